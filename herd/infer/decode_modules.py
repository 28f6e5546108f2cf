"""The modules of a compiled decode step: ``decode_model(model)`` returns a copy of ``model`` that shares every
parameter and buffer, with a few modules swapped for subclasses that take the shapes of decoding. The caller's
model is left as it is; the engine compiles its decode step around the copy (gpt-fast style: swaps on a model
copy, then one compiled function), and everything else (prefill, training) runs the plain modules.

At batch 1 a decode step is a chain of matrix-vector products, bound by how fast the weights stream from
memory. On CPUs torch's GEMV paths (MKL / oneDNN, fp32 and bf16) reach ~10-16 GB/s on two cores, a third to a
half of the memory bandwidth; the same product written as an elementwise multiply + row sum and compiled by
inductor streams at ~30 GB/s (measured: benchmarks/RESULTS.md). So on CPU, for at most ``MAX_ROWS`` rows:

* ``MatvecLinear`` / ``MatvecRouter``: every bias-free ``nn.Linear`` and the MoE routers as that fused product
  (a [16, D] router product costs ~30 us as a GEMM call, ~1 us fused);
* ``FewQueryAttention``: attention in plain ops that inductor fuses around two small matmuls, where the SDPA
  kernel's fixed per-call cost dominates at one query;
* ``RowwiseMoE``: each (token, expert) row multiplies its own expert's weights, gathered, in (token, k) order:
  sort, counts and offsets would be a chain of tiny ops costing more than the product itself.

The copy only ever runs inside the compiled step, so each subclass decides by static shape. Its routed experts
use a grouped-matmul backend a graph can hold (herd.model.moe): torch's kernel where it traces (bf16), else
``gather``; with ``gather`` a few rows go per row on every device. Weights updated in place on the original
(``p.copy_``) show in the copy; a parameter replaced by a new tensor does not: build a new copy then.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from herd.model import Transformer
from herd.model.attention import Attention
from herd.model.moe import Experts, MoE, Router, grouped_kernel_ok

MAX_ROWS = 4  # beyond a few rows the product is no longer bandwidth-bound and the GEMM kernels win


def matvec(x_MK: torch.Tensor, w_NK: torch.Tensor) -> torch.Tensor:
    """x @ w.T as a multiply + fp32 row sum, for inductor to fuse into one streaming loop. w may carry leading
    dims that broadcast against x's rows (w_MNK: a weight per row)."""
    return (x_MK.unsqueeze(-2).float() * w_NK.float()).sum(-1).to(x_MK.dtype)


def attend_fused(q_BHTd: torch.Tensor, k_BKVSd: torch.Tensor, v_BKVSd: torch.Tensor,
                 mask_B1TS: torch.Tensor) -> torch.Tensor:
    """``Attention.attend`` of a few queries in plain ops; query head h reads KV head h // (H / KV)."""
    B, H, T, hd = q_BHTd.shape
    KV = k_BKVSd.shape[1]
    q = q_BHTd.float().reshape(B, KV, (H // KV) * T, hd)
    scores = (q @ k_BKVSd.float().transpose(-1, -2)).view(B, KV, H // KV, T, -1) * hd**-0.5
    probs = scores.masked_fill(~mask_B1TS[:, :, None], float("-inf")).softmax(-1)
    out = probs.view(B, KV, (H // KV) * T, -1) @ v_BKVSd.float()
    return out.view(B, H, T, hd).to(q_BHTd.dtype)


def _rows(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1]


class MatvecLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _rows(x) <= MAX_ROWS and self.bias is None:
            return matvec(x, self.weight)
        return F.linear(x, self.weight, self.bias)


class MatvecRouter(Router):
    def logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        return matvec(x_TD, self.weight) if _rows(x_TD) <= MAX_ROWS else super().logits(x_TD)


class FewQueryAttention(Attention):
    def attend(self, q_BHTd: torch.Tensor, k_BKVSd: torch.Tensor, v_BKVSd: torch.Tensor,
               mask_B1TS: torch.Tensor) -> torch.Tensor:
        if q_BHTd.shape[2] <= MAX_ROWS:
            return attend_fused(q_BHTd, k_BKVSd, v_BKVSd, mask_B1TS)
        return super().attend(q_BHTd, k_BKVSd, v_BKVSd, mask_B1TS)


class RowwiseMoE(MoE):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x_TD = x.reshape(-1, x.shape[-1])
        if x_TD.shape[0] * self.top_k > MAX_ROWS:
            return super().forward(x)
        scores_TA, experts_TA, logits_TE = self.router(x_TD)
        rows_RD = x_TD.repeat_interleave(self.top_k, dim=0) * scores_TA.reshape(-1, 1)
        expert_R = experts_TA.flatten()
        gate_up_ENK, down_ENK = self.experts.local_weights()
        gate_RF, up_RF = matvec(rows_RD, gate_up_ENK[expert_R]).chunk(2, dim=-1)
        routed_RD = matvec(F.silu(gate_RF) * up_RF, down_ENK[expert_R])
        return self.combine(x, x_TD, routed_RD), logits_TE


def decode_backend(experts: Experts) -> str:
    """The grouped-matmul backend for ``experts`` inside a compiled graph: torch's kernel when it takes the
    weights and traces their dtype (bf16 only), else per-row gathered weights (no host sync, fixed shapes)."""
    w = experts.local_weights()
    return "grouped" if w[0].dtype == torch.bfloat16 and grouped_kernel_ok(*w) else "gather"


def decode_model(model: Transformer) -> Transformer:
    """A copy of ``model`` for the compiled decode step: the same parameters and buffers (shared, not copied),
    the decode subclasses of the module doc swapped in on the copy only."""
    tensors = (*model.parameters(), *model.buffers())
    decode = copy.deepcopy(model, memo={id(t): t for t in tensors})
    on_cpu = next(model.parameters()).device.type == "cpu"
    swaps = {nn.Linear: MatvecLinear, Router: MatvecRouter, Attention: FewQueryAttention} if on_cpu else {}
    for m in decode.modules():
        if type(m) is MoE and type(m.experts) is Experts:
            m.experts.backend = decode_backend(m.experts)
            if on_cpu or m.experts.backend == "gather":
                m.__class__ = RowwiseMoE
        elif type(m) in swaps:
            m.__class__ = swaps[type(m)]  # same parameters, hooks and state; only forward differs
    return decode
