"""``herd export CKPT OUT``: a training checkpoint as a plain HF model directory (what ``herd generate``,
``herd.load`` and transformers' ``Llama4ForCausalLM`` load), in the dtype asked for."""

from __future__ import annotations

import shutil
from pathlib import Path

from herd import checkpoint
from herd.train import checkpointing


def export(ckpt: str | Path, out: str | Path, dtype: str | None = "bf16") -> Path:
    src = checkpointing.resolve(ckpt) / checkpointing.MODEL_DIR
    model = checkpoint.load(src)
    out = checkpoint.save(model, out, dtype=dtype)
    for f in src.iterdir():
        if f.name.startswith("tokenizer"):
            shutil.copy2(f, out / f.name)
    return out
