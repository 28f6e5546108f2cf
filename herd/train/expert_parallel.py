"""Expert parallelism: each rank holds ``n_experts / ep`` of every MoE layer's routed experts, and each token row
travels to the rank that holds its expert and back, with one all-to-all each way (GShard / torchtitan style).

Applied to a built model from outside. Each ``Experts`` module's two weights become DTensors sharded on the
expert dim over the EP mesh, so state dicts keep their global names and shapes (a DCP checkpoint reshards to
any rank count). ``Experts.forward`` multiplies with the local shards; a forward pre-hook and a forward hook on
the module do the exchange around it, as torchtitan's ExpertParallel does:

    rows sorted by global expert (MoE dispatch) --all-to-all--> rows of this rank's experts, from every rank
    --sort by local expert--> grouped SwiGLU on the local shards --unsort--> --all-to-all back--> original order

The all-to-alls are autograd functions, so a row's gradient goes back to the rank it came from, and each expert
weight's gradient sums the contributions of every rank's tokens: it is the gradient of the *summed* losses.
FSDP must then sum the other gradients too (``apply_fsdp(..., sum_gradients=True)``) with every rank's loss
normalised by the global token count, which the trainer does.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from herd.errors import ConfigError
from herd.model.moe import Experts

_LEAVES = ("gate_up_proj", "down_proj")


def apply_expert_parallel(model: nn.Module, mesh: DeviceMesh) -> list[nn.Parameter]:
    """Shard every ``Experts`` module of ``model`` over ``mesh`` (1-D) and hook the exchange around it. Returns
    the sharded parameters (FSDP must leave them alone: pass them as ``ignored``). Every rank must hold the same
    full weights before."""
    ep, rank = mesh.size(), mesh.get_local_rank()
    sharded = []
    for name, m in model.named_modules():
        if not isinstance(m, Experts):
            continue
        n_experts = m.gate_up_proj.shape[0]
        if n_experts % ep:
            raise ConfigError(f"{name}: {n_experts} experts do not split over {ep} expert-parallel ranks")
        n_local = n_experts // ep
        for leaf in _LEAVES:
            full = getattr(m, leaf)
            local = full.detach()[rank * n_local:(rank + 1) * n_local].clone()
            p = nn.Parameter(DTensor.from_local(local, mesh, [Shard(0)], run_check=False),
                             requires_grad=full.requires_grad)
            setattr(m, leaf, p)
            sharded.append(p)
        exchange = _Exchange(mesh.get_group(), ep, n_local)
        m.register_forward_pre_hook(exchange.dispatch)
        m.register_forward_hook(exchange.combine)
    return sharded


def _all_to_all(x: torch.Tensor, out_rows: list[int], in_rows: list[int], group) -> torch.Tensor:
    # gloo has no bf16 all-to-all; the exchange is exact in fp32 and the cast back restores the value
    wire = torch.float32 if x.device.type == "cpu" and x.dtype == torch.bfloat16 else x.dtype
    out = funcol.all_to_all_single_autograd(x.to(wire).contiguous(), out_rows, in_rows, group)
    return funcol.wait_tensor(out).to(x.dtype)


class _Exchange:
    """The hooks around one ``Experts`` module. ``dispatch`` turns its input (rows sorted by global expert,
    cumulative counts per global expert) into this rank's experts' rows from every rank, sorted by local expert,
    with local offsets; ``combine`` sends the results back and restores the original row order. The routing
    between the two is kept here, which holds as a module runs one forward at a time (an activation-checkpoint
    recompute dispatches anew, and may stop before combining: the next dispatch replaces what it left)."""

    def __init__(self, group, ep: int, n_local: int):
        self.group, self.ep, self.n_local = group, ep, n_local
        self.route: tuple[torch.Tensor, list[int], list[int]] | None = None

    def dispatch(self, m: nn.Module, args: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        x_RD, offsets_E = args
        counts_E = torch.diff(offsets_E.long(), prepend=offsets_E.new_zeros(1, dtype=torch.long))
        recv_counts = torch.empty_like(counts_E)
        dist.all_to_all_single(recv_counts, counts_E, group=self.group)  # n_local counts to each rank and back
        recv_SL = recv_counts.view(self.ep, self.n_local)  # rows from source rank s for local expert l
        send_rows = counts_E.view(self.ep, self.n_local).sum(1).tolist()
        recv_rows = recv_SL.sum(1).tolist()
        recv_RD = _all_to_all(x_RD, recv_rows, send_rows, self.group)  # ordered by (source rank, local expert)
        expert_R = torch.repeat_interleave(torch.arange(self.n_local).repeat(self.ep), recv_SL.flatten())
        order = torch.argsort(expert_R, stable=True)
        self.route = (order, send_rows, recv_rows)
        return recv_RD[order], torch.cumsum(recv_SL.sum(0), 0, dtype=torch.int32)

    def combine(self, m: nn.Module, args, out_RD: torch.Tensor) -> torch.Tensor:
        (order, send_rows, recv_rows), self.route = self.route, None
        return _all_to_all(out_RD[torch.argsort(order)], send_rows, recv_rows, self.group)
