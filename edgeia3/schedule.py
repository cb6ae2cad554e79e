"""How many optimizer steps a training run takes, from the data size and the options.

One epoch of a few dozen rows is a handful of steps: IA3 vectors barely leave 1
(issue 13: 32 rows, 4 steps, 2.5% accuracy). T-Few trains few-shot sets for many
epochs instead. So without --epochs or --max-steps the run takes at least
MIN_STEPS steps (many epochs of a small set) and at least one epoch (a large set).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

# Steps when the user gives neither --epochs nor --max-steps, on a small set. Measured on
# SmolLM2-135M, batch 8, lr 3e-3, 50 eval rows: intent, 32 rows, accuracy after 4 (one epoch,
# the old default) / 25 / 50 / 75 / 100 steps: 10 / 82 / 88 / 92 / 92%; sentiment 32 rows:
# 56% after 4, 94% after 100; sentiment 16 rows: 84% after 50 and 100 (no overfitting).
# lr 1e-2 learns sooner but overfits (intent 88% at 100 steps, eval loss 0.12 vs 0.07).
MIN_STEPS = 100

# Learning-rate shapes after the linear warm-up (``lr_factor``): "linear" decays linearly to
# 10% of --lr at the last step; "cosine" follows a half cosine to 0; "constant" stays at --lr;
# "constant-decay" stays at --lr, then decays linearly to 0 over the last DECAY_FRACTION of
# the steps (warm-up, stable, decay).
SCHEDULES = ("constant", "constant-decay", "cosine", "linear")
# The defaults of TrainConfig and `edgeia3 train` (peak AdamW learning rate, shape, warm-up fraction).
DEFAULT_LR = 3e-3
DEFAULT_SCHEDULE = "linear"
DEFAULT_WARMUP = 0.05
DECAY_FRACTION = 0.2
LINEAR_FLOOR = 0.1


@dataclass(frozen=True)
class Schedule:
    steps: int  # optimizer steps in all
    steps_per_epoch: int
    epochs: float  # passes over the rows those steps make
    warmup_steps: int  # linear warm-up to the full learning rate
    source: str  # "--max-steps", "--epochs" or "auto (rows)"
    lr_schedule: str = DEFAULT_SCHEDULE  # one of SCHEDULES: the shape of the learning rate after warm-up

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        return (f"{self.steps} steps = {self.epochs:g} epochs of {self.steps_per_epoch} steps, "
                f"{self.warmup_steps} warm-up, lr {self.lr_schedule} ({self.source})")

    def lr_factor(self, step: int) -> float:
        """The multiplier of --lr at (0-based) ``step``."""
        return lr_factor(self.lr_schedule, step, self.steps, self.warmup_steps)


def lr_factor(schedule: str, step: int, total: int, warmup: int) -> float:
    """The multiplier of the base learning rate at 0-based ``step`` of ``total``: a linear
    warm-up over ``warmup`` steps (1/warmup .. 1), then the ``schedule`` shape (SCHEDULES)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r} (one of {', '.join(SCHEDULES)})")
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)  # 0 at the first step after warm-up
    if schedule == "linear":
        return max(LINEAR_FLOOR, 1 - progress)
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "constant-decay":
        decay = max(1, round(DECAY_FRACTION * total))
        left = total - step  # steps left, this one included: decay .. 1
        return min(1.0, left / decay)
    return 1.0


def plan(rows: int, batch_size: int, epochs: float | None = None, max_steps: int | None = None,
         warmup_ratio: float = DEFAULT_WARMUP, lr_schedule: str = DEFAULT_SCHEDULE) -> Schedule:
    """The schedule for ``rows`` training rows (per process). Explicit options win:
    --max-steps over --epochs over the automatic choice."""
    per_epoch = max(1, math.ceil(rows / batch_size))
    if max_steps:
        steps, source = max_steps, "--max-steps"
    elif epochs:
        steps, source = max(1, math.ceil(epochs * per_epoch)), "--epochs"
    else:
        steps, source = max(per_epoch, MIN_STEPS), f"auto ({rows} rows)"
    warmup = max(1, int(warmup_ratio * steps))
    return Schedule(steps, per_epoch, round(steps / per_epoch, 2), warmup, source, lr_schedule)
