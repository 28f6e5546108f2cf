"""herd's error family: every message names the file, tensor, key or input at fault."""


class HerdError(Exception):
    """Base class of every error herd raises on purpose."""


class ConfigError(HerdError, ValueError):
    """A config value is unknown, missing or inconsistent; the message names the key."""


class CheckpointError(HerdError):
    """A checkpoint is missing tensors, has extra or mis-shaped ones, or a file is truncated/corrupt."""


class TokenizerError(HerdError):
    """The tokenizer file cannot be read or an id is out of range."""
