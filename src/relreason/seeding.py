"""Seeds: the one check every seed passes, and seeding every generator a run uses."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

from relreason.errors import RelreasonError

MAX_SEED = 2**63 - 1  # int64: what torch.manual_seed, torch.Generator and numpy's generators all take


def check_seed(seed: Any, name: str = "seed") -> int:
    """Refuse a seed that some generator it reaches would reject (a negative one or one beyond int64)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise RelreasonError(f"{name} must be an integer in [0, 2**63 - 1], got {seed!r}; pass e.g. 0")
    return seed


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
