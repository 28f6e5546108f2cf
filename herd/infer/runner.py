"""The model as the decode core runs it: prefill forwards, the (compiled) decode step, image features, and weights
that change under a live engine.

Inference transforms, applied from outside the model in this order (torchtitan's rule: one place, one order):
  1. quantization: module swaps, at load (a quantized checkpoint, herd.checkpoint) or by
     ``herd.infer.quantize.quantize(model, scheme)`` before the engine is built;
  2. the routed experts' grouped-matmul backend for the device and dtype (``pick_grouped_mm_backend``);
  3. decode specialisation: ``decode_model(model)``, a copy sharing every parameter, with decode-shaped modules
     swapped in (herd.infer.decode_modules); the caller's model is left as it is;
  4. compilation of the decode step over that copy.

``compile=True`` runs decode steps through torch.compile (CUDA graphs on GPU) with fixed shapes: one graph per
batch-size bucket (1, 2, 4, ... rows: the rows past the running ones ride along as padding, as vLLM captures
a graph per batch size) and per power-of-2 bucket of cache slots attended. The first step of each new bucket pays
for its compilation.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Mapping, Sequence

import torch

from herd.infer.cache import KVCache
from herd.infer.decode_modules import decode_model
from herd.infer.sampling import SamplingParams
from herd.model import Transformer
from herd.model.moe import pick_grouped_mm_backend, set_grouped_mm_backend
from herd.tokenizer import Tokenizer

# Inductor options for the CPU decode step (measured on small bf16: together +25% tok/s, benchmarks/RESULTS.md).
# Materialise small intermediates (a normed hidden state, a scaled expert input) instead of recomputing them
# inside every matvec loop that reads them: at one row the recomputation is per weight row, which made the
# LM head compute-bound. A C++ wrapper calls the ~100 kernels of a step without Python in between.
_CPU_DECODE_OPTIONS = {"realize_cpu_opcount_threshold": 4, "realize_cpu_acc_reads_threshold": 2,
                       "realize_reads_threshold": 1, "cpp_wrapper": True}
_IMAGE_LRU = 8  # image sets whose features the engine keeps
MIN_SLOTS = 256  # the smallest bucket of cache slots a compiled step attends over


def bucket(n: int, smallest: int = 1) -> int:
    """The power of 2 >= max(n, smallest)."""
    return 1 << (max(n, smallest) - 1).bit_length()


class ModelRunner:
    def __init__(self, model: Transformer, tokenizer: Tokenizer | None = None, prefill_chunk: int = 512,
                 compile: bool = False):
        self.model, self.tokenizer, self.prefill_chunk = model.eval(), tokenizer, prefill_chunk
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype if p.is_floating_point() else torch.bfloat16
        self.weights_version = 0  # bumped by update_weights: cores re-prefill what they hold
        self._compiled = None
        self._image_features: OrderedDict[str, torch.Tensor] = OrderedDict()  # pixels digest -> features
        set_grouped_mm_backend(model, pick_grouped_mm_backend(self.device, self.dtype))
        if compile:
            self._decode_model = decode_model(model)  # decode subclasses on a parameter-sharing copy
            if self.device.type == "cuda":
                self._compiled = torch.compile(self._static_decode, mode="reduce-overhead", dynamic=False)
            else:
                self._compiled = torch.compile(self._static_decode, dynamic=False, options=_CPU_DECODE_OPTIONS)

    @property
    def compiled(self) -> bool:
        return self._compiled is not None

    # -- the decode step ----------------------------------------------------------------------------------------
    def _static_decode(self, ids_B1: torch.Tensor, positions_B1: torch.Tensor, step) -> torch.Tensor:
        return self._decode_model(ids_B1, positions=positions_B1, cache=step, last_only=True)

    def decode(self, cache: KVCache, ids: list[int], min_rows: int = 1) -> torch.Tensor:
        """One token for each of the rows [0, n) of ``cache`` (n = len(ids)): fp32 logits [n, V]; the rows'
        lengths advance by one. Compiled, the step runs over a bucket of >= max(n, min_rows) rows."""
        n = len(ids)
        if self._compiled is None:
            ids_n1 = torch.tensor(ids, device=self.device)[:, None]
            return self.model(ids_n1, cache=cache.rows(0, n), last_only=True)[:, -1].float()
        rows = min(bucket(n, min_rows), len(cache.lengths))
        lengths = cache.lengths[:rows]
        slots = min(bucket(max(lengths) + 1, MIN_SLOTS), cache.max_len)
        view = cache.static(rows, slots)
        if self.device.type == "cuda" and not view.static_marked:
            for t in view.tensors():
                torch._dynamo.mark_static_address(t)  # written in place inside the CUDA graph
            view.static_marked = True
        ids_B1 = torch.tensor(ids + [0] * (rows - n), device=self.device)[:, None]
        positions_B1 = torch.tensor(lengths, device=self.device)[:, None]
        logits = self._compiled(ids_B1, positions_B1, view)[:n, -1].float()
        for i in range(n):
            cache.lengths[i] += 1
        return logits

    @torch.inference_mode()
    def warmup(self, cache: KVCache) -> list[int]:
        """Compile the decode step for every batch-size bucket of ``cache`` (over its first slot bucket) now rather
        than at the first step that reaches it, as vLLM captures its graphs at start-up. Leaves the cache empty:
        call it before any sequence is in. Returns the buckets compiled (none when the step is eager)."""
        if self._compiled is None:
            return []
        rows = len(cache.lengths)
        buckets = [min(1 << i, rows) for i in range((rows - 1).bit_length() + 1)]
        for b in buckets:
            self.decode(cache, [0] * b)
        for b in range(rows):
            cache.reset_row(b)
        return buckets

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        if self._compiled is not None:
            # fixed shapes: round the cache up so that nearby lengths share compiled graphs
            max_len = min(-(-max_len // MIN_SLOTS) * MIN_SLOTS, self.model.cfg.max_seq_len)
        return KVCache(self.model.cfg, batch, max_len, self.dtype, self.device)

    # -- prefill --------------------------------------------------------------------------------------------------
    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Vision features of the tiles [N, 3, H, W], from the LRU when these exact pixels were seen lately."""
        data = pixels.detach().cpu().contiguous()
        key = f"{tuple(data.shape)}{data.dtype}" + hashlib.sha1(data.view(torch.uint8).numpy()).hexdigest()
        if key in self._image_features:
            self._image_features.move_to_end(key)
        else:
            self._image_features[key] = self.model.encode_images(pixels.to(self.device))
            if len(self._image_features) > _IMAGE_LRU:
                self._image_features.popitem(last=False)
        return self._image_features[key]

    def check_inputs(self, prompts: Sequence[list[int]], images: Sequence[torch.Tensor | None]) -> None:
        """ValueError naming the first prompt that is empty, holds an id outside the vocabulary, or whose image
        tiles do not fit its <|patch|> placeholders."""
        vocab = self.model.cfg.vocab_size
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError(f"prompt {i} is empty: give at least one token (e.g. <|begin_of_text|>)")
            bad = [t for t in p if not 0 <= t < vocab]
            if bad:
                raise ValueError(f"prompt {i} holds token id {bad[0]} outside the vocabulary [0, {vocab})")
        if len(images) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(images)} image entries (give None for a text prompt)")
        cfg = self.model.cfg
        for i, (p, pixels) in enumerate(zip(prompts, images)):
            if pixels is None:
                continue
            if self.model.vision is None:
                raise ValueError("this model has no vision tower (its config has no vision_config): it cannot "
                                 "take images")
            v, n = cfg.vision, sum(t == cfg.image_token_id for t in p)
            if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (v.n_channels, v.image_size, v.image_size):
                raise ValueError(f"prompt {i}: image tiles must be [N, {v.n_channels}, {v.image_size}, "
                                 f"{v.image_size}], got {list(pixels.shape)}")
            if n != pixels.shape[0] * v.tokens_per_tile:
                raise ValueError(f"prompt {i} has {n} <|patch|> placeholders but its {pixels.shape[0]} image tiles "
                                 f"give {pixels.shape[0] * v.tokens_per_tile} features ({v.tokens_per_tile} per tile)")

    def stop_ids(self, params: SamplingParams) -> set[int]:
        if params.stop_ids is not None:
            return set(params.stop_ids)
        return set(self.tokenizer.stop_ids) if self.tokenizer is not None else set()

    # -- weights --------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def update_weights(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load new values into the live model's parameters and buffers, in place: names as in
        ``model.state_dict()``, same shapes (any floating dtype is cast); a subset is fine (e.g. only the
        trained ones). Everything is checked before anything is copied, so a bad entry changes nothing.

        In place keeps every tensor where compiled graphs (and CUDA graphs) read it: no recompilation. Cached
        image features are dropped, and every core re-prefills what its sequences hold at its next step, so
        what follows is what a fresh engine on the new weights gives. Not thread-safe against a running step:
        the server's scheduler calls it between steps (``Scheduler.update_weights``)."""
        own = self.model.state_dict(keep_vars=True)
        for name, value in state.items():
            if name not in own:
                raise KeyError(f"update_weights: the model has no parameter or buffer {name!r}")
            if tuple(value.shape) != tuple(own[name].shape):
                raise ValueError(f"update_weights: {name} is {list(own[name].shape)} in the model, "
                                 f"{list(value.shape)} in the update")
            if value.is_floating_point() != own[name].is_floating_point():
                raise ValueError(f"update_weights: {name} is {own[name].dtype} in the model, {value.dtype} in the "
                                 f"update")
        for name, value in state.items():
            own[name].copy_(value)
        self._image_features.clear()
        self.weights_version += 1
