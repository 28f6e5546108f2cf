"""The generation engine: chunked prefill, batched decode over a chunk-aware KV cache, sampling, stop rules,
streaming text.

Prompts of different lengths are prefilled one row at a time (each row of the cache has its own length and
positions), then decoded together, so a batched greedy run gives exactly what each prompt gives alone.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from herd.infer.cache import KVCache
from herd.infer.sampling import SamplingParams, sample
from herd.model import Transformer
from herd.tokenizer import Tokenizer


@dataclass
class Completion:
    prompt_ids: list[int]
    token_ids: list[int]  # generated ids, including the stop token when one ended the generation
    text: str  # decoded text, without the stop token / stop string
    stop_reason: str  # "stop_token" | "stop_string" | "length"


class _Row:
    """Per-prompt bookkeeping: ids, incremental text, stop rules."""

    def __init__(self, prompt: list[int], tokenizer: Tokenizer | None, params: SamplingParams, stop_ids: set[int]):
        self.prompt, self.ids, self.params, self.stop_ids = prompt, [], params, stop_ids
        self.decoder = tokenizer.stream_decoder() if tokenizer is not None else None
        self.text, self.emitted, self.reason = "", 0, None

    @property
    def done(self) -> bool:
        return self.reason is not None

    def push(self, token: int) -> None:
        self.ids.append(token)
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


class Engine:
    def __init__(self, model: Transformer, tokenizer: Tokenizer | None = None, prefill_chunk: int = 512):
        self.model, self.tokenizer, self.prefill_chunk = model.eval(), tokenizer, prefill_chunk
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype if p.is_floating_point() else torch.bfloat16

    def _stop_ids(self, params: SamplingParams) -> set[int]:
        if params.stop_ids is not None:
            return set(params.stop_ids)
        return set(self.tokenizer.stop_ids) if self.tokenizer is not None else set()

    @torch.inference_mode()
    def _steps(self, prompts: Sequence[list[int]], params: SamplingParams) -> Iterator[list[_Row]]:
        """Yield the rows after every decode step until all are done."""
        cfg = self.model.cfg
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError(f"prompt {i} is empty: give at least one token (e.g. <|begin_of_text|>)")
            if max(p) >= cfg.vocab_size or min(p) < 0:
                raise ValueError(f"prompt {i} holds token id {max(p)} outside the vocabulary ({cfg.vocab_size})")
        rows = [_Row(list(p), self.tokenizer, params, self._stop_ids(params)) for p in prompts]
        if params.max_new_tokens == 0:
            yield rows
            return
        max_len = max(len(p) for p in prompts) + params.max_new_tokens
        if max_len > cfg.max_seq_len:
            raise ValueError(f"prompt + max_new_tokens = {max_len} exceeds the model's context ({cfg.max_seq_len})")
        cache = KVCache(cfg, len(prompts), max_len, self.dtype, self.device)
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(params.seed)
        seen = None
        if params.repetition_penalty != 1.0:
            seen = torch.zeros(len(prompts), cfg.vocab_size, dtype=torch.bool, device=self.device)
            for b, p in enumerate(prompts):
                seen[b, torch.tensor(p, device=self.device)] = True
        # chunked prefill, one row at a time: memory is bounded by prefill_chunk, not by the prompt
        last = torch.empty(len(prompts), cfg.vocab_size, device=self.device)
        for b, prompt in enumerate(prompts):
            view = cache.row(b)
            for start in range(0, len(prompt), self.prefill_chunk):
                piece = torch.tensor([prompt[start:start + self.prefill_chunk]], device=self.device)
                logits = self.model(piece, cache=view, last_only=True)
            last[b] = logits[0, -1].float()
        while True:
            next_ids = sample(last, params, seen, generator)
            for row, token in zip(rows, next_ids.tolist()):
                if not row.done:
                    row.push(token)
            yield rows
            if all(r.done for r in rows):
                return
            if seen is not None:
                seen.scatter_(1, next_ids[:, None], True)
            last = self.model(next_ids[:, None], cache=cache, last_only=True)[:, -1].float()

    def generate(self, prompts: Sequence[list[int]], params: SamplingParams | None = None) -> list[Completion]:
        """Complete every prompt (token id lists); batched, each row stops on its own."""
        params = params or SamplingParams()
        rows: list[_Row] = []
        for rows in self._steps(prompts, params):
            pass
        return [Completion(r.prompt, r.ids, r.text, r.reason or "length") for r in rows]

    def stream(self, prompt: list[int], params: SamplingParams | None = None) -> Iterator[str]:
        """Text deltas of one completion as they are generated (never a broken UTF-8 character, never the
        beginning of a stop string that might still complete)."""
        if self.tokenizer is None:
            raise ValueError("streaming text needs a tokenizer: Engine(model, tokenizer)")
        for (row,) in self._steps([prompt], params or SamplingParams()):
            delta = row.delta()
            if delta:
                yield delta

    def stream_ids(self, prompt: list[int], params: SamplingParams | None = None) -> Iterator[int]:
        """Generated token ids one at a time."""
        for (row,) in self._steps([prompt], params or SamplingParams()):
            if row.ids:
                yield row.ids[-1]
