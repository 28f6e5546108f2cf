"""The teacher of a distillation run (``[distill] teacher = ...`` in any training recipe), run online beside the
student: a model directory, or a training run that may still be training (codistillation: the seeds train
Maverick from Behemoth while Behemoth trains).

A run directory's teacher is its newest complete checkpoint's ``model/`` (herd.train.run_state renames a
checkpoint into place only once it is whole, so a half-written one is never seen). With ``reload_every = N`` the
student looks for a newer one every N steps; a checkpoint that disappears while it is read (the teacher's run
rotating its checkpoints) leaves the current teacher in place with a warning, and the next look tries again.
Each student checkpoint records which teacher checkpoint it was using, so a resumed student reloads that one and
continues exactly.

The teacher runs without gradients in ``dtype`` (bf16 by default), on the same packed batch, positions and
document masking as the student. Its tokenizer must be the student's (herd.train.distill.check_compatible).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

from herd import checkpoint
from herd.checkpoint import parse_dtype
from herd.errors import CheckpointError, ConfigError
from herd.train import run_state
from herd.train.distill import TeacherTargets, check_compatible, teacher_forward


class Teacher:
    def __init__(self, source: str | Path, student: Any, dtype: str = "bf16", reload_every: int = 0):
        """``student``: what check_compatible takes for the student side ((tokenizer, vocab_size))."""
        self.source, self.student, self.reload_every = Path(source), student, reload_every
        self.dtype = parse_dtype(dtype)
        self.path: Path | None = None
        self.model: torch.nn.Module | None = None
        if not self.source.exists():
            raise ConfigError(f"distill.teacher {self.source}: no such model or run directory")
        self.load(self.newest())

    def newest(self) -> Path:
        """The model directory the source names now: itself, or its run's newest checkpoint's model/."""
        if (self.source / "config.json").is_file():
            return self.source
        return run_state.resolve(self.source) / run_state.MODEL_DIR

    def load(self, path: Path) -> None:
        if path == self.path:
            return
        check_compatible(self.student, path)
        model = checkpoint.load(path, dtype=self.dtype).eval()
        model.requires_grad_(False)
        self.model, self.path = model, path

    def maybe_reload(self, step: int) -> None:
        """Every ``reload_every`` steps: move to the source's newest checkpoint, if there is a newer one."""
        if not self.reload_every or step % self.reload_every:
            return
        try:
            self.load(self.newest())
        except (CheckpointError, OSError) as e:  # rotated away while we read it: keep the current teacher
            warnings.warn(f"distill.teacher: could not read the newest checkpoint of {self.source} ({e}); "
                          f"keeping {self.path}", stacklevel=2)

    @torch.no_grad()
    def targets(self, batch: dict[str, torch.Tensor]) -> TeacherTargets:
        return teacher_forward(self.model, batch)

    def state_dict(self) -> dict[str, str]:
        return {"path": str(self.path)}

    def load_state_dict(self, state: dict[str, str]) -> None:
        """Back to the teacher a checkpoint was using (the newest one, with a warning, if it is gone)."""
        path = Path(state["path"])
        if path.is_dir():
            self.load(path)
        else:
            warnings.warn(f"distill.teacher: {path}, the teacher of the checkpoint being resumed, is gone; using "
                          f"{self.path}: the run will not continue exactly", stacklevel=2)
