"""Parameter census and layer layout of a config: what ``herd info`` prints.

Counts come from the module tree built on the meta device (no memory), so they cannot drift from the model.
"Active" parameters are those one token touches: everything except the routed experts it is not sent to
(the usual convention: embeddings and the LM head count as active). The vision tower, when the config has one,
is in the total but not in the active count, which is per text token, as in Meta's "17B active".
"""

from __future__ import annotations

import platform
from dataclasses import dataclass, field
from pathlib import Path

import torch

from herd.config import ModelConfig
from herd.model import Transformer

GPU_BYTES = 80e9  # one H100 / A100-80GB
# bytes per weight by format; int4 adds one bf16 scale per group of 128, fp8 one fp32 scale per row (~0)
FORMAT_BYTES = {"bf16": 2.0, "fp8": 1.0, "int4": 0.5 + 2 / 128}


def component(name: str) -> str:
    """The census component of a parameter name (herd's module names)."""
    if name.startswith("vision."):
        return "vision"
    if name.startswith("embed_tokens"):
        return "embedding"
    if name.startswith("lm_head"):
        return "lm_head"
    if ".self_attn." in name:
        return "attention"
    if ".feed_forward.router." in name:
        return "router"
    if ".feed_forward.experts." in name:
        return "routed_experts"
    if ".feed_forward.shared_expert." in name:
        return "shared_expert"
    if ".feed_forward." in name:
        return "dense_ffn"
    return "norms"


@dataclass
class Census:
    config: ModelConfig
    by_component: dict[str, int] = field(default_factory=dict)
    active_by_component: dict[str, int] = field(default_factory=dict)

    @property
    def total_params(self) -> int:
        return sum(self.by_component.values())

    @property
    def active_params(self) -> int:
        return sum(self.active_by_component.values())

    def weight_bytes(self, fmt: str) -> float:
        # embeddings, norms and router stay bf16 in every scheme herd and the references use
        keep = sum(self.by_component.get(c, 0) for c in ("embedding", "norms", "router", "vision"))
        return keep * 2.0 + (self.total_params - keep) * FORMAT_BYTES[fmt]

    def layers(self) -> list[dict]:
        c = self.config
        return [{"index": i, "attention": "chunked_local" if c.is_chunked(i) else "global",
                 "rope": c.uses_rope(i), "ffn": "moe" if c.is_moe(i) else "dense"} for i in range(c.n_layers)]

    def to_dict(self) -> dict:
        memory = {fmt: {"bytes": self.weight_bytes(fmt), "fits_one_80gb_gpu": self.weight_bytes(fmt) <= GPU_BYTES}
                  for fmt in FORMAT_BYTES}
        return {"total_params": self.total_params, "active_params": self.active_params,
                "params_by_component": self.by_component, "active_params_by_component": self.active_by_component,
                "n_layers": self.config.n_layers, "moe_layers": list(self.config.moe_layers),
                "nope_layers": [i for i in range(self.config.n_layers) if not self.config.uses_rope(i)],
                "experts": self.config.n_experts, "top_k": self.config.top_k,
                "attention_chunk_size": self.config.attention_chunk_size,
                "weight_memory": memory, "layers": self.layers()}


def census(cfg: ModelConfig) -> Census:
    with torch.device("meta"):
        model = Transformer(cfg)
    out = Census(cfg)
    for name, p in model.named_parameters():
        comp = component(name)
        out.by_component[comp] = out.by_component.get(comp, 0) + p.numel()
    out.active_by_component = dict(out.by_component)
    if "vision" in out.active_by_component:  # runs on image tiles, not per text token: not in "17B active"
        out.active_by_component["vision"] = 0
    if "routed_experts" in out.by_component:
        out.active_by_component["routed_experts"] = out.by_component["routed_experts"] * cfg.top_k // cfg.n_experts
    return out


def _b(n: float) -> str:
    if n >= 1e8:
        return f"{n / 1e9:.2f}B"
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}K"


def _ranges(idx: list[int]) -> str:
    if not idx:
        return "none"
    parts, start = [], idx[0]
    for a, b in zip(idx, idx[1:] + [None]):
        if b != a + 1:
            parts.append(f"{start}" if start == a else f"{start}-{a}")
            start = b
    return ",".join(parts)


def render(c: Census, title: str) -> str:
    cfg = c.config
    layers = c.layers()
    pattern = "".join(("M" if layer["ffn"] == "moe" else "D") + ("g" if layer["attention"] == "global" else "l")
                      for layer in layers)
    lines = [f"{title}: {cfg.n_layers} layers, width {cfg.dim}, {cfg.n_heads} heads / {cfg.n_kv_heads} KV heads "
             f"x {cfg.head_dim}, vocab {cfg.vocab_size}",
             f"  experts: {cfg.n_experts} routed (top-{cfg.top_k}) + 1 shared, expert FFN {cfg.expert_hidden_dim}, "
             f"dense FFN {cfg.dense_hidden_dim}" if cfg.moe_layers else
             f"  experts: none (dense: a SwiGLU FFN {cfg.dense_hidden_dim} on every layer)",
             f"  MoE layers: {_ranges(list(cfg.moe_layers))}   dense layers: "
             f"{_ranges([layer['index'] for layer in layers if layer['ffn'] == 'dense'])}",
             f"  NoPE global layers: "
             f"{_ranges([layer['index'] for layer in layers if layer['attention'] == 'global'])}   "
             f"chunked local (RoPE{', QK-norm' if cfg.use_qk_norm else ''}) chunk {cfg.attention_chunk_size}: "
             f"the rest",
             f"  layout (M=MoE D=dense, l=local g=global): "
             f"{' '.join(pattern[i:i + 8] for i in range(0, len(pattern), 8))}",
             "",
             f"  {'component':<16}{'total':>12}{'active':>12}"]
    for comp, n in c.by_component.items():
        active = c.active_by_component[comp]
        lines.append(f"  {comp:<16}{_b(n):>12}{_b(active) if active else '-':>12}")
    lines.append(f"  {'all':<16}{_b(c.total_params):>12}{_b(c.active_params):>12}")
    if cfg.vision is not None:
        lines.append("  (vision: ViT + adapter + projector, counted from vision_config; it runs on image tiles only,\n"
                     "   so it is not part of the per-token active count)")
    lines.append("")
    lines.append("  weight memory (embeddings, norms, router, vision kept in bf16):")
    for fmt in FORMAT_BYTES:
        nbytes = c.weight_bytes(fmt)
        gpus = int(-(-nbytes // GPU_BYTES))
        fits = "fits one 80 GB GPU" if nbytes <= GPU_BYTES else f"needs >= {gpus} x 80 GB GPUs"
        lines.append(f"    {fmt:<5}{nbytes / 1e9:10.1f} GB   {fits} (weights only, before KV cache)")
    return "\n".join(lines)


def cpu_name() -> str:
    """The CPU model (for benchmark and training reports)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
