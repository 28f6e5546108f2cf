"""Pure nn.Modules of Llama 4: no I/O, no training, no serving logic."""

from herd.model.transformer import Block, Transformer

__all__ = ["Block", "Transformer"]
