"""Training checkpoints: everything a run needs to continue exactly, written so that a crash never costs more
than the checkpoint being written.

A checkpoint is a directory ``checkpoints/step_00000200/`` holding

* ``model/``: the model as an HF directory (herd.checkpoint.save: config.json + safetensors, fp32 as trained),
  plus the run's tokenizer files, so ``herd generate`` / transformers load it as is;
* ``optimizer.pt``: the optimizer state and the torch RNG states;
* ``trainer.json``: step, data-loader state, the run config, the last metrics.

It is built in a hidden ``.step_00000200.tmp-*`` directory and renamed into place when complete: the rename
is atomic, so a process killed at any moment leaves either the finished checkpoint or none, and the previous
one untouched. Leftover temporary directories are removed by the next run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from herd import checkpoint
from herd.errors import CheckpointError
from herd.model.transformer import Transformer

_STEP_DIR = re.compile(r"^step_(\d{8})$")
TRAINER_FILE = "trainer.json"
OPTIMIZER_FILE = "optimizer.pt"
MODEL_DIR = "model"


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(root: str | Path, step: int, model: Transformer, optimizer: torch.optim.Optimizer,
         trainer_state: dict[str, Any], tokenizer_dir: Path | None = None, keep: int | None = None) -> Path:
    """Write checkpoint ``step`` under ``root`` atomically; then keep only the newest ``keep``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=root))
    try:
        checkpoint.save(model, tmp / MODEL_DIR)
        if tokenizer_dir is not None:
            for f in tokenizer_dir.iterdir():
                if f.is_file() and f.name.startswith("tokenizer"):
                    shutil.copy2(f, tmp / MODEL_DIR / f.name)
        torch.save({"optimizer": optimizer.state_dict(), "rng": rng_state()}, tmp / OPTIMIZER_FILE)
        (tmp / TRAINER_FILE).write_text(json.dumps({"step": step, **trainer_state}, indent=1))
        _fsync_tree(tmp)
        checkpoint.replace_dir(tmp, final)  # the same step saved again (after a resume) is swapped out whole
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep is not None:
        for old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / TRAINER_FILE).is_file()]
    return sorted(found, key=lambda p: p.name)


def latest(root: str | Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def clean_partial(root: str | Path) -> list[Path]:
    """Remove the temporary directories of saves that were killed midway; return what was removed."""
    root = Path(root)
    removed = []
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(".step_") and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


def resolve(path: str | Path) -> Path:
    """A checkpoint directory, or a run / checkpoints directory (its latest checkpoint)."""
    p = Path(path)
    if (p / TRAINER_FILE).is_file():
        return p
    for root in (p / "checkpoints", p):
        found = latest(root)
        if found is not None:
            return found
    raise CheckpointError(f"{p}: no training checkpoint here (expected {TRAINER_FILE}, or checkpoints/step_*/)")


def read_trainer_state(ckpt: Path) -> dict[str, Any]:
    try:
        return json.loads((ckpt / TRAINER_FILE).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{ckpt / TRAINER_FILE}: unreadable ({e})") from e


def load_optimizer(ckpt: Path, optimizer: torch.optim.Optimizer) -> None:
    """Optimizer state and RNG states (the model is loaded with herd.checkpoint.load from ``ckpt/model``)."""
    state = torch.load(ckpt / OPTIMIZER_FILE, map_location="cpu", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    set_rng_state(state["rng"])
