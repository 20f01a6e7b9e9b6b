"""Few-label evaluation: a class-balanced, seeded subset of the training labels."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from relreason.errors import RelreasonError
from relreason.protocols._common import check_seed

__all__ = ["check_label_fractions", "few_label_indices", "fraction_key", "fraction_name"]


def _check_fraction(fraction: Any) -> float:
    try:
        f = float(fraction)
    except (TypeError, ValueError):
        f = float("nan")
    if isinstance(fraction, bool) or not (0.0 < f <= 1.0):
        raise RelreasonError(
            f"label fraction must be a number in (0, 1], got {fraction!r}; pass e.g. 0.01 for 1% of the labels"
        )
    return f


def check_label_fractions(fractions: Any) -> tuple[float, ...]:
    """``fractions`` as a tuple of distinct floats in (0, 1], in the order given."""
    if isinstance(fractions, (int, float, str)):
        fractions = (fractions,)
    try:
        checked = tuple(dict.fromkeys(_check_fraction(f) for f in fractions))
    except TypeError:
        raise RelreasonError(
            f"label fractions must be a list of numbers, got {fractions!r}; pass e.g. 0.01 0.1 0.25"
        ) from None
    if not checked:
        raise RelreasonError("no label fraction given; pass e.g. --label-fractions 0.01 0.1 0.25")
    keys = [fraction_key(f) for f in checked]
    if len(set(keys)) != len(keys):  # their results would share one JSON key, the second overwriting the first
        raise RelreasonError(f"label fractions {list(checked)} are too close to tell apart ({', '.join(keys)}); "
                             "pass fractions that differ in their first 6 digits")
    return checked


def fraction_key(fraction: float) -> str:
    """The JSON key of a label fraction: ``0.1 -> "0.1"``, ``0.01 -> "0.01"``."""
    return f"{float(fraction):g}"


def fraction_name(fraction: float) -> str:
    """The fraction in percent for tables: ``0.1 -> "10%"``, ``0.005 -> "0.5%"``."""
    return f"{100.0 * float(fraction):g}%"


def few_label_indices(labels: Any, fraction: float, seed: int = 0) -> np.ndarray:
    """Indices of a class-balanced subset holding about ``fraction`` of the labelled items.

    Every class present in ``labels`` gets the same number of items::

        per_class = max(1, floor(fraction * N / C + 0.5))      # N items, C classes, half rounds up

    capped at the size of the smallest class (so the subset stays balanced when classes are
    not).  ``fraction == 1`` is the exception: it returns every index (the full training set,
    balanced or not).  Each class's members are drawn without replacement by a
    ``numpy.random.default_rng(seed)`` permutation, class by class in increasing label order;
    so the same seed gives the same subset, and for one seed a smaller fraction's subset is
    contained in a larger one's.  Returns sorted int64 indices into ``labels``.
    """
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    y = np.asarray(labels)
    if y.ndim != 1 or y.shape[0] == 0:
        raise RelreasonError(f"labels must be a non-empty 1-D array, got shape {y.shape}; pass one label per item")
    if y.dtype.kind not in "iu":
        raise RelreasonError(f"labels have dtype {y.dtype}; pass integer class indices")
    if (y < 0).any():
        raise RelreasonError(
            "labels contain negative (unlabelled) entries; few-label evaluation needs a fully labelled training split"
        )
    f = _check_fraction(fraction)
    seed = check_seed(seed)
    n = y.shape[0]
    if f == 1.0:
        return np.arange(n, dtype=np.int64)
    classes, counts = np.unique(y, return_counts=True)
    per_class = max(1, math.floor(f * n / classes.shape[0] + 0.5))
    per_class = min(per_class, int(counts.min()))
    rng = np.random.default_rng(seed)
    chosen = []
    for c in classes:
        members = np.flatnonzero(y == c)
        chosen.append(members[rng.permutation(members.shape[0])[:per_class]])
    return np.sort(np.concatenate(chosen)).astype(np.int64)
