"""MetaP: a muP-family parametrisation so that hyper-parameters tuned on a small proxy transfer to a wider, deeper
model. Meta published only the claim (per-layer learning rates and init scales that transfer across width,
depth, batch size and tokens); herd implements the public method closest to it, CompleteP (muP in width plus
depth-muP with alpha = 1, arXiv 2203.03466, 2505.01618), with per-layer-type multipliers on top. The rules and
their sources: docs/metap.md.

With m_d = dim / base_dim and m_L = n_layers / base_layers, for AdamW (eta, sigma, eps, lambda = the base
learning rate, init std, epsilon, weight decay, tuned at the base shape):

    group          init std                  learning rate          epsilon          weight decay
    embedding      sigma                     eta                    eps              lambda
    hidden in      sigma / sqrt(m_d)         eta / m_d              eps / m_d        lambda * m_d
    hidden out     sigma / (sqrt(m_d) m_L)   eta / (m_d m_L)        eps / (m_d m_L)  lambda * m_d * m_L
    router         sigma / sqrt(m_d)         eta / m_d              eps / m_d        lambda * m_d
    lm_head        sigma / m_d               eta / m_d              eps / m_d        lambda * m_d
    norms          1                         eta                    eps              0

"hidden in" are the matrices reading the residual stream (q, k, v, gate/up of dense, shared and routed FFNs);
"hidden out" write into it (o_proj, down projections). The forward multipliers of muP/CompleteP (1/m_d on the
LM head's input, 1/m_L on each residual branch) are folded into those weights: under Adam a multiplier c on a
weight's output is the same as scaling its init, learning rate and epsilon by c, so the model code is
unchanged. Weight decay scales inversely with the learning rate, keeping AdamW's lr x wd (its EMA timescale)
width-independent. Each group's init and learning rate are further multiplied by ``init_mult`` / ``lr_mult``
(the per-layer-type knobs MetaP tunes on the proxy). Batch size and token budget: the base learning rate is
scaled by sqrt(batch_tokens / base_batch_tokens) (Adam's square-root rule), and weight decay so that
lr x wd x steps stays as at the base (constant AdamW timescale as a fraction of training).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from herd.info import component

GROUPS = ("embedding", "hidden_in", "hidden_out", "router", "lm_head", "norms", "vision")
_OUT = ("o_proj", "down_proj")


@dataclass
class MetaPSpec:
    enabled: bool = False
    base_dim: int = 256
    base_layers: int = 6
    base_batch_tokens: int | None = None  # None: no batch-size rule
    base_steps: int | None = None  # None: no token-budget rule for weight decay
    lr_mult: dict[str, float] = field(default_factory=dict)  # per group, e.g. {"router": 0.5}
    init_mult: dict[str, float] = field(default_factory=dict)

    def check(self) -> None:
        bad = (set(self.lr_mult) | set(self.init_mult)) - set(GROUPS)
        if bad:
            raise ValueError(f"metap multipliers for unknown groups {sorted(bad)}; groups: {', '.join(GROUPS)}")
        if self.base_dim < 1 or self.base_layers < 1:
            raise ValueError("metap.base_dim and metap.base_layers must be >= 1")


def group_of(name: str) -> str:
    comp = component(name)  # embedding, lm_head, norms, router, vision, or a hidden matrix's component
    if comp in ("attention", "dense_ffn", "shared_expert", "routed_experts"):
        leaf = name.split(".")[-2] if name.endswith(".weight") else name.split(".")[-1]
        return "hidden_out" if leaf in _OUT else "hidden_in"
    return comp


def _factors(model: nn.Module, spec: MetaPSpec) -> dict[str, tuple[float, float]]:
    """group -> (init scale vs sigma, learning-rate / epsilon scale vs eta / eps)."""
    cfg = model.cfg
    m_d, m_L = cfg.dim / spec.base_dim, cfg.n_layers / spec.base_layers
    f = {"embedding": (1.0, 1.0), "hidden_in": (m_d ** -0.5, 1 / m_d),
         "hidden_out": (m_d ** -0.5 / m_L, 1 / (m_d * m_L)),
         "router": (m_d ** -0.5, 1 / m_d), "lm_head": (1 / m_d, 1 / m_d), "norms": (1.0, 1.0), "vision": (1.0, 1.0)}
    return {g: (i * spec.init_mult.get(g, 1.0), lr * spec.lr_mult.get(g, 1.0)) for g, (i, lr) in f.items()}


@torch.no_grad()
def init_metap(model: nn.Module, spec: MetaPSpec, std: float | None = None) -> None:
    """Re-initialise a fresh model's text weights by the table (norm gains stay 1; the vision tower keeps its own
    init)."""
    std = model.cfg.init_std if std is None else std
    factors = _factors(model, spec)
    for name, p in model.named_parameters():
        group = group_of(name)
        if group in ("norms", "vision"):
            continue
        nn.init.normal_(p, 0.0, std * factors[group][0])


def param_groups(model: nn.Module, spec: MetaPSpec, lr: float, weight_decay: float, eps: float,
                 batch_tokens: int | None = None, steps: int | None = None) -> list[dict]:
    """AdamW parameter groups by the table (one per group present), with the batch and token rules applied."""
    batch_f = math.sqrt(batch_tokens / spec.base_batch_tokens) if spec.base_batch_tokens and batch_tokens else 1.0
    steps_f = spec.base_steps / steps if spec.base_steps and steps else 1.0
    factors = _factors(model, spec)
    params: dict[str, list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            params.setdefault(group_of(name), []).append(p)
    groups = []
    for g, ps in params.items():
        lr_scale = factors[g][1] * batch_f  # the trainer multiplies its scheduled lr by this
        wd = 0.0 if g == "norms" else weight_decay * steps_f / lr_scale  # lr x wd x steps as at the base
        groups.append({"params": ps, "lr": lr * lr_scale, "eps": eps * factors[g][1], "weight_decay": wd,
                       "metap_group": g, "lr_scale": lr_scale})
    return groups


@torch.no_grad()
def coordinate_scales(model: nn.Module, tokens: torch.Tensor) -> dict[str, float]:
    """Mean |x| per coordinate of the embedding output, each block's output and the logits (muP's coordinate
    check: under a width-transferring parametrisation these stay flat as the width grows)."""
    out: dict[str, float] = {}
    hooks = [model.embed_tokens.register_forward_hook(
        lambda m, i, o: out.__setitem__("embedding", o.abs().mean().item()))]
    for k, block in enumerate(model.layers):
        hooks.append(block.register_forward_hook(
            lambda m, i, o, k=k: out.__setitem__(f"block{k}", o[0].abs().mean().item())))
    try:
        out["logits"] = model(tokens).abs().mean().item()
    finally:
        for h in hooks:
            h.remove()
    return out
