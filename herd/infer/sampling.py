"""Sampling parameters and the logits -> next-token step (batched, on device, no Python per vocab entry)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    """How to pick tokens. temperature 0 is greedy; the filters apply in the order of the fields."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # nucleus mass kept; 1: off
    min_p: float = 0.0  # drop tokens below min_p * p(best); 0: off
    repetition_penalty: float = 1.0  # >1 discourages tokens already in prompt or output (CTRL-style)
    seed: int | None = None
    stop: list[str] = field(default_factory=list)  # stop strings (the text is cut before them)
    stop_ids: frozenset[int] | None = None  # None: the tokenizer's <|eot|>, <|eom|>, <|end_of_text|>

    def __post_init__(self) -> None:
        checks = [("max_new_tokens", self.max_new_tokens >= 0), ("temperature", self.temperature >= 0),
                  ("top_k", self.top_k >= 0), ("top_p", 0 < self.top_p <= 1), ("min_p", 0 <= self.min_p < 1),
                  ("repetition_penalty", self.repetition_penalty > 0)]
        for name, ok in checks:
            if not ok:
                raise ValueError(f"invalid sampling parameter {name}={getattr(self, name)!r}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_repetition_penalty(logits_BV: torch.Tensor, seen_BV: torch.Tensor, penalty: float) -> torch.Tensor:
    """Divide positive / multiply negative logits of tokens already seen (seen_BV: bool)."""
    if penalty == 1.0:
        return logits_BV
    penalised = torch.where(logits_BV > 0, logits_BV / penalty, logits_BV * penalty)
    return torch.where(seen_BV, penalised, logits_BV)


def filter_logits(logits_BV: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p masks (-inf) on fp32 logits."""
    logits = logits_BV.float() / p.temperature
    if p.top_k and p.top_k < logits.shape[-1]:
        kth = torch.topk(logits, p.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass before it already reaches top_p (the best token always stays)
        drop_sorted = probs.cumsum(-1) - probs >= p.top_p
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    if p.min_p > 0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < p.min_p * probs.max(-1, keepdim=True).values, float("-inf"))
    return logits


def sample(logits_BV: torch.Tensor, p: SamplingParams, seen_BV: torch.Tensor | None = None,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """[B, V] logits -> [B] token ids."""
    if seen_BV is not None:
        logits_BV = apply_repetition_penalty(logits_BV, seen_BV, p.repetition_penalty)
    if p.greedy:
        return logits_BV.argmax(-1)
    probs = filter_logits(logits_BV, p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
