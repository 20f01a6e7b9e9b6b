"""Checks of argument values shared across the library, each a one-line error naming the argument."""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import operator
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from relreason.atomic_files import plain_json
from relreason.errors import RelreasonError

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

ConfigT = TypeVar("ConfigT", bound="DataclassInstance")


def _is_bool(value: Any) -> bool:
    """True for Python, NumPy and torch booleans, which ``operator.index`` would take as 0 and 1."""
    return isinstance(value, bool) or str(getattr(value, "dtype", "")) in ("torch.bool", "bool")


def check_positive_int(value: Any, name: str, example: int | None = None) -> int:
    """``value`` as an int when it is an integer >= 1 (a NumPy or 0-d torch integer too, not a bool or a float),
    else a one-line error naming ``name``."""
    try:
        number = None if _is_bool(value) else operator.index(value)
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


def whole_number(value: Any, name: str) -> int:
    """``value`` as an int when it is an integer (a NumPy or 0-d torch integer too), else a one-line error: a float,
    even 4.0, is refused as ``check_positive_int`` refuses it, rather than silently truncated."""
    try:
        if _is_bool(value):
            raise TypeError
        return operator.index(value)  # ints, NumPy and 0-d torch integers; not 2.5
    except TypeError:
        raise RelreasonError(f"{name} must be a whole number, got {value!r}") from None


def real_number(value: Any, name: str) -> float:
    """``value`` as a float when it is a real number (not a bool, not text), else a one-line error naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise RelreasonError(f"{name} must be a number, got {value!r}")
    return float(value)


def check_folder_given(value: Any, flag: str = "--output-dir") -> None:
    """Refuse an empty folder option (an unset shell variable, ``--output-dir "$OUT"``), which would otherwise
    mean the working folder."""
    if value is None or not str(value).strip():
        raise RelreasonError(f"{flag} is empty; give a folder, e.g. runs/my-run")


def _plain_value(value: Any, kind: str, name: str, example: Any = None) -> Any:
    """``value`` as the plain Python type ``kind`` names ('int', 'float', 'bool', 'str'), or a one-line error."""
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if getattr(value, "shape", None) == () and hasattr(value, "item"):  # a NumPy scalar or a 0-d tensor
        value = value.item()
    if kind == "str" and isinstance(value, str) or kind == "bool" and isinstance(value, bool):
        return value
    if kind == "int" and not isinstance(value, bool):
        try:
            return operator.index(value)
        except TypeError:
            pass
    if kind == "float" and not isinstance(value, (bool, str, bytes)):
        try:
            return float(value)
        except (TypeError, ValueError):
            pass
    article = "an" if kind == "int" else "a"
    right_kind = {"int": int, "float": float, "bool": bool, "str": str}[kind]
    hint = f"; pass e.g. {example!r}" if isinstance(example, right_kind) else ""
    raise RelreasonError(f"{name} must be {article} {kind}, got {value!r}{hint}")


def _plain_mapping(value: Any, name: str) -> dict[str, Any]:
    """``value`` as the plain dict its JSON record reads back as (NumPy numbers as numbers, tuples as lists), so
    that a run compares equal to its own config.json."""
    if not isinstance(value, Mapping) or not all(isinstance(key, str) for key in value):
        raise RelreasonError(f"{name} must be a mapping of names to values, got {value!r}; pass e.g. {{}}")
    try:
        return json.loads(json.dumps(dict(value), default=plain_json))
    except (TypeError, ValueError) as error:
        raise RelreasonError(f"{name} must hold plain values (numbers, text, lists), got {value!r} ({error})") from None


def with_plain_values(config: ConfigT) -> ConfigT:
    """``config`` with each option of the plain type its field declares: a config built in Python may hold a
    NumPy number, a 0-d tensor or a ``Path`` where the command line gives an int, a float or a string, which
    would break its JSON record after the work is done; a value of the wrong kind is refused here, in one line."""
    changes = {}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        kind = str(field.type)
        if value is None and kind.endswith("| None"):
            continue
        kind = kind.removesuffix(" | None")
        name = f"{type(config).__name__}.{field.name}"
        if kind in ("int", "float", "bool", "str"):
            plain = _plain_value(value, kind, name, field.default)
        elif kind.startswith("dict["):
            plain = _plain_mapping({} if value is None else value, name)
        elif kind.startswith("tuple[") and kind.endswith(", ...]") and isinstance(value, (list, tuple)):
            plain = type(value)(_plain_value(v, kind[6:-6], f"each item of {name}") for v in value)
        else:
            continue
        if plain is not value:
            changes[field.name] = plain
    return dataclasses.replace(config, **changes) if changes else config


def with_home_expanded(config: ConfigT, *fields: str) -> ConfigT:
    """``config`` with its path options ``fields`` as strings and a leading ``~`` expanded: a path from a YAML
    config, or written ``--output-dir=~/runs``, meets no shell that would expand it, and a folder named ``~`` is a
    trap."""
    changes = {}
    for name in fields:
        value = getattr(config, name)
        if isinstance(value, os.PathLike):  # a Path from Python code: kept as the string the CLI would give
            value = changes[name] = os.fspath(value)
        if isinstance(value, str) and value.startswith("~"):
            changes[name] = os.path.expanduser(value)
    return dataclasses.replace(config, **changes) if changes else config
