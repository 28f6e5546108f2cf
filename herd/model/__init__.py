"""Pure nn.Modules of Llama 4: no I/O, no training, no serving or decoding specialisations (herd.infer and herd.train
swap those in from outside).

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
