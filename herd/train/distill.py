"""Distillation losses: a per-token mixture of the hard cross-entropy and a temperature-scaled divergence to a
teacher, with a fixed, scheduled or per-token (dynamic) weight.

Notation, per token t with target y_t: z_S, z_T the student's and teacher's logits over V ids; τ the temperature;
q = softmax(z_S / τ), p = softmax(z_T / τ) (at τ = 1: q¹, p¹); m_t the loss mask; n the token count.

The loss (``distill_loss``)::

    L = (1/n) Σ_t m_t [ (1 − a_t)·CE_t + a_t·τ²·D_t ]         CE_t = −log q¹(y_t)         (herd's cross_entropy)

``n`` = Σ_t m_t, or the ``n_tokens`` given (data parallelism passes the global batch's count, as for
``herd.train.losses.cross_entropy``); targets < 0 (IGNORE) are masked. τ² keeps the soft gradients' scale
comparable to the hard ones' across temperatures (Hinton et al. 2015): ∂(τ² D)/∂z_S is O(τ⁰·(q − p)·τ).

Divergences D_t (``DistillSpec.divergence``), summed over the vocabulary (or over the top-k buckets, below)::

    forward_kl   KL(p ‖ q) = Σ_v p_v (log p_v − log q_v)                   mean-seeking (Hinton's KD)
    reverse_kl   KL(q ‖ p) = Σ_v q_v (log q_v − log p_v)                   mode-seeking (MiniLLM)
    jsd          JSD_β = β·KL(p ‖ μ) + (1 − β)·KL(q ‖ μ),  μ = β·p + (1 − β)·q     (GKD, arXiv 2306.13649)

``jsd`` is TRL's ``generalized_jsd_loss`` (trl.experimental.gkd) term for term, its endpoints included: β = 0 is
forward KL and β = 1 reverse KL there (the formula's own limits vanish; TRL special-cases them, and so does herd).
TRL has no τ² factor: herd's soft term is τ²·TRL's. Terms with p_v = 0 count 0 (0·log 0 = 0).

Weights a_t (``DistillSpec.weight``), always detached (no gradient flows through a_t)::

    fixed        a_t = α
    scheduled    a_t = s(step),  s = α₁ + (α₀ − α₁)·½(1 + cos π·u)  (cosine)  or  α₀ + (α₁ − α₀)·u  (linear),
                 u = min(1, step / (total_steps − 1))  (step 0-based: step 0 gives α₀, the last step α₁)
    dynamic      a_t = clip(s(step)·c_t, 0, 1), the teacher's trust c_t (``DistillSpec.confidence``):
                   teacher_prob     c_t = p¹(y_t)                          the teacher is right here
                   teacher_entropy  c_t = 1 − H(p¹)/log V                  the teacher is sure here
                   gap              c_t = 1 − exp(−CE_t / CE_T,t),  CE_T,t = −log p¹(y_t)
                                    (Weighted Soft Labels, arXiv 2102.00650: lean on the teacher where the student
                                    is worse than it; CE_T is floored at 1e-6)

Tokens without teacher targets (``TeacherTargets.valid`` false) get a_t = 0 (plain cross entropy). With a_t = 0 on
every token, L is herd's ``cross_entropy`` bit for bit (value and gradients).

Teacher targets (``TeacherTargets``) come either as full logits (an online teacher) or as a top-k cache
(herd.train.distill_cache): the k ids I_t of the teacher's largest probabilities at τ, their log p_v (τ), the log
of the tail mass r_t = Σ_{v∉I_t} p_v, and, exact at any k, log p¹(y_t) and H(p¹) for the dynamic weights.

The top-k approximation: both distributions are coarse-grained onto k + 1 buckets, the k ids and one "rest"::

    P = (p_{i_1}, ..., p_{i_k}, r_t) / Z     (Z renormalises what fp16 storage rounding left; 1 in exact arithmetic)
    Q = (q_{i_1}, ..., q_{i_k}, ρ_t)         ρ_t = Σ_{v∉I_t} q_v = 1 − Σ_{i∈I_t} q_i  (computed as a logsumexp)

and D_t is the divergence of P and Q. With k = V there is no rest bucket and the result equals the full
computation (up to float summation order). The error bound: coarse-graining never increases these divergences
(the chain rule of KL; μ coarse-grains with p and q), so the cached D_t is a lower bound of the full one and the
gap is the divergence inside the rest bucket, weighted by its mass::

    forward_kl   0 ≤ D − D̂ = r·KL(p|rest ‖ q|rest) ≤ r·[log min(1, p_min/r) − log min_{v∉I} (q_v/ρ)]
    jsd          0 ≤ D − D̂ = β·r·KL(p|rest ‖ μ|rest) + (1 − β)·ρ·KL(q|rest ‖ μ|rest)
                            ≤ M·h(βr/M) ≤ M·log 2,   M = βr + (1 − β)ρ,  h the binary entropy in nats
    reverse_kl   0 ≤ D − D̂ = ρ·KL(q|rest ‖ p|rest): no bound without the teacher's tail (it may be ~0 where the
                 student puts mass); it shrinks with the student's mass ρ outside the teacher's top-k

(p_min: the smallest kept teacher probability, an upper bound of every tail probability.) ``topk_error_bound``
computes the per-token bounds (times τ²); the loss error is at most Σ_t m_t a_t τ² bound_t / n. The hard term and
the dynamic weights are exact at any k. fp16 storage of log p adds a relative error of ~2⁻¹¹·|log p_v| to each
p_v (the bucket renormalisation keeps P a distribution); ``herd.train.distill_cache.measure_cache_error``
measures the whole difference against the online teacher.

Tokenizers must match: ``check_compatible(student, teacher)`` refuses a teacher whose tokenizer or vocabulary
size differs from the student's, naming both.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from herd.errors import ConfigError

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
WEIGHTS = ("fixed", "scheduled", "dynamic")
SCHEDULES = ("cosine", "linear")
CONFIDENCES = ("teacher_prob", "teacher_entropy", "gap")
_CE_T_FLOOR = 1e-6


@dataclass(frozen=True)
class DistillSpec:
    """How the hard and soft targets mix (the formulas: module docstring)."""

    divergence: str = "forward_kl"  # forward_kl | reverse_kl | jsd
    beta: float = 0.5  # jsd's mixture weight (0: forward KL, 1: reverse KL)
    temperature: float = 1.0  # τ (the soft term is multiplied by τ²)
    weight: str = "fixed"  # fixed | scheduled | dynamic
    alpha: float = 0.5  # fixed: the soft weight
    alpha0: float = 0.9  # scheduled / dynamic: the schedule's value at step 0 ...
    alpha1: float = 0.3  # ... and at the last step
    schedule: str = "cosine"  # cosine | linear
    confidence: str = "teacher_prob"  # dynamic: teacher_prob | teacher_entropy | gap

    def __post_init__(self) -> None:
        for name, allowed in (("divergence", DIVERGENCES), ("weight", WEIGHTS), ("schedule", SCHEDULES),
                              ("confidence", CONFIDENCES)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"distill.{name}={getattr(self, name)!r}: choose one of {', '.join(allowed)}")
        for name in ("beta", "alpha", "alpha0", "alpha1"):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and 0.0 <= v <= 1.0):
                raise ConfigError(f"distill.{name}={v!r} must be in [0, 1]")
        t = self.temperature
        if not (isinstance(t, int | float) and math.isfinite(t) and t > 0):
            raise ConfigError(f"distill.temperature={t!r} must be > 0")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DistillSpec:
        """From a recipe's ``[distill]`` table; unknown keys are an error naming them."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ConfigError(f"[distill] has unknown keys {sorted(unknown)}; known: {sorted(names)}")
        return cls(**d)


@dataclass
class TeacherTargets:
    """The teacher's side of a batch: full ``logits`` [B, T, V] (online), or a top-k cache's entries.

    Top-k: ``ids`` [B, T, K] (int), ``logprobs`` [B, T, K] = log p_v at ``temperature``, ``tail_logprob`` [B, T] =
    log of the mass outside ``ids`` at ``temperature`` (−inf or anything when K = V: unused), ``target_logprob``
    [B, T] = log p¹(y_t) and ``entropy`` [B, T] = H(p¹) in nats (τ = 1, exact; needed by dynamic weights only).
    ``valid`` [B, T] bool: tokens that have teacher targets (None: all)."""

    logits: torch.Tensor | None = None
    ids: torch.Tensor | None = None
    logprobs: torch.Tensor | None = None
    tail_logprob: torch.Tensor | None = None
    target_logprob: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    temperature: float = 1.0
    valid: torch.Tensor | None = None

    @property
    def is_topk(self) -> bool:
        return self.logits is None

    @classmethod
    @torch.no_grad()
    def topk(cls, logits_BTV: torch.Tensor, targets_BT: torch.Tensor, k: int, temperature: float = 1.0,
             dtype: torch.dtype = torch.float32, valid: torch.Tensor | None = None) -> TeacherTargets:
        """The top-k entries of full teacher logits, as a cache stores them (``dtype``: the stored log-probs'
        precision; they come back as float32). What herd.train.distill_cache writes."""
        V = logits_BTV.shape[-1]
        if not 1 <= k <= V:
            raise ValueError(f"top_k={k} must be in [1, {V}] (the vocabulary size)")
        z = logits_BTV.float()
        logp1 = F.log_softmax(z, -1)
        logp = logp1 if temperature == 1.0 else F.log_softmax(z / temperature, -1)
        values, ids = logp.topk(k, dim=-1)
        if k < V:
            tail = logp.scatter(-1, ids, -math.inf).logsumexp(-1)
        else:
            tail = torch.full(logp.shape[:-1], -math.inf, device=logp.device)
        tgt = targets_BT.long().clamp_min(0)
        values = values.clamp_min(torch.finfo(dtype).min).to(dtype).float()  # fp16: -65504 at worst, not -inf
        return cls(ids=ids.to(torch.int32), logprobs=values, tail_logprob=tail,
                   target_logprob=logp1.gather(-1, tgt[..., None])[..., 0], entropy=_entropy(logp1),
                   temperature=float(temperature), valid=valid)

    @classmethod
    def from_batch(cls, batch: dict[str, torch.Tensor], temperature: float) -> TeacherTargets:
        """From the ``teacher_*`` fields a cached loader (herd.train.distill_cache.DistillLoader) adds to a batch."""
        return cls(ids=batch["teacher_ids"], logprobs=batch["teacher_logprobs"],
                   tail_logprob=batch["teacher_tail_logprob"], target_logprob=batch["teacher_target_logprob"],
                   entropy=batch["teacher_entropy"], temperature=temperature, valid=batch.get("teacher_valid"))


def _entropy(logp: torch.Tensor) -> torch.Tensor:
    p = logp.exp()
    return -torch.where(p > 0, p * logp, 0.0).sum(-1)


@torch.no_grad()
def teacher_forward(teacher: torch.nn.Module, batch: dict[str, torch.Tensor]) -> TeacherTargets:
    """An online teacher's targets for a packed batch (the same positions and document masking as the student)."""
    was_training = teacher.training
    teacher.eval()
    try:
        logits = teacher(batch["tokens"], positions=batch.get("positions"), doc_ids=batch.get("doc_ids"))
    finally:
        teacher.train(was_training)
    return TeacherTargets(logits=logits.float())


# ---------------------------------------------------------------------------------------------- formulas


def schedule_value(spec: DistillSpec, step: int, total_steps: int) -> float:
    """s(step): α for ``fixed``, the α₀ → α₁ schedule otherwise."""
    if spec.weight == "fixed":
        return float(spec.alpha)
    u = min(1.0, max(0.0, step / max(1, total_steps - 1)))
    if spec.schedule == "cosine":
        return spec.alpha1 + (spec.alpha0 - spec.alpha1) * 0.5 * (1.0 + math.cos(math.pi * u))
    return spec.alpha0 + (spec.alpha1 - spec.alpha0) * u


def _kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """Σ p (log p − log q) over the last dim; entries with p = 0 count 0."""
    p = logp.exp()
    return torch.where(p > 0, p * (logp - logq), 0.0).sum(-1)


def divergence(logp: torch.Tensor, logq: torch.Tensor, kind: str, beta: float = 0.5) -> torch.Tensor:
    """D(p, q) per row of log-distributions (teacher ``logp``, student ``logq``) [N, M] -> [N]."""
    if kind == "forward_kl" or (kind == "jsd" and beta == 0.0):
        return _kl(logp, logq)
    if kind == "reverse_kl" or (kind == "jsd" and beta == 1.0):
        return _kl(logq, logp)
    if kind != "jsd":
        raise ValueError(f"unknown divergence {kind!r}")
    logm = torch.logsumexp(torch.stack([logq + math.log1p(-beta), logp + math.log(beta)]), dim=0)
    return beta * _kl(logp, logm) + (1.0 - beta) * _kl(logq, logm)


def _buckets(logq_NV: torch.Tensor, teacher: TeacherTargets) -> tuple[torch.Tensor, torch.Tensor]:
    """(log P, log Q) of the top-k buckets [N, K(+1)]: the k ids, then the rest (absent when K = V)."""
    V = logq_NV.shape[-1]
    ids = teacher.ids.flatten(0, -2).long()
    logp = teacher.logprobs.flatten(0, -2).float()
    K = ids.shape[-1]
    logq = logq_NV.gather(-1, ids)
    if K < V:
        logp = torch.cat([logp, teacher.tail_logprob.reshape(-1, 1).float()], -1)
        rest = logq_NV.scatter(-1, ids, -math.inf).logsumexp(-1, keepdim=True)
        logq = torch.cat([logq, rest], -1)
    elif K > V:
        raise ValueError(f"the teacher cache holds {K} ids per token, more than the student's vocabulary ({V})")
    return logp - logp.logsumexp(-1, keepdim=True), logq


def soft_term(student_logits_BTV: torch.Tensor, teacher: TeacherTargets, spec: DistillSpec) -> torch.Tensor:
    """D_t per token [B*T] (without τ²), from full teacher logits or from top-k buckets."""
    tau = spec.temperature
    z = student_logits_BTV.float().flatten(0, 1)
    logq = F.log_softmax(z if tau == 1.0 else z / tau, -1)
    if teacher.is_topk:
        if not math.isclose(teacher.temperature, tau, rel_tol=1e-6):
            raise ConfigError(f"distill.temperature={tau} but the teacher cache holds log-probs at temperature "
                              f"{teacher.temperature}: write the cache at the training temperature")
        logp, logq = _buckets(logq, teacher)
    else:
        zt = teacher.logits.detach().float().flatten(0, 1)
        if zt.shape != z.shape:
            raise ValueError(f"teacher logits {tuple(teacher.logits.shape)} vs student "
                             f"{tuple(student_logits_BTV.shape)}: the vocabularies must match")
        logp = F.log_softmax(zt if tau == 1.0 else zt / tau, -1)
    return divergence(logp.detach(), logq, spec.divergence, spec.beta)


def _teacher_scalars(teacher: TeacherTargets, targets_N: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p¹(y_t), H(p¹)) per token [N], exact (from the full logits, or as the cache stored them)."""
    if teacher.is_topk:
        if teacher.target_logprob is None or teacher.entropy is None:
            raise ValueError("dynamic weights need the teacher's target_logprob and entropy")
        return teacher.target_logprob.reshape(-1).float(), teacher.entropy.reshape(-1).float()
    logp1 = F.log_softmax(teacher.logits.detach().float().flatten(0, 1), -1)
    return logp1.gather(-1, targets_N[:, None])[:, 0], _entropy(logp1)


@torch.no_grad()
def token_weights(spec: DistillSpec, step: int, total_steps: int, teacher: TeacherTargets | None,
                  targets_N: torch.Tensor, ce_N: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """a_t per token [N], detached (formulas: module docstring)."""
    s = schedule_value(spec, step, total_steps)
    a = torch.full_like(ce_N, s, dtype=torch.float32)
    if spec.weight == "dynamic" and teacher is not None:
        target_logprob, entropy = _teacher_scalars(teacher, targets_N)
        if spec.confidence == "teacher_prob":
            c = target_logprob.exp()
        elif spec.confidence == "teacher_entropy":
            c = 1.0 - entropy / math.log(vocab_size)
        else:
            c = 1.0 - torch.exp(-ce_N.detach().float() / (-target_logprob).clamp_min(_CE_T_FLOOR))
        a = (s * c).clamp(0.0, 1.0)
    if teacher is None:
        return torch.zeros_like(a)
    if teacher.valid is not None:
        a = torch.where(teacher.valid.reshape(-1).bool(), a, 0.0)
    return a


def distill_loss(student_logits_BTV: torch.Tensor, targets_BT: torch.Tensor, loss_mask_BT: torch.Tensor | None,
                 teacher: TeacherTargets | None, spec: DistillSpec, step: int = 0, total_steps: int = 1,
                 n_tokens: float | None = None, z_loss: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L = (1/n) Σ_t m_t [(1 − a_t) CE_t + a_t τ² D_t] (+ ``z_loss`` · herd's z term). Returns (loss, parts) with
    detached parts, each a share summed over tokens and divided by n like the loss (so ranks' parts add up):
    ``ce`` (hard cross entropy), ``soft`` (τ² D), ``alpha`` (a_t), ``z`` (with z_loss). ``teacher`` None: plain
    cross entropy (a_t = 0)."""
    logits = student_logits_BTV.float().flatten(0, 1)
    N, V = logits.shape
    targets = targets_BT.flatten()
    weight = torch.ones(N, dtype=logits.dtype) if loss_mask_BT is None else loss_mask_BT.flatten().to(logits.dtype)
    if bool((targets < 0).any()):  # IGNORE labels carry no loss
        weight = torch.where(targets < 0, 0.0, weight)
        targets = targets.clamp_min(0)
    n = weight.sum().clamp(min=1.0) if n_tokens is None else max(float(n_tokens), 1.0)
    ce = F.cross_entropy(logits, targets, reduction="none")  # herd's cross_entropy, bit for bit
    a = token_weights(spec, step, total_steps, teacher, targets, ce, V)
    if teacher is None:
        per_token, soft = ce, torch.zeros_like(ce)
    else:
        soft = spec.temperature ** 2 * soft_term(student_logits_BTV, teacher, spec)
        if teacher.valid is not None:
            soft = torch.where(teacher.valid.reshape(-1).bool(), soft, 0.0)
        per_token = (1.0 - a) * ce + a * soft
    loss = (per_token * weight).sum() / n
    parts = {"ce": ((ce * weight).sum() / n).detach(), "soft": ((soft * weight).sum() / n).detach(),
             "alpha": ((a * weight).sum() / n).detach()}
    if z_loss:
        z = (torch.logsumexp(logits, dim=-1).square() * weight).sum() / n
        loss = loss + z_loss * z
        parts["z"] = z.detach()
    return loss, parts


@torch.no_grad()
def topk_error_bound(student_logits_BTV: torch.Tensor, teacher: TeacherTargets, spec: DistillSpec) -> torch.Tensor:
    """τ² times the per-token bound [B*T] of (full D − top-k D) (module docstring); inf for reverse_kl with a
    rest bucket (no bound), 0 when K = V."""
    tau = spec.temperature
    logq = F.log_softmax(student_logits_BTV.float().flatten(0, 1) / tau, -1)
    N, V = logq.shape
    ids = teacher.ids.flatten(0, -2).long()
    if ids.shape[-1] >= V:
        return torch.zeros(N)
    logP, logQ = _buckets(logq, teacher)
    r, rho = logP[:, -1].exp(), logQ[:, -1].exp()
    kind, beta = spec.divergence, spec.beta
    if kind == "jsd" and beta == 0.0:
        kind = "forward_kl"
    if kind == "jsd" and beta == 1.0:
        kind = "reverse_kl"
    if kind == "reverse_kl":
        return torch.full((N,), math.inf)
    if kind == "forward_kl":
        p_min = logP[:, :-1].min(-1).values.exp()
        u = torch.minimum(torch.ones_like(r), p_min / r.clamp_min(1e-38))
        min_tail_logq = logq.scatter(-1, ids, math.inf).min(-1).values - logQ[:, -1]
        bound = r * (u.log() - min_tail_logq).clamp_min(0.0)
    else:
        m = beta * r + (1 - beta) * rho
        x = (beta * r / m.clamp_min(1e-38)).clamp(0.0, 1.0)
        h = -(torch.xlogy(x, x) + torch.xlogy(1 - x, 1 - x))
        bound = m * h
    return tau ** 2 * bound


# ---------------------------------------------------------------------------------------------- compatibility


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A short hash of a herd Tokenizer's content (split pattern, BPE ranks, special tokens): equal iff the two
    tokenizers map text to the same ids."""
    enc = tokenizer.model
    h = hashlib.sha256(enc._pat_str.encode())
    for piece, rank in sorted(enc._mergeable_ranks.items(), key=lambda kv: kv[1]):
        h.update(len(piece).to_bytes(4, "little") + piece + rank.to_bytes(4, "little"))
    for name, i in sorted(tokenizer.special_tokens.items(), key=lambda kv: kv[1]):
        h.update(f"{name}={i};".encode())
    return h.hexdigest()[:16]


def describe_side(x: Any, role: str) -> tuple[str, str, int | None, int | None]:
    """(label, tokenizer fingerprint, tokenizer ids, model vocabulary size or None) of a student/teacher given as a
    model directory, a herd Tokenizer, a (Tokenizer, vocab_size) pair or an object with .tokenizer and .model
    (herd.api.LLM)."""
    from herd.tokenizer import Tokenizer

    vocab = None
    if isinstance(x, tuple):
        x, vocab = x
    if isinstance(x, str | Path):
        from herd.config import load_config

        path = Path(x)
        if (path / "config.json").is_file():
            vocab = load_config(path).vocab_size if vocab is None else vocab
            tok, label = Tokenizer.for_model(path), f"{role} {path}"
        else:
            tok, label = Tokenizer.load(path), f"{role} tokenizer {path}"
    elif isinstance(x, Tokenizer):
        tok, label = x, f"{role} tokenizer {x.model.name}"
    elif hasattr(x, "tokenizer") and hasattr(x, "model"):
        tok, label = x.tokenizer, f"{role} model"
        vocab = x.model.cfg.vocab_size if vocab is None else vocab
    else:
        raise TypeError(f"{role}: give a model directory, a Tokenizer, (Tokenizer, vocab_size) or a herd LLM, "
                        f"not {type(x).__name__}")
    return label, tokenizer_fingerprint(tok), tok.vocab_size, vocab


def check_compatible(student: Any, teacher: Any) -> str:
    """Refuse a teacher whose tokenizer or model vocabulary differs from the student's (the error names both);
    return the shared tokenizer fingerprint. Each side: a model directory (its tokenizer and config.json's
    vocab_size), a herd Tokenizer, a (Tokenizer, vocab_size) pair, or a herd LLM."""
    s_label, s_fp, s_ids, s_vocab = describe_side(student, "student")
    t_label, t_fp, t_ids, t_vocab = describe_side(teacher, "teacher")
    if s_fp != t_fp:
        raise ConfigError(f"the tokenizers differ: {s_label} (tokenizer {s_fp}, {s_ids} ids) vs {t_label} "
                          f"(tokenizer {t_fp}, {t_ids} ids); distillation compares probabilities id by id, so the "
                          f"student and the teacher need the same tokenizer")
    if s_vocab is not None and t_vocab is not None and s_vocab != t_vocab:
        raise ConfigError(f"the vocabulary sizes differ: {s_label} has {s_vocab} logits per token, {t_label} "
                          f"{t_vocab}; distillation needs the same vocabulary")
    return s_fp
