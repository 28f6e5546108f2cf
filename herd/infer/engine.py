"""The generation engine: chunked prefill, batched decode over a chunk-aware KV cache, sampling, stop rules,
streaming text.

Prompts of different lengths are prefilled one row at a time (each row of the cache has its own length and
positions), then decoded together, so a batched greedy run gives exactly what each prompt gives alone.

A prompt may come with images (the pixel tiles of its <|patch|> spans, herd.images): they are encoded once per
distinct image set (an LRU of recent features, so the next turn of a chat does not re-encode them) and their
features replace the placeholders during prefill; decoding never touches them again.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from herd.infer.cache import KVCache
from herd.infer.decode_modules import decode_model
from herd.infer.sampling import SamplingParams, TokenLogprob, sample, token_logprobs
from herd.model import Transformer
from herd.model.moe import pick_grouped_mm_backend, set_grouped_mm_backend
from herd.tokenizer import Tokenizer


@dataclass
class Completion:
    prompt_ids: list[int]
    token_ids: list[int]  # generated ids, including the stop token when one ended the generation
    text: str  # decoded text, without the stop token / stop string
    stop_reason: str  # "stop_token" | "stop_string" | "length"
    logprobs: list[TokenLogprob] | None = None  # per generated token, when SamplingParams.logprobs is set


class Row:
    """Per-prompt bookkeeping: ids, incremental text, stop rules."""

    def __init__(self, prompt: list[int], tokenizer: Tokenizer | None, params: SamplingParams, stop_ids: set[int]):
        self.prompt, self.ids, self.params, self.stop_ids = prompt, [], params, stop_ids
        self.decoder = tokenizer.stream_decoder() if tokenizer is not None else None
        self.text, self.emitted, self.reason = "", 0, None
        self.logprobs: list[TokenLogprob] | None = [] if params.logprobs is not None else None

    @property
    def done(self) -> bool:
        return self.reason is not None

    def push(self, token: int, logprob: TokenLogprob | None = None) -> None:
        self.ids.append(token)
        if self.logprobs is not None and logprob is not None:
            self.logprobs.append(logprob)
        if token in self.stop_ids:
            self.reason = "stop_token"
        elif self.decoder is not None:
            self.text += self.decoder.push(token)
            for s in self.params.stop:
                cut = self.text.find(s)
                if cut >= 0:
                    self.text, self.reason = self.text[:cut], "stop_string"
        if self.reason is None and len(self.ids) >= self.params.max_new_tokens:
            self.reason = "length"
        if self.reason is not None and self.reason != "stop_string" and self.decoder is not None:
            self.text += self.decoder.flush()

    def delta(self) -> str:
        """New text safe to show: while generating, hold back a tail that may still become a stop string."""
        end = len(self.text)
        if not self.done:
            for s in self.params.stop:
                for n in range(min(len(s) - 1, end), 0, -1):
                    if self.text.endswith(s[:n]):
                        end = min(end, len(self.text) - n)
                        break
        out, self.emitted = self.text[self.emitted:end], max(self.emitted, end)
        return out


class _StaticStep:
    """The cache as a compiled decode step sees it: tensor-only updates; the engine advances the lengths."""

    def __init__(self, cache: KVCache):
        self.cache = cache

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor):
        return self.cache.update_static(layer, k, v, positions)

    def advance(self, T: int) -> None:
        pass


# Inductor options for the CPU decode step (measured on small bf16: together +25% tok/s, benchmarks/RESULTS.md).
# Materialise small intermediates (a normed hidden state, a scaled expert input) instead of recomputing them
# inside every matvec loop that reads them: at one row the recomputation is per weight row, which made the
# LM head compute-bound. A C++ wrapper calls the ~100 kernels of a step without Python in between.
_CPU_DECODE_OPTIONS = {"realize_cpu_opcount_threshold": 4, "realize_cpu_acc_reads_threshold": 2,
                       "realize_reads_threshold": 1, "cpp_wrapper": True}
_IMAGE_LRU = 8  # image sets whose features the engine keeps


class Engine:
    """``compile=True`` runs decode steps through torch.compile (CUDA graphs on GPU): the first steps of each
    new batch size / cache length pay for compilation."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer | None = None, prefill_chunk: int = 512,
                 compile: bool = False):
        self.model, self.tokenizer, self.prefill_chunk = model.eval(), tokenizer, prefill_chunk
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype if p.is_floating_point() else torch.bfloat16
        self._compiled = None
        self._image_features: OrderedDict[str, torch.Tensor] = OrderedDict()  # pixels digest -> features
        set_grouped_mm_backend(model, pick_grouped_mm_backend(self.device, self.dtype))
        if compile:
            self._decode_model = decode_model(model)  # decode subclasses on a parameter-sharing copy
            if self.device.type == "cuda":
                self._compiled = torch.compile(self._static_decode, mode="reduce-overhead", dynamic=False)
            else:
                self._compiled = torch.compile(self._static_decode, dynamic=False, options=_CPU_DECODE_OPTIONS)

    def _static_decode(self, ids_B1: torch.Tensor, positions_B1: torch.Tensor, step: _StaticStep) -> torch.Tensor:
        return self._decode_model(ids_B1, positions=positions_B1, cache=step, last_only=True)

    def _decode(self, cache: KVCache, ids_B1: torch.Tensor) -> torch.Tensor:
        if self._compiled is None:
            return self.model(ids_B1, cache=cache, last_only=True)
        logits = self._compiled(ids_B1, cache.positions(1), _StaticStep(cache))
        cache.advance(1)
        return logits

    def _new_cache(self, batch: int, max_len: int) -> KVCache:
        if self._compiled is not None:
            # fixed shapes: round the cache up so that nearby lengths share one compiled graph
            max_len = min(-(-max_len // 256) * 256, self.model.cfg.max_seq_len)
        cache = KVCache(self.model.cfg, batch, max_len, self.dtype, self.device)
        if self._compiled is not None and self.device.type == "cuda":
            for t in (*cache.k, *cache.v, cache.ring_pos):
                torch._dynamo.mark_static_address(t)  # updated in place inside the CUDA graph
        return cache

    def _features(self, pixels: torch.Tensor) -> torch.Tensor:
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

    def _prefill(self, view, prompt: list[int], pixels: torch.Tensor | None) -> torch.Tensor:
        for logits in self.prefill_chunks(view, prompt, pixels):
            pass
        return logits

    def prefill_chunks(self, view, prompt: list[int], pixels: torch.Tensor | None,
                       prompt_logprobs: tuple[int, list[TokenLogprob]] | None = None
                       ) -> Iterator[torch.Tensor | None]:
        """Prefill one row chunk by chunk into its cache view, yielding None after each chunk but the last and
        then the last position's fp32 logits [V] (a scheduler interleaves the chunks with decode steps). Image
        features are consumed in order as their placeholders come. ``prompt_logprobs`` = (n, out): append to
        ``out`` the logprob and top-n alternatives of every prompt token after the first (one chunk of logits at
        a time, never [T, V] for the whole prompt)."""
        features, used = (self._features(pixels) if pixels is not None else None), 0
        last_only = prompt_logprobs is None
        for start in range(0, len(prompt), self.prefill_chunk):
            if start:
                yield None
            ids = prompt[start:start + self.prefill_chunk]
            piece = torch.tensor([ids], device=self.device)
            if features is None:
                logits = self.model(piece, cache=view, last_only=last_only)
            else:
                n = sum(t == self.model.cfg.image_token_id for t in ids)
                embeds = self.model.embed(piece, features[used:used + n])
                used += n
                logits = self.model(embeds=embeds, cache=view, last_only=last_only)
            if prompt_logprobs is not None:  # position t predicts prompt token t + 1
                targets = torch.tensor(prompt[start + 1:start + 1 + len(ids)], device=self.device)
                top, out = prompt_logprobs
                out += token_logprobs(logits[0, :len(targets)], targets, top)
        yield logits[0, -1].float()

    def stop_ids(self, params: SamplingParams) -> set[int]:
        if params.stop_ids is not None:
            return set(params.stop_ids)
        return set(self.tokenizer.stop_ids) if self.tokenizer is not None else set()

    @torch.inference_mode()
    def _steps(self, prompts: Sequence[list[int]], params: SamplingParams,
               images: Sequence[torch.Tensor | None] | None = None) -> Iterator[list[Row]]:
        """Yield the rows after every decode step until all are done."""
        cfg = self.model.cfg
        images = images if images is not None else [None] * len(prompts)
        self.check_inputs(prompts, images)
        rows = [Row(list(p), self.tokenizer, params, self.stop_ids(params)) for p in prompts]
        if params.max_new_tokens == 0:
            yield rows
            return
        max_len = max(len(p) for p in prompts) + params.max_new_tokens
        if max_len > cfg.max_seq_len:
            raise ValueError(f"prompt + max_new_tokens = {max_len} exceeds the model's context ({cfg.max_seq_len})")
        cache = self._new_cache(len(prompts), max_len)
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(params.seed)
        seen, counts = None, None
        if params.counts_output:
            counts = torch.zeros(len(prompts), cfg.vocab_size, dtype=torch.int32, device=self.device)
        if params.repetition_penalty != 1.0:
            seen = torch.zeros(len(prompts), cfg.vocab_size, dtype=torch.bool, device=self.device)
            for b, p in enumerate(prompts):
                seen[b, torch.tensor(p, device=self.device)] = True
        # chunked prefill, one row at a time: memory is bounded by prefill_chunk, not by the prompt
        last = torch.empty(len(prompts), cfg.vocab_size, device=self.device)
        for b, (prompt, pixels) in enumerate(zip(prompts, images)):
            last[b] = self._prefill(cache.row(b), prompt, pixels)
        while True:
            next_ids = sample(last, params, seen, generator, counts)
            logprobs = (token_logprobs(last, next_ids, params.logprobs) if params.logprobs is not None
                        else [None] * len(rows))
            for row, token, lp in zip(rows, next_ids.tolist(), logprobs):
                if not row.done:
                    row.push(token, lp)
            yield rows
            if all(r.done for r in rows):
                return
            if seen is not None:
                seen.scatter_(1, next_ids[:, None], True)
            if counts is not None:
                counts.scatter_add_(1, next_ids[:, None], torch.ones_like(next_ids[:, None], dtype=torch.int32))
            last = self._decode(cache, next_ids[:, None])[:, -1].float()

    def generate(self, prompts: Sequence[list[int]], params: SamplingParams | None = None,
                 images: Sequence[torch.Tensor | None] | None = None) -> list[Completion]:
        """Complete every prompt (token id lists); batched, each row stops on its own. images[i]: the tiles
        [N, 3, H, W] of prompt i's images in <|patch|>-span order (None: a text prompt)."""
        params = params or SamplingParams()
        rows: list[Row] = []
        for rows in self._steps(prompts, params, images):
            pass
        return [Completion(r.prompt, r.ids, r.text, r.reason or "length", r.logprobs) for r in rows]

    def stream(self, prompt: list[int], params: SamplingParams | None = None,
               images: torch.Tensor | None = None) -> Iterator[str]:
        """Text deltas of one completion as they are generated (never a broken UTF-8 character, never the
        beginning of a stop string that might still complete)."""
        if self.tokenizer is None:
            raise ValueError("streaming text needs a tokenizer: Engine(model, tokenizer)")
        for (row,) in self._steps([prompt], params or SamplingParams(), [images]):
            delta = row.delta()
            if delta:
                yield delta
