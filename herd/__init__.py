"""herd: Llama 4 in one PyTorch codebase."""

from herd.config import ModelConfig, VisionConfig, preset
from herd.errors import CheckpointError, ConfigError, HerdError
from herd.model import Transformer

__version__ = "0.1.0"


def __getattr__(name: str):
    # the API pulls in the tokenizer and the engine: import it on first use, keeping `import herd` light
    if name in ("load", "pipeline", "LLM"):
        from herd import api

        return getattr(api, name)
    raise AttributeError(f"module 'herd' has no attribute {name!r}")


__all__ = ["ModelConfig", "VisionConfig", "preset", "Transformer", "HerdError", "ConfigError", "CheckpointError",
           "load", "pipeline", "LLM"]
