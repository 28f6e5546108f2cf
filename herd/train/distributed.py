"""Data parallelism with FSDP2 (``torch.distributed.fsdp.fully_shard``), applied to the model from outside.

Each transformer block is its own FSDP unit (its parameters are gathered just before it runs and freed after),
and the root module holds the embedding, final norm and LM head. Parameters, gradients and optimizer state are
sharded over the ranks; gradients are averaged across them, or summed (``sum_gradients``) when every rank's loss
is already normalised by the global token count, as the trainer does. It runs on CPU with the gloo backend (how
the tests check it: 2 processes give the single-process losses) and on CUDA with NCCL.

Expert parallelism (``herd.train.expert_parallel``) shards the routed experts over the same ranks instead; FSDP
then leaves them alone. ``herd.train.parallelize`` applies both, FSDP last. ``herd train RECIPE --nproc N``
launches the trainer through torchrun.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from herd.model.transformer import Transformer


@dataclass
class World:
    """This process's place in the run: rank ``rank`` of ``size``, and the 1-D mesh over all ranks (None when
    alone). A single process is ``World()``, and every method is then a no-op."""

    rank: int = 0
    size: int = 1
    mesh: DeviceMesh | None = None

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """All-reduce ``t`` (sum) in place over the ranks."""
        if self.size > 1:
            dist.all_reduce(t)
        return t

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on any (e.g. a stop request that reached one rank)."""
        return bool(self.sum_(torch.tensor([float(flag)]))[0]) if self.size > 1 else flag

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    def close(self) -> None:
        if self.size > 1 and dist.is_initialized():
            dist.destroy_process_group()

    @contextlib.contextmanager
    def main_first(self):
        """Rank 0 runs the block first (it builds shared files: tokenizer, token shards); the others run it after,
        finding the files built."""
        if not self.main:
            self.barrier()
        yield
        if self.main:
            self.barrier()


def init_distributed(cuda: bool | None = None) -> World:
    """Join the process group torchrun describes (WORLD_SIZE > 1), gloo for CPU tensors and NCCL for CUDA ones
    (one GPU per local rank; ``cuda=None``: when available), with a 1-D mesh over all ranks; a single process
    gets ``World()``."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    mesh = init_device_mesh("cuda" if cuda else "cpu", (size,), mesh_dim_names=("dp",))
    return World(dist.get_rank(), size, mesh)


def apply_fsdp(model: Transformer, mesh: DeviceMesh, param_dtype: torch.dtype | None = None,
               ignored: list[nn.Parameter] | None = None, sum_gradients: bool = False) -> Transformer:
    """Shard ``model`` over ``mesh``: one FSDP unit per block, the rest at the root. ``param_dtype`` (e.g. bf16)
    gathers parameters in that dtype for compute while the shards and gradient reduction stay fp32.
    ``ignored``: parameters sharded otherwise (expert parallelism). ``sum_gradients``: sum the ranks' gradients
    instead of averaging them (for losses normalised by the global token count)."""
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    units = [*model.layers] + ([model.vision] if model.vision is not None else []) + [model]
    for unit in units:
        own = {p for p in unit.parameters()}
        fully_shard(unit, mesh=mesh, mp_policy=mp, ignored_params={p for p in ignored or () if p in own} or None)
        if sum_gradients:
            unit.set_gradient_divide_factor(1.0)
            unit.set_force_sum_reduction_for_comms(True)  # gloo has no pre-multiplied sum
    return model


def rank_rows(batch: dict[str, torch.Tensor], rank: int, world: int) -> dict[str, torch.Tensor]:
    """This rank's share of a global batch: a contiguous block of rows (the batch size must divide evenly)."""
    if world == 1:
        return batch
    n = batch["tokens"].shape[0]
    if n % world:
        raise ValueError(f"batch of {n} rows does not split over {world} ranks")
    if "pixel_values" in batch:
        raise NotImplementedError("splitting image-text batches over ranks (tiles per row) is not done yet")
    lo, hi = rank * n // world, (rank + 1) * n // world
    return {k: v[lo:hi] for k, v in batch.items()}
