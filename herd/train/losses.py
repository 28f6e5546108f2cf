"""Training losses: next-token cross entropy with optional z-loss, the MoE load-balancing loss, and the expert-load
metrics that show whether balancing works.

Load balancing is the Switch-Transformer auxiliary loss exactly as transformers computes it for Llama 4
(``load_balancing_loss_func``, coefficient ``router_aux_loss_coef``): counts and probabilities are pooled over
all MoE layers before the product. herd does not offer DeepSeek's aux-loss-free bias: that bias changes which
expert a token picks, and neither Meta's nor the HF checkpoint format has a place for it, so an exported model
would route differently from the one that was trained.
"""

import math

import torch
import torch.nn.functional as F


def cross_entropy(logits_BTV: torch.Tensor, targets_BT: torch.Tensor, mask_BT: torch.Tensor | None = None,
                  z_loss: float = 0.0, n_tokens: float | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean next-token loss over unmasked targets (+ ``z_loss`` * mean logsumexp², PaLM's stabiliser that keeps
    the softmax normaliser near 1). Returns (loss, {"ce": ..., "z": ...}) with detached parts.

    ``n_tokens``: divide the sums by this instead of the batch's own count. Data parallelism passes the global
    batch's count, so that the ranks' losses (and their gradients) add up to the global mean."""
    logits = logits_BTV.float().flatten(0, 1)
    targets = targets_BT.flatten()
    weight = torch.ones_like(targets, dtype=logits.dtype) if mask_BT is None else mask_BT.flatten().to(logits.dtype)
    n = weight.sum().clamp(min=1.0) if n_tokens is None else max(float(n_tokens), 1.0)
    # torch's fused log-softmax + NLL: one pass forward, one backward (a logsumexp - gather would take several)
    ce = (F.cross_entropy(logits, targets, reduction="none") * weight).sum() / n
    parts = {"ce": ce.detach()}
    loss = ce
    if z_loss:
        z = (torch.logsumexp(logits, dim=-1).square() * weight).sum() / n
        loss = loss + z_loss * z
        parts["z"] = z.detach()
    return loss, parts


def _routing(router_logits: list[torch.Tensor], top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[L, N, E] softmax probabilities and [L, N, K] chosen experts (top-k on the logits, as the router does)."""
    logits_LNE = torch.stack([r.float() for r in router_logits])
    return logits_LNE.softmax(-1), logits_LNE.topk(top_k, dim=-1).indices


def load_balancing_loss(router_logits: list[torch.Tensor], n_experts: int, top_k: int,
                        mask: torch.Tensor | None = None) -> torch.Tensor:
    """E * sum_e f_e * P_e, with f_e the share of (token, k) assignments to expert e (summing to top_k) and P_e
    its mean router probability, both pooled over layers and tokens. 1.0 * top_k when perfectly balanced.

    router_logits: one [N, E] tensor per MoE layer (N = B * T, row-major); mask [B, T] drops padding rows."""
    probs_LNE, chosen_LNK = _routing(router_logits, top_k)
    L, N, E = probs_LNE.shape
    w_N = torch.ones(N, device=probs_LNE.device) if mask is None else mask.reshape(-1).float()
    counts_E = torch.zeros(E, device=probs_LNE.device).scatter_add_(
        0, chosen_LNK.reshape(-1), w_N[None, :, None].expand(L, N, top_k).reshape(-1))
    rows = w_N.sum() * L
    f_E = counts_E / rows
    p_E = (probs_LNE * w_N[None, :, None]).sum((0, 1)) / rows
    return n_experts * (f_E * p_E).sum()


@torch.no_grad()
def expert_load(router_logits: list[torch.Tensor], n_experts: int, top_k: int) -> dict[str, float]:
    """Per-layer expert load of one batch: max/mean load (1 = balanced, n_experts = every assignment on one
    expert) and the entropy of the load shares divided by log(n_experts) (1 = balanced), plus the worst layer."""
    if not router_logits:
        return {}
    _, chosen_LNK = _routing(router_logits, top_k)
    L = chosen_LNK.shape[0]
    counts_LE = torch.zeros(L, n_experts, device=chosen_LNK.device).scatter_add_(
        1, chosen_LNK.reshape(L, -1), torch.ones(L, chosen_LNK[0].numel(), device=chosen_LNK.device))
    share_LE = counts_LE / counts_LE.sum(-1, keepdim=True)
    max_over_mean_L = share_LE.max(-1).values * n_experts
    entropy_L = -(share_LE * share_LE.clamp(min=1e-12).log()).sum(-1) / math.log(n_experts)
    out = {f"moe/layer{i}/max_over_mean": float(v) for i, v in enumerate(max_over_mean_L)}
    out |= {f"moe/layer{i}/entropy": float(v) for i, v in enumerate(entropy_L)}
    out["moe/max_over_mean"] = float(max_over_mean_L.max())
    out["moe/mean_max_over_mean"] = float(max_over_mean_L.mean())
    out["moe/min_entropy"] = float(entropy_L.min())
    return out

