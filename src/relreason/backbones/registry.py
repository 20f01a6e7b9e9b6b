"""Backbones by name, so configs and the CLI can name them; user factories load as ``module:function``."""

from __future__ import annotations

import functools
import inspect
import math
import numbers
import shlex
from collections.abc import Callable, Mapping
from typing import Any

import torch
import yaml
from torch import nn

from relreason.backbones.cifar_resnet import resnet8, resnet32, resnet56
from relreason.backbones.conv4 import Conv4
from relreason.backbones.feature_dim import infer_feature_dim
from relreason.backbones.torchvision_resnet import torchvision_resnet
from relreason.checks import check_positive_int
from relreason.config_files import as_yaml_value
from relreason.device import is_out_of_memory
from relreason.errors import RelreasonError
from relreason.user_code import import_named

BACKBONES: dict[str, Callable[..., nn.Module]] = {}
_BUILT_IN: dict[str, Callable[..., nn.Module]] = {}  # filled below, once the built-in names are registered


def register_backbone(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: make a factory ``f(**kwargs) -> nn.Module`` buildable by ``name``.

    Registering a name again replaces one's own factory (a notebook cell run twice); a built-in name is kept, so
    that runs and exports that name it mean one network.
    """
    if not isinstance(name, str) or not name.strip() or ":" in name:
        raise RelreasonError(f"a backbone name must be a non-empty string without ':' (which marks "
                             f"package.module:factory), got {name!r}")
    if name in _BUILT_IN:
        raise RelreasonError(f"'{name}' is a built-in backbone; register yours under another name, e.g. "
                             f"'my-{name}'")

    def decorate(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if not callable(factory):
            raise RelreasonError(f"register_backbone('{name}') decorates a factory f(**kwargs) -> nn.Module, got "
                                 f"{type(factory).__name__}")
        BACKBONES[name] = factory
        return factory

    return decorate


register_backbone("conv4")(Conv4)
register_backbone("resnet8")(resnet8)
register_backbone("resnet32")(resnet32)
register_backbone("resnet56")(resnet56)
for _name in ("resnet18", "resnet34", "resnet50"):
    register_backbone(_name)(functools.partial(torchvision_resnet, _name))
# relreason's own factories, the ones check_backbone may call: they do nothing but build layers.
_BUILT_IN.update(BACKBONES)


def backbone_names() -> list[str]:
    """The registered backbones' names, as ``build_backbone`` and ``--backbone`` take them."""
    return sorted(BACKBONES)


def backbone_arguments(name: str) -> dict[str, Any]:
    """The keyword arguments a registered backbone's factory takes beyond ``in_channels`` (views are RGB), with
    their defaults: what ``--backbone-args`` may set."""
    parameters = inspect.signature(BACKBONES[name]).parameters.values()
    return {p.name: p.default for p in parameters
            if p.name != "in_channels" and p.default is not inspect.Parameter.empty}


def factory_defaults(name: str, args: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The defaults that backbone ``name``'s factory gives the arguments ``args`` leave unset, where they are plain
    values (numbers, strings, booleans, None): a run records them, so that a default its author changes later does
    not change the network a resume trains or evaluate rebuilds in silence. Empty when the factory cannot be read."""
    try:
        parameters = inspect.signature(_factory(name)).parameters.values()
    except (RelreasonError, TypeError, ValueError):
        return {}
    given = set(args or {})
    return {p.name: p.default for p in parameters
            if p.name != "in_channels" and p.name not in given and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
            and p.default is not p.empty and (p.default is None or type(p.default) in (bool, int, float, str))}


def same_value(a: Any, b: Any) -> bool:
    """Equal and of one type (``True`` is not ``1``, ``1`` not ``1.0``), NaN equal to NaN."""
    if type(a) is not type(b):
        return False
    return a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b))


_UNSET = object()


def build_difference(name: str, saved_args: Mapping[str, Any] | None, saved_defaults: Mapping[str, Any],
                     args: Mapping[str, Any] | None) -> tuple[list[str], dict[str, tuple[Any, Any]]]:
    """How backbone ``name`` built with ``args`` now differs from the build a run recorded (its arguments and its
    factory's defaults then): the arguments whose values differ, and of those the defaults that moved while no
    argument was given, ``{argument: (then, now)}``. Giving a default as an argument builds the same network."""
    saved_args, args = dict(saved_args or {}), dict(args or {})
    defaults_now = factory_defaults(name, args)
    # A parameter the factory no longer has is not compared: a build that misses it fails in its own words.
    then = {**{k: v for k, v in saved_defaults.items() if k in defaults_now or k in args}, **saved_args}
    now = {**defaults_now, **args}
    differing = [k for k in {**then, **args} if not same_value(then.get(k, _UNSET), now.get(k, _UNSET))]
    moved = {k: (then[k], now[k]) for k in differing if k in saved_defaults and k not in saved_args and k not in args}
    return differing, moved


def changed_defaults(name: str, args: Mapping[str, Any] | None, recorded: Mapping[str, Any] | None
                     ) -> dict[str, tuple[Any, Any]]:
    """``{argument: (recorded default, default now)}`` for the defaults of ``recorded`` (``factory_defaults`` when a
    run was trained) that backbone ``name``'s factory now gives otherwise, for the arguments ``args`` leave unset."""
    return build_difference(name, args, recorded, args)[1] if recorded else {}


def _shell_word(key: str, value: Any) -> str:
    """``key=value`` as one shell word that ``--backbone-args`` reads back as ``value``."""
    text = yaml.safe_dump(value, default_flow_style=True, width=float("inf")).strip()
    text = text.removesuffix("...").strip()  # a plain scalar's end-of-document marker
    return shlex.quote(f"{key}={text}")


def describe_changed_defaults(args: Mapping[str, Any] | None, changed: Mapping[str, tuple[Any, Any]]
                              ) -> tuple[str, str]:
    """What changed (``dropout 0.1 then, 0.3 now``) and the ``--backbone-args`` that build the network as trained."""
    what = ", ".join(f"{key} {as_yaml_value(then)} then, {as_yaml_value(now)} now" for key, (then, now) in changed.items())
    as_trained = {**(args or {}), **{key: then for key, (then, _) in changed.items()}}
    return what, " ".join(_shell_word(key, value) for key, value in as_trained.items())


def _import_factory(spec: str) -> Callable[..., nn.Module]:
    factory = import_named(spec, "backbone factory", "backbone", "package.module:function")
    if not callable(factory):  # e.g. 'os:path', a module
        raise RelreasonError(
            f"backbone factory '{spec}' is a {type(factory).__name__}, not a function or class returning an "
            "nn.Module; give 'package.module:function'"
        )
    return factory


def check_backbone(name: str, args: Mapping[str, Any] | None = None) -> None:
    """Refuse, before any work starts, a backbone that cannot be built: an unknown name, a ``module:factory`` that
    does not import, or ``args`` (``--backbone-args``) that its factory does not take. A registered backbone is
    also built, on the meta device (no memory, no numbers), so that a value it refuses (``width=0``) is refused
    here too; a user's factory (registered or ``module:factory``) is not called, as it may do anything."""
    kwargs = check_backbone_args(args)
    factory = _factory(name)
    _check_call(factory, name, kwargs)
    if _BUILT_IN.get(name) is factory:
        try:
            with torch.device("meta"):
                factory(**kwargs)
        except RelreasonError:
            raise
        except Exception:  # noqa: BLE001 - whatever else the real build meets, it reports in its turn
            pass


def backbone_args_of(name: str, state: Mapping[str, Any]) -> dict[str, Any] | None:
    """The ``--backbone-args`` that weights ``state`` were built with, for a registered backbone whose factory says
    (an ``args_of_state(state)`` attribute, as ``Conv4``'s width); None when it cannot tell."""
    read = getattr(BACKBONES.get(name), "args_of_state", None)
    return read(state) if callable(read) else None


def check_backbone_args(args: Any) -> dict[str, Any]:
    """``args`` as the keyword arguments of a backbone factory: a mapping of argument names to values."""
    if args is None:
        return {}
    if not isinstance(args, Mapping) or not all(isinstance(k, str) and k.isidentifier() for k in args):
        raise RelreasonError(f"backbone arguments must map argument names to values, got {args!r}; pass e.g. "
                             "--backbone-args small_stem=false (a dict such as {'small_stem': False} in Python)")
    return dict(args)


def _factory(name: str) -> Callable[..., nn.Module]:
    if ":" in name:
        return _import_factory(name)
    if name not in BACKBONES:
        raise RelreasonError(
            f"unknown backbone '{name}'; choose one of {', '.join(backbone_names())} or give 'module:factory'"
        )
    return BACKBONES[name]


def _check_call(factory: Callable[..., nn.Module], name: str, kwargs: dict[str, Any]) -> None:
    try:
        signature = inspect.signature(factory)
    except ValueError:  # no signature to read (some built-ins): the call itself will tell
        return
    given = ", ".join(f"{k}={v!r}" for k, v in kwargs.items()) or "no arguments"
    takes = ", ".join(signature.parameters) or "none"
    try:
        signature.bind(**kwargs)
    except TypeError as error:
        raise RelreasonError(
            f"backbone '{name}' cannot be built with {given} ({error}; it takes: {takes}); give --backbone-args "
            "(PretrainConfig's backbone_args=, build_backbone's args=) each argument it needs and none that it does "
            "not take"
        ) from None
    for key, value in kwargs.items():
        kind = _plain_kind(signature.parameters[key]) if key in signature.parameters else None
        if kind is not None and not _is_kind(value, kind):
            raise RelreasonError(
                f"backbone '{name}' takes {key} as {kind.__name__}, got {value!r}; pass e.g. "
                f"--backbone-args {key}={ {bool: 'false', int: '3', float: '0.5', str: 'text'}[kind] }"
            )


def _plain_kind(parameter: inspect.Parameter) -> type | None:
    """The plain type (bool, int, float, str) a factory parameter declares, by annotation or by its default."""
    kinds = {kind.__name__: kind for kind in (bool, int, float, str)}
    annotation = parameter.annotation
    if isinstance(annotation, str):
        return kinds.get(annotation)
    if annotation in kinds.values():
        return annotation
    default = parameter.default
    return type(default) if type(default) in kinds.values() else None


def _is_kind(value: Any, kind: type) -> bool:
    if kind is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if kind is int:  # NumPy integers too, as the factories themselves take them
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    return isinstance(value, kind)


def build_backbone(name: str, image_size: int = 32, args: Mapping[str, Any] | None = None, **kwargs: Any) -> nn.Module:
    """A fresh backbone with a ``feature_dim`` attribute.

    ``name`` is a registered name (``backbone_names()``) or ``"package.module:factory"`` for a user's own
    module; ``args`` and ``kwargs`` go to its factory (``--backbone-args``: ``small_stem=False`` for a
    torchvision ResNet's own 7x7 stem, a user factory's own arguments; ``args`` may name any argument, even
    one called ``name`` or ``image_size``). A module without ``feature_dim`` gets it inferred at ``image_size``.
    """
    kwargs = {**check_backbone_args(args), **kwargs}
    factory = _factory(name)
    _check_call(factory, name, kwargs)
    try:
        backbone = factory(**kwargs)
    except RuntimeError as error:
        if not is_out_of_memory(error):
            raise
        given = " ".join(f"{key}={value}" for key, value in kwargs.items())
        raise RelreasonError(f"out of memory building backbone '{name}'{f' with {given}' if given else ''}; choose "
                             "a smaller one (--backbone-args) or free memory") from None
    if not isinstance(backbone, nn.Module):
        raise RelreasonError(f"backbone factory '{name}' returned {type(backbone).__name__}, not a torch.nn.Module; "
                             "make it return the backbone module")
    module: Any = backbone  # feature_dim is the module's own attribute, which nn.Module's type does not know
    if getattr(module, "feature_dim", None) is None:
        module.feature_dim = infer_feature_dim(backbone, image_size, kwargs.get("in_channels"))
    else:  # the module's own: a NumPy integer would break backbone.json, a wrong one the relation head
        width = check_positive_int(module.feature_dim, f"the feature_dim of backbone '{name}'")
        if type(module.feature_dim) is not int:
            module.feature_dim = width
    return backbone
