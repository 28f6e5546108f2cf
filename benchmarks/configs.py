"""Model shapes shared by herd's inference benchmarks, and their cached random-weight HF directories.

    from configs import CONFIGS, make_model_dir
    d = make_model_dir("small", "bf16")   # benchmarks/.cache/models/small-bf16 (config.json + safetensors)

Both are Llama 4 text decoders with a 32k vocab, random weights N(0, 0.02) drawn with seed 0 (so every dtype of
one config holds the same weights, rounded), chunked-local RoPE layers (chunk 8192) and NoPE global layers:

- small:  Scout-shaped, width 512, 8 layers, 8 heads / 2 KV heads of 64, 16 experts top-1 on every layer,
          expert FFN 1024 (+ shared expert), dense FFN 2048 (unused: every layer is MoE). ~0.25B total / ~0.05B active.
- medium: width 2048, 16 layers, 16 heads / 4 KV heads of 128, 16 experts top-1 on every second layer as in
          Maverick (expert FFN 2048, + shared expert), dense FFN 8192 on the others. ~2.4B total / ~0.8B active params.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from herd import checkpoint
from herd.config import ModelConfig, preset
from herd.model import Transformer

BENCH_DIR = Path(__file__).resolve().parent
MODELS_DIR = BENCH_DIR / ".cache" / "models"
SEED = 0

_COMMON = dict(vocab_size=32000, n_experts=16, top_k=1, attention_chunk_size=8192, floor_scale=8192,
               pad_token_id=None, bos_token_id=1, eos_token_id=2, rope_scaling=None)

CONFIGS: dict[str, ModelConfig] = {
    "small": preset("tiny").replace(**_COMMON, dim=512, n_layers=8, n_heads=8, n_kv_heads=2, head_dim=64,
                                    expert_hidden_dim=1024, dense_hidden_dim=2048),
    "medium": preset("tiny").replace(**_COMMON, dim=2048, n_layers=16, n_heads=16, n_kv_heads=4, head_dim=128,
                                     expert_hidden_dim=2048, dense_hidden_dim=8192, interleave_moe_layer_step=2),
}

DTYPES = {"f32": torch.float32, "fp32": torch.float32, "float32": torch.float32,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def param_counts(cfg: ModelConfig) -> dict[str, int]:
    """Total and per-token active parameters (embedding excluded from active: it is a lookup)."""
    attn = cfg.dim * cfg.head_dim * (2 * cfg.n_heads + 2 * cfg.n_kv_heads) + 2 * cfg.dim
    dense = 3 * cfg.dim * cfg.dense_hidden_dim
    expert = 3 * cfg.dim * cfg.expert_hidden_dim
    router = cfg.dim * cfg.n_experts
    total = active = 0
    for layer in range(cfg.n_layers):
        if cfg.is_moe(layer):
            total += attn + router + expert * (cfg.n_experts + 1)
            active += attn + router + expert * (cfg.top_k + 1)
        else:
            total += attn + dense
            active += attn + dense
    head = cfg.dim * cfg.vocab_size
    total += head * (1 if cfg.tie_embeddings else 2) + cfg.dim
    active += head + cfg.dim
    return {"total": total, "active": active}


def make_model_dir(name: str, dtype: str = "f32", root: Path | str = MODELS_DIR) -> Path:
    """The HF ``Llama4ForCausalLM`` directory of config ``name`` in ``dtype`` (f32 or bf16), written once.

    The model is built by herd with seed 0 (``torch.manual_seed(0); Transformer(cfg)``), so the weights do not
    depend on the dtype asked for beyond its rounding. Cached: a directory with a ``.done`` marker is reused."""
    if name not in CONFIGS:
        raise KeyError(f"unknown config {name!r}; choose one of {', '.join(CONFIGS)}")
    if dtype not in DTYPES:
        raise KeyError(f"unknown dtype {dtype!r}; choose one of f32, bf16")
    short = "bf16" if DTYPES[dtype] is torch.bfloat16 else "f32"
    out = Path(root) / f"{name}-{short}"
    if (out / ".done").exists():
        return out
    if out.exists():
        shutil.rmtree(out)
    torch.manual_seed(SEED)
    model = Transformer(CONFIGS[name])  # f32, N(0, init_std) weights
    # 1 GiB shards keep the peak memory of safetensors' serialisation low for the 10 GB f32 medium model
    checkpoint.save(model, out, max_shard_bytes=2**30, dtype=DTYPES[dtype])
    del model
    (out / ".done").write_text(json.dumps({"config": name, "dtype": short, "seed": SEED}) + "\n")
    return out


if __name__ == "__main__":
    import sys

    for cfg_name, cfg in CONFIGS.items():
        n = param_counts(cfg)
        print(f"{cfg_name}: {n['total'] / 1e9:.3f}B total, {n['active'] / 1e9:.3f}B active, "
              f"moe layers {list(cfg.moe_layers)}")
    for arg in sys.argv[1:]:
        cfg_name, _, dt = arg.partition(":")
        print(make_model_dir(cfg_name, dt or "f32"))
