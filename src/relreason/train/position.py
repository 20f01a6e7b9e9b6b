"""Where a run stands: the epoch, the steps done in it and their running sums; a checkpoint keeps it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass
class TrainingPosition:
    """Where training stands: epoch (0-based) in progress, steps done in it, and its running sums."""

    epoch: int = 0
    step: int = 0
    totals: dict[str, float] = dataclasses.field(default_factory=dict)  # loss and metrics summed over steps
    views: int = 0
    seconds: float = 0.0  # training time in this epoch
    past_seconds: float = 0.0  # training time in the epochs before it
    steps_per_epoch: int = 0
    items: int | None = None  # images of the epoch's shuffled order used so far by all ranks together

    @property
    def epochs_done(self) -> float:
        """Epochs trained, the current one counted by its fraction done."""
        return self.epoch + (self.step / self.steps_per_epoch if self.steps_per_epoch else 0.0)

    @property
    def train_seconds(self) -> float:
        """Training time of the whole run so far (its data loading and checkpoints not counted)."""
        return self.past_seconds + self.seconds

    def means(self) -> dict[str, float]:
        """The running means of the epoch so far."""
        return {name: total / max(self.step, 1) for name, total in self.totals.items()}

    def next_epoch(self) -> None:
        self.past_seconds += self.seconds
        self.epoch, self.step, self.totals, self.views, self.seconds, self.items = self.epoch + 1, 0, {}, 0, 0.0, 0
