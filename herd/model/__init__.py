"""Pure nn.Modules of Llama 4: no I/O, no training, no serving or decoding specialisations (herd.infer and herd.train
swap those in from outside).

How the outside changes a built model, one mechanism per kind of change, each applied by one function in a
documented order (herd.infer.runner for inference, herd.train.parallelize for training):
  a subclass swap (``m.__class__ = Sub``) when only ``forward`` differs and the parameters stay as they are:
      decode-shaped modules (herd.infer.decode_modules, on a parameter-sharing copy), FP8 matmuls
      (herd.train.fp8), activation checkpointing (herd.train.parallelize);
  a module replacement (``set_submodule``) when the parameters change form: quantized weights
      (herd.infer.quantize, herd.checkpoint.quantized);
  forward hooks and DTensor parameters, which the model tolerates (``Experts.local_weights``): expert
      parallelism (herd.train.expert_parallel), FSDP2.
No instance ``forward`` is ever replaced.

Shape suffixes name a tensor's dims in order (``x_BTD`` is [B, T, D]):

  B   batch rows                       T   query tokens (per row; flattened B*T tokens in the MoE)
  S   key/value slots attended         D   model dim
  H   query heads                      KV  key/value heads            hd  head dim
  F   FFN / expert hidden dim          E   routed experts             A   experts per token (top-k)
  R   rows after MoE dispatch (T*A)    V   vocabulary
  vision: N image tiles, P patches (tokens) of a tile, C channels (pixels_NCHW: channels, height, width)

Matmuls, here and in herd.infer.quantize / herd.train.fp8, follow one GEMM convention: ``x_MK @ w_NK.T ->
y_MN``, weights stored out x in as nn.Linear stores them (``w_NK``), grouped (per-expert) weights ``w_ENK``.
M, N, K are local to a matmul helper; a module's own tensors use the letters above.
"""

from herd.model.transformer import Block, Transformer
from herd.model.vision import MultiModalProjector, VisionModel, VisionTower

__all__ = ["Block", "Transformer", "VisionModel", "MultiModalProjector", "VisionTower"]
