"""MoE -> dense pruning, the way Llama Guard 4 12B was made from Llama 4 Scout: every routed expert and every
router is dropped and each MoE layer's feed-forward becomes a dense SwiGLU FFN initialised from that layer's
shared expert; attention, norms, embeddings, the LM head and a vision tower are kept as they are. No training
happens here: the pruned model is a starting point for fine-tuning (herd-guard-pico: ``make guard-pico``).

The result is in Llama Guard 4's dense layout (transformers' dense convert script writes the same):
text_config ``num_local_experts`` 0, ``interleave_moe_layer_step`` 0, ``moe_layers`` [], and
``intermediate_size_mlp`` = the shared expert's width. Layers that were dense already keep their FFN unchanged,
so they must have the shared expert's width too (Scout and herd-pico are MoE on every layer).

    python -m herd.post.prune models/herd-pico OUT_DIR [--dtype bf16]
"""

from __future__ import annotations

import argparse
import re
import shutil
from pathlib import Path

import torch

from herd import checkpoint
from herd.checkpoint.dense import assign
from herd.config import ModelConfig
from herd.errors import HerdError
from herd.model import Transformer

_FFN = re.compile(r"layers\.(\d+)\.feed_forward\.(.*)")  # a decoder layer's FFN / MoE parameter (herd names)


def dense_config(cfg: ModelConfig) -> ModelConfig:
    """The config of ``cfg`` pruned to dense: no MoE layer, no experts, the dense FFN as wide as a shared expert."""
    if not cfg.moe_layers:
        raise HerdError("the model has no MoE layer: nothing to prune")
    dense_kept = [i for i in range(cfg.n_layers) if not cfg.is_moe(i)]
    if dense_kept and cfg.dense_hidden_dim != cfg.expert_hidden_dim:
        raise HerdError(f"layers {dense_kept} are dense with width {cfg.dense_hidden_dim} but the shared experts are "
                        f"{cfg.expert_hidden_dim} wide: one dense width (intermediate_size_mlp) cannot hold both")
    return cfg.replace(moe_layers=(), n_experts=0, interleave_moe_layer_step=0,
                       dense_hidden_dim=cfg.expert_hidden_dim)


def dense_parameters(model: Transformer) -> dict[str, torch.Tensor]:
    """The dense model's parameters, by herd name: each MoE layer's shared expert becomes the layer's FFN
    (``layers.N.feed_forward.shared_expert.gate_proj.weight`` -> ``layers.N.feed_forward.gate_proj.weight``),
    routers and routed experts are left out, everything else is kept. Tensors are shared, not copied."""
    out = {}
    for name, p in model.named_parameters():  # a tied LM head is listed once, as the embedding
        m = _FFN.fullmatch(name)
        if m is None or not model.layers[int(m.group(1))].is_moe:
            out[name] = p.detach()
        elif m.group(2).startswith("shared_expert."):
            out[f"layers.{m.group(1)}.feed_forward.{m.group(2).removeprefix('shared_expert.')}"] = p.detach()
    return out


def prune(model: Transformer) -> Transformer:
    """A new dense Transformer holding ``model``'s weights as dense_parameters maps them (dtype and device kept)."""
    with torch.device("meta"):
        dense = Transformer(dense_config(model.cfg))
    weights = dense_parameters(model)
    expected = dict(dense.named_parameters())
    if set(weights) != set(expected) or any(weights[n].shape != expected[n].shape for n in expected):
        raise HerdError(f"pruning left parameters that do not fit the dense model: "
                        f"{sorted(set(weights) ^ set(expected))[:3]}")
    for name, tensor in weights.items():
        assign(dense, name, tensor.clone())
    if dense.cfg.tie_embeddings:
        dense.lm_head.weight = dense.embed_tokens.weight
    return dense


def prune_directory(src: str | Path, out: str | Path, dtype: str | None = None) -> Path:
    """Prune the HF model directory ``src`` into ``out`` (config, safetensors in ``dtype`` or as stored, and the
    tokenizer files)."""
    src = Path(src)
    dense = prune(checkpoint.load(src))
    out = checkpoint.save(dense, out, dtype=dtype)
    for f in src.iterdir():
        if f.name.startswith("tokenizer"):
            shutil.copy2(f, out / f.name)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m herd.post.prune", description=__doc__.split("\n\n")[0])
    ap.add_argument("model_dir")
    ap.add_argument("out")
    ap.add_argument("--dtype", default=None, help="bf16 | fp32 (default: as stored)")
    args = ap.parse_args(argv)
    out = prune_directory(args.model_dir, args.out, args.dtype)
    n = sum(p.numel() for p in checkpoint.load(out).parameters())
    print(f"pruned {args.model_dir} to dense: {n / 1e6:.1f}M parameters -> {out}")


if __name__ == "__main__":
    main()
