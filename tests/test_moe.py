"""Sparse dispatch: each expert multiplies only its own tokens; every grouped-matmul backend gives the same."""

import pytest
import torch
from conftest import small_config

from herd.model.moe import GROUPED_MM, MoE, pick_grouped_mm_backend, set_grouped_mm_backend


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


def _moe(**overrides) -> MoE:
    m = MoE(small_config(**overrides))
    for p in m.parameters():
        torch.nn.init.normal_(p, 0, 0.1)
    return m


@pytest.mark.parametrize("backend", GROUPED_MM)
def test_rows_fed_to_experts_equal_tokens_times_top_k(backend):
    rows = []
    for top_k, n_experts in [(1, 16), (2, 8)]:
        rows.clear()
        m = _moe(n_experts=n_experts, top_k=top_k)
        set_grouped_mm_backend(m, backend)
        m.experts.register_forward_pre_hook(lambda _, args: rows.append((args[0].shape[0], int(args[1][-1]))))
        x = torch.randn(3, 37, m.router.weight.shape[1])
        with torch.no_grad():
            out, _ = m(x)
            ref = _dense_reference(m, x.view(-1, x.shape[-1])).view_as(x)
        tokens = 3 * 37
        assert rows == [(tokens * top_k, tokens * top_k)]  # one row per (token, chosen expert), all in offsets
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_every_backend_gives_the_per_expert_products():
    offsets = torch.tensor([3, 3, 7, 10], dtype=torch.int32)  # expert 1 gets no rows
    # rows of 8 fp32 values suit torch's grouped kernel; rows of 6 (24 bytes) do not: those backends loop
    for k in (8, 6):
        x = torch.randn(10, k)
        w = torch.randn(4, 12, k)  # out x in
        ref = torch.cat([x[:3] @ w[0].T, x[3:7] @ w[2].T, x[7:] @ w[3].T])
        for name, mm in GROUPED_MM.items():
            torch.testing.assert_close(mm(x, w, offsets), ref, atol=1e-5, rtol=1e-5, msg=f"{name}, K={k}")


@pytest.mark.parametrize("backend", ["loop", "grouped_autograd"])
def test_moe_backward_flows_to_experts_and_router_inputs(backend):
    m = _moe(n_experts=4, top_k=2)
    set_grouped_mm_backend(m, backend)
    x = torch.randn(2, 9, m.router.weight.shape[1], requires_grad=True)
    out, _ = m(x)
    out.square().sum().backward()
    assert x.grad is not None and m.experts.gate_up_proj.grad.abs().sum() > 0
    assert m.router.weight.grad.abs().sum() > 0  # through the scores that scale the expert inputs


def test_grouped_autograd_gradients_match_the_loop():
    """The CPU training backend (grouped kernel forward and backward) against autograd through a plain per-expert
    loop, with an empty group: fp32, bf16, and rows the kernel does not take (24 bytes: its fallback loops)."""
    torch.manual_seed(0)
    offsets = torch.tensor([5, 5, 12, 16], dtype=torch.int32)  # expert 1 gets no rows
    for dtype, k, tol in [(torch.float32, 8, 1e-5), (torch.float32, 6, 1e-5), (torch.bfloat16, 8, 3e-2)]:
        x = torch.randn(16, k, dtype=dtype, requires_grad=True)
        w = torch.randn(4, 12, k, dtype=dtype, requires_grad=True)
        g = torch.randn(16, 12, dtype=dtype)
        (GROUPED_MM["grouped_autograd"](x, w, offsets) * g).sum().backward()
        xr, wr = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
        ref = torch.cat([xr[:5] @ wr[0].T, xr[5:12] @ wr[2].T, xr[12:] @ wr[3].T])
        (ref * g.float()).sum().backward()
        torch.testing.assert_close(x.grad.float(), xr.grad, atol=tol, rtol=tol)
        torch.testing.assert_close(w.grad.float(), wr.grad, atol=tol, rtol=tol)
        assert w.grad[1].abs().max() == 0


def test_grouped_autograd_under_autocast_gives_fp32_gradients():
    x = torch.randn(16, 8, requires_grad=True)
    w = torch.randn(4, 12, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = GROUPED_MM["grouped_autograd"](x, w, torch.tensor([4, 8, 12, 16], dtype=torch.int32))
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert x.grad.dtype == w.grad.dtype == torch.float32 and w.grad.abs().sum() > 0


def test_backend_choice_by_name():
    assert pick_grouped_mm_backend("cpu", torch.float32) == "grouped_autograd"
    assert pick_grouped_mm_backend("cuda", torch.bfloat16) == "grouped"
    assert pick_grouped_mm_backend("cuda", torch.float32) == "loop"
    m = _moe()
    assert m.experts.backend == "loop"  # the default: any device, dtype and autograd
    set_grouped_mm_backend(m, "gather")
    assert m.experts.backend == "gather"
    with pytest.raises(ValueError, match="choose one of"):
        set_grouped_mm_backend(m, "fast")
