"""Readers for the raw on-disk formats of the standard image datasets.

Every reader returns plain numpy arrays: images as uint8 ``(N, H, W)`` (grey) or
``(N, H, W, 3)`` (RGB, row-major pixels) and labels as int64 ``(N,)``. Files are
only ever read, never modified. Malformed files raise :class:`RelreasonError`
with a one-line message naming the file and what to do about it.
"""

from __future__ import annotations

import gzip
import os
import pickle
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from relreason.errors import RelreasonError, short_reason

__all__ = [
    "read_cifar_pickle",
    "cifar_images",
    "cifar_labels",
    "stl_count",
    "read_idx",
    "read_stl_images",
    "read_stl_labels",
    "read_text_lines",
    "read_svhn_mat",
]

_REFETCH = "delete it and fetch it again (e.g. with --download)"


# --------------------------------------------------------------------------- CIFAR


def read_cifar_pickle(path: str | os.PathLike) -> dict[str, Any]:
    """Load one CIFAR python pickle (a batch or a meta file) as a dict with str keys."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            obj = pickle.load(fh, encoding="latin1")
    except (OSError, pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as exc:
        raise RelreasonError(f"cannot read CIFAR file {path} ({short_reason(exc, limit=None)}); {_REFETCH}") from None
    if not isinstance(obj, dict):
        raise RelreasonError(f"CIFAR file {path} does not hold a dict (got {type(obj).__name__}); {_REFETCH}")
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}


def cifar_images(batch: dict[str, Any], path: str | os.PathLike) -> np.ndarray:
    """Turn a batch's ``data`` (rows of 3072 bytes, channel-major) into uint8 (N, 32, 32, 3)."""
    if "data" not in batch:
        raise RelreasonError(f"CIFAR file {path} has no 'data' entry; {_REFETCH}")
    data = np.asarray(batch["data"])
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise RelreasonError(
            f"CIFAR file {path} has data of shape {data.shape}, expected (N, 3072); {_REFETCH}"
        )
    data = data.astype(np.uint8, copy=False)
    return np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))


def cifar_labels(batch: dict[str, Any], key: str, path: str | os.PathLike, n: int) -> np.ndarray:
    """Read the label list ``key`` of a batch and check it has ``n`` entries."""
    if key not in batch:
        raise RelreasonError(f"CIFAR file {path} has no '{key}' entry; {_REFETCH}")
    labels = np.asarray(batch[key], dtype=np.int64).reshape(-1)
    if labels.shape[0] != n:
        raise RelreasonError(
            f"CIFAR file {path} has {labels.shape[0]} '{key}' for {n} images; {_REFETCH}"
        )
    return labels


# --------------------------------------------------------------------------- IDX (MNIST family)

# IDX type codes -> big-endian numpy dtypes.
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def _read_maybe_gzip(path: Path) -> bytes:
    with open(path, "rb") as fh:
        head = fh.read(2)
    if head == b"\x1f\x8b":
        with gzip.open(path, "rb") as fh:
            return fh.read()
    with open(path, "rb") as fh:
        return fh.read()


def read_idx(path: str | os.PathLike, expected_ndim: int | None = None) -> np.ndarray:
    """Read an IDX file (gzip-compressed or not; detected from its first bytes).

    The header is two zero bytes, a type code, the number of dimensions, then one
    big-endian uint32 per dimension. The payload size must match the header exactly.
    """
    path = Path(path)
    try:
        raw = _read_maybe_gzip(path)
    except (OSError, EOFError, gzip.BadGzipFile, zlib.error) as exc:  # zlib.error: corrupt compressed data
        reason = f"corrupt gzip data: {exc}" if isinstance(exc, zlib.error) else short_reason(exc, limit=None)
        raise RelreasonError(f"cannot read IDX file {path} ({reason}); {_REFETCH}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise RelreasonError(f"{path} is not an IDX file (bad magic number {raw[:4].hex()}); {_REFETCH}")
    type_code, ndim = raw[2], raw[3]
    if type_code not in _IDX_DTYPES:
        raise RelreasonError(f"IDX file {path} has unknown type code 0x{type_code:02x}; {_REFETCH}")
    if expected_ndim is not None and ndim != expected_ndim:
        raise RelreasonError(
            f"IDX file {path} has {ndim} dimensions, expected {expected_ndim}; check the file name or {_REFETCH}"
        )
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise RelreasonError(f"IDX file {path} is truncated inside its header; {_REFETCH}")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = _IDX_DTYPES[type_code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header_len != expected:
        raise RelreasonError(
            f"IDX file {path} holds {len(raw) - header_len} data bytes but its header {dims} needs {expected}; {_REFETCH}"
        )
    arr = np.frombuffer(raw, dtype=dtype, offset=header_len).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=True) if dtype.itemsize > 1 else arr.copy()


# --------------------------------------------------------------------------- STL-10

_STL_SIDE = 96
_STL_IMAGE_BYTES = 3 * _STL_SIDE * _STL_SIDE


def stl_count(path: str | os.PathLike) -> int:
    """Number of images in an STL-10 ``*_X.bin`` file (checks the size is a whole number)."""
    path = Path(path)
    size = path.stat().st_size
    if size % _STL_IMAGE_BYTES:
        raise RelreasonError(
            f"STL-10 file {path} has {size} bytes, not a multiple of {_STL_IMAGE_BYTES}; {_REFETCH}"
        )
    return size // _STL_IMAGE_BYTES


def read_stl_images(
    path: str | os.PathLike, out: np.ndarray | None = None, chunk: int = 4096
) -> np.ndarray:
    """Read an STL-10 ``*_X.bin`` file into uint8 (N, 96, 96, 3).

    Each image is stored as 3 channel planes, each plane column-major; the result
    matches torchvision's orientation (``out[n, row, col, c] = raw[n, c, col, row]``).
    The file is read in chunks so the 2.7 GB unlabeled split needs no second copy.
    If ``out`` is given, it must have exactly N images and is filled in place.
    """
    path = Path(path)
    n = stl_count(path)
    if out is None:
        out = np.empty((n, _STL_SIDE, _STL_SIDE, 3), dtype=np.uint8)
    elif out.shape != (n, _STL_SIDE, _STL_SIDE, 3):
        raise ValueError(f"out has shape {out.shape}, expected {(n, _STL_SIDE, _STL_SIDE, 3)}")
    try:
        with open(path, "rb") as fh:
            for start in range(0, n, chunk):
                count = min(chunk, n - start)
                buf = fh.read(count * _STL_IMAGE_BYTES)
                if len(buf) != count * _STL_IMAGE_BYTES:
                    raise RelreasonError(f"STL-10 file {path} ended early; {_REFETCH}")
                block = np.frombuffer(buf, dtype=np.uint8).reshape(count, 3, _STL_SIDE, _STL_SIDE)
                out[start : start + count] = block.transpose(0, 3, 2, 1)
    except OSError as exc:
        raise RelreasonError(f"cannot read STL-10 file {path} ({short_reason(exc, limit=None)}); {_REFETCH}") from None
    return out


def read_stl_labels(path: str | os.PathLike) -> np.ndarray:
    """Read an STL-10 ``*_y.bin`` file (uint8 labels 1..10) as int64 labels 0..9."""
    path = Path(path)
    try:
        raw = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        raise RelreasonError(f"cannot read STL-10 file {path} ({short_reason(exc, limit=None)}); {_REFETCH}") from None
    if raw.size and (raw.min() < 1 or raw.max() > 10):
        raise RelreasonError(
            f"STL-10 label file {path} has labels outside 1..10 ({raw.min()}..{raw.max()}); {_REFETCH}"
        )
    return raw.astype(np.int64) - 1


def read_text_lines(path: str | os.PathLike) -> list[str]:
    """Non-empty stripped lines of a small text file (e.g. ``class_names.txt``)."""
    with open(path, encoding="utf-8", errors="replace") as fh:
        return [line.strip() for line in fh if line.strip()]


# --------------------------------------------------------------------------- SVHN


def read_svhn_mat(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read an SVHN cropped-digits ``.mat`` file.

    ``X`` has shape (32, 32, 3, N) and ``y`` shape (N, 1) with label 10 meaning the
    digit 0. Returns uint8 (N, 32, 32, 3) and int64 labels 0..9.
    """
    import scipy.io

    path = Path(path)
    try:
        mat = scipy.io.loadmat(path, variable_names=["X", "y"])
    except (OSError, ValueError, TypeError, NotImplementedError) as exc:
        raise RelreasonError(f"cannot read SVHN file {path} ({short_reason(exc, limit=None)}); {_REFETCH}") from None
    if "X" not in mat or "y" not in mat:
        raise RelreasonError(f"SVHN file {path} lacks the 'X' or 'y' variable; {_REFETCH}")
    x, y = np.asarray(mat["X"]), np.asarray(mat["y"])
    if x.ndim != 4 or x.shape[2] != 3:
        raise RelreasonError(f"SVHN file {path} has X of shape {x.shape}, expected (H, W, 3, N); {_REFETCH}")
    labels = y.astype(np.int64).reshape(-1)
    if labels.shape[0] != x.shape[3]:
        raise RelreasonError(f"SVHN file {path} has {labels.shape[0]} labels for {x.shape[3]} images; {_REFETCH}")
    labels[labels == 10] = 0
    images = np.ascontiguousarray(x.transpose(3, 0, 1, 2).astype(np.uint8, copy=False))
    return images, labels
