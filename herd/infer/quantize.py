"""Weight quantization as a transform of a loaded model.

Applied from outside the model (torchtitan style): ``quantize`` swaps ``nn.Linear`` for ``QuantLinear`` and the
routed ``Experts`` for ``QuantExperts`` (same ``forward(x_RD, offsets_E)``), in place; herd/model has no
quantization branch. Embeddings, norms and the router always stay in the model dtype; lm_head is quantized only
with ``quantize_lm_head=True``. Schemes:

  int8   int8 weights, symmetric, one fp32 scale per output channel (per expert and output row for the routed
         experts). CPU: torch._weight_int8pack_mm for a few rows (decode), dequantize + dense GEMM otherwise.
  int4   int4 weights, symmetric, one fp32 scale per group of ``group_size`` inputs (halved until it divides the
         input dim), two per byte. Dequantize + GEMM.
  int4_weight_int8_dynamic_activation
         llama-models' scheme of that name (torchao Int8DynActInt4WeightLinear): the int4 weights above, and
         every activation row fake-quantized to int8 (asymmetric, per token) before the matmul.
  fp8    float8_e4m3fn weights, one fp32 scale per output row; by default only the routed experts, and not those
         of the first and last layer (Meta's fp8_mixed; Llama-4-Maverick-FP8). CPU: dequantize to the compute
         dtype; CUDA sm89+: torch._scaled_mm rowwise with per-token fp8 activations, as fbgemm does (the routed
         experts in one torch._scaled_grouped_mm on Hopper).

int4 is symmetric like both Meta references (fbgemm int4_mixed, torchao 8da4w): no zero points to store, and
torchao's scale (amax / 7.5, clamp to [-8, 7]) uses the -8 level. Packing: uint8 [N, K/2], low nibble = even
input index, nibble = q + 8.

Checkpoints (herd.checkpoint.quantized): ``save_quantized`` writes int8/int4 in herd's own layout
(``...q_proj.weight`` packed + ``...q_proj.weight_scale``; routed experts fused, ``experts.gate_up_proj`` [E, 2F, D]
out x in + ``_scale``) and fp8 as compressed-tensors with per-expert unfused experts, the layout of
Llama-4-Maverick-17B-128E-Instruct-FP8. ``herd.checkpoint.load`` reads both.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from herd.config import ModelConfig
from herd.model import Transformer
from herd.model.moe import Experts

SCHEMES = ("int8", "int4", "int4_weight_int8_dynamic_activation", "fp8")
# the dtype each scheme stores its weights in (int4: two per uint8)
STORAGE = {"int8": torch.int8, "int4": torch.uint8, "int4_weight_int8_dynamic_activation": torch.uint8,
           "fp8": torch.float8_e4m3fn}
PACKED_DTYPES = (torch.int8, torch.uint8, torch.float8_e4m3fn)
_FP8_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448
_FP8_ACT_UB = 1200.0  # activation amax clamp of fbgemm's quantize_fp8_per_row, as llama-models sets it
# Rows up to which torch's int8 weight-only CPU kernel beats dequantize + GEMM (2-core AVX-512, 4096^2 weight:
# 6x faster at 1 row in bf16, still ahead at 64, behind at 128; in fp32 it has no fast path, behind from 8 rows).
_INT8_KERNEL_ROWS = {torch.bfloat16: 64, torch.float16: 64, torch.float32: 4}


def check_scheme(scheme: str) -> str:
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    return scheme


# -- weight formats ---------------------------------------------------------------------------------------------
def int4_group(k: int, group_size: int) -> int:
    """The group used along an input dim of size k: ``group_size``, halved until it divides k."""
    g = group_size
    while g > 1 and k % g:
        g //= 2
    if k % 2 or g < 16:
        raise ValueError(f"int4: input dim {k} cannot be split in groups of {group_size} (nor a half, quarter... "
                         f"down to 16) and packed two per byte; pass a group_size that divides {k}")
    return g


def packed_shapes(n: int, k: int, scheme: str, group_size: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(weight, scale) shapes of an [n, k] weight in ``scheme``. Scales are [n, groups] with one group for the
    per-channel schemes: the [out, 1] of compressed-tensors and fbgemm, and one dequantize for all schemes."""
    if STORAGE[scheme] == torch.uint8:
        return (n, k // 2), (n, k // int4_group(k, group_size))
    return (n, k), (n, 1)


@torch.no_grad()
def quantize_weight(w_NK: torch.Tensor, scheme: str, group_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., N, K] float -> (packed weight, fp32 scale [..., N, groups]) as ``packed_shapes`` describes."""
    w = w_NK.float()  # statistics and rounding in fp32 whatever the model dtype
    if scheme == "int8":
        scale = w.abs().amax(-1, keepdim=True).clamp(min=1e-12) / 127
        return (w / scale).round().clamp(-127, 127).to(torch.int8), scale
    if scheme == "fp8":
        scale = w.abs().amax(-1, keepdim=True).clamp(min=1e-12) / _FP8_MAX
        return (w / scale).clamp(-_FP8_MAX, _FP8_MAX).to(torch.float8_e4m3fn), scale
    k = w.shape[-1]
    g = int4_group(k, group_size)
    w_NGg = w.unflatten(-1, (k // g, g))
    scale = w_NGg.abs().amax(-1).clamp(min=1e-12) / 7.5
    u = ((w_NGg / scale[..., None]).round().clamp(-8, 7) + 8).flatten(-2).to(torch.uint8)
    return u[..., 0::2] | (u[..., 1::2] << 4), scale


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor, scheme: str, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of ``quantize_weight``: [..., N, K] in ``dtype`` (scaled in fp32, rounded once)."""
    if STORAGE[scheme] == torch.uint8:
        q_NK = torch.stack((q & 15, q >> 4), dim=-1).flatten(-2).float() - 8
    else:
        q_NK = q.float()
    return (q_NK.unflatten(-1, (scale.shape[-1], -1)) * scale.float()[..., None]).flatten(-2).to(dtype)


def fake_quantize_per_token_int8(x: torch.Tensor) -> torch.Tensor:
    """torchao's dynamic activation quantization of 8da4w, quantized and dequantized: each row (token) to int8
    with its own scale and zero point, so the range [min(row, 0), max(row, 0)] maps onto [-128, 127]."""
    xf = x.float()
    lo, hi = xf.amin(-1, keepdim=True).clamp(max=0), xf.amax(-1, keepdim=True).clamp(min=0)
    scale = ((hi - lo) / 255).clamp(min=torch.finfo(torch.float32).eps)
    zero = (-128 - lo / scale).clamp(-128, 127).round()
    q = (xf / scale + zero).round().clamp(-128, 127)
    return ((q - zero) * scale).to(x.dtype)


def aligned(t: torch.Tensor) -> bool:
    return t.data_ptr() % 64 == 0  # torch's CPU allocator aligns to 64 bytes; safetensors' buffers only to 8


def _fp8_gemm_ok(x: torch.Tensor, q_NK: torch.Tensor, grouped: bool = False) -> bool:
    # torch's rowwise-scaled fp8 GEMMs: CUDA sm89+ (grouped: Hopper only), bf16 output, dims multiple of 16
    if not (x.is_cuda and q_NK.dtype == torch.float8_e4m3fn and x.dtype == torch.bfloat16
            and q_NK.shape[-1] % 16 == 0 and q_NK.shape[-2] % 16 == 0):
        return False
    capability = torch.cuda.get_device_capability(x.device)
    if grouped:
        return hasattr(torch, "_scaled_grouped_mm") and capability[0] == 9
    return hasattr(torch, "_scaled_mm") and capability >= (8, 9)


def _fp8_rows(x_MK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token fp8 activations as fbgemm's quantize_fp8_per_row: scale = min(amax, 1200) / 448."""
    x_scale_M1 = x_MK.abs().amax(-1, keepdim=True).float().clamp_(1e-12, _FP8_ACT_UB) / _FP8_MAX
    # the cast to fp8 does not saturate (out of range gives NaN): clamp first
    return (x_MK / x_scale_M1).clamp_(-_FP8_MAX, _FP8_MAX).to(torch.float8_e4m3fn), x_scale_M1


def fp8_rowwise_mm(x_MK: torch.Tensor, q_NK: torch.Tensor, scale_N1: torch.Tensor) -> torch.Tensor:
    xq_MK, x_scale_M1 = _fp8_rows(x_MK)
    # the second operand must be column-major: the transpose of the row-major [N, K] weight is; fast
    # accumulation as fbgemm's f8f8bf16_rowwise runs it for Llama 4
    return torch._scaled_mm(xq_MK, q_NK.t(), scale_a=x_scale_M1, scale_b=scale_N1.reshape(1, -1),
                            out_dtype=x_MK.dtype, use_fast_accum=True)


def _fp8_grouped_mm(x_MK: torch.Tensor, q_ENK: torch.Tensor, scale_EN1: torch.Tensor,
                    offsets_E: torch.Tensor) -> torch.Tensor:
    """All experts in one kernel, without the host sync of a per-expert loop (CUDA-graph friendly)."""
    xq_MK, x_scale_M1 = _fp8_rows(x_MK)
    return torch._scaled_grouped_mm(xq_MK, q_ENK.transpose(-2, -1), x_scale_M1.view(-1), scale_EN1.squeeze(-1),
                                    offs=offsets_E, out_dtype=x_MK.dtype, use_fast_accum=True)


def qmatmul(x_MK: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, scheme: str) -> torch.Tensor:
    """x [M, K] @ W.T for a quantized weight W [N, K] -> [M, N] in x's dtype."""
    if (scheme == "int8" and x_MK.device.type == "cpu" and q.dtype == torch.int8 and aligned(q)
            and x_MK.shape[0] <= _INT8_KERNEL_ROWS.get(x_MK.dtype, 0) and hasattr(torch, "_weight_int8pack_mm")):
        # the kernel's vector loads crash (torch 2.14, AVX-512) on activations not 32-byte aligned, as a row
        # slice can be; a copy of a few rows is cheap
        x_MK = x_MK if x_MK.is_contiguous() and aligned(x_MK) else x_MK.clone(memory_format=torch.contiguous_format)
        return torch._weight_int8pack_mm(x_MK, q, scale.to(x_MK.dtype).reshape(-1))
    if scheme == "fp8" and _fp8_gemm_ok(x_MK, q):
        return fp8_rowwise_mm(x_MK, q, scale)
    if scheme == "int4_weight_int8_dynamic_activation":
        x_MK = fake_quantize_per_token_int8(x_MK)
    return F.linear(x_MK, dequantize_weight(q, scale, scheme, x_MK.dtype))


# -- modules ----------------------------------------------------------------------------------------------------
def _frozen(t: torch.Tensor) -> nn.Parameter:
    # Parameters (not buffers) so that checkpoint loading, .to(device) and byte counts treat them like weights
    return nn.Parameter(t, requires_grad=False)


class QuantLinear(nn.Module):
    """Stands in for a bias-free ``nn.Linear(K -> N)``: ``weight`` packed, ``weight_scale`` fp32."""

    def __init__(self, in_features: int, out_features: int, scheme: str, group_size: int = 128):
        super().__init__()
        self.in_features, self.out_features, self.scheme = in_features, out_features, check_scheme(scheme)
        q_shape, s_shape = packed_shapes(out_features, in_features, scheme, group_size)
        self.weight = _frozen(torch.empty(q_shape, dtype=STORAGE[scheme]))
        self.weight_scale = _frozen(torch.empty(s_shape))

    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme: str, group_size: int = 128) -> QuantLinear:
        if linear.bias is not None:
            raise ValueError("QuantLinear has no bias (no Llama 4 linear layer has one)")
        with torch.device("meta"):
            m = cls(linear.in_features, linear.out_features, scheme, group_size)
        q, scale = quantize_weight(linear.weight, scheme, group_size)
        m.weight, m.weight_scale = _frozen(q), _frozen(scale)
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = qmatmul(x.reshape(-1, self.in_features), self.weight, self.weight_scale, self.scheme)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme}"


class QuantExperts(nn.Module):
    """Stands in for ``Experts``. Weights are stored out x in, so that each expert's slice is a ``QuantLinear``
    weight: gate_up_proj [E, 2F, D] (gate rows, then up rows), down_proj [E, D, F], and their ``_scale``s."""

    def __init__(self, n_experts: int, dim: int, hidden_dim: int, scheme: str, group_size: int = 128):
        super().__init__()
        self.n_experts, self.dim, self.hidden_dim, self.scheme = n_experts, dim, hidden_dim, check_scheme(scheme)
        gu_q, gu_s = packed_shapes(2 * hidden_dim, dim, scheme, group_size)
        d_q, d_s = packed_shapes(dim, hidden_dim, scheme, group_size)
        self.gate_up_proj = _frozen(torch.empty(n_experts, *gu_q, dtype=STORAGE[scheme]))
        self.gate_up_proj_scale = _frozen(torch.empty(n_experts, *gu_s))
        self.down_proj = _frozen(torch.empty(n_experts, *d_q, dtype=STORAGE[scheme]))
        self.down_proj_scale = _frozen(torch.empty(n_experts, *d_s))

    @classmethod
    def from_experts(cls, experts: Experts, scheme: str, group_size: int = 128) -> QuantExperts:
        E, F2, D = experts.gate_up_proj.shape
        with torch.device("meta"):
            m = cls(E, D, F2 // 2, scheme, group_size)
        device = experts.gate_up_proj.device
        for name, w_ENK in (("gate_up_proj", experts.gate_up_proj), ("down_proj", experts.down_proj)):
            q = torch.empty(getattr(m, name).shape, dtype=STORAGE[scheme], device=device)
            scale = torch.empty(getattr(m, name + "_scale").shape, device=device)
            for e in range(E):  # one expert at a time: an fp32 copy of a whole Maverick layer would be 40+ GB
                q[e], scale[e] = quantize_weight(w_ENK[e], scheme, group_size)
            setattr(m, name, _frozen(q))
            setattr(m, name + "_scale", _frozen(scale))
        return m

    def forward(self, x_RD: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
        if _fp8_gemm_ok(x_RD, self.gate_up_proj, grouped=True) and _fp8_gemm_ok(x_RD, self.down_proj, grouped=True):
            gate, up = _fp8_grouped_mm(x_RD, self.gate_up_proj, self.gate_up_proj_scale, offsets_E).chunk(2, dim=-1)
            return _fp8_grouped_mm(F.silu(gate) * up, self.down_proj, self.down_proj_scale, offsets_E)
        # else one quantized matmul per expert that has rows: touches only the active experts' weights
        out_RD, start = x_RD.new_empty(x_RD.shape[0], self.dim), 0
        for e, end in enumerate(offsets_E.tolist()):
            if end > start:
                h = qmatmul(x_RD[start:end], self.gate_up_proj[e], self.gate_up_proj_scale[e], self.scheme)
                gate, up = h.chunk(2, dim=-1)
                out_RD[start:end] = qmatmul(F.silu(gate) * up, self.down_proj[e], self.down_proj_scale[e], self.scheme)
            start = end
        return out_RD

    def extra_repr(self) -> str:
        return f"n_experts={self.n_experts}, dim={self.dim}, hidden_dim={self.hidden_dim}, scheme={self.scheme}"


QUANT_MODULES = (QuantLinear, QuantExperts)


# -- applying ---------------------------------------------------------------------------------------------------
@dataclass
class QuantizationInfo:
    """What ``quantize`` did, kept on the model as ``model.quantization`` (and written to config.json)."""

    scheme: str
    group_size: int = 128
    experts_only: bool = False
    quantize_lm_head: bool = False
    skipped: list[str] = field(default_factory=list)  # quantizable modules left in the model dtype


def default_skip(cfg: ModelConfig, scheme: str) -> tuple[str, ...]:
    # Meta's fp8_mixed keeps the first and last layers in bf16 (llama_models/llama4/quantization/loader.py)
    return ("layers.0.*", f"layers.{cfg.n_layers - 1}.*") if scheme == "fp8" else ()


def quantizable(model: Transformer, experts_only: bool, quantize_lm_head: bool) -> list[str]:
    """Names of the modules a scheme may swap: routed experts, and (unless experts_only) every nn.Linear."""
    if quantize_lm_head and model.cfg.tie_embeddings:
        raise ValueError("lm_head is tied to the embedding, which stays unquantized; pass quantize_lm_head=False")
    names = []
    for name, m in model.named_modules():
        if name.startswith("vision."):
            continue  # the vision tower stays in bf16, as in Meta's quantized checkpoints
        if isinstance(m, (Experts, QuantExperts)):
            names.append(name)
        elif isinstance(m, (nn.Linear, QuantLinear)) and not experts_only and (name != "lm_head" or quantize_lm_head):
            names.append(name)
    return names


@torch.no_grad()
def quantize(model: Transformer, scheme: str, group_size: int = 128, skip: Iterable[str] | None = None,
             quantize_lm_head: bool = False, experts_only: bool | None = None, progress: bool = False) -> Transformer:
    """Quantize ``model``'s weights in place (module swaps) and return it.

    skip: glob patterns of module names to keep (``"layers.0.*"``, ``"*.self_attn.*"``); default: none, or the
    first and last layer for fp8. experts_only: default True for fp8, False otherwise. Cast the model to its
    compute dtype first: ``model.to(dtype)`` afterwards would also cast the fp8 weights and the fp32 scales."""
    check_scheme(scheme)
    if getattr(model, "quantization", None) is not None or any(isinstance(m, QUANT_MODULES) for m in model.modules()):
        raise ValueError("model is already quantized; quantize the original weights")
    experts_only = scheme == "fp8" if experts_only is None else experts_only
    patterns = default_skip(model.cfg, scheme) if skip is None else tuple(skip)
    names = quantizable(model, experts_only, quantize_lm_head)
    if skip is not None:
        unused = [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in names)]
        if unused:
            raise ValueError(f"skip pattern {unused[0]!r} matches no quantizable module "
                             f"(they are named like {', '.join(names[:2]) or 'nothing: there are none'})")
    skipped = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    targets = [n for n in names if n not in skipped]
    if STORAGE[scheme] == torch.uint8:  # fail on an impossible group before half the model is converted
        for name in targets:
            m = model.get_submodule(name)
            for k in ((m.gate_up_proj.shape[2], m.down_proj.shape[2]) if isinstance(m, Experts) else (m.in_features,)):
                try:
                    int4_group(k, group_size)
                except ValueError as e:
                    raise ValueError(f"{name}: {e}") from None
    for name in tqdm(targets, disable=not progress, desc=f"quantizing to {scheme}", unit="module"):
        m = model.get_submodule(name)
        new = (QuantExperts.from_experts(m, scheme, group_size) if isinstance(m, Experts)
               else QuantLinear.from_linear(m, scheme, group_size))
        model.set_submodule(name, new)
    model.quantization = QuantizationInfo(scheme, group_size, experts_only, quantize_lm_head, skipped)
    return model


def model_bytes(model: nn.Module) -> int:
    """Bytes of the model's tensors (tied ones once)."""
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


@torch.no_grad()
def cast_unquantized(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast the floating parameters outside the quantized modules to ``dtype``, in place."""
    for m in model.modules():
        if isinstance(m, QUANT_MODULES):
            continue
        for p in m.parameters(recurse=False):
            if p.is_floating_point():
                p.data = p.data.to(dtype)  # in place on the Parameter: keeps a tied lm_head tied


__all__ = ["SCHEMES", "STORAGE", "PACKED_DTYPES", "QUANT_MODULES", "QuantLinear", "QuantExperts", "QuantizationInfo",
           "quantize", "quantize_weight", "dequantize_weight", "qmatmul", "fake_quantize_per_token_int8", "int4_group",
           "model_bytes", "default_skip", "quantizable", "check_scheme", "packed_shapes", "aligned", "cast_unquantized"]
