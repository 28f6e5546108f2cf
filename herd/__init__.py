"""herd: Llama 4 in one PyTorch codebase."""

from herd.config import ModelConfig, VisionConfig, preset
from herd.errors import CheckpointError, ConfigError, HerdError
from herd.model import Transformer

__version__ = "0.1.0"
__all__ = ["ModelConfig", "VisionConfig", "preset", "Transformer", "HerdError", "ConfigError", "CheckpointError"]
