"""Checks of argument values shared across the library, each a one-line error naming the argument."""

from __future__ import annotations

import math
from typing import Any

from relreason.errors import RelreasonError


def check_positive_int(value: Any, name: str, example: int | None = None) -> int:
    """``value`` when it is an integer >= 1 (not a bool), else a one-line error naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        hint = f"; pass e.g. {example}" if example is not None else ""
        raise RelreasonError(f"{name} must be a positive integer, got {value!r}{hint}")
    return value


def check_positive_float(value: Any, name: str) -> float:
    """``value`` as a float when it is finite and > 0, else a one-line error naming ``name``."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = float("nan")
    if not (v > 0 and math.isfinite(v)):
        raise RelreasonError(f"{name} must be a positive finite number, got {value!r}")
    return v
