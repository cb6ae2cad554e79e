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
# (Those figures were taken with the earlier default recipe, lr 3e-3 with linear decay.)
MIN_STEPS = 100

# Learning-rate shapes after the linear warm-up (``lr_factor``): "linear" decays linearly to
# 10% of --lr at the last step; "cosine" follows a half cosine to 0; "constant" stays at --lr;
# "constant-decay" stays at --lr, then decays linearly to 0 over the last DECAY_FRACTION of
# the steps (warm-up, stable, decay).
SCHEDULES = ("constant", "constant-decay", "cosine", "linear")
# The defaults of TrainConfig and `edgeia3 train` (peak AdamW learning rate, shape, warm-up fraction),
# chosen by bench/bench_sweep.py (BENCHMARKS.md): on SmolLM2 at 60 steps x 8, lr 6e-3 held
# constant with a final 20% decay scored 100 / 100 / 99% on sentiment / intent / extract, the
# previous 3e-3 with linear decay (which halves the mean step) 100 / 87 / 89%, a plain
# constant-lr PEFT loop 100 / 98 / 99%; at 30 steps on intent 89%, 68% and 74% (one seed each).
DEFAULT_LR = 6e-3
DEFAULT_SCHEDULE = "constant-decay"
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


# Early signal: was the budget about right? Judged from the loss per answer (summed over an
# answer's tokens, averaged over rows: what decides an exact-match answer, comparable across
# label and JSON tasks) at a few points of the run: the eval loss of a few eval rows at 0, 1/4,
# 1/2, 3/4 and the end; without an eval set, the mean training loss of each quarter.
# "still improving" when the loss is still above FLOOR (answers not yet nearly all right) and
# the second half of the run cut it by STEEP_HALF (to its best point) or the last quarter by
# STEEP; "plateaued at step N" when it was near its best (NEAR_REL of it, or NEAR_ABS) by half
# the run, or rose by ROSE after its best; "not improving" when the run barely moved it (FLAT);
# else "converged". Checked on the bench/bench_sweep.py runs (BENCHMARKS.md): the SmolLM2 runs
# that more steps improved (intent at 30 and 60 steps: 68-89%, extract at 60 steps of the old
# default: 89%; loss 0.54-1.25 per answer) and Gemma 3 270M's intent at 30 steps (81%; 0.86
# per answer at its best) say "still improving"; the runs at 100% (0.004-0.11) do not.
CHECKPOINTS = (0.25, 0.5, 0.75)
FLOOR = 0.2
STEEP_HALF = 0.25
STEEP = 0.15
NEAR_REL = 0.1
NEAR_ABS = 0.05
ROSE = 0.2
FLAT = 0.02


def early_signal(points: list[tuple[int, float]], total: int, source: str = "eval loss") -> dict | None:
    """A verdict on the run's length from ``points`` [(step, loss per answer), ...] (in step
    order, the first the starting level, the last at or near the end of ``total`` steps): a
    dict with ``verdict`` (still improving, plateaued, converged, not improving), ``message``
    (with the numbers), ``source``, ``points`` and the figures it was judged by. None: under
    3 points."""
    if len(points) < 3:
        return None
    steps, loss = [s for s, _ in points], [float(v) for _, v in points]
    start, end, best = loss[0], loss[-1], min(loss)
    at_best = steps[loss.index(best)]
    mid = max((i for i, s in enumerate(steps[:-1]) if s <= total / 2), default=0)
    # to the second half's best, not its last point: a few probe rows make each point noisy, and
    # one unlucky last probe must not turn a steep second half into "converged"
    half_best = min(loss[mid + 1:])
    half_rel = (loss[mid] - half_best) / loss[mid] if loss[mid] > 0 else 0.0
    last_rel = (loss[-2] - end) / loss[-2] if loss[-2] > 0 else 0.0
    figures = {"source": source, "points": [[s, round(v, 5)] for s, v in points],
               "second_half_drop": round(half_rel, 4), "last_quarter_drop": round(last_rel, 4), "best_step": at_best}
    trail = f"{source} {loss[mid]:.3f} at step {steps[mid]}, {loss[-2]:.3f} at {steps[-2]}, {end:.3f} at {steps[-1]}"
    if start - best <= FLAT * max(start, 1e-12):
        return {"verdict": "not improving", **figures,
                "message": f"not improving: {source} {start:.3f} at step {steps[0]}, {end:.3f} at step "
                           f"{steps[-1]}, best {best:.3f}; check the data or raise --lr"}
    if end > FLOOR and (half_rel >= STEEP_HALF or last_rel >= STEEP):
        return {"verdict": "still improving", **figures,
                "message": f"still improving: more steps would help ({trail}: -{half_rel:.0%} over the second "
                           f"half of the run, {-last_rel:+.0%} over the last quarter)"}
    near = next(s for s, v in zip(steps, loss) if v <= best + max(NEAR_REL * best, NEAR_ABS))
    rose = end > best * (1 + ROSE) + 0.01
    if near <= total / 2 or rose:
        step = at_best if rose else near
        why = (f"{source} rose after it: {best:.3f} at step {at_best}, {end:.3f} at step {steps[-1]}" if rose else
               f"{source} {loss[steps.index(near)]:.3f} there, {end:.3f} at step {steps[-1]} (best {best:.3f})")
        return {"verdict": "plateaued", "plateau_step": step, **figures,
                "message": f"plateaued at step {step}: {why}; fewer steps would do" + (" (or a lower --lr)" if rose else "")}
    low = f", below {FLOOR} per answer: few answers left to fix" if end <= FLOOR else ""
    return {"verdict": "converged", **figures,
            "message": f"converged: {source} {start:.3f} -> {end:.3f} ({-half_rel:+.0%} over the second half, "
                       f"{-last_rel:+.0%} over the last quarter{low})"}


def checkpoint_steps(total: int) -> list[int]:
    """The steps (after which) the early signal measures the eval loss: quarters and the end."""
    return sorted({max(1, round(f * total)) for f in CHECKPOINTS} | {total})


def quarter_means(losses: list[float]) -> list[tuple[int, float]]:
    """Training-loss points without an eval set: each quarter's mean (of per-step losses per
    answer), at the quarter's last step."""
    n = len(losses)
    if n < 4:
        return []
    bounds = [round(i * n / 4) for i in range(5)]
    return [(bounds[i + 1], sum(losses[bounds[i]:bounds[i + 1]]) / (bounds[i + 1] - bounds[i])) for i in range(4)]
