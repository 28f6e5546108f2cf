"""Mixture of experts: sigmoid top-k router, routed SwiGLU experts with sparse dispatch, shared expert.

Llama 4 semantics (both references): the router's sigmoid score scales each expert's *input*, and a shared
expert sees every token. The references run every expert on every token with a zero score for the unselected
ones; here tokens are sorted by expert and each expert multiplies only its own rows (a grouped matmul), so the
cost follows the active parameters.
"""

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from herd.config import ModelConfig
from herd.model.ffn import FeedForward

_HAS_GROUPED_MM = hasattr(torch, "_grouped_mm")
_FUSED_ROWS = 4  # up to this many rows a compiled expert product is a fused multiply+sum (decode)


def grouped_mm(x_ND: torch.Tensor, w_EMK: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    """Rows x[offsets[e-1]:offsets[e]] multiply w[e].T. x [N, K] sorted by expert, w [E, M, K] (out x in) -> [N, M]."""
    if (x_ND.device.type == "cpu" and torch.is_grad_enabled() and (x_ND.requires_grad or w_EMK.requires_grad)
            and not torch.compiler.is_compiling()):
        if torch.is_autocast_enabled("cpu"):
            dtype = torch.get_autocast_dtype("cpu")
            x_ND, w_EMK = x_ND.to(dtype), w_EMK.to(dtype)
        return _GroupedMM.apply(x_ND, w_EMK.to(x_ND.dtype), offsets_E)
    if _HAS_GROUPED_MM and _grouped_kernel_ok(x_ND, w_EMK):
        return torch._grouped_mm(x_ND, w_EMK.transpose(-2, -1), offs=offsets_E)
    if torch.compiler.is_compiling():
        # fixed shapes and no host sync inside a graph: each row multiplies its own expert's weights, gathered
        expert_N = torch.searchsorted(offsets_E, torch.arange(x_ND.shape[0], device=x_ND.device), right=True)
        return per_row_mm(x_ND, w_EMK, expert_N)
    return _grouped_loop(x_ND, w_EMK, offsets_E)


def _grouped_nograd(x_ND: torch.Tensor, w_EMK: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    if _HAS_GROUPED_MM and _aligned(x_ND, w_EMK):
        return torch._grouped_mm(x_ND, w_EMK.transpose(-2, -1), offs=offsets_E)
    return _grouped_loop(x_ND, w_EMK, offsets_E)


def _grouped_loop(x_ND: torch.Tensor, w_EMK: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    out, start = x_ND.new_empty(x_ND.shape[0], w_EMK.shape[1]), 0
    for e, end in enumerate(offsets_E.tolist()):
        if end > start:
            out[start:end] = x_ND[start:end] @ w_EMK[e].T
        start = end
    return out


def _aligned(*ts: torch.Tensor) -> bool:
    # torch's grouped kernel wants equal dtypes and 16-byte aligned rows
    return len({t.dtype for t in ts}) == 1 and all((t.shape[-1] * t.element_size()) % 16 == 0 for t in ts)


class _GroupedMM(torch.autograd.Function):
    """grouped_mm for CPU training, with its backward as two more grouped products: grad_x = grad_out[rows] @ w[e]
    and grad_w[e] = grad_out[rows].T @ x[rows]. Autograd through per-expert slices of w instead would allocate
    and zero a full [E, M, K] gradient for every expert (E x the weight's bytes per step), and torch's CPU
    grouped kernel has no backward of its own (torch 2.14)."""

    @staticmethod
    def forward(ctx, x_ND, w_EMK, offsets_E):
        ctx.save_for_backward(x_ND, w_EMK, offsets_E)
        return _grouped_nograd(x_ND, w_EMK, offsets_E)

    @staticmethod
    def backward(ctx, grad_NM):
        x_ND, w_EMK, offsets_E = ctx.saved_tensors
        grad_NM = grad_NM.to(x_ND.dtype).contiguous()
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = _grouped_nograd(grad_NM, w_EMK.transpose(1, 2), offsets_E)
        if ctx.needs_input_grad[1]:
            if _HAS_GROUPED_MM and _aligned(grad_NM, x_ND):
                grad_w = torch._grouped_mm(grad_NM.t(), x_ND, offs=offsets_E)  # [E, M, K]; empty groups give 0
            else:
                grad_w, start = torch.zeros_like(w_EMK), 0
                for e, end in enumerate(offsets_E.tolist()):
                    if end > start:
                        grad_w[e] = grad_NM[start:end].T @ x_ND[start:end]
                    start = end
        return grad_x, grad_w, None


def per_row_mm(x_ND: torch.Tensor, w_EMK: torch.Tensor, expert_N: torch.Tensor) -> torch.Tensor:
    """Row n times w[expert[n]].T, for rows in any order. A few rows (decode) as multiply + sum over the
    contiguous input dim, which inductor turns into one loop streaming just those experts' weights; more rows
    as a batched matmul over gathered weights."""
    if x_ND.shape[0] <= _FUSED_ROWS:
        return (x_ND[:, None, :].float() * w_EMK[expert_N].float()).sum(-1).to(x_ND.dtype)
    return torch.bmm(w_EMK[expert_N], x_ND[:, :, None]).squeeze(-1)


def _grouped_kernel_ok(x: torch.Tensor, w: torch.Tensor) -> bool:
    # torch's grouped kernel wants equal dtypes and 16-byte aligned rows; its CPU backward fails (torch 2.14):
    # eager CPU training goes through _GroupedMM, a compiled CPU graph with gradients through the loop
    size = x.element_size()
    if x.device.type == "cpu" and torch.is_grad_enabled() and (x.requires_grad or w.requires_grad):
        return False
    if x.device.type == "cuda" and x.dtype != torch.bfloat16:
        return False  # the CUDA kernel is bf16-only
    if torch.compiler.is_compiling() and (x.dtype != torch.bfloat16 or (x.device.type == "cpu"
                                                                        and x.shape[0] <= _FUSED_ROWS)):
        return False  # the op's tracing rule is bf16-only; for a few rows on CPU the fused loop is faster
    return (x.dtype == w.dtype and x.device.type in ("cpu", "cuda") and (x.shape[1] * size) % 16 == 0
            and (w.shape[-1] * size) % 16 == 0)


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
        top_logits_TK, experts_TK = torch.topk(logits_TE, self.top_k, dim=-1)
        scores_TK = torch.sigmoid(top_logits_TK.float()).to(x_TD.dtype)
        return scores_TK, experts_TK, logits_TE


class Experts(nn.Module):
    """E SwiGLU experts stored out x in, like nn.Linear: gate_up_proj [E, 2F, D] (gate rows, then up rows),
    down_proj [E, D, F]. (HF stores the transposes; herd.checkpoint converts.) Out x in keeps each output's
    weights contiguous, so a decode step streams them instead of walking columns a page apart."""

    def __init__(self, n_experts: int, dim: int, hidden_dim: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, 2 * hidden_dim, dim))
        self.down_proj = nn.Parameter(torch.empty(n_experts, dim, hidden_dim))

    def local_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up, down) as this process holds them: under expert parallelism the parameters are DTensors
        sharded on the expert dim, and this rank multiplies its own experts' rows with its shards."""
        return tuple(w.to_local() if isinstance(w, DTensor) else w for w in (self.gate_up_proj, self.down_proj))

    def forward(self, x_ND: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
        gate_up, down = self.local_weights()
        gate, up = grouped_mm(x_ND, gate_up, offsets_E).chunk(2, dim=-1)
        return grouped_mm(F.silu(gate) * up, down, offsets_E)

    def per_row(self, x_ND: torch.Tensor, expert_N: torch.Tensor) -> torch.Tensor:
        """Row n through expert[n]: no sorting, for the few rows of a compiled decode step."""
        gate, up = per_row_mm(x_ND, self.gate_up_proj, expert_N).chunk(2, dim=-1)
        return per_row_mm(F.silu(gate) * up, self.down_proj, expert_N)


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts, self.top_k = cfg.n_experts, cfg.top_k
        self.router = Router(cfg.dim, cfg.n_experts, cfg.top_k)
        self.experts = Experts(cfg.n_experts, cfg.dim, cfg.expert_hidden_dim)
        self.shared_expert = FeedForward(cfg.dim, cfg.expert_hidden_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [..., D] -> (out [..., D], router logits [tokens, E] for load-balancing losses)."""
        x_TD = x.reshape(-1, x.shape[-1])
        scores_TK, experts_TK, logits_TE = self.router(x_TD)
        if (torch.compiler.is_compiling() and x.device.type == "cpu" and type(self.experts) is Experts
                and experts_TK.numel() <= _FUSED_ROWS):
            # decode: rows stay in (token, k) order, each gathers its own expert (sort, counts and offsets would
            # be a chain of tiny ops costing more than the product itself)
            rows_ND = x_TD.repeat_interleave(self.top_k, dim=0) * scores_TK.reshape(-1, 1)
            routed_TKD = self.experts.per_row(rows_ND, experts_TK.flatten()).view(-1, self.top_k, x.shape[-1])
            return (self.shared_expert(x_TD) + routed_TKD.sum(dim=1)).view_as(x), logits_TE
        # dispatch: one row per (token, chosen expert), grouped by expert
        flat_experts = experts_TK.flatten()
        order = torch.argsort(flat_experts, stable=True)
        token_of_row = order // self.top_k
        rows_ND = x_TD[token_of_row] * scores_TK.flatten()[order, None]
        # counts by scatter_add, not bincount: its output length depends on the data, which torch.compile dislikes
        counts_E = torch.zeros(self.n_experts, dtype=torch.long, device=x.device).scatter_add_(
            0, flat_experts, torch.ones_like(flat_experts))
        offsets_E = torch.cumsum(counts_E, 0, dtype=torch.int32)
        routed_ND = self.experts(rows_ND, offsets_E)
        # combine: rows back in (token, k) order, summed over k, plus the shared expert (a gather, not
        # index_add: torch's CPU index_add takes milliseconds even for one row)
        routed_TKD = routed_ND[torch.argsort(order)].view(-1, self.top_k, x.shape[-1])
        out_TD = self.shared_expert(x_TD) + routed_TKD.sum(dim=1)
        return out_TD.view_as(x), logits_TE
