"""Seeds: the one check every seed passes, seeding every generator a run uses, and the seeds derived from a
run's seed (per epoch, step, item)."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from relreason.checks import whole_number
from relreason.errors import RelreasonError

MAX_SEED = 2**63 - 1  # int64: what torch.manual_seed, torch.Generator and numpy's generators all take

_MASK64 = (1 << 64) - 1


def mix_seed(*values: int) -> int:
    """A well-spread 63-bit seed from integers (splitmix64 steps), so nearby items get unrelated streams."""
    state = 0x9E3779B97F4A7C15
    for value in values:
        state = (state ^ (value & _MASK64)) * 0xBF58476D1CE4E5B9 & _MASK64
        state = (state ^ (state >> 27)) * 0x94D049BB133111EB & _MASK64
        state ^= state >> 31
    return state >> 1


def check_seed(seed: Any, name: str = "seed") -> int:
    """Refuse a seed that some generator it reaches would reject (a negative one or one beyond int64)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise RelreasonError(f"{name} must be an integer in [0, 2**63 - 1], got {seed!r}; pass e.g. 0")
    return seed


def check_optional_seed(seed: Any, name: str = "seed") -> int | None:
    """None (views from PyTorch's global generator), or a seed as ``check_seed`` takes it, a NumPy or 0-d torch
    integer too: anything else is a one-line error now rather than a TypeError inside a DataLoader worker."""
    if seed is None:
        return None
    try:
        number = whole_number(seed, name)
    except RelreasonError:
        number = None
    if number is None or not 0 <= number <= MAX_SEED:
        raise RelreasonError(f"{name} must be None or an integer in [0, 2**63 - 1], got {seed!r}; pass e.g. 0")
    return number


@contextlib.contextmanager
def caller_rng_kept() -> Iterator[None]:
    """Inside, a run seeds the global generators as it needs; on leaving, Python's, NumPy's and PyTorch's (the
    CPU's, and those of CUDA devices already in use) are as the caller left them, so that a call from a notebook or
    one's own script does not change what the caller draws next. (A run on the GPU in a process that had not
    started CUDA leaves CUDA's generators as the run left them; one on the CPU does not touch them.)"""
    python_state, numpy_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    # Reading them would start CUDA in a process that has not used it.
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        torch.set_rng_state(torch_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)


def seed_torch(seed: int, device: torch.device) -> None:
    """PyTorch's CPU generator, and CUDA's when the work runs there. Not torch.manual_seed: in a process that has
    not started CUDA it also queues a seed for CUDA's first use, which a CPU run would leave behind for the
    caller's next GPU work."""
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed_all(seed)


def seed_everything(seed: int, device: torch.device) -> None:
    """Python's, NumPy's and PyTorch's generators for a run on ``device``."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    seed_torch(seed, device)
