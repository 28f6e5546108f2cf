"""The compiled decode step's model copy (herd.infer.decode_modules): shared weights, the caller's model
untouched, and each decode subclass equal to the module it replaces."""

import torch
from conftest import small_config
from torch import nn

from herd.infer.decode_modules import (
    FewQueryAttention,
    MatvecLinear,
    MatvecRouter,
    RowwiseMoE,
    attend_fused,
    decode_model,
    matvec,
)
from herd.model import Transformer
from herd.model.attention import Attention, attention_mask
from herd.model.moe import MoE


def _model(**changes) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(small_config(**changes)).eval()
    model.init_weights(std=0.08)
    return model


def test_fused_decode_attention_equals_sdpa():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, t, 16, generator=g) for h, t in ((8, 1), (2, 40), (2, 40)))
    q_pos = torch.tensor([[37], [12]])
    k_pos = torch.arange(40).expand(2, 40)
    for chunk in (None, 16):
        mask = attention_mask(q_pos, k_pos, chunk)
        ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        assert torch.allclose(attend_fused(q, k, v, mask), ref, atol=1e-5)


def test_matvec_is_the_product():
    w, v = torch.randn(6, 5), torch.randn(3, 5)
    assert torch.allclose(matvec(v, w), v @ w.T, atol=1e-5)
    w_RNK = torch.randn(3, 6, 5)  # a weight per row
    assert torch.allclose(matvec(v, w_RNK), torch.bmm(w_RNK, v[:, :, None])[..., 0], atol=1e-5)


def test_decode_copy_shares_weights_and_leaves_the_model_alone():
    model = _model()
    decode = decode_model(model)
    assert type(model.layers[0].self_attn.q_proj) is nn.Linear and type(model.layers[0].self_attn) is Attention
    assert isinstance(decode.layers[0].self_attn.q_proj, MatvecLinear)
    assert isinstance(decode.layers[0].self_attn, FewQueryAttention)
    moe = next(b.feed_forward for b in decode.layers if b.is_moe)
    assert isinstance(moe, RowwiseMoE) and isinstance(moe.router, MatvecRouter)
    assert moe.experts.backend == "gather"  # fp32: torch's grouped op traces bf16 only
    assert type(next(b.feed_forward for b in model.layers if b.is_moe)) is MoE
    params = dict(model.named_parameters())
    for name, p in decode.named_parameters():
        assert p is params[name]

    ids = torch.randint(0, 512, (1, 3))
    with torch.no_grad():
        before = decode(ids)
        for p in model.parameters():  # an in-place weight update (an RL step, Engine.update_weights)
            p.copy_(p * 1.5)
        torch.testing.assert_close(decode(ids), model(ids), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(decode(ids), before, atol=1e-3)


def test_decode_subclasses_equal_the_plain_modules():
    """Few rows take the decode forms, more rows the plain ones; both give the plain model's logits."""
    model = _model(attention_chunk_size=8)
    decode = decode_model(model)
    with torch.no_grad():
        for shape in ((1, 1), (2, 1), (1, 3), (3, 7)):
            ids = torch.randint(0, 512, shape)
            torch.testing.assert_close(decode(ids), model(ids), atol=1e-4, rtol=1e-4)


def test_bf16_decode_copy_uses_the_grouped_kernel():
    decode = decode_model(_model().to(torch.bfloat16))
    moe = next(b.feed_forward for b in decode.layers if b.is_moe)
    assert moe.experts.backend == "grouped" and isinstance(moe, RowwiseMoE)  # CPU: a few rows still go per row


def test_compiled_decode_copy_equals_the_model():
    """Past MAX_ROWS inside a graph: torch's grouped op (bf16) or the gathered experts (fp32); one row is
    test_engine's compiled decode."""
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 3e-2)):
        model = _model().to(dtype)
        ids = torch.randint(0, 512, (8, 1))
        with torch.no_grad():
            got = torch.compile(decode_model(model), dynamic=False)(ids)
            torch.testing.assert_close(got.float(), model(ids).float(), atol=tol, rtol=tol)
