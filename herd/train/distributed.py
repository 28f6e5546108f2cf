"""Data parallelism with FSDP2 (``torch.distributed.fsdp.fully_shard``), applied to the model from outside.

Each transformer block is its own FSDP unit (its parameters are gathered just before it runs and freed after),
and the root module holds the embedding, final norm and LM head. Parameters, gradients and optimizer state are
sharded over the ranks; gradients are averaged across them. It runs on CPU with the gloo backend (how the tests
check it: 2 processes give the single-process losses) and on CUDA with NCCL.

Not here yet (issue 6): the trainer's ``--nproc`` launch, expert parallelism (all-to-all token exchange) and
resharding distributed checkpoints.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from herd.model.transformer import Transformer


def init_distributed() -> DeviceMesh | None:
    """Join the process group torchrun describes (WORLD_SIZE > 1) and return a 1-D data-parallel mesh, else
    None. gloo on CPU, NCCL on CUDA (one GPU per local rank)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return None
    cuda = torch.cuda.is_available()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return init_device_mesh("cuda" if cuda else "cpu", (world,), mesh_dim_names=("dp",))


def apply_fsdp(model: Transformer, mesh: DeviceMesh, param_dtype: torch.dtype | None = None) -> Transformer:
    """Shard ``model`` over ``mesh``: one FSDP unit per block, the rest at the root. ``param_dtype`` (e.g. bf16)
    gathers parameters in that dtype for compute while the shards and gradient reduction stay fp32."""
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for block in model.layers:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    if model.vision is not None:
        fully_shard(model.vision, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def rank_rows(batch: dict[str, torch.Tensor], rank: int, world: int) -> dict[str, torch.Tensor]:
    """This rank's share of a global batch: a contiguous block of rows (the batch size must divide evenly)."""
    n = batch["tokens"].shape[0]
    if n % world:
        raise ValueError(f"batch of {n} rows does not split over {world} ranks")
    if "pixel_values" in batch:
        raise NotImplementedError("splitting image-text batches over ranks (tiles per row) is not done yet")
    lo, hi = rank * n // world, (rank + 1) * n // world
    return {k: v[lo:hi] for k, v in batch.items()}
