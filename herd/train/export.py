"""``herd export CKPT OUT``: a training checkpoint as a plain HF model directory (what ``herd generate``,
``herd.load`` and transformers' ``Llama4ForCausalLM`` load), in the dtype asked for."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

from herd import checkpoint
from herd.train import run_state
from herd.train.report import write_report


def export(ckpt: str | Path, out: str | Path, dtype: str | None = "bf16", report: bool = True) -> Path:
    """Copy the checkpoint's model (cast to ``dtype``) and tokenizer to ``out``; with ``report``, and when the
    checkpoint lies in a run directory, add the training report (loss.png, TRAINING.md: herd.train.report)."""
    ckpt = run_state.resolve(ckpt)
    src = ckpt / run_state.MODEL_DIR
    model = checkpoint.load(src)
    out = checkpoint.save(model, out, dtype=dtype)
    for f in src.iterdir():
        if f.name.startswith("tokenizer"):
            shutil.copy2(f, out / f.name)
    run_dir = ckpt.parent.parent
    if report and (run_dir / "metrics.jsonl").is_file():
        try:
            write_report(run_dir, out, up_to_step=run_state.read_trainer_state(ckpt)["step"])
        except ImportError:
            warnings.warn("matplotlib is not installed (pip install 'herd[train]'): no training report written",
                          stacklevel=2)
    return out
