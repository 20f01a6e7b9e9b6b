"""Pretraining methods on one interface: relational reasoning and the paper's baselines.

``relational`` (the method), ``simclr`` (NT-Xent on two views), ``rotation`` (4-way rotation prediction),
``supervised`` (labels; the upper bound) and ``random`` (no training; the lower bound).
"""

from __future__ import annotations

from relreason.errors import RelreasonError
from relreason.methods.base import PretrainMethod, StepOutput
from relreason.methods.online_probe import OnlineProbe
from relreason.methods.rotation import RotationPrediction
from relreason.methods.simclr import SimCLR
from relreason.methods.supervised import Supervised

METHOD_NAMES = ("relational", "simclr", "rotation", "supervised", "random")


def method_class(name: str) -> type[PretrainMethod] | None:
    """The class of method ``name``; None for ``random``, which trains nothing."""
    if name == "relational":
        from relreason.model import RelationalReasoning  # here: relreason.model imports this package's base

        return RelationalReasoning
    if name == "simclr":
        return SimCLR
    if name == "rotation":
        return RotationPrediction
    if name == "supervised":
        return Supervised
    if name == "random":
        return None
    raise RelreasonError(f"unknown method '{name}'; choose one of {', '.join(METHOD_NAMES)}")


def check_method_name(name: str) -> None:
    """A one-line error for a name not in ``METHOD_NAMES``."""
    if name not in METHOD_NAMES:
        raise RelreasonError(f"unknown method '{name}'; choose one of {', '.join(METHOD_NAMES)}")


__all__ = [
    "METHOD_NAMES",
    "OnlineProbe",
    "PretrainMethod",
    "RotationPrediction",
    "SimCLR",
    "StepOutput",
    "Supervised",
    "check_method_name",
    "method_class",
]
