"""Sparse dispatch: each expert multiplies only its own tokens."""

import torch

from conftest import small_config
from herd.model import moe as moe_module
from herd.model.moe import MoE


def _dense_reference(m: MoE, x_TD: torch.Tensor) -> torch.Tensor:
    """Every expert on every token with zero scores for the unselected ones (what the references do)."""
    logits = x_TD @ m.router.weight.T
    top, idx = logits.topk(m.top_k, dim=-1)
    scores = torch.full_like(logits, float("-inf")).scatter(1, idx, top).sigmoid()  # [T, E]
    out = m.shared_expert(x_TD)
    for e in range(m.n_experts):
        h = (x_TD * scores[:, e:e + 1]) @ m.experts.gate_up_proj[e].T
        gate, up = h.chunk(2, dim=-1)
        out = out + (torch.nn.functional.silu(gate) * up) @ m.experts.down_proj[e].T
    return out


def test_rows_fed_to_experts_equal_tokens_times_top_k(monkeypatch):
    rows = []
    real = moe_module.grouped_mm

    def counting(x, w, offsets):
        rows.append(x.shape[0])
        assert int(offsets[-1]) == x.shape[0]
        return real(x, w, offsets)

    monkeypatch.setattr(moe_module, "grouped_mm", counting)
    for top_k, n_experts in [(1, 16), (2, 8)]:
        rows.clear()
        cfg = small_config(n_experts=n_experts, top_k=top_k)
        m = MoE(cfg)
        for p in m.parameters():
            torch.nn.init.normal_(p, 0, 0.1)
        x = torch.randn(3, 37, cfg.dim)
        with torch.no_grad():
            out, _ = m(x)
            ref = _dense_reference(m, x.view(-1, cfg.dim)).view_as(x)
        tokens = 3 * 37
        assert rows == [tokens * top_k, tokens * top_k]  # gate_up and down matmuls
        assert rows[0] < tokens * n_experts
        assert torch.allclose(out, ref, atol=1e-5)


def test_grouped_mm_fallback_matches(monkeypatch):
    x = torch.randn(10, 8)
    w = torch.randn(4, 12, 8)  # out x in
    offsets = torch.tensor([3, 3, 7, 10], dtype=torch.int32)
    fast = moe_module.grouped_mm(x, w, offsets)
    monkeypatch.setattr(moe_module, "_HAS_GROUPED_MM", False)
    slow = moe_module.grouped_mm(x, w, offsets)
    ref = torch.cat([x[:3] @ w[0].T, x[3:7] @ w[2].T, x[7:] @ w[3].T])
    expert_N = torch.tensor([0, 0, 0, 2, 2, 2, 2, 3, 3, 3])
    few, many = moe_module.per_row_mm(x[:3], w, expert_N[:3]), moe_module.per_row_mm(x, w, expert_N)
    for got in (fast, slow, many):
        assert torch.allclose(got, ref, atol=1e-5)
    assert torch.allclose(few, ref[:3], atol=1e-5)


def test_moe_backward_flows_to_experts_and_router_inputs():
    cfg = small_config(n_experts=4, top_k=2)
    m = MoE(cfg)
    for p in m.parameters():
        torch.nn.init.normal_(p, 0, 0.1)
    x = torch.randn(2, 9, cfg.dim, requires_grad=True)
    out, _ = m(x)
    out.square().sum().backward()
    assert x.grad is not None and m.experts.gate_up_proj.grad.abs().sum() > 0
    assert m.router.weight.grad.abs().sum() > 0  # through the scores that scale the expert inputs


def test_grouped_mm_gradients_match_the_loop(monkeypatch):
    """The CPU training path (_GroupedMM: grouped kernel forward and backward) against autograd through a plain
    per-expert loop, with an empty group, in fp32, bf16, and with the kernel's fallback loop."""
    torch.manual_seed(0)
    offsets = torch.tensor([5, 5, 12, 16], dtype=torch.int32)  # expert 1 gets no rows
    for dtype, has_kernel, tol in [(torch.float32, True, 1e-5), (torch.float32, False, 1e-5),
                                   (torch.bfloat16, True, 3e-2)]:
        monkeypatch.setattr(moe_module, "_HAS_GROUPED_MM", has_kernel)
        x = torch.randn(16, 8, dtype=dtype, requires_grad=True)
        w = torch.randn(4, 12, 8, dtype=dtype, requires_grad=True)
        g = torch.randn(16, 12, dtype=dtype)
        (moe_module.grouped_mm(x, w, offsets) * g).sum().backward()
        xr, wr = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
        ref = torch.cat([xr[:5] @ wr[0].T, xr[5:12] @ wr[2].T, xr[12:] @ wr[3].T])
        (ref * g.float()).sum().backward()
        torch.testing.assert_close(x.grad.float(), xr.grad, atol=tol, rtol=tol)
        torch.testing.assert_close(w.grad.float(), wr.grad, atol=tol, rtol=tol)
        assert w.grad[1].abs().max() == 0


def test_grouped_mm_under_autocast_gives_fp32_gradients():
    x = torch.randn(16, 8, requires_grad=True)
    w = torch.randn(4, 12, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = moe_module.grouped_mm(x, w, torch.tensor([4, 8, 12, 16], dtype=torch.int32))
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert x.grad.dtype == w.grad.dtype == torch.float32 and w.grad.abs().sum() > 0
