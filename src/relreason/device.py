"""The device a command runs on (``--device``), the autocast dtype of an ``--amp`` mode, and the most precise
float a device computes in."""

from __future__ import annotations

import re

import torch

from relreason.errors import RelreasonError

AMP_MODES = ("off", "bf16", "fp16")


def check_device_name(name: str) -> None:
    """Refuse a ``--device`` that is none of auto, cpu, cuda, cuda:N or mps, whatever this machine holds."""
    if not isinstance(name, str) or re.fullmatch(r"auto|cpu|mps|cuda(:[0-9]+)?", name) is None:
        raise RelreasonError(f"unknown --device '{name}'; use auto, cpu, cuda, cuda:N or mps")


def resolve_device(name: str) -> torch.device:
    """auto, cpu, cuda, cuda:N (a visible GPU) or mps (where available); anything else is refused in one line."""
    check_device_name(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise RelreasonError("--device mps requested but MPS (Apple GPU) is not available here; use --device cpu")
        return torch.device("mps")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RelreasonError("--device cuda requested but no CUDA GPU is visible; use --device cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            visible = "cuda:0" if count == 1 else f"one of cuda:0 to cuda:{count - 1}"
            raise RelreasonError(f"--device {name} requested but only {count} CUDA GPU(s) are visible; use {visible}")
    return device


def use_device(device: torch.device) -> None:
    """Make ``device`` the current CUDA device when it names one: pinned host memory and a DataLoader's pinning
    thread open a CUDA context on the current device, which would otherwise be GPU 0 whatever ``--device`` says."""
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)


def autocast_dtype(amp: str) -> torch.dtype | None:
    """The autocast dtype of an ``--amp`` mode ('off', 'bf16', 'fp16'); None for 'off'."""
    dtypes = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    if amp not in dtypes:
        raise RelreasonError(f"unknown --amp '{amp}'; choose one of {', '.join(dtypes)}")
    return dtypes[amp]


def precise_float(device: torch.device | str) -> torch.dtype:
    """float64 for sums and solves that need it, except on Apple's MPS, which has no float64 (float32 there)."""
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is an allocation that failed: a GPU's (CUDA, MPS; also as cuBLAS's or cuDNN's) or the
    host's."""
    text = str(error)
    return isinstance(error, torch.cuda.OutOfMemoryError) or (isinstance(error, RuntimeError) and (
        "out of memory" in text.lower() or "can't allocate memory" in text or "_ALLOC_FAILED" in text))
