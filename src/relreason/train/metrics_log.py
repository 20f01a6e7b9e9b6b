"""The run's metrics: per-epoch and running-mean records as JSON lines, TensorBoard, the curves' plot."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from relreason.atomic_files import atomic_write_bytes
from relreason.figures import off_screen_figure, save_png
from relreason.run_files import METRICS_NAME, STEPS_NAME
from relreason.train.position import TrainingPosition


class MetricsLog:
    """Per-epoch metrics (metrics.jsonl) and running means every few steps (steps.jsonl), as JSON lines;
    the epoch records are mirrored to TensorBoard when it is installed."""

    def __init__(self, run_dir: Path, use_tensorboard: bool) -> None:
        self.path = run_dir / METRICS_NAME
        self.steps_path = run_dir / STEPS_NAME
        self.tensorboard_dir = run_dir / "tensorboard" if use_tensorboard else None
        self.writer: Any = None  # a SummaryWriter once the first record is written
        self.purge_from: int | None = None  # the first epoch a resumed run writes again

    def _tensorboard(self) -> Any:  # a SummaryWriter, or None without tensorboard
        if self.writer is None and self.tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                self.tensorboard_dir = None
                return None
            # purge_step: TensorBoard hides the earlier attempt's events from that epoch on, as truncate_after
            # drops its JSON lines, so a resumed run's curves do not show those epochs twice.
            self.writer = SummaryWriter(str(self.tensorboard_dir), purge_step=self.purge_from)
        return self.writer

    def write(self, record: dict[str, float]) -> None:
        # Synced: the checkpoint that ends the epoch is, and a crash must not keep it without its record.
        _append_json_line(self.path, record, sync=True)
        writer = self._tensorboard()
        if writer is not None:
            for key, value in record.items():
                if key != "epoch":
                    writer.add_scalar(f"pretrain/{key}", value, record["epoch"])
            writer.flush()

    def write_step(self, record: dict[str, float]) -> None:
        _append_json_line(self.steps_path, record)

    def read(self) -> list[dict[str, float]]:
        return read_json_lines(self.path)

    def read_steps(self) -> list[dict[str, float]]:
        return read_json_lines(self.steps_path)

    def truncate_after(self, epochs_done: float) -> None:
        """Drop records a resumed run will write again (those after the checkpoint it resumes)."""
        self.purge_from = math.floor(epochs_done) + 1  # epoch records are logged at steps 1, 2, ...
        for path in (self.path, self.steps_path):
            kept = [r for r in read_json_lines(path) if r["epoch"] <= epochs_done]
            atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in kept).encode())

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _append_json_line(path: Path, record: dict[str, float], sync: bool = False) -> None:
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")
        if sync:
            handle.flush()
            os.fsync(handle.fileno())


def read_json_lines(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines log (``metrics.jsonl``, ``steps.jsonl``); none when it is missing."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # a line cut short by a killed process; its steps are redone on resume
    return records


def in_percent(means: dict[str, float]) -> dict[str, float]:
    """Accuracies as percentages, as the logs keep them; the other metrics as they are."""
    return {name: 100 * value if name.endswith("accuracy") else value for name, value in means.items()}


def step_record(position: TrainingPosition) -> dict[str, float]:
    """The running means of the current epoch, placed in training time and epochs, for fine-grained curves."""
    return {
        "epoch": position.epochs_done,
        "minutes": position.train_seconds / 60,
        **in_percent(position.means()),
    }


def format_metric(name: str, value: float, percent_decimals: int = 2) -> str:
    return f"{100 * value:.{percent_decimals}f}%" if name.endswith("accuracy") else f"{value:.4f}"


def progress_fields(means: dict[str, float]) -> dict[str, str]:
    """The running means as a progress bar shows them: short names (``relation`` for ``relation_accuracy``), the
    loss and the probe first, so that a narrow terminal, which cuts the line on the right, keeps those."""
    first = [name for name in ("loss", "probe_accuracy") if name in means]
    return {name.removesuffix("_accuracy"): format_metric(name, means[name], percent_decimals=1)
            for name in [*first, *(n for n in means if n not in first)]}


def plot_training_curves(history: list[dict[str, float]], path: Path) -> bool:
    """Loss and every accuracy per epoch as a PNG; skipped (returns False) without matplotlib."""
    if not history:
        return False
    try:
        figure = off_screen_figure(figsize=(9, 3.2))
    except ImportError:
        return False
    epochs = [r["epoch"] for r in history]
    left, right = figure.subplots(1, 2)
    left.plot(epochs, [r["loss"] for r in history], marker="o")
    left.set(xlabel="epoch", ylabel="loss", title="training loss")
    for key in (k for k in history[-1] if k.endswith("accuracy")):
        right.plot(epochs, [r.get(key, math.nan) for r in history], marker="o", label=key.replace("_", " "))
    right.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracies")
    if right.lines:  # a method of one's own may log no accuracy
        right.legend(fontsize="small")
    figure.tight_layout()
    save_png(figure, path)  # a temporary a kill leaves is removed at the next start
    return True
