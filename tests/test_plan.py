"""herd plan: the per-GPU numbers against a hand calculation from the published shapes, and the seeds' claims
(Scout in int4 fits one H100; Maverick in FP8 fits one 8 x H100 host; Behemoth trains on 32K GPUs)."""

import json

import pytest

from herd.config import preset
from herd.errors import ConfigError
from herd.plan import INT4_BYTES, kv_cache_bytes, plan

GB = 1e9


def _text_params(cfg):
    """Parameter counts of a Llama 4 text model written out from its shape (no census)."""
    d, L = cfg.dim, cfg.n_layers
    moe = len(cfg.moe_layers)
    return {
        "embedding": cfg.vocab_size * d, "lm_head": cfg.vocab_size * d,
        "attention": L * d * cfg.head_dim * (2 * cfg.n_heads + 2 * cfg.n_kv_heads),
        "norms": (2 * L + 1) * d,
        "router": moe * cfg.n_experts * d,
        "routed_experts": moe * cfg.n_experts * 3 * d * cfg.expert_hidden_dim,
        "shared_expert": moe * 3 * d * cfg.expert_hidden_dim,
        "dense_ffn": (L - moe) * 3 * d * cfg.dense_hidden_dim,
    }


def test_scout_int4_fits_one_h100_by_hand():
    cfg = preset("scout").replace(vision=None)
    n = _text_params(cfg)
    weights = (n["attention"] + n["routed_experts"] + n["shared_expert"]) * INT4_BYTES + \
        (n["embedding"] + n["lm_head"] + n["norms"] + n["router"]) * 2
    # 128K context: 36 chunked layers hold one 8192-token chunk, 12 global layers the whole context
    kv = (36 * 8192 + 12 * 131072) * 2 * 8 * 128 * 2
    p = plan(cfg, "scout", gpus=1, dtype="int4", context=131072)
    assert p.per_gpu["weights"] == pytest.approx(weights, rel=1e-12)
    assert p.per_gpu["kv_cache"] == pytest.approx(kv, rel=1e-12)
    assert 55 * GB < weights < 62 * GB and kv == pytest.approx(7.65 * GB, rel=1e-3)
    assert p.fits
    assert not plan(cfg, "scout", gpus=1, dtype="bf16").fits  # 218 GB of bf16 weights


def test_maverick_fp8_fits_one_8gpu_host_by_hand():
    cfg = preset("maverick").replace(vision=None)
    n = _text_params(cfg)
    moe = list(cfg.moe_layers)  # 1, 3, ..., 47: the last layer stays bf16 (fp8_mixed), the first is dense
    per_layer = n["routed_experts"] / len(moe)
    experts = per_layer * 2 + per_layer * (len(moe) - 1) * (1 + 4 / cfg.dim)
    tp_split = (n["embedding"] + n["lm_head"] + n["attention"] + n["shared_expert"] + n["dense_ffn"]) * 2
    weights = tp_split / 8 + experts / 8 + (n["norms"] + n["router"]) * 2
    p = plan(cfg, "maverick", gpus=8, dtype="fp8", context=8192)
    assert p.layout == {"tp": 8, "ep": 8, "replicas": 1}
    assert p.per_gpu["weights"] == pytest.approx(weights, rel=1e-12)
    assert p.per_gpu["kv_cache"] == pytest.approx(kv_cache_bytes(cfg, 8192, 1, tp=8), rel=1e-12)
    assert p.per_gpu["kv_cache"] == pytest.approx(48 * 8192 * 2 * 1 * 128 * 2, rel=1e-12)  # 8 KV heads / 8 GPUs
    assert p.fits
    assert not plan(cfg, "maverick", gpus=8, dtype="bf16").fits  # ~800 GB of bf16 weights on 640 GB


def test_behemoth_training_on_32k_gpus():
    p = plan(preset("behemoth"), "behemoth", gpus=32768, dtype="fp8", train=True, context=8192, tokens=30e12,
             tflops=390)
    assert p.fits
    # FSDP2 shards fp32 weights, grads and AdamW moments (16 bytes / parameter) over every GPU
    total = sum(_text_params(preset("behemoth")).values()) + 918069760  # + the vision tower (herd info)
    assert p.per_gpu["weights"] + p.per_gpu["gradients"] + p.per_gpu["optimizer"] == pytest.approx(
        16 * total / 32768, rel=1e-9)
    assert 40 < p.throughput["days"] < 60  # 7M tokens/s at Meta's 390 TFLOP/s per GPU
    assert not plan(preset("behemoth"), "behemoth", gpus=8, train=True).fits


def test_cli_json_and_errors(capsys):
    from herd.cli import main

    assert main(["plan", "scout", "--gpus", "1", "--dtype", "int4", "--context", "131072", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["fits"] is True and d["per_gpu_bytes"] == pytest.approx(sum(d["per_gpu"].values()))
    assert main(["plan", "maverick", "--gpus", "8", "--dtype", "fp8"]) == 0
    assert "fits in 80 GB" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="must divide"):
        plan(preset("scout"), "scout", gpus=8, tp=3)
