"""Learning-rate schedules: linear warmup, then cosine decay, WSD (warmup-stable-decay) or constant."""

import math

from herd.train.config import OptimSpec


def lr_at(step: int, total_steps: int, spec: OptimSpec) -> float:
    """The learning rate of optimizer step ``step`` (0-based) in a run of ``total_steps``.

    WSD holds the peak until the last ``decay_fraction`` of the run and then decays linearly; unlike cosine,
    its stable phase does not depend on the run length, so a run can be extended and decayed later."""
    if step < spec.warmup_steps:
        return spec.lr * (step + 1) / spec.warmup_steps
    floor = spec.lr * spec.min_lr_ratio
    if spec.schedule == "constant":
        return spec.lr
    if spec.schedule == "cosine":
        progress = min(1.0, (step - spec.warmup_steps) / max(1, total_steps - 1 - spec.warmup_steps))
        return floor + (spec.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    decay_start = max(spec.warmup_steps, total_steps - round(spec.decay_fraction * total_steps))
    if step < decay_start:
        return spec.lr
    progress = min(1.0, (step - decay_start + 1) / max(1, total_steps - decay_start))
    return spec.lr + (floor - spec.lr) * progress
