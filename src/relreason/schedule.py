"""Learning-rate schedules as a function of the optimizer step, so a resumed run picks up the same rate."""

from __future__ import annotations

import math
from typing import Any

import torch

from relreason.checks import real_number, whole_number
from relreason.errors import RelreasonError

LR_SCHEDULES = ("constant", "cosine")


def check_schedule(schedule: str, warmup_epochs: float, epochs: int) -> None:
    """Raise a one-line error for an unknown schedule or a warm-up that does not fit in the run."""
    if schedule not in LR_SCHEDULES:
        raise RelreasonError(f"unknown --lr-schedule '{schedule}'; choose one of {', '.join(LR_SCHEDULES)}")
    if not 0 <= real_number(warmup_epochs, "--warmup-epochs") < whole_number(epochs, "--epochs"):
        raise RelreasonError(
            f"--warmup-epochs must lie in [0, --epochs) = [0, {epochs}), got {warmup_epochs}; "
            "use a shorter warm-up or more epochs"
        )


def _whole_steps(value: Any, name: str) -> int:
    """A count of steps as an int: a whole float too (``5.0 * steps_per_epoch``), a fractional one refused."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return whole_number(value, name)


def learning_rate_factor(step: int, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """Multiplier of the base learning rate for optimizer step ``step`` (0-based) of ``total_steps``.

    A linear warm-up over the first ``warmup_steps`` (from ``1/warmup_steps`` up to 1), then 1 for
    ``constant`` or a half cosine from 1 towards 0 at ``total_steps`` for ``cosine``. Steps are whole numbers (a
    warm-up of ``epochs * steps_per_epoch`` steps: round it, as the trainer does) and the warm-up ends within the
    run; past ``total_steps`` the cosine stays at 0.
    """
    if schedule not in LR_SCHEDULES:
        raise RelreasonError(f"unknown learning-rate schedule '{schedule}'; choose one of {', '.join(LR_SCHEDULES)}")
    step, total_steps = _whole_steps(step, "step"), _whole_steps(total_steps, "total_steps")
    warmup_steps = _whole_steps(warmup_steps, "warmup_steps (round a fractional warm-up to whole steps)")
    if step < 0 or not 0 <= warmup_steps <= total_steps:
        raise RelreasonError(
            f"learning_rate_factor needs step >= 0 and 0 <= warmup_steps <= total_steps, got step {step}, "
            f"warmup_steps {warmup_steps}, total_steps {total_steps}; count steps from 0 over the whole run"
        )
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def set_learning_rate(optimizer: torch.optim.Optimizer, factor: float) -> None:
    """Set every parameter group's rate to its ``base_lr`` times ``factor``.

    A group without ``base_lr`` gets its current ``lr`` as the base on the first call, so call this before the
    first step has changed any rate (or set ``base_lr`` yourself, as the trainer does).
    """
    for group in optimizer.param_groups:
        group["lr"] = group.setdefault("base_lr", group["lr"]) * factor
