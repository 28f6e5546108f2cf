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
    presence_penalty: float = 0.0  # OpenAI's: subtracted once from the logit of every token already generated
    frequency_penalty: float = 0.0  # OpenAI's: subtracted per time a token was already generated
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit (OpenAI: -100 bans, 100 forces)
    logprobs: int | None = None  # report each token's log-probability and the top-N alternatives; None: off
    seed: int | None = None
    stop: list[str] = field(default_factory=list)  # stop strings (the text is cut before them)
    stop_ids: frozenset[int] | None = None  # None: the tokenizer's <|eot|>, <|eom|>, <|end_of_text|>

    def __post_init__(self) -> None:
        checks = [("max_new_tokens", self.max_new_tokens >= 0), ("temperature", self.temperature >= 0),
                  ("top_k", self.top_k >= 0), ("top_p", 0 < self.top_p <= 1), ("min_p", 0 <= self.min_p < 1),
                  ("repetition_penalty", self.repetition_penalty > 0),
                  ("logprobs", self.logprobs is None or self.logprobs >= 0)]
        for name, ok in checks:
            if not ok:
                raise ValueError(f"invalid sampling parameter {name}={getattr(self, name)!r}")
        # torch.Generator.manual_seed takes [-2^63, 2^64)
        if self.seed is not None and (not isinstance(self.seed, int) or not -2**63 <= self.seed < 2**64):
            raise ValueError(f"invalid sampling parameter seed={self.seed!r}: an integer in [-2^63, 2^64)")
        if isinstance(self.stop, str):
            self.stop = [self.stop]

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def counts_output(self) -> bool:
        """Whether sampling needs the counts of the tokens generated so far."""
        return bool(self.presence_penalty or self.frequency_penalty)

    @property
    def adjusts_logits(self) -> bool:
        return self.counts_output or bool(self.logit_bias)


def apply_repetition_penalty(logits_BV: torch.Tensor, seen_BV: torch.Tensor, penalty: float) -> torch.Tensor:
    """Divide positive / multiply negative logits of tokens already seen (seen_BV: bool)."""
    if penalty == 1.0:
        return logits_BV
    penalised = torch.where(logits_BV > 0, logits_BV / penalty, logits_BV * penalty)
    return torch.where(seen_BV, penalised, logits_BV)


def adjust_logits(logits_BV: torch.Tensor, p: SamplingParams, counts_BV: torch.Tensor | None = None) -> torch.Tensor:
    """OpenAI's logit adjustments, before temperature and filters: logit_bias, then presence and frequency
    penalties from counts_BV, the times each token was generated so far."""
    if p.logit_bias:
        ids = torch.tensor(list(p.logit_bias), device=logits_BV.device)
        bias = torch.tensor(list(p.logit_bias.values()), device=logits_BV.device, dtype=torch.float32)
        logits_BV = logits_BV.float().index_add(-1, ids, bias.expand(logits_BV.shape[0], -1))
    if counts_BV is not None and p.counts_output:
        counts = counts_BV.float()
        logits_BV = logits_BV - p.frequency_penalty * counts - p.presence_penalty * (counts > 0).float()
    return logits_BV


@dataclass
class TokenLogprob:
    token: int
    logprob: float
    top: list[tuple[int, float]]  # the most likely tokens at this step, best first: (id, logprob)


def token_logprobs(logits_BV: torch.Tensor, tokens_B: torch.Tensor, n: int) -> list[TokenLogprob]:
    """Per row: the chosen token's log-probability under the model's own distribution (the logits as the model
    gave them, before penalties, temperature and filters, as vLLM reports by default), and the n most likely
    tokens with theirs."""
    logp = logits_BV.float().log_softmax(-1)
    chosen = logp.gather(-1, tokens_B[:, None])[:, 0].tolist()
    values, ids = logp.topk(min(n, logp.shape[-1]), dim=-1)
    return [TokenLogprob(t, c, list(zip(i, v)))
            for t, c, i, v in zip(tokens_B.tolist(), chosen, ids.tolist(), values.tolist())]


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
           generator: torch.Generator | None = None, counts_BV: torch.Tensor | None = None) -> torch.Tensor:
    """[B, V] logits -> [B] token ids. seen_BV: tokens in prompt or output (repetition penalty); counts_BV:
    times each token was generated (presence and frequency penalties)."""
    if seen_BV is not None:
        logits_BV = apply_repetition_penalty(logits_BV, seen_BV, p.repetition_penalty)
    if p.adjusts_logits:
        logits_BV = adjust_logits(logits_BV, p, counts_BV)
    if p.greedy:
        return logits_BV.argmax(-1)
    probs = filter_logits(logits_BV, p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
