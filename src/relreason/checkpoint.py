"""Atomic file writes and training checkpoints: a crash mid-write never leaves a half-written file."""

from __future__ import annotations

import io
import json
import os
import random
import re
import sys
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from relreason.errors import RelreasonError, short_reason


def _read_umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # once, at import: the round trip above is not safe beside threads that create files


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temporary file beside ``path``, fsync it, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        try:
            os.fchmod(descriptor, 0o666 & ~_UMASK)  # mkstemp's 0600 would hide the file from the user's group
        except OSError:
            pass  # a file system without modes (e.g. vfat): its own defaults apply
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # make the rename itself durable
    finally:
        os.close(directory)


def remove_stale_temporaries(directory: str | os.PathLike, name_pattern: str) -> None:
    """Delete the temporary files that ``atomic_write_bytes`` left for names matching ``name_pattern`` when a
    process was killed mid-write (they are never renamed into place)."""
    for path in Path(directory).glob(f".{name_pattern}.*.tmp"):
        path.unlink(missing_ok=True)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def plain_json(obj: Any) -> Any:
    """``json.dumps``'s ``default``: paths, devices, sets, tensors and NumPy values as plain JSON types (a config
    built in Python may hold a ``Path`` or a NumPy number where the command line gives a string or an int)."""
    if isinstance(obj, (os.PathLike, torch.device)):
        return os.fspath(obj) if isinstance(obj, os.PathLike) else str(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj, key=repr)
    if hasattr(obj, "tolist"):  # torch tensors and numpy arrays / scalars
        return obj.tolist()
    raise TypeError(f"object of type {type(obj).__name__} is not JSON serialisable")


def atomic_write_json(path: str | os.PathLike, payload: Any) -> None:
    atomic_write_bytes(path, (json.dumps(payload, indent=2, default=plain_json) + "\n").encode())


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
                print(f"relreason: warning: passing over {path.name}: it {error.reason}; trying the one before",
                      file=sys.stderr)
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
    behind = {Path(path) for path in behind}
    for path in behind - ({Path(newest)} if newest is not None else set()):
        path.unlink(missing_ok=True)
    found = [path for path in list_checkpoints(run_dir) if path not in behind]
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
