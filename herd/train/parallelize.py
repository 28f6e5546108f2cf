"""Everything training does to a built model, in one place: ``parallelize(model, train, world)``, as torchtitan's
``parallelize_llama``. The model itself only tolerates the result (``Experts.local_weights``); each step here
is a module class swap or a hook from outside, so parameter names, and so state dicts, optimizers and DCP
checkpoints, are those of the plain model. The order is fixed:

0. **Grouped-matmul backend**: the routed experts' fastest eager backend for training on the weights' device
   (``pick_grouped_mm_backend``; on CPU torch's grouped kernel with a grouped backward). An ``Experts``
   attribute, so the class swaps below keep it; FP8 experts multiply with their own casts instead.
1. **FP8** (``train.fp8``): swaps ``nn.Linear`` for ``Fp8Linear`` or torchao's ``Float8Linear`` and ``Experts`` for
   ``Fp8Experts``. First, because torchao builds each ``Float8Linear`` from a plain ``nn.Linear`` holding its full
   weight, and every later step must wrap the modules that will really run.
2. **Activation checkpointing** (``train.activation_checkpointing``): each block recomputes its forward in the
   backward pass, with whatever FP8 made of its matmuls, and with the expert exchange below, whose hooks sit on
   a module inside the block and so run again in the recompute.
3. **Expert parallelism** (``train.ep > 1``): the routed experts become DTensors sharded over the ranks, with the
   all-to-all as hooks. Before FSDP, which must be told to leave those parameters alone.
4. **FSDP2** (more than one rank): one unit per block, the rest at the root, gradients summed over ranks. Last,
   so that it shards the parameters as every earlier step left them and its gather/free hooks run outside the
   checkpointed forward (a recompute finds the block's parameters still gathered for the backward).
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from herd.model.moe import pick_grouped_mm_backend, set_grouped_mm_backend
from herd.model.transformer import Block, Transformer
from herd.train.config import TrainSpec
from herd.train.distributed import World, apply_fsdp
from herd.train.expert_parallel import apply_expert_parallel
from herd.train.fp8 import apply_fp8


class CheckpointedBlock(Block):
    """A Block that keeps no activations: the backward pass runs its forward again. Made by swapping a built
    Block's class, so its parameter names are the Block's own."""

    def forward(self, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
        return checkpoint(super().forward, *args, use_reentrant=False, **kwargs)


def apply_activation_checkpointing(model: Transformer) -> None:
    for block in model.layers:
        block.__class__ = CheckpointedBlock


def parallelize(model: Transformer, train: TrainSpec, world: World) -> Transformer:
    """Apply ``train``'s FP8, activation checkpointing, expert parallelism and FSDP to ``model`` in place, in the
    module doc's order. Every rank must hold the same full weights before."""
    weight = next(model.parameters())
    set_grouped_mm_backend(model, pick_grouped_mm_backend(weight.device, weight.dtype))
    if train.fp8:
        apply_fp8(model, train.fp8, train.fp8_backend)
    if train.activation_checkpointing:
        apply_activation_checkpointing(model)
    if world.size > 1:
        experts = apply_expert_parallel(model, world.mesh) if train.ep > 1 else []
        apply_fsdp(model, world.mesh, ignored=experts, sum_gradients=True)
    return model
