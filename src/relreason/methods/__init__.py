"""Pretraining methods on one interface: relational reasoning and the paper's baselines.

``relational`` (the method), ``simclr`` (NT-Xent on two views), ``rotation`` (4-way rotation prediction),
``supervised`` (labels; the upper bound) and ``random`` (no training; the lower bound); or a user's own
``PretrainMethod`` subclass named ``package.module:Class``.
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
    """The class of method ``name`` (one of ``METHOD_NAMES``, or ``package.module:Class`` for a user's own
    ``PretrainMethod`` subclass); None for ``random``, which trains nothing."""
    if isinstance(name, str) and ":" in name:
        return _user_method(name)
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
    raise _unknown(name)


def check_method_name(name: str) -> None:
    """A one-line error for a name not in ``METHOD_NAMES`` and not a ``package.module:Class`` that imports as a
    ``PretrainMethod`` subclass."""
    if isinstance(name, str) and ":" in name:
        _user_method(name)
    elif name not in METHOD_NAMES:
        raise _unknown(name)


def is_built_in(name: str) -> bool:
    return name in METHOD_NAMES


def _unknown(name: str) -> RelreasonError:
    return RelreasonError(f"unknown method '{name}'; choose one of {', '.join(METHOD_NAMES)}, or give "
                          "'package.module:Class' for a PretrainMethod subclass of your own")


def _user_method(spec: str) -> type[PretrainMethod]:
    """A user's method class: a subclass of ``PretrainMethod`` whose constructor takes (backbone, feature_dim)."""
    from relreason.user_code import import_named

    found = import_named(spec, "method class", "method", "package.module:Class")
    if not (isinstance(found, type) and issubclass(found, PretrainMethod)):
        kind = f"class {found.__name__}" if isinstance(found, type) else f"a {type(found).__name__}"
        raise RelreasonError(f"method '{spec}' is {kind}, not a subclass of relreason.methods.PretrainMethod; "
                             "subclass it (forward(views, labels) -> StepOutput)")
    return found


__all__ = [
    "METHOD_NAMES",
    "OnlineProbe",
    "PretrainMethod",
    "RotationPrediction",
    "SimCLR",
    "StepOutput",
    "Supervised",
    "check_method_name",
    "is_built_in",
    "method_class",
]
