"""Pure nn.Modules of Llama 4: no I/O, no training, no serving logic."""

from herd.model.transformer import Block, Transformer
from herd.model.vision import MultiModalProjector, VisionModel, VisionTower

__all__ = ["Block", "Transformer", "VisionModel", "MultiModalProjector", "VisionTower"]
