"""Checks of argument values shared across the library, each a one-line error naming the argument."""

from __future__ import annotations

import dataclasses
import math
import operator
import os
from typing import Any, TypeVar

from relreason.errors import RelreasonError

ConfigT = TypeVar("ConfigT")


def check_positive_int(value: Any, name: str, example: int | None = None) -> int:
    """``value`` as an int when it is an integer >= 1 (a NumPy or 0-d torch integer too, not a bool or a float),
    else a one-line error naming ``name``."""
    try:
        is_bool = isinstance(value, bool) or str(getattr(value, "dtype", "")) in ("torch.bool", "bool")
        number = None if is_bool else operator.index(value)
    except TypeError:
        number = None
    if number is None or number < 1:
        hint = f"; pass e.g. {example}" if example is not None else ""
        raise RelreasonError(f"{name} must be a positive integer, got {value!r}{hint}")
    return number


def check_positive_float(value: Any, name: str) -> float:
    """``value`` as a float when it is finite and > 0, else a one-line error naming ``name``."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = float("nan")
    if not (v > 0 and math.isfinite(v)):
        raise RelreasonError(f"{name} must be a positive finite number, got {value!r}")
    return v


def with_home_expanded(config: ConfigT, *fields: str) -> ConfigT:
    """``config`` with a leading ``~`` expanded in its path options ``fields``: a path from a YAML config, or
    written ``--output-dir=~/runs``, meets no shell that would expand it, and a folder named ``~`` is a trap."""
    changes = {}
    for name in fields:
        value = getattr(config, name)
        if isinstance(value, os.PathLike):  # a Path from Python code
            value = os.fspath(value)
        if isinstance(value, str) and value.startswith("~"):
            changes[name] = os.path.expanduser(value)
    return dataclasses.replace(config, **changes) if changes else config
