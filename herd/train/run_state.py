"""A training run's checkpoints: everything a run needs to continue exactly, written so that a crash never costs
more than the checkpoint being written. (Plain HF model directories are herd.checkpoint's.)

A checkpoint is a directory ``checkpoints/step_00000200/`` holding

* ``state/``: model weights and optimizer state as a torch.distributed.checkpoint (DCP) directory: every rank
  writes its own shards, with global names and shapes, so a run resumes on any number of ranks (DCP reshards
  on load; a single process loads it too);
* ``model/``: the full model as an HF directory (herd.checkpoint.save: config.json + safetensors, fp32 as
  trained), plus the run's tokenizer files, so ``herd generate`` / ``herd export`` / transformers load it as is;
* ``rng.pt``: the torch RNG states; ``trainer.json``: step, data-loader state, the run config, the last metrics.

It is built in a hidden ``.step_00000200.tmp`` directory and renamed into place when complete: the rename is
atomic, so a process killed at any moment leaves either the finished checkpoint or none, and the previous one
untouched. Leftover temporary directories are removed by the next run. (Checkpoints from before DCP, with the
optimizer in ``optimizer.pt``, still resume in one process.)
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from herd import checkpoint
from herd.errors import CheckpointError
from herd.model.transformer import Transformer
from herd.train.distributed import World

_STEP_DIR = re.compile(r"^step_(\d{8})$")
TRAINER_FILE = "trainer.json"
OPTIMIZER_FILE = "optimizer.pt"  # the optimizer before DCP (read only)
RNG_FILE = "rng.pt"
STATE_DIR = "state"
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
         trainer_state: dict[str, Any], tokenizer_dir: Path | None = None, keep: int | None = None,
         world: World = World(), plain: Callable[[dict], dict] | None = None,
         files: dict[str, Any] | None = None) -> Path:
    """Write checkpoint ``step`` under ``root`` atomically; then keep only the newest ``keep``. Every rank calls
    it (the shards and the full-model gather are collective); rank 0 writes the rest and renames. ``plain``
    turns the full state dict into a plain Transformer's for ``model/`` (a LoRA model's adapters folded in);
    ``files``: more objects for the checkpoint, torch.save'd by rank 0 under their names."""
    root = Path(root)
    final = root / f"step_{step:08d}"
    tmp = root / f".{final.name}.tmp"  # the same name on every rank
    if world.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    world.barrier()
    try:
        model_state, optim_state = get_state_dict(model, optimizer)
        with _one_process_ok():
            dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=tmp / STATE_DIR)
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if world.main:
            checkpoint.save(_plain_model(model.cfg, plain(full) if plain else full), tmp / MODEL_DIR)
            if tokenizer_dir is not None:
                for f in tokenizer_dir.iterdir():
                    if f.is_file() and f.name.startswith("tokenizer"):
                        shutil.copy2(f, tmp / MODEL_DIR / f.name)
            torch.save(rng_state(), tmp / RNG_FILE)
            for name, obj in (files or {}).items():
                torch.save(obj, tmp / name)
            (tmp / TRAINER_FILE).write_text(json.dumps({"step": step, **trainer_state}, indent=1))
            _fsync_tree(tmp)
            checkpoint.replace_dir(tmp, final)  # the same step saved again (after a resume) is swapped out whole
            if keep is not None:
                for old in list_checkpoints(root)[:-keep]:
                    shutil.rmtree(old, ignore_errors=True)
        world.barrier()
    except BaseException:
        if world.main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


@contextlib.contextmanager
def _one_process_ok():
    # DCP warns when no process group exists: one process is a supported layout here, not a mistake
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _plain_model(cfg, state: dict[str, torch.Tensor]) -> Transformer:
    """Full tensors in a Transformer skeleton (no memory of its own), for herd.checkpoint.save."""
    with torch.device("meta"):
        model = Transformer(cfg)
    model.load_state_dict(state, strict=True, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    return model


def load_state(ckpt: Path, model: Transformer, optimizer: torch.optim.Optimizer) -> None:
    """Model weights, optimizer state and RNG states from ``ckpt`` into the (sharded or not) model and optimizer,
    whatever the number of ranks that wrote it. Every rank calls it."""
    if (ckpt / STATE_DIR).is_dir():
        model_state, optim_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optim": optim_state}
        with _one_process_ok():
            dcp.load(state, checkpoint_id=ckpt / STATE_DIR)
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        set_rng_state(torch.load(ckpt / RNG_FILE, map_location="cpu", weights_only=False))
        return
    if not (ckpt / OPTIMIZER_FILE).is_file():
        raise CheckpointError(f"{ckpt}: neither {STATE_DIR}/ nor {OPTIMIZER_FILE}")
    if type(model) is not Transformer or any(p.__class__.__name__ == "DTensor" for p in model.parameters()):
        raise CheckpointError(f"{ckpt} predates distributed checkpoints: resume it in one process (no --nproc)")
    model.load_state_dict(checkpoint.load(ckpt / MODEL_DIR, dtype=torch.float32).state_dict())
    state = torch.load(ckpt / OPTIMIZER_FILE, map_location="cpu", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    set_rng_state(state["rng"])


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
