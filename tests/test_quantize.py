"""Weight quantization: closeness to bf16, real memory savings, checkpoint round trips, precise errors."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from herd import checkpoint
from herd.checkpoint import quantized as QC
from herd.config import preset
from herd.errors import CheckpointError
from herd.eval.quant_quality import logit_kl, perplexity
from herd.infer import quantize as Q
from herd.model import Transformer
from herd.model.moe import Experts

CFG = preset("tiny").replace(vocab_size=512, pad_token_id=None)  # 4 MoE layers, 4 experts, dim 64, expert FFN 96
TOKENS = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(0))


def _model(cfg=CFG, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(cfg).eval()
    model.init_weights(std=0.08)  # N(0, 0.08): peaked, non-flat logits, so a KL means something
    return model.to(torch.bfloat16)


@pytest.fixture(scope="module")
def bf16():
    return _model()


def _kl(ref, q) -> float:
    return logit_kl(ref, q, [TOKENS])


def _quantized(model, scheme, **kw):
    return Q.quantize(copy.deepcopy(model), scheme, **kw)


def test_int8_logits_close_to_bf16(bf16):
    q = _quantized(bf16, "int8")
    assert _kl(bf16, q) < 0.01
    for name in ("layers.0.self_attn.q_proj", "layers.1.feed_forward.shared_expert.down_proj"):
        m = q.get_submodule(name)
        assert isinstance(m, Q.QuantLinear) and m.weight.dtype == torch.int8 and m.weight_scale.dtype == torch.float32
    experts = q.layers[2].feed_forward.experts
    assert isinstance(experts, Q.QuantExperts) and experts.gate_up_proj.dtype == torch.int8
    # embedding, norms, router and (by default) lm_head keep the model dtype
    assert type(q.lm_head) is nn.Linear and q.lm_head.weight.dtype == torch.bfloat16
    assert q.embed_tokens.weight.dtype == q.layers[0].feed_forward.router.weight.dtype == torch.bfloat16
    assert Q.model_bytes(q) < 0.65 * Q.model_bytes(bf16)


# Bounds from the weight error: int8's rounding noise is ~1/200 of a row's scale, int4's (groups of 64 here,
# amax / 7.5 steps) ~17x larger, and the KL grows with the square of it: ~300x int8's 3e-4, i.e. ~0.1; measured
# 0.02-0.03, bound 0.15. fp8 e4m3 keeps 3 mantissa bits (~2% rms error) on the experts of layers 1-2 only:
# measured 1e-4, bound 0.01.
@pytest.mark.parametrize("scheme,bound,max_ratio", [("int4", 0.15, 0.45),
                                                    ("int4_weight_int8_dynamic_activation", 0.15, 0.45),
                                                    ("fp8", 0.01, 0.9)])
def test_low_bit_schemes_finite_close_and_small(bf16, scheme, bound, max_ratio):
    q = _quantized(bf16, scheme)
    with torch.no_grad():
        assert torch.isfinite(q(TOKENS)).all()
    assert _kl(bf16, q) < bound
    assert Q.model_bytes(q) < max_ratio * Q.model_bytes(bf16)
    storage = torch.float8_e4m3fn if scheme == "fp8" else torch.uint8
    experts = q.layers[1].feed_forward.experts
    assert isinstance(experts, Q.QuantExperts) and experts.down_proj.dtype == storage
    if scheme == "fp8":  # Meta's fp8_mixed: routed experts only, first and last layer kept
        assert not any(isinstance(m, Q.QuantLinear) for m in q.modules())
        assert type(q.layers[0].feed_forward.experts) is Experts and type(q.layers[3].feed_forward.experts) is Experts
        assert q.quantization.skipped == ["layers.0.feed_forward.experts", "layers.3.feed_forward.experts"]
    else:
        assert q.layers[0].self_attn.v_proj.weight.dtype == torch.uint8
        assert q.layers[0].self_attn.v_proj.weight.shape == (32, 32)  # [N, K/2]: two per byte


def test_smaller_int4_groups_are_closer(bf16):
    assert _kl(bf16, _quantized(bf16, "int4", group_size=16)) < _kl(bf16, _quantized(bf16, "int4", group_size=64))


@pytest.mark.parametrize("scheme", Q.SCHEMES)
def test_quantized_experts_equal_experts_with_dequantized_weights(scheme):
    """The swap itself is exact: QuantExperts == Experts holding the dequantized weights (layout, transposes)."""
    torch.manual_seed(0)
    experts = Experts(4, 64, 96)
    nn.init.normal_(experts.gate_up_proj, 0, 0.1), nn.init.normal_(experts.down_proj, 0, 0.1)
    q = Q.QuantExperts.from_experts(experts, scheme)
    ref = Experts(4, 64, 96)
    with torch.no_grad():
        ref.gate_up_proj.copy_(Q.dequantize_weight(q.gate_up_proj, q.gate_up_proj_scale, scheme, torch.float32))
        ref.down_proj.copy_(Q.dequantize_weight(q.down_proj, q.down_proj_scale, scheme, torch.float32))
        x = torch.randn(20, 64)
        if scheme == "int4_weight_int8_dynamic_activation":
            x = Q.fake_quantize_per_token_int8(x)  # what the scheme does to every input
        offsets = torch.tensor([5, 5, 12, 20], dtype=torch.int32)
        got, want = q(x, offsets), ref(x, offsets)
    if scheme == "int4_weight_int8_dynamic_activation":  # the down projection's input is quantized too
        assert torch.allclose(got, want, rtol=0.05, atol=0.02 * want.abs().max())
    else:
        assert torch.allclose(got, want, atol=1e-4)


def test_weight_formats_error_bounds_and_packing():
    torch.manual_seed(0)
    w = torch.randn(32, 128)
    for scheme in ("int8", "int4"):
        q, scale = Q.quantize_weight(w, scheme, group_size=32)
        err = (Q.dequantize_weight(q, scale, scheme, torch.float32) - w).abs()
        step = scale.repeat_interleave(128 // scale.shape[1], dim=1)
        assert (err <= 0.5 * step + 1e-6).all()  # round to nearest, nothing clipped by more than half a step
    q, scale = Q.quantize_weight(w, "fp8")
    rel = (Q.dequantize_weight(q, scale, "fp8", torch.float32) - w).abs() / w.abs().clamp(min=scale)
    assert q.dtype == torch.float8_e4m3fn and rel.max() <= 2**-4  # e4m3: half an ulp of 3 mantissa bits
    # packing: byte j holds input 2j in its low nibble and 2j+1 in its high nibble, each stored as q + 8
    w = torch.tensor([[-7.5, 7.5, 0.0, 1.0] * 4])
    q, scale = Q.quantize_weight(w, "int4", group_size=16)
    assert scale.shape == (1, 1) and q.dtype == torch.uint8 and q[0, 0] == (15 << 4 | 0) and q[0, 1] == (9 << 4 | 8)


def test_int4_group_falls_back_or_errors_clearly():
    assert Q.int4_group(5120, 128) == 128 and Q.int4_group(96, 128) == 32
    with pytest.raises(ValueError, match="100"):
        Q.int4_group(100, 128)
    with pytest.raises(ValueError, match="layers.0.self_attn.q_proj.*group_size"):
        Q.quantize(_model(), "int4", group_size=24)


def test_int8_dynamic_activation_fake_quant():
    x = torch.randn(6, 64) * torch.linspace(0.1, 10, 6)[:, None]
    x[:, 0] = 0.0
    xq = Q.fake_quantize_per_token_int8(x)
    step = (x.amax(-1).clamp(min=0) - x.amin(-1).clamp(max=0)) / 255
    assert ((xq - x).abs() <= 0.5 * step[:, None] * (1 + 1e-5)).all()
    assert (xq[:, 0] == 0).all()  # the zero point makes 0 exact


def test_skip_patterns_and_lm_head():
    model = _model()
    q = _quantized(model, "int8", skip=["*.self_attn.*", "layers.3.*"], quantize_lm_head=True)
    assert type(q.layers[0].self_attn.q_proj) is nn.Linear and type(q.layers[3].feed_forward.experts) is Experts
    assert isinstance(q.lm_head, Q.QuantLinear) and isinstance(q.layers[2].feed_forward.shared_expert.up_proj,
                                                               Q.QuantLinear)
    with pytest.raises(ValueError, match="layers.9"):
        _quantized(model, "int8", skip=["layers.9.*"])
    with pytest.raises(ValueError, match="already quantized"):
        Q.quantize(q, "int4")


def test_unknown_scheme_names_it(tmp_path):
    with pytest.raises(ValueError, match="'int3'.*int8, int4"):
        Q.quantize(_model(), "int3")
    with pytest.raises(ValueError, match="'nf4'"):
        QC.quantize_directory(tmp_path / "nowhere", tmp_path / "out", "nf4")


@pytest.mark.parametrize("scheme", Q.SCHEMES)
def test_save_load_round_trip_identical_logits(bf16, tmp_path, scheme):
    q = _quantized(bf16, scheme, quantize_lm_head=scheme == "int8")
    QC.save_quantized(q, tmp_path / "q", max_shard_bytes=150_000)  # sharded: experts spread over files
    loaded = checkpoint.load(tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(q(TOKENS), loaded(TOKENS))
    assert {n: (p.dtype, p.shape) for n, p in q.named_parameters()} == \
           {n: (p.dtype, p.shape) for n, p in loaded.named_parameters()}
    assert loaded.quantization.scheme == scheme and loaded.quantization.skipped == q.quantization.skipped
    qc = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    tensors = {}
    for f in sorted((tmp_path / "q").glob("*.safetensors")):
        tensors |= load_file(f)
    if scheme == "fp8":  # compressed-tensors, Llama-4-Maverick-FP8 layout: per-expert unfused Linear weights
        assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "float-quantized"
        assert qc["config_groups"]["group_0"]["weights"]["strategy"] == "channel"
        w = tensors["model.layers.1.feed_forward.experts.3.gate_proj.weight"]
        assert w.dtype == torch.float8_e4m3fn and w.shape == (96, 64)
        assert tensors["model.layers.1.feed_forward.experts.3.down_proj.weight_scale"].shape == (64, 1)
        assert tensors["model.layers.0.feed_forward.experts.0.up_proj.weight"].dtype == torch.bfloat16
        assert r"re:model\.layers\.0\.feed_forward\.experts\..*" in qc["ignore"]
    else:
        assert qc["quant_method"] == "herd" and qc["scheme"] == scheme and qc["group_size"] == 128
        assert tensors["model.layers.0.self_attn.q_proj.weight"].dtype in (torch.int8, torch.uint8)
        assert "model.layers.0.self_attn.q_proj.weight_scale" in tensors
        assert ("lm_head.weight_scale" in tensors) == (scheme == "int8")


def test_maverick_style_fp8_directory_loads(bf16, tmp_path):
    """As published: the multimodal prefix, and fused bf16 experts beside per-expert FP8 ones."""
    q = _quantized(bf16, "fp8")
    QC.save_quantized(q, tmp_path / "q")
    tensors = load_file(tmp_path / "q" / checkpoint.SINGLE_FILE)
    for layer in (0, 3):  # the unquantized layers' experts fused, as an HF bf16 checkpoint stores them
        prefix = f"model.layers.{layer}.feed_forward.experts"
        exp = q.layers[layer].feed_forward.experts
        for k in [k for k in tensors if k.startswith(prefix + ".")]:
            del tensors[k]
        tensors[prefix + ".gate_up_proj"], tensors[prefix + ".down_proj"] = exp.gate_up_proj.mT, exp.down_proj.mT
    tensors = {("language_model." + k): v.contiguous() for k, v in tensors.items()}
    save_file(tensors, tmp_path / "q" / checkpoint.SINGLE_FILE, metadata={"format": "pt"})
    loaded = checkpoint.load(tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(q(TOKENS), loaded(TOKENS))


def test_missing_scale_names_the_tensor(bf16, tmp_path):
    QC.save_quantized(_quantized(bf16, "int8"), tmp_path / "int8")
    file = tmp_path / "int8" / checkpoint.SINGLE_FILE
    tensors = load_file(file)
    del tensors["model.layers.2.self_attn.k_proj.weight_scale"]
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model\.layers\.2\.self_attn\.k_proj\.weight_scale"):
        checkpoint.load(tmp_path / "int8")

    QC.save_quantized(_quantized(bf16, "fp8"), tmp_path / "fp8")
    file = tmp_path / "fp8" / checkpoint.SINGLE_FILE
    tensors = load_file(file)
    del tensors["model.layers.1.feed_forward.experts.2.up_proj.weight_scale"]
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.feed_forward\.experts\.2\.up_proj\.weight_scale"):
        checkpoint.load(tmp_path / "fp8")
    # every scale of a module gone: its FP8 weights are still recognised as quantized
    for k in [k for k in tensors if k.startswith("model.layers.1.") and k.endswith("_scale")]:
        del tensors[k]
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"(experts\.0\.\w+_proj\.weight) .*float8_e4m3fn.*\.\1_scale is missing"):
        checkpoint.load(tmp_path / "fp8")


def test_wrong_packed_dtype_names_tensor(bf16, tmp_path):
    QC.save_quantized(_quantized(bf16, "int4"), tmp_path / "q")
    file = tmp_path / "q" / checkpoint.SINGLE_FILE
    tensors = load_file(file)
    tensors["model.layers.0.self_attn.o_proj.weight"] = tensors["model.layers.0.self_attn.o_proj.weight"].to(torch.int8)
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.self_attn\.o_proj\.weight .*torch\.int8.*uint8"):
        checkpoint.load(tmp_path / "q")


def test_quantize_directory(tmp_path):
    checkpoint.save(_model().float(), tmp_path / "src")
    (tmp_path / "src" / "tokenizer.model").write_text("kept")
    out = QC.quantize_directory(tmp_path / "src", tmp_path / "out", "int4", group_size=32, progress=False)
    assert (out / "tokenizer.model").read_text() == "kept"
    loaded = checkpoint.load(out)
    assert loaded.embed_tokens.weight.dtype == torch.bfloat16  # the unquantized rest in the requested dtype
    assert loaded.layers[0].self_attn.q_proj.weight_scale.shape == (64, 2)
    with torch.no_grad():
        assert torch.isfinite(loaded(TOKENS)).all()
    with pytest.raises(ValueError, match="already quantized"):
        QC.quantize_directory(out, tmp_path / "again", "int8", progress=False)


def test_quality_metrics(bf16):
    batches = [TOKENS[:, :20], TOKENS[:, 20:]]
    assert logit_kl(bf16, bf16, batches) == pytest.approx(0.0, abs=1e-6)
    ppl = perplexity(bf16, batches)
    with torch.no_grad():
        nll = torch.cat([F.cross_entropy(bf16(b[:, :-1]).float().flatten(0, 1), b[:, 1:].flatten(), reduction="none")
                         for b in batches])
    assert ppl == pytest.approx(nll.mean().exp().item(), rel=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp8 _scaled_mm path needs a CUDA GPU")
def test_fp8_cuda_scaled_mm(bf16, tmp_path, monkeypatch):
    """Meta's FP8 recipe on the GPU: per-token fp8 activations times the fp8 weights in torch's scaled GEMMs."""
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("rowwise fp8 GEMM needs sm89+ (Ada, Hopper)")
    torch.manual_seed(0)
    w = torch.randn(256, 512, device="cuda") * 0.05
    x = torch.randn(33, 512, device="cuda", dtype=torch.bfloat16)
    q, scale = Q.quantize_weight(w, "fp8")
    got = Q.qmatmul(x, q, scale, "fp8").float()
    want = x.float() @ Q.dequantize_weight(q, scale, "fp8", torch.float32).T
    assert (got - want).norm() / want.norm() < 0.05  # the activations are fp8 (per token) on this path
    # the experts: one grouped fp8 GEMM on Hopper, else per-expert fp8 GEMMs; same numbers either way
    torch.manual_seed(0)
    experts = Experts(4, 64, 96)
    nn.init.normal_(experts.gate_up_proj, 0, 0.1), nn.init.normal_(experts.down_proj, 0, 0.1)
    qe = Q.QuantExperts.from_experts(experts.cuda(), "fp8")
    x = torch.randn(20, 64, device="cuda", dtype=torch.bfloat16)
    offsets = torch.tensor([5, 5, 12, 20], dtype=torch.int32, device="cuda")
    with torch.no_grad():
        fast = qe(x, offsets).float()
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 9))  # no grouped kernel
        loop = qe(x, offsets).float()
        monkeypatch.undo()
    assert (fast - loop).norm() / loop.norm() < 0.01
    calls = []
    real = Q.fp8_rowwise_mm
    monkeypatch.setattr(Q, "fp8_rowwise_mm", lambda *a: calls.append(1) or real(*a))
    model = Q.quantize(copy.deepcopy(bf16).cuda(), "fp8", experts_only=False, skip=())
    ref = copy.deepcopy(bf16).cuda()
    tokens = TOKENS.cuda()
    assert logit_kl(ref, model, [tokens]) < 0.01 and calls  # the attention projections took the fp8 GEMM
    QC.save_quantized(model, tmp_path / "q")
    loaded = checkpoint.load(tmp_path / "q", device="cuda")
    with torch.no_grad():
        assert torch.equal(model(tokens), loaded(tokens))
