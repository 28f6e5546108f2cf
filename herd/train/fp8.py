"""FP8 training as a transform applied from outside the model: ``apply_fp8(model, recipe, backend)``.

Numerics are torchao's float8 training recipes, matmul by matmul. For ``y_MN = x_MK @ w_NK.T`` (the GEMM
convention of herd.model: M rows, K in, N out) the forward casts x and w to e4m3; the backward casts the output
gradient g_MN and computes ``grad_x_MK = g8 @ w8`` and ``grad_w_NK = g8.T @ x8``. Each operand of each of the
three matmuls is scaled along that matmul's contracted dim:

* ``tensorwise``: one scale per tensor (amax / 448 for e4m3), gradients in e5m2;
* ``rowwise``: one scale per row of the contracted dim (x per token and w per output channel in the forward, w per
  input channel for grad_x, g and x per column for grad_w), gradients in e4m3, scales rounded down to powers of 2.

Routed experts are grouped matmuls, cast the way torchao's MoE training casts them (rowwise: each expert's weight
per output channel, grad_w scaled per expert's group of tokens); ``tensorwise`` there means one scale per
activation tensor and one per expert's weight matrix.

Backends:

* ``torchao``: the attention / FFN / shared-expert linears become torchao ``Float8Linear``, which calls
  ``torch._scaled_mm`` (FP8 tensor cores on Hopper; a reference kernel on CPU, so the path is tested here);
* ``emulate``: every targeted matmul quantises and dequantises its operands with the scales above and multiplies
  them with fp32 accumulation, as the FP8 kernels do: in bf16 when the scales are powers of 2 and the output is
  bf16 (exact there), else in fp32. It matches the torchao backend up to summation order (tests/test_fp8.py);
* ``auto`` (the default): torchao on a CUDA GPU with FP8 tensor cores (Ada, Hopper) when torchao is installed,
  the emulation elsewhere.

Routed experts always use the emulation: torchao's FP8 grouped matmul is a Triton-only prototype.
Kept in high precision, as torchao and Meta do: the embedding, the LM head, the router, norms, the vision tower,
and any linear whose dims are not multiples of 16 (FP8 kernels need them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from herd.model.moe import Experts, grouped_mm

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
RECIPES = ("tensorwise", "rowwise")
BACKENDS = ("auto", "torchao", "emulate")


@dataclass(frozen=True)
class Fp8Recipe:
    """torchao's Float8LinearConfig.from_recipe_name(name), as far as the numerics go."""
    name: str
    rowwise: bool
    grad_dtype: torch.dtype
    pow2_scales: bool

    @classmethod
    def of(cls, name: str) -> Fp8Recipe:
        if name not in RECIPES:
            raise ValueError(f"fp8 recipe {name!r}: choose one of {', '.join(RECIPES)}")
        rowwise = name == "rowwise"
        return cls(name, rowwise, E4M3 if rowwise else E5M2, rowwise)

    def dim(self, d: int | tuple[int, ...]) -> int | tuple[int, ...] | None:
        """The amax reduction dim for an operand contracted along ``d``; None (whole tensor) when tensorwise."""
        return d if self.rowwise else None


def quantize_dequantize(t: torch.Tensor, dtype: torch.dtype, dim: int | tuple[int, ...] | None = None,
                        pow2: bool = False) -> torch.Tensor:
    """t (as fp32) rounded through ``dtype``, scaled so that the amax over ``dim`` (None: the whole tensor) maps to
    the format's max; torchao's arithmetic: the scale computed in fp64, then fp32, optionally rounded down to a
    power of 2; saturating cast."""
    tf = t.float()
    amax = tf.abs().amax() if dim is None else tf.abs().amax(dim=dim, keepdim=True)
    fmax = torch.finfo(dtype).max
    scale = (fmax / amax.double().clamp(min=1e-12)).float()
    if pow2:
        scale = torch.exp2(torch.floor(torch.log2(scale)))
    return (tf * scale).clamp(-fmax, fmax).to(dtype).float() / scale


def _out_dtype(x: torch.Tensor) -> torch.dtype:
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


def _cast_out(y: torch.Tensor, dtype: torch.dtype, r: Fp8Recipe) -> torch.Tensor:
    if r.rowwise and dtype != torch.bfloat16:
        y = y.to(torch.bfloat16)  # as torchao: rowwise torch._scaled_mm has no fp32/fp16 output
    return y.to(dtype)


def _no_autocast(x: torch.Tensor):
    """The operands' dtype is chosen here (_compute_dtype), not by autocast."""
    return torch.autocast(x.device.type, enabled=False)


def _compute_dtype(r: Fp8Recipe, out_dtype: torch.dtype) -> torch.dtype:
    """The dtype the dequantised operands are multiplied in. An FP8 value times a power-of-2 scale is exact in
    bf16 (3 mantissa bits of 7, the same exponent range as fp32), and bf16 matmuls accumulate in fp32, so with
    power-of-2 scales and a bf16 output a bf16 matmul gives the FP8 kernel's result, at bf16 speed (on a GPU,
    tensor cores instead of fp32 for the routed experts). Otherwise fp32."""
    return torch.bfloat16 if r.pow2_scales and out_dtype == torch.bfloat16 else torch.float32


def _quantizer(r: Fp8Recipe, out_dtype: torch.dtype):
    """quantize_dequantize with the recipe's scales, giving operands in the compute dtype."""
    dtype = _compute_dtype(r, out_dtype)
    return lambda t, fp8, dim=None: quantize_dequantize(t, fp8, dim, r.pow2_scales).to(dtype)


class _Fp8LinearFn(torch.autograd.Function):
    """x [..., K] (the leading dims are the M rows), w_NK -> y [..., N]."""

    @staticmethod
    def forward(ctx, x, w_NK, recipe: Fp8Recipe, out_dtype: torch.dtype):
        ctx.save_for_backward(x, w_NK)
        ctx.recipe = recipe
        q = _quantizer(recipe, out_dtype)
        with _no_autocast(x):
            y_MN = q(x.reshape(-1, x.shape[-1]), E4M3, recipe.dim(-1)) @ q(w_NK, E4M3, recipe.dim(-1)).T
        return _cast_out(y_MN, out_dtype, recipe).reshape(*x.shape[:-1], w_NK.shape[0])

    @staticmethod
    def backward(ctx, g):
        x, w_NK = ctx.saved_tensors
        r = ctx.recipe
        q = _quantizer(r, g.dtype)
        g_MN, x_MK = g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1])
        with _no_autocast(x):
            grad_x_MK = q(g_MN, r.grad_dtype, r.dim(-1)) @ q(w_NK, E4M3, r.dim(0))
            grad_w_NK = q(g_MN, r.grad_dtype, r.dim(0)).T @ q(x_MK, E4M3, r.dim(0))
        # in g's dtype, as the kernels write them; autograd casts to x's and w's
        return (_cast_out(grad_x_MK, g.dtype, r).reshape(x.shape), _cast_out(grad_w_NK, g.dtype, r), None,
                None)


class _Fp8GroupedMMFn(torch.autograd.Function):
    """x_MK sorted by expert, w_ENK (out x in), offsets_E the cumulative group ends -> y_MN."""

    @staticmethod
    def forward(ctx, x_MK, w_ENK, offsets_E, recipe: Fp8Recipe, out_dtype: torch.dtype):
        ctx.save_for_backward(x_MK, w_ENK, offsets_E)
        ctx.recipe = recipe
        q = _quantizer(recipe, out_dtype)
        w_dim = -1 if recipe.rowwise else (-2, -1)  # per expert and output channel / per expert
        with _no_autocast(x_MK):
            return grouped_mm(q(x_MK, E4M3, recipe.dim(-1)), q(w_ENK, E4M3, w_dim), offsets_E).to(out_dtype)

    @staticmethod
    def backward(ctx, g_MN):
        x_MK, w_ENK, offsets_E = ctx.saved_tensors
        r = ctx.recipe
        q = _quantizer(r, g_MN.dtype)
        w_dim = -2 if r.rowwise else (-2, -1)  # contracted over the output channels now
        g_rows = q(g_MN, r.grad_dtype, r.dim(-1))  # per row, or (tensorwise) the whole tensor
        g8, x8 = (None, None) if r.rowwise else (g_rows, q(x_MK, E4M3))
        grad_w_ENK, start = torch.zeros(w_ENK.shape, dtype=_compute_dtype(r, g_MN.dtype), device=w_ENK.device), 0
        with _no_autocast(x_MK):
            grad_x_MK = grouped_mm(g_rows, q(w_ENK, E4M3, w_dim).transpose(-2, -1), offsets_E)
            for e, end in enumerate(offsets_E.tolist()):
                if end > start:  # rowwise: the group's own column scales over its rows
                    g_e = g8[start:end] if g8 is not None else q(g_MN[start:end], r.grad_dtype, 0)
                    x_e = x8[start:end] if x8 is not None else q(x_MK[start:end], E4M3, 0)
                    grad_w_ENK[e] = g_e.T @ x_e
                start = end
        return grad_x_MK.to(g_MN.dtype), grad_w_ENK.to(g_MN.dtype), None, None, None


def fp8_linear(x: torch.Tensor, w_NK: torch.Tensor, recipe: str | Fp8Recipe = "tensorwise") -> torch.Tensor:
    r = recipe if isinstance(recipe, Fp8Recipe) else Fp8Recipe.of(recipe)
    return _Fp8LinearFn.apply(x, w_NK, r, _out_dtype(x))


def fp8_grouped_mm(x_MK: torch.Tensor, w_ENK: torch.Tensor, offsets_E: torch.Tensor,
                   recipe: str | Fp8Recipe = "tensorwise") -> torch.Tensor:
    r = recipe if isinstance(recipe, Fp8Recipe) else Fp8Recipe.of(recipe)
    return _Fp8GroupedMMFn.apply(x_MK, w_ENK, offsets_E, r, _out_dtype(x_MK))


def _fp8_ok(m: nn.Linear) -> bool:
    return m.in_features % 16 == 0 and m.out_features % 16 == 0


def _torchao_float8():
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError as e:
        raise ImportError("fp8 backend 'torchao' needs torchao: pip install 'herd[fp8]' (or use backend "
                          "'emulate')") from e
    return Float8LinearConfig, convert_to_float8_training


def uses_torchao(backend: str, device: torch.device, capability: tuple[int, int] | None = None) -> bool:
    """Whether ``backend`` means torchao's Float8Linear on ``device``. FP8 tensor cores start at compute
    capability 8.9 (Ada, Hopper): ``auto`` emulates below it, and an explicit ``torchao`` there is an error
    now rather than a kernel failure at the first step. ``capability``: the GPU's, when known."""
    if backend not in BACKENDS:
        raise ValueError(f"fp8 backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if backend == "emulate":
        return False
    if device.type == "cuda":
        capability = capability or torch.cuda.get_device_capability(device)
        if capability < (8, 9):
            if backend == "torchao":
                raise ValueError(f"fp8 backend 'torchao' needs FP8 tensor cores (compute capability 8.9+: Ada, "
                                 f"Hopper); this GPU is {capability[0]}.{capability[1]}: use backend 'emulate'")
            return False
    elif backend == "auto":
        return False  # on CPU the emulation is the faster of the two
    try:
        _torchao_float8()
    except ImportError:
        if backend == "torchao":
            raise
        return False
    return True


class Fp8Linear(nn.Linear):
    """nn.Linear with the emulated FP8 matmul. Made by swapping a built Linear's class (``to_fp8``), so its
    parameters, their names and their identity are the Linear's own."""
    recipe: Fp8Recipe

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = fp8_linear(x, self.weight, self.recipe)
        return y if self.bias is None else y + self.bias.to(y.dtype)


class Fp8Experts(Experts):
    """Experts with the emulated FP8 grouped matmuls; made by a class swap like Fp8Linear."""
    recipe: Fp8Recipe

    def forward(self, x_RD: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
        gate_up_ENK, down_ENK = self.local_weights()
        gate_RF, up_RF = fp8_grouped_mm(x_RD, gate_up_ENK, offsets_E, self.recipe).chunk(2, dim=-1)
        return fp8_grouped_mm(torch.nn.functional.silu(gate_RF) * up_RF, down_ENK, offsets_E, self.recipe)


def to_fp8(m: nn.Linear | Experts, recipe: Fp8Recipe) -> None:
    """Swap ``m`` in place to its FP8 subclass: the recipe first, so the new forward never runs without it."""
    m.recipe = recipe
    m.__class__ = Fp8Experts if isinstance(m, Experts) else Fp8Linear


def apply_fp8(model: nn.Module, recipe: str = "tensorwise", backend: str = "auto") -> list[str]:
    """Make the model's attention, FFN and expert matmuls FP8 (see the module doc); return the converted names."""
    r = Fp8Recipe.of(recipe)
    use_torchao = uses_torchao(backend, next(model.parameters()).device)

    def wanted(name: str, m: nn.Module) -> bool:
        return (type(m) is nn.Linear and _fp8_ok(m) and not name.startswith("vision.")
                and name != "lm_head" and not name.endswith("router"))

    converted = [name for name, m in model.named_modules() if wanted(name, m) or type(m) is Experts]
    if use_torchao:
        config, convert = _torchao_float8()
        convert(model, config=config.from_recipe_name(recipe), module_filter_fn=lambda m, name: wanted(name, m))
    for name, m in model.named_modules():
        if type(m) is Experts or (not use_torchao and wanted(name, m)):
            to_fp8(m, r)
    return converted
