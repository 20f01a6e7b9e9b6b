"""Training checkpoints: their names, the newest readable one, rotation, RNG state, and what differs when a model
no longer fits one. They are written (by ``relreason.train.resume``) with ``relreason.atomic_files``: a crash
mid-write never leaves a half-written one."""

from __future__ import annotations

import os
import random
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from relreason.errors import RelreasonError, short_reason, warn
from relreason.run_files import BACKBONE_META_NAME


def rng_state(device: torch.device | None = None) -> dict[str, Any]:
    """Every random generator a training step may draw from: the host's, and the training device's when it is
    a GPU (only that one: asking for every GPU's state would open a context on each, from every rank)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device | None = None) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if device is None or device.type != "cuda" or "cuda" not in state:
        return
    saved = state["cuda"]
    if isinstance(saved, (list, tuple)):  # older checkpoints kept every visible GPU's state
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index >= len(saved):
            return
        saved = saved[index]
    torch.cuda.set_rng_state(saved, device)


class UnreadableCheckpoint(RelreasonError):
    """A checkpoint file that does not read back as one: ``reason`` says why, in a few words."""

    def __init__(self, path: Path, reason: str, fix: str, damaged: bool = True) -> None:
        super().__init__(f"checkpoint {path} {reason}; {fix}")
        self.reason = reason
        self.damaged = damaged  # False: whole, but written by other software versions than these


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a training checkpoint on the CPU; a corrupt or foreign file is a one-line error."""
    path = Path(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except (ImportError, AttributeError) as error:  # a class its pickle names is not here (numpy 2 -> 1, say)
        raise UnreadableCheckpoint(path, f"cannot be read here ({short_reason(error)}), written by other package "
                                   "versions", "install the versions it was written with, or start a new --output-dir",
                                   damaged=False) from None
    except Exception as error:  # torch raises several types for truncated files
        raise UnreadableCheckpoint(path, f"cannot be read ({short_reason(error)}), truncated or corrupt",
                                   "delete it or start a new --output-dir") from None
    if not isinstance(checkpoint, dict) or "backbone" not in checkpoint or "epoch" not in checkpoint:
        raise UnreadableCheckpoint(path, "is not a relreason training checkpoint", "point --output-dir elsewhere")
    return checkpoint


_CHECKPOINT_PATTERN = re.compile(r"^checkpoint-e(\d+)-s(\d+)\.pt$")


def is_checkpoint_path(path: str | os.PathLike) -> bool:
    """Whether ``path`` is named as the training checkpoints ``checkpoint_path`` makes."""
    return _CHECKPOINT_PATTERN.match(Path(path).name) is not None


def checkpoint_path(run_dir: str | os.PathLike, epoch: int, step: int) -> Path:
    """Where the checkpoint taken after ``step`` steps of epoch ``epoch`` (0-based) lives."""
    return Path(run_dir) / f"checkpoint-e{epoch:04d}-s{step:07d}.pt"


def checkpoint_position(path: str | os.PathLike) -> tuple[int, int] | None:
    """``(epochs done, steps into the next)`` that a checkpoint's name says, or None for another name."""
    match = _CHECKPOINT_PATTERN.match(Path(path).name)
    return (int(match.group(1)), int(match.group(2))) if match else None


def holds_a_run(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` is a pretrain run's: it holds the run's exported backbone.json or a checkpoint."""
    return (Path(folder) / BACKBONE_META_NAME).is_file() or bool(list_checkpoints(folder))


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Training checkpoints in ``run_dir``, newest (furthest in training) first."""
    found = [(position, path) for path in Path(run_dir).glob("checkpoint-e*-s*.pt")
             if (position := checkpoint_position(path)) is not None]
    return [path for _, path in sorted(found, reverse=True)]


def load_newest_checkpoint(run_dir: str | os.PathLike) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint that reads back whole; corrupt or truncated ones are reported and passed over.

    None when there are no checkpoints; when there are some but none reads back, a one-line error: starting
    afresh beside them would hide that the run's progress is lost.
    """
    paths = list_checkpoints(run_dir)
    for path in paths:
        try:
            return path, load_checkpoint(path)
        except UnreadableCheckpoint as error:
            if path != paths[-1]:
                warn(f"passing over {path.name}: it {error.reason}; trying the one before")
            last = error
    if paths:
        fix = ("delete them to start this run over" if last.damaged else
               "install the package versions they were written with to resume,")
        raise RelreasonError(
            f"none of the {len(paths)} checkpoint(s) in {run_dir} can be read (the oldest, {paths[-1].name}, "
            f"{last.reason}); {fix} or choose another --output-dir"
        )
    return None


def rotate_checkpoints(
    run_dir: str | os.PathLike,
    keep: int,
    newest: str | os.PathLike | None = None,
    behind: Iterable[str | os.PathLike] = (),
) -> None:
    """Delete all but the ``keep`` newest checkpoints, counting from ``newest`` (the one just written), and
    those in ``behind`` (known to hold less progress than ``newest`` whatever their names say).

    Other files named as later than ``newest`` are left alone: they could not be read when the run resumed,
    perhaps only for a moment, and counting them would delete the checkpoint just written.
    """
    behind_paths = {Path(path) for path in behind}
    for path in behind_paths - ({Path(newest)} if newest is not None else set()):
        path.unlink(missing_ok=True)
    found = [path for path in list_checkpoints(run_dir) if path not in behind_paths]
    if newest is not None and Path(newest) in found:
        found = found[found.index(Path(newest)):]
    for path in found[keep:]:
        path.unlink(missing_ok=True)


def _state_differences(expected: Mapping[str, torch.Tensor], given: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Every tensor by which ``given`` differs from a model whose state_dict is ``expected``, as ``(key, kind)``:
    'missing' or 'mis-shaped' in ``expected``'s order, then 'unexpected' in ``given``'s."""
    differences = []
    for key, tensor in expected.items():
        shape = getattr(given[key], "shape", None) if key in given else None
        if key not in given:
            differences.append((key, "missing"))
        elif shape is None or tuple(shape) != tuple(tensor.shape):  # not a tensor counts as mis-shaped
            differences.append((key, "mis-shaped"))
    return differences + [(key, "unexpected") for key in given if key not in expected]


def first_difference(expected: Mapping[str, torch.Tensor], given: Mapping[str, Any]) -> str:
    """The first tensor by which ``given`` differs from a model whose state_dict is ``expected``, in a few words."""
    differences = _state_differences(expected, given)
    if not differences:
        return "its tensors do not load"
    key, kind = differences[0]
    if kind == "missing":
        return f"{key} is not in the checkpoint"
    if kind == "unexpected":
        return f"the checkpoint has {key}, which the model has not"
    saved = getattr(given[key], "shape", None)
    shape = "not a tensor" if saved is None else tuple(saved)
    return f"{key} is {shape} in the checkpoint, {tuple(expected[key].shape)} now"


def state_mismatch(expected: Mapping[str, torch.Tensor], given: Mapping[str, Any]) -> str | None:
    """How far ``given`` is from a model whose state_dict is ``expected``, in a few words; None when it fits."""
    kinds = [kind for _, kind in _state_differences(expected, given)]
    if not kinds:
        return None
    return (f"{kinds.count('missing')} missing, {kinds.count('unexpected')} unexpected, "
            f"{kinds.count('mis-shaped')} mis-shaped tensors")
