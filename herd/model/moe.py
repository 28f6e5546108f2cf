"""Mixture of experts: sigmoid top-k router, routed SwiGLU experts with sparse dispatch, shared expert.

Llama 4 semantics (both references): the router's sigmoid score scales each expert's *input*, and a shared
expert sees every token. The references run every expert on every token with a zero score for the unselected
ones; here tokens are sorted by expert and each expert multiplies only its own rows (a grouped matmul), so the
cost follows the active parameters.

Shapes as in herd.model: T tokens, D model dim, F expert hidden, E experts, A experts per token (top-k),
R = T * A rows after dispatch. The grouped matmuls name their operands by the GEMM convention:
rows x_MK sorted by expert, x_MK[rows of e] @ w_ENK[e].T -> y_MN.

Grouped-matmul backends (``GROUPED_MM``), plain functions of (x_MK, w_ENK, offsets_E); each ``Experts`` module
holds the name of one (``experts.backend``), chosen once for a use by ``set_grouped_mm_backend``, with
``pick_grouped_mm_backend`` naming the fast one for a device and dtype:

  loop              one matmul per expert that has rows: any device, dtype, autograd (the default)
  grouped           torch._grouped_mm (CPU; CUDA in bf16), the loop when the operands do not suit it
  grouped_autograd  ``grouped`` with its backward as two more grouped products: CPU training
  gather            each row times its own expert's weights, gathered: fixed shapes and no host sync, for a
                    compiled graph
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from herd.config import ModelConfig
from herd.model.ffn import FeedForward

_HAS_GROUPED_MM = hasattr(torch, "_grouped_mm")


def grouped_kernel_ok(*operands: torch.Tensor) -> bool:
    """Whether torch's grouped kernel takes these operands (as laid out in memory, whichever way they are then
    transposed): equal dtypes, 16-byte aligned rows, CPU, or CUDA in bf16 (its only CUDA dtype)."""
    t = operands[0]
    return (_HAS_GROUPED_MM and (t.device.type == "cpu" or (t.device.type == "cuda" and t.dtype == torch.bfloat16))
            and all(u.dtype == t.dtype and all(s * u.element_size() % 16 == 0 for s in u.stride() if s != 1)
                    for u in operands))


def grouped_mm_loop(x_MK: torch.Tensor, w_ENK: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    """Rows x[offsets[e-1]:offsets[e]] times w[e].T, one matmul per expert with rows -> [M, N]."""
    y_MN, start = x_MK.new_empty(x_MK.shape[0], w_ENK.shape[1]), 0
    for e, end in enumerate(offsets_E.tolist()):
        if end > start:
            y_MN[start:end] = x_MK[start:end] @ w_ENK[e].T
        start = end
    return y_MN


def grouped_mm(x_MK: torch.Tensor, w_ENK: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    """``grouped_mm_loop`` in one torch._grouped_mm call when the kernel takes the operands."""
    if grouped_kernel_ok(x_MK, w_ENK):
        return torch._grouped_mm(x_MK, w_ENK.transpose(-2, -1), offs=offsets_E)
    return grouped_mm_loop(x_MK, w_ENK, offsets_E)


class _GroupedMM(torch.autograd.Function):
    """grouped_mm with its backward as two more grouped products: grad_x = grad_y[rows] @ w[e] and
    grad_w[e] = grad_y[rows].T @ x[rows]. Autograd through per-expert slices of w instead would allocate and
    zero a full [E, N, K] gradient for every expert (E x the weight's bytes per step), and torch's CPU grouped
    kernel has no backward of its own."""

    @staticmethod
    def forward(ctx, x_MK, w_ENK, offsets_E):
        ctx.save_for_backward(x_MK, w_ENK, offsets_E)
        return grouped_mm(x_MK, w_ENK, offsets_E)

    @staticmethod
    def backward(ctx, grad_MN):
        x_MK, w_ENK, offsets_E = ctx.saved_tensors
        grad_MN = grad_MN.to(x_MK.dtype).contiguous()
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = grouped_mm(grad_MN, w_ENK.transpose(1, 2), offsets_E)
        if ctx.needs_input_grad[1]:
            if grouped_kernel_ok(grad_MN, x_MK):
                grad_w = torch._grouped_mm(grad_MN.t(), x_MK, offs=offsets_E)  # [E, N, K]; empty groups give 0
            else:
                grad_w, start = torch.zeros_like(w_ENK), 0
                for e, end in enumerate(offsets_E.tolist()):
                    if end > start:
                        grad_w[e] = grad_MN[start:end].T @ x_MK[start:end]
                    start = end
        return grad_x, grad_w, None


def grouped_mm_autograd(x_MK: torch.Tensor, w_ENK: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    """``grouped_mm`` with ``_GroupedMM``'s backward; under autocast both operands in the autocast dtype."""
    if torch.is_autocast_enabled(x_MK.device.type):
        dtype = torch.get_autocast_dtype(x_MK.device.type)
        x_MK, w_ENK = x_MK.to(dtype), w_ENK.to(dtype)
    return _GroupedMM.apply(x_MK, w_ENK.to(x_MK.dtype), offsets_E)


def gathered_mm(x_MK: torch.Tensor, w_ENK: torch.Tensor, expert_M: torch.Tensor) -> torch.Tensor:
    """Row m times w[expert[m]].T, for rows in any order: a batched matmul over gathered weights."""
    return torch.bmm(w_ENK[expert_M], x_MK[:, :, None]).squeeze(-1)


def grouped_mm_gather(x_MK: torch.Tensor, w_ENK: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    """``grouped_mm_loop`` without a host sync or a data-dependent shape: each row gathers its expert's weights."""
    expert_M = torch.searchsorted(offsets_E, torch.arange(x_MK.shape[0], device=x_MK.device), right=True)
    return gathered_mm(x_MK, w_ENK, expert_M)


GROUPED_MM: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "loop": grouped_mm_loop, "grouped": grouped_mm, "grouped_autograd": grouped_mm_autograd,
    "gather": grouped_mm_gather}


def pick_grouped_mm_backend(device: torch.device | str, dtype: torch.dtype) -> str:
    """The fastest eager backend on ``device`` for weights in ``dtype``, for training and inference alike: on CPU
    torch's grouped kernel with ``grouped_autograd``'s backward (the kernel has none of its own there; without
    gradients it is the plain kernel), on CUDA in bf16 the kernel (with its own backward), else the loop."""
    device_type = torch.device(device).type
    if device_type == "cpu":
        return "grouped_autograd"
    return "grouped" if device_type == "cuda" and dtype == torch.bfloat16 else "loop"


def set_grouped_mm_backend(model: nn.Module, name: str) -> None:
    """Make every ``Experts`` module of ``model`` multiply with the backend ``name`` (a key of GROUPED_MM)."""
    if name not in GROUPED_MM:
        raise ValueError(f"grouped matmul backend {name!r}: choose one of {', '.join(GROUPED_MM)}")
    for m in model.modules():
        if isinstance(m, Experts):
            m.backend = name


class Router(nn.Module):
    """Linear D -> E; top-k on the logits; sigmoid of each chosen logit is its score."""

    def __init__(self, dim: int, n_experts: int, top_k: int):
        super().__init__()
        self.top_k = top_k
        self.weight = nn.Parameter(torch.empty(n_experts, dim))

    def logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        return F.linear(x_TD, self.weight)

    def forward(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits_TE = self.logits(x_TD)
        top_logits_TA, experts_TA = torch.topk(logits_TE, self.top_k, dim=-1)
        scores_TA = torch.sigmoid(top_logits_TA.float()).to(x_TD.dtype)
        return scores_TA, experts_TA, logits_TE


class Experts(nn.Module):
    """E SwiGLU experts stored out x in, like nn.Linear: gate_up_proj [E, 2F, D] (gate rows, then up rows),
    down_proj [E, D, F]. (HF stores the transposes; herd.checkpoint converts.) Out x in keeps each output's
    weights contiguous, so a decode step streams them instead of walking columns a page apart."""

    backend = "loop"  # a key of GROUPED_MM; set_grouped_mm_backend picks a faster one for a use

    def __init__(self, n_experts: int, dim: int, hidden_dim: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, 2 * hidden_dim, dim))
        self.down_proj = nn.Parameter(torch.empty(n_experts, dim, hidden_dim))

    def local_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up, down) as this process holds them: under expert parallelism the parameters are DTensors
        sharded on the expert dim, and this rank multiplies its own experts' rows with its shards."""
        return tuple(w.to_local() if isinstance(w, DTensor) else w for w in (self.gate_up_proj, self.down_proj))

    def forward(self, x_RD: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
        mm = GROUPED_MM[self.backend]
        gate_up_ENK, down_ENK = self.local_weights()
        gate_RF, up_RF = mm(x_RD, gate_up_ENK, offsets_E).chunk(2, dim=-1)
        return mm(F.silu(gate_RF) * up_RF, down_ENK, offsets_E)


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts, self.top_k = cfg.n_experts, cfg.top_k
        self.router = Router(cfg.dim, cfg.n_experts, cfg.top_k)
        self.experts = Experts(cfg.n_experts, cfg.dim, cfg.expert_hidden_dim)
        self.shared_expert = FeedForward(cfg.dim, cfg.expert_hidden_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [..., D] -> (out [..., D], router logits [T, E] for load-balancing losses)."""
        x_TD = x.reshape(-1, x.shape[-1])
        scores_TA, experts_TA, logits_TE = self.router(x_TD)
        # dispatch: one row per (token, chosen expert), grouped by expert
        expert_R = experts_TA.flatten()
        order_R = torch.argsort(expert_R, stable=True)
        rows_RD = x_TD[order_R // self.top_k] * scores_TA.flatten()[order_R, None]
        # counts by scatter_add, not bincount: its output length depends on the data, which torch.compile dislikes
        counts_E = torch.zeros(self.n_experts, dtype=torch.long, device=x.device).scatter_add_(
            0, expert_R, torch.ones_like(expert_R))
        offsets_E = torch.cumsum(counts_E, 0, dtype=torch.int32)
        routed_RD = self.experts(rows_RD, offsets_E)
        # rows back in (token, k) order (a gather, not index_add: torch's CPU index_add takes milliseconds even
        # for one row)
        return self.combine(x, x_TD, routed_RD[torch.argsort(order_R)]), logits_TE

    def combine(self, x: torch.Tensor, x_TD: torch.Tensor, routed_RD: torch.Tensor) -> torch.Tensor:
        """Routed rows in (token, k) order, summed over k, plus the shared expert, in x's shape."""
        routed_TAD = routed_RD.view(-1, self.top_k, x_TD.shape[-1])
        return (self.shared_expert(x_TD) + routed_TAD.sum(dim=1)).view_as(x)
