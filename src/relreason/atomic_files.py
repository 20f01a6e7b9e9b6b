"""Atomic file writes: a file is written whole beside its place, fsynced and renamed over it, so a crash or a kill
mid-write leaves the old file or the new one, never half of one."""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch


def _read_umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


# Once, at import: the round trip above is not safe beside threads that create files.
_UMASK_AT_IMPORT = _read_umask()


def current_umask() -> int:
    """The umask in force now, read from /proc without changing it (Linux 4.7 and later); elsewhere the one in
    force when relreason was imported."""
    try:
        with open("/proc/self/status", "rb") as status:
            for line in status:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return _UMASK_AT_IMPORT


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temporary file beside ``path``, fsync it, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        try:
            os.fchmod(descriptor, 0o666 & ~current_umask())  # mkstemp's 0600 would hide the file from the user's group
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
