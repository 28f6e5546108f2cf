"""Expert parallelism: each rank holds ``n_experts / ep`` of every MoE layer's routed experts, and each token row
travels to the rank that holds its expert and back, with one all-to-all each way (GShard / torchtitan style).

Applied to a built model from outside. Each ``Experts`` module's two weights become DTensors sharded on the
expert dim over the EP mesh, so state dicts keep their global names and shapes (a DCP checkpoint reshards to
any rank count), and the module's forward is wrapped with the exchange:

    rows sorted by global expert (MoE dispatch) --all-to-all--> rows of this rank's experts, from every rank
    --sort by local expert--> grouped SwiGLU on the local shards --unsort--> --all-to-all back--> original order

The all-to-alls are autograd functions, so a row's gradient goes back to the rank it came from, and each expert
weight's gradient sums the contributions of every rank's tokens: it is the gradient of the *summed* losses.
FSDP must then sum the other gradients too (``apply_fsdp(..., sum_gradients=True)``) with every rank's loss
normalised by the global token count, which the trainer does.
"""

from __future__ import annotations

import functools

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
    """Shard every ``Experts`` module of ``model`` over ``mesh`` (1-D). Returns the sharded parameters (FSDP
    must leave them alone: pass them as ``ignored``). Every rank must hold the same full weights before."""
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
        m.forward = functools.partial(_forward, m, m.forward, mesh.get_group(), ep, n_local)
    return sharded


def _all_to_all(x: torch.Tensor, out_rows: list[int], in_rows: list[int], group) -> torch.Tensor:
    # gloo has no bf16 all-to-all; the exchange is exact in fp32 and the cast back restores the value
    wire = torch.float32 if x.device.type == "cpu" and x.dtype == torch.bfloat16 else x.dtype
    out = funcol.all_to_all_single_autograd(x.to(wire).contiguous(), out_rows, in_rows, group)
    return funcol.wait_tensor(out).to(x.dtype)


def _forward(m: Experts, compute, group, ep: int, n_local: int, x_ND: torch.Tensor,
             offsets_E: torch.Tensor) -> torch.Tensor:
    """x [N, D] sorted by global expert, offsets [E] cumulative row counts -> [N, D] in the same order."""
    counts_E = torch.diff(offsets_E.long(), prepend=offsets_E.new_zeros(1, dtype=torch.long))
    recv_counts = torch.empty_like(counts_E)
    dist.all_to_all_single(recv_counts, counts_E, group=group)  # n_local counts to each rank, n_local back
    recv_SL = recv_counts.view(ep, n_local)  # rows from source rank s for local expert l
    send_rows = counts_E.view(ep, n_local).sum(1).tolist()
    recv_rows = recv_SL.sum(1).tolist()
    rows_RD = _all_to_all(x_ND, recv_rows, send_rows, group)  # ordered by (source rank, local expert)
    expert_R = torch.repeat_interleave(torch.arange(n_local).repeat(ep), recv_SL.flatten())
    order = torch.argsort(expert_R, stable=True)
    local_offsets = torch.cumsum(recv_SL.sum(0), 0, dtype=torch.int32)
    local = (m.gate_up_proj.to_local(), m.down_proj.to_local())
    out_RD = compute(rows_RD[order], local_offsets, weights=local)[torch.argsort(order)]
    return _all_to_all(out_RD, send_rows, recv_rows, group)
