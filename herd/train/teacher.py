"""The teacher of a distillation run (``[distill] teacher = ...`` in any training recipe), run online beside the
student: a model directory, or a training run that may still be training (codistillation: the seeds train
Maverick from Behemoth while Behemoth trains).

A run directory's teacher is its newest complete checkpoint's ``model/`` (herd.train.run_state renames a
checkpoint into place only once it is whole, so a half-written one is never seen). With ``reload_every = N`` the
student looks for a newer one every N steps; a checkpoint that disappears while it is read (the teacher's run
rotating its checkpoints) leaves the current teacher in place with a warning, and the next look tries again.
Each student checkpoint records which teacher checkpoint it was using, so a resumed student reloads that one and
continues exactly.

Mutual codistillation (Anil et al. 2018): two runs name each other as teacher with ``reload_every``. A teacher
run that has no checkpoint yet (or does not exist yet) is then no error: the student trains on the data alone
(plain cross-entropy) until the first one lands, a burn-in as in the paper. Its tokenizer is checked when it
loads; a mismatch then stops the run with the error naming both.

The teacher runs without gradients in ``dtype`` (bf16 by default), optionally weight-quantized
(``teacher_quantize``: herd.infer.quantize's int8, int4, ... to halve or quarter its memory), on the same packed
batch, positions and document masking as the student. Its tokenizer must be the student's
(herd.train.distill.check_compatible).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

from herd import checkpoint
from herd.checkpoint import parse_dtype
from herd.errors import CheckpointError, ConfigError
from herd.infer.quantize import quantize
from herd.train import run_state
from herd.train.distill import TeacherTargets, check_compatible, teacher_forward


class Teacher:
    def __init__(self, source: str | Path, student: Any, dtype: str = "bf16", reload_every: int = 0,
                 quantize: str | None = None):
        """``student``: what check_compatible takes for the student side ((tokenizer, vocab_size)).
        ``quantize``: a herd.infer.quantize scheme applied to the teacher's weights once loaded (int8, int4, ...)."""
        self.source, self.student, self.reload_every = Path(source), student, reload_every
        self.dtype, self.quantize = parse_dtype(dtype), quantize
        self.path: Path | None = None
        self.model: torch.nn.Module | None = None
        if reload_every and not (self.source / "config.json").is_file() and not _has_checkpoint(self.source):
            # mutual codistillation: the other run has not saved yet (or not started); until it does, the student
            # learns from the data alone (targets() is None) and looks again every reload_every steps
            warnings.warn(f"distill.teacher: {self.source} has no checkpoint yet; training on the data alone until "
                          f"it has one", stacklevel=2)
            return
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
        if self.quantize is not None:
            quantize(model, self.quantize)
        self.model, self.path = model, path

    def maybe_reload(self, step: int) -> None:
        """Every ``reload_every`` steps: move to the source's newest checkpoint, if there is a newer one."""
        if not self.reload_every or step % self.reload_every:
            return
        if self.model is None and not _has_checkpoint(self.source):
            return  # the other run of a mutual codistillation has still not saved
        try:
            self.load(self.newest())
        except (CheckpointError, OSError) as e:  # rotated away while we read it: keep the current teacher
            warnings.warn(f"distill.teacher: could not read the newest checkpoint of {self.source} ({e}); "
                          f"keeping {self.path}", stacklevel=2)

    @torch.no_grad()
    def targets(self, batch: dict[str, torch.Tensor]) -> TeacherTargets | None:
        """The teacher's targets, or None while there is no teacher yet (plain cross-entropy)."""
        return None if self.model is None else teacher_forward(self.model, batch)

    def state_dict(self) -> dict[str, str | None]:
        return {"path": None if self.path is None else str(self.path)}

    def load_state_dict(self, state: dict[str, str | None]) -> None:
        """Back to the teacher a checkpoint was using (the newest one, with a warning, if it is gone), or to no
        teacher if it had none yet."""
        if state["path"] is None:
            self.model = self.path = None
            return
        path = Path(state["path"])
        if path.is_dir():
            self.load(path)
        else:
            warnings.warn(f"distill.teacher: {path}, the teacher of the checkpoint being resumed, is gone; using "
                          f"{self.path}: the run will not continue exactly", stacklevel=2)


def _has_checkpoint(run: Path) -> bool:
    try:
        run_state.resolve(run)
        return True
    except CheckpointError:
        return False
