"""FP8 training as a transform applied from outside the model: ``apply_fp8(model, recipe)``.

Numerics follow torchao's float8 training: the inputs and weights of each matmul are scaled to their amax and
cast to float8 e4m3 in the forward; the output gradient is scaled and cast to e5m2 before the two backward
matmuls (grad_input = g8 @ w8, grad_weight = g8.T @ x8). Scaling is ``tensorwise`` (one scale per tensor) or
``rowwise`` (one per row along the contracted dim: per token for inputs and output gradients, per output
channel for weights). Each routed expert's weight is its own tensor (one scale per expert, tensorwise).

* On CUDA with torchao installed, the attention / FFN / shared-expert linears become torchao ``Float8Linear``
  (real FP8 matmuls on Hopper), and the routed experts use the emulation below (torchao's grouped-expert FP8 is a
  prototype API).
* Elsewhere (CPU, tests) every targeted matmul is *emulated*: quantise-dequantise to FP8 and multiply in the
  original precision, which reproduces FP8's rounding of the operands (not its accumulation).

Kept in high precision, as torchao and Meta do: the embedding, the LM head, the router, norms, and any linear
whose dims are not multiples of 16 (FP8 kernels need them).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from herd.model.moe import Experts, grouped_mm

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
RECIPES = ("tensorwise", "rowwise")


def quantize_dequantize(t: torch.Tensor, dtype: torch.dtype, dims: tuple[int, ...] | None) -> torch.Tensor:
    """t rounded through ``dtype`` with an amax scale over ``dims`` (None: the whole tensor; (-1,): per row)."""
    tf = t.float()
    amax = tf.abs().amax() if dims is None else tf.abs().amax(dim=dims, keepdim=True)
    scale = torch.finfo(dtype).max / amax.clamp(min=1e-12)
    return ((tf * scale).to(dtype).float() / scale).to(t.dtype)


class _ForwardFp8(torch.autograd.Function):
    """Forward: the operand rounded through e4m3. Backward: the gradient passes unchanged (it is the rounded
    operand's gradient, computed from the e5m2 output gradient below)."""

    @staticmethod
    def forward(ctx, t, dims):
        return quantize_dequantize(t, E4M3, dims)

    @staticmethod
    def backward(ctx, g):
        return g, None


class _BackwardFp8(torch.autograd.Function):
    """Forward: identity. Backward: the output gradient rounded through e5m2 (wider range, for gradients)."""

    @staticmethod
    def forward(ctx, t, dims):
        ctx.dims = dims
        return t.view_as(t)

    @staticmethod
    def backward(ctx, g):
        return quantize_dequantize(g, E5M2, ctx.dims), None


def fp8_linear(x: torch.Tensor, w: torch.Tensor, rowwise: bool) -> torch.Tensor:
    dims = (-1,) if rowwise else None
    return _BackwardFp8.apply(F.linear(_ForwardFp8.apply(x, dims), _ForwardFp8.apply(w, dims)), dims)


def fp8_grouped_mm(x: torch.Tensor, w_EMK: torch.Tensor, offsets: torch.Tensor, rowwise: bool) -> torch.Tensor:
    dims = (-1,) if rowwise else None
    w_dims = (-1,) if rowwise else (-2, -1)  # "tensorwise" for experts: one scale per expert's matrix
    out = grouped_mm(_ForwardFp8.apply(x, dims), _ForwardFp8.apply(w_EMK, w_dims), offsets)
    return _BackwardFp8.apply(out, dims)


def _fp8_ok(m: nn.Linear) -> bool:
    return m.in_features % 16 == 0 and m.out_features % 16 == 0


def apply_fp8(model: nn.Module, recipe: str = "tensorwise", emulate: bool | None = None) -> list[str]:
    """Make the model's attention, FFN and expert matmuls FP8 (see module doc); return the converted names.
    ``emulate``: None = real FP8 (torchao) for linears on CUDA when available, emulation otherwise."""
    if recipe not in RECIPES:
        raise ValueError(f"fp8 recipe {recipe!r}: choose one of {', '.join(RECIPES)}")
    rowwise = recipe == "rowwise"
    on_cuda = next(model.parameters()).device.type == "cuda"
    use_torchao = on_cuda and not emulate
    if use_torchao:
        try:
            from torchao.float8 import Float8LinearConfig, convert_to_float8_training
        except ImportError:
            if emulate is False:
                raise
            use_torchao = False
    converted = []

    def wanted(name: str, m: nn.Module) -> bool:
        return (isinstance(m, nn.Linear) and _fp8_ok(m) and not name.startswith("vision.")
                and name != "lm_head" and not name.endswith("router"))

    if use_torchao:
        convert_to_float8_training(model, config=Float8LinearConfig.from_recipe_name(recipe),
                                   module_filter_fn=lambda m, name: wanted(name, m))
        converted += [n for n, m in model.named_modules() if type(m).__name__ == "Float8Linear"]
    else:
        for name, m in model.named_modules():
            if wanted(name, m):
                m.forward = functools.partial(_emulated_linear_forward, m, rowwise)
                converted.append(name)
    for name, m in model.named_modules():
        if type(m) is Experts:
            m.forward = functools.partial(_emulated_experts_forward, m, rowwise)
            converted.append(name)
    return converted


def _emulated_linear_forward(m: nn.Linear, rowwise: bool, x: torch.Tensor) -> torch.Tensor:
    return fp8_linear(x, m.weight, rowwise)


def _emulated_experts_forward(m: Experts, rowwise: bool, x_ND: torch.Tensor, offsets_E: torch.Tensor,
                              weights: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    gate_up, down = weights or (m.gate_up_proj, m.down_proj)
    gate, up = fp8_grouped_mm(x_ND, gate_up, offsets_E, rowwise).chunk(2, dim=-1)
    return fp8_grouped_mm(F.silu(gate) * up, down, offsets_E, rowwise)
