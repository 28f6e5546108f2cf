"""The generation engine: ``generate`` a batch of prompts to completion, or ``stream`` one, through the decode core
(herd.infer.core): chunked prefill over a chunk-aware KV cache, batched decode, per-sequence sampling, stop rules,
streaming text.

A prompt may come with images (the pixel tiles of its <|patch|> spans, herd.images): they are encoded once per
distinct image set (an LRU of recent features, so the next turn of a chat does not re-encode them) and their
features replace the placeholders during prefill; decoding never touches them again.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from herd.infer import core
from herd.infer.core import DecodeCore, Row
from herd.infer.runner import ModelRunner
from herd.infer.sampling import SamplingParams, TokenLogprob


@dataclass
class Completion:
    prompt_ids: list[int]
    token_ids: list[int]  # generated ids, including the stop token when one ended the generation
    text: str  # decoded text, without the stop token / stop string
    stop_reason: str  # "stop_token" | "stop_string" | "length"
    logprobs: list[TokenLogprob] | None = None  # per generated token, when SamplingParams.logprobs is set


class Engine(ModelRunner):
    """``Engine(model, tokenizer, prefill_chunk=512, compile=False)``: see herd.infer.runner for ``compile`` and
    ``update_weights`` (new weights under a live engine)."""

    def core(self, max_batch: int, max_len: int, min_bucket: int = 1) -> DecodeCore:
        """A decode core of ``max_batch`` rows of ``max_len`` tokens on this engine (the server's scheduler and RL
        rollouts step one)."""
        return DecodeCore(self, max_batch, max_len, min_bucket)

    def steps(self, prompts: Sequence[list[int]], params: SamplingParams,
              images: Sequence[torch.Tensor | None] | None = None) -> Iterator[list[Row]]:
        """Yield the rows after the prefill and after every decode step until all are done. A seeded batch
        draws row i from seed + i, so that row i is what prompt i gives alone with that seed."""
        if not prompts:
            raise ValueError("no prompts to generate from")
        images = images if images is not None else [None] * len(prompts)
        self.check_inputs(prompts, images)
        max_len = max(len(p) for p in prompts) + params.max_new_tokens
        if max_len > self.model.cfg.max_seq_len:
            raise ValueError(f"prompt + max_new_tokens = {max_len} exceeds the model's context "
                             f"({self.model.cfg.max_seq_len})")
        seqs = [core.Sequence(list(p), params if params.seed is None else  # torch seeds are 64-bit: wrap
                              dataclasses.replace(params, seed=(params.seed + i) % 2**64), pixels)
                for i, (p, pixels) in enumerate(zip(prompts, images))]
        batch = self.core(len(prompts), max_len, min_bucket=len(prompts))
        yielded = False
        for _ in batch.run(seqs):
            _raise_first_error(seqs)
            yielded = True
            yield [s.row for s in seqs]
        _raise_first_error(seqs)
        if not yielded:  # nothing to generate: max_new_tokens == 0
            yield [s.row for s in seqs]

    def generate(self, prompts: Sequence[list[int]], params: SamplingParams | None = None,
                 images: Sequence[torch.Tensor | None] | None = None) -> list[Completion]:
        """Complete every prompt (token id lists); batched, each row stops on its own. images[i]: the tiles
        [N, 3, H, W] of prompt i's images in <|patch|>-span order (None: a text prompt)."""
        params = params or SamplingParams()
        rows: list[Row] = []
        for rows in self.steps(prompts, params, images):
            pass
        return [Completion(r.prompt, r.ids, r.text, r.reason or "length", r.logprobs) for r in rows]

    def stream(self, prompt: list[int], params: SamplingParams | None = None,
               images: torch.Tensor | None = None) -> Iterator[str]:
        """Text deltas of one completion as they are generated (never a broken UTF-8 character, never the
        beginning of a stop string that might still complete)."""
        if self.tokenizer is None:
            raise ValueError("streaming text needs a tokenizer: Engine(model, tokenizer)")
        for (row,) in self.steps([prompt], params or SamplingParams(), [images]):
            delta = row.delta()
            if delta:
                yield delta


def _raise_first_error(seqs: list[core.Sequence]) -> None:
    failed = next((s.error for s in seqs if s.error is not None), None)
    if failed is not None:
        raise failed
