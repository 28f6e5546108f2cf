"""The GRPO-family policy loss as pure functions: group-normalised advantages (no value model), the clipped ratio
with separate low/high clip (DAPO's clip-higher), token-level aggregation, an optional k3 KL to the reference, and
truncated importance sampling for completions sampled by older weights (asynchronous rollouts).

Conventions are TRL's GRPOTrainer (1.16) unless said otherwise; tests/test_grpo.py checks them by hand and against
its ``_compute_loss``. Shapes: B completions (consecutive groups of ``group_size`` per prompt), T completion
positions (right-padded; ``mask_BT`` marks the scored tokens). For one token, with A its completion's advantage,

    ratio = exp(logp - old_logp)                               # pi / pi_old
    pg    = -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A)
    w     = min(exp(old_logp - rollout_logp), tis_cap)         # detached; only with rollout log-probs
    kl    = ratio * k3, k3 = exp(ref_logp - logp) - (ref_logp - logp) - 1
    loss  = w * pg + beta * kl                                 # w weights pg only, as in TRL

k3 (Schulman) estimates KL(pi || ref) from samples of pi, but its gradient alone is, in expectation, that of
KL(ref || pi). Weighted by the ratio, gradient included (``unbiased_kl``: DeepSeek-V3.2, TRL's default
use_bias_correction_kl), the expected gradient on samples of pi_old is E_old[ratio * log(pi / ref) * grad log pi] =
grad KL(pi || ref).

Differences from TRL, on purpose: the caller drops zero-advantage groups before the loss (``varied_groups``: they
add no policy gradient, but TRL keeps their tokens in the "dapo" normaliser, and their KL); the importance weight is
computed here from the sampler's log-probs rather than passed in, in one mode (TRL's "token_truncate", no lower
clip); NaN rewards (TRL: unscorable completions) are not handled.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from herd.errors import ConfigError

SCALES = ("group", "batch", "none")
LOSS_TYPES = ("dapo", "grpo", "dr_grpo")


@dataclass
class GRPOSpec:
    """The loss settings of an RL recipe (its [grpo] section)."""

    epsilon_low: float = 0.2  # the ratio is clipped below at 1 - epsilon_low
    epsilon_high: float = 0.28  # ... and above at 1 + epsilon_high (DAPO's clip-higher; GRPO: = epsilon_low)
    beta: float = 0.0  # weight of the k3 KL to the reference; 0 = no reference model (DAPO, TRL's default)
    unbiased_kl: bool = True  # k3 times the ratio pi / pi_old: the gradient of KL(pi || ref), not of KL(ref || pi)
    scale_rewards: str = "group"  # advantage divided by the group's reward std ("group"), the batch's, or "none"
    loss_type: str = "dapo"  # token sum over the batch's tokens; "grpo": mean of sequence means; "dr_grpo" (below)
    tis_cap: float | None = 2.0  # truncated IS: weight min(pi_old / pi_rollout, tis_cap); None = no weight

    def check(self) -> None:
        if not 0.0 <= self.epsilon_low < 1.0:
            raise ConfigError(f"grpo.epsilon_low must be in [0, 1), got {self.epsilon_low}")
        if self.epsilon_high < 0:
            raise ConfigError(f"grpo.epsilon_high must be >= 0, got {self.epsilon_high}")
        if self.beta < 0:
            raise ConfigError(f"grpo.beta must be >= 0, got {self.beta}")
        if self.scale_rewards not in SCALES:
            raise ConfigError(f"grpo.scale_rewards must be one of {SCALES}, got {self.scale_rewards!r}")
        if self.loss_type not in LOSS_TYPES:
            raise ConfigError(f"grpo.loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        if self.tis_cap is not None and self.tis_cap <= 0:
            raise ConfigError(f"grpo.tis_cap must be > 0 (or unset), got {self.tis_cap}")


def _groups(rewards_B: torch.Tensor, group_size: int) -> torch.Tensor:
    if group_size < 2 or rewards_B.numel() % group_size:
        raise ValueError(f"{rewards_B.numel()} rewards do not split into groups of {group_size} (>= 2)")
    return rewards_B.float().view(-1, group_size)  # (N prompts, G)


def group_advantages(rewards_B: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-4
                     ) -> torch.Tensor:
    """A = (r - mean of r's group) / (std + eps), the std (unbiased, as TRL's nanstd) of the group (``"group"``,
    GRPO) or of all of ``rewards_B`` (``"batch"``: pass the whole step's rewards, all ranks'), or A = r - mean
    (``"none"``, Dr. GRPO). The baseline is always the group's mean."""
    r_NG = _groups(rewards_B, group_size)
    adv_NG = r_NG - r_NG.mean(1, keepdim=True)
    if scale == "group":
        adv_NG = adv_NG / (r_NG.std(1, keepdim=True) + eps)
    elif scale == "batch":
        adv_NG = adv_NG / (r_NG.std() + eps)
    elif scale != "none":
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    return adv_NG.flatten()


def varied_groups(rewards_B: torch.Tensor, group_size: int) -> torch.Tensor:
    """Which completions (bool [B]) belong to a group whose rewards are not all equal. The others have zero
    advantage: they teach nothing and would only dilute the token normaliser, so they never reach the loss."""
    r_NG = _groups(rewards_B, group_size)
    return (r_NG != r_NG[:, :1]).any(1).repeat_interleave(group_size)


def grpo_loss(logps_BT: torch.Tensor, old_logps_BT: torch.Tensor | None, advantages_B: torch.Tensor,
              mask_BT: torch.Tensor, spec: GRPOSpec, ref_logps_BT: torch.Tensor | None = None,
              rollout_logps_BT: torch.Tensor | None = None, n_tokens: float | None = None,
              n_seqs: float | None = None, max_completion_length: int | None = None
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss of a batch of completions and its metrics, both as this batch's share of an optimizer step over
    ``n_seqs`` completions holding ``n_tokens`` scored tokens (all ranks and micro-batches; default: this batch's),
    so that shares add up (herd sums gradients over ranks).

    ``logps_BT``: the policy's log-probs of the completion tokens (with grad); ``old_logps_BT``: those of the
    weights at the start of this optimisation round (None: the policy's, detached, i.e. on-policy);
    ``rollout_logps_BT``: the sampler's, possibly older weights or another engine (enables truncated IS);
    ``ref_logps_BT``: the reference's (needed when ``spec.beta``). Masked positions must hold finite values.
    Normalisers, per ``spec.loss_type``: "dapo" sum / n_tokens; "grpo" the sum over completions of each one's
    token mean, / n_seqs; "dr_grpo" sum / (n_seqs * max_completion_length) (Dr. GRPO: no length bias).
    Metrics are token-weighted (shares of means over n_tokens): clip_low (ratio below 1 - eps_low with A < 0: the
    clip binds), clip_high (above 1 + eps_high with A > 0), clip_region (either), ratio, and kl, is_weight,
    is_capped (share of tokens whose weight hit the cap) when they apply."""
    mask_BT = mask_BT.to(logps_BT.dtype)
    if old_logps_BT is None:
        old_logps_BT = logps_BT.detach()
    n_tokens = mask_BT.sum().clamp(min=1.0) if n_tokens is None else n_tokens
    n_seqs = logps_BT.shape[0] if n_seqs is None else n_seqs
    adv_B1 = advantages_B.to(logps_BT.dtype)[:, None]

    ratio_BT = torch.exp(logps_BT - old_logps_BT)
    clipped_BT = ratio_BT.clamp(1 - spec.epsilon_low, 1 + spec.epsilon_high)
    per_token_BT = -torch.min(ratio_BT * adv_B1, clipped_BT * adv_B1)
    metrics = {}
    if rollout_logps_BT is not None and spec.tis_cap is not None:
        # pi_old / pi_rollout corrects for sampling by older weights (or a different kernel); truncated at the cap
        # so one unlikely-under-the-sampler token cannot blow up the step (TRL's "token_truncate")
        is_BT = torch.exp(old_logps_BT - rollout_logps_BT).detach()
        w_BT = is_BT.clamp(max=spec.tis_cap)
        per_token_BT = per_token_BT * w_BT
        metrics["is_weight"] = (w_BT * mask_BT).sum()
        metrics["is_capped"] = ((is_BT > spec.tis_cap) * mask_BT).sum()
    if spec.beta:
        if ref_logps_BT is None:
            raise ValueError("beta > 0 needs the reference's log-probs (ref_logps_BT)")
        d_BT = ref_logps_BT - logps_BT
        kl_BT = torch.exp(d_BT) - d_BT - 1
        if spec.unbiased_kl:
            kl_BT = kl_BT * ratio_BT
        per_token_BT = per_token_BT + spec.beta * kl_BT
        metrics["kl"] = (kl_BT.detach() * mask_BT).sum()

    if spec.loss_type == "dapo":
        loss = (per_token_BT * mask_BT).sum() / n_tokens
    elif spec.loss_type == "grpo":
        loss = ((per_token_BT * mask_BT).sum(-1) / mask_BT.sum(-1).clamp(min=1.0)).sum() / n_seqs
    elif spec.loss_type == "dr_grpo":
        if max_completion_length is None:
            raise ValueError('loss_type "dr_grpo" normalises by max_completion_length: pass it')
        loss = (per_token_BT * mask_BT).sum() / (n_seqs * max_completion_length)
    else:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {spec.loss_type!r}")

    with torch.no_grad():
        low_BT = (ratio_BT < 1 - spec.epsilon_low) & (adv_B1 < 0)
        high_BT = (ratio_BT > 1 + spec.epsilon_high) & (adv_B1 > 0)
        metrics |= {"clip_low": (low_BT * mask_BT).sum(), "clip_high": (high_BT * mask_BT).sum(),
                    "clip_region": ((low_BT | high_BT) * mask_BT).sum(), "ratio": (ratio_BT * mask_BT).sum()}
    return loss, {k: v.detach() / n_tokens for k, v in metrics.items()}
