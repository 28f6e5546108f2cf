"""Decode-time matrix-vector products for compiled CPU decoding, applied to a built model from outside.

At batch 1 a decode step is a chain of matrix-vector products, bound by how fast the weights stream from
memory. On CPUs torch's GEMV paths (MKL / oneDNN, fp32 and bf16) reach ~10-16 GB/s on two cores, a third to a
half of the memory bandwidth; the same product written as an elementwise multiply + row sum and compiled by
inductor streams at ~30 GB/s (measured: benchmarks/RESULTS.md). ``use_matvec(model)`` swaps every ``nn.Linear``
for ``MatvecLinear`` (and each MoE router for a ``MatvecRouter``), which takes that form only while
torch.compile traces a call with at most ``MAX_ROWS`` rows, and is the plain module otherwise (eager, prefill,
training).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from herd.model.moe import Router

MAX_ROWS = 4  # beyond a few rows the product is no longer bandwidth-bound and the GEMM kernels win


def matvec(x: torch.Tensor, w_NK: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ w.T as a multiply + fp32 row sum, for inductor to fuse into one streaming loop."""
    return (x.unsqueeze(-2).float() * w_NK.float()).sum(-1).to(x.dtype)


def small(x: torch.Tensor) -> bool:
    return torch.compiler.is_compiling() and x.device.type == "cpu" and x.numel() // x.shape[-1] <= MAX_ROWS


class MatvecLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if small(x) and self.bias is None:
            return matvec(x, self.weight)
        return F.linear(x, self.weight, self.bias)


class MatvecRouter(Router):
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return matvec(x, self.weight) if small(x) else super().logits(x)


def use_matvec(model: nn.Module) -> nn.Module:
    """In place: every exact ``nn.Linear`` becomes a ``MatvecLinear`` and every MoE ``Router`` a ``MatvecRouter``,
    sharing their parameters (a [16, D] router product costs ~30 us as a GEMM call, ~1 us fused)."""
    swaps = {nn.Linear: MatvecLinear, Router: MatvecRouter}
    for m in list(model.modules()):
        if type(m) in swaps:
            m.__class__ = swaps[type(m)]  # same parameters, hooks and state; only forward differs
    return model
