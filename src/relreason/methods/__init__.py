"""Pretraining methods on one interface: relational reasoning and the paper's baselines.

``relational`` (the method, :class:`RelationalReasoning`), ``simclr`` (NT-Xent on two views), ``rotation``
(4-way rotation prediction), ``supervised`` (labels; the upper bound) and ``random`` (no training; the lower
bound); or a user's own ``PretrainMethod`` subclass named ``package.module:Class``.
"""

from __future__ import annotations

import inspect
import operator

from relreason.errors import RelreasonError, short_reason
from relreason.methods.base import PretrainMethod, StepOutput
from relreason.methods.online_probe import OnlineProbe
from relreason.methods.relational import RelationalReasoning, RelationOutput
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
    """Whether ``name`` is one of relreason's own methods (not a user's ``package.module:Class``)."""
    return name in METHOD_NAMES


def _unknown(name: str) -> RelreasonError:
    return RelreasonError(f"unknown method '{name}'; choose one of {', '.join(METHOD_NAMES)}, or give "
                          "'package.module:Class' for a PretrainMethod subclass of your own")


def _user_method(spec: str) -> type[PretrainMethod]:
    """A user's method class: a subclass of ``PretrainMethod`` whose constructor takes ``(backbone, feature_dim)``
    (and ``num_classes``, when it has such a parameter) and whose static ``views_per_image(K)`` gives a count."""
    from relreason.user_code import import_named

    found = import_named(spec, "method class", "method", "package.module:Class")
    if not (isinstance(found, type) and issubclass(found, PretrainMethod)):
        kind = f"class {found.__name__}" if isinstance(found, type) else f"a {type(found).__name__}"
        raise RelreasonError(f"method '{spec}' is {kind}, not a subclass of relreason.methods.PretrainMethod; "
                             "subclass it (forward(views, labels) -> StepOutput)")
    try:
        inspect.signature(found).bind(None, 1, **({"num_classes": 2} if takes_num_classes(found) else {}))
    except TypeError as error:
        raise RelreasonError(f"method '{spec}' cannot be built as {found.__name__}(backbone, feature_dim) ({error}); "
                             "give its constructor those two parameters (others need defaults)") from None
    if not isinstance(inspect.getattr_static(found, "views_per_image"), (staticmethod, classmethod)):
        raise RelreasonError(f"method '{spec}': views_per_image must be a @staticmethod taking K and returning the "
                             "views per image a step needs (the trainer asks before any model exists)")
    return found


def views_per_image(method: type[PretrainMethod], num_views: int, name: str) -> int:
    """How many views of each image a step of ``method`` needs at K = ``num_views``; a one-line error when a
    user's method cannot say."""
    try:
        count = operator.index(method.views_per_image(num_views))
    except RelreasonError:
        raise
    except Exception as error:
        raise RelreasonError(f"method '{name}': views_per_image({num_views}) failed ({short_reason(error)}); "
                             "return the views per image a step needs at that K") from None
    if count < 1:
        raise RelreasonError(f"method '{name}': views_per_image({num_views}) returned {count}; it must be >= 1")
    return count


def takes_num_classes(method: type[PretrainMethod]) -> bool:
    """Whether a method's constructor takes ``num_classes`` (a user's method that trains on labels may)."""
    return "num_classes" in inspect.signature(method).parameters


__all__ = [
    "METHOD_NAMES",
    "OnlineProbe",
    "PretrainMethod",
    "RelationOutput",
    "RelationalReasoning",
    "RotationPrediction",
    "SimCLR",
    "StepOutput",
    "Supervised",
    "check_method_name",
    "is_built_in",
    "method_class",
    "takes_num_classes",
    "views_per_image",
]
