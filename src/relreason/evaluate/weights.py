"""The weights to evaluate: an exported backbone with its metadata, or a training checkpoint."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from relreason.backbones.registry import backbone_args_of, changed_defaults, describe_changed_defaults
from relreason.checkpoint import is_checkpoint_path, load_checkpoint, state_mismatch
from relreason.errors import RelreasonError, note, one_line, short_reason
from relreason.evaluate.config import EvaluateConfig
from relreason.run_files import BACKBONE_META_NAME, BACKBONE_NAME


def load_backbone_source(config: EvaluateConfig) -> tuple[Path, dict[str, Any], dict[str, torch.Tensor]]:
    """The weights file, its metadata (backbone.json beside it, overridden by explicit options) and its state.

    A training checkpoint (``checkpoint-eEEEE-sSSSSSSS.pt``) may be given instead of an exported backbone: its
    backbone is evaluated, described by the options and geometry the checkpoint records.
    """
    weights = Path(config.weights) if config.weights else Path(config.run_dir) / BACKBONE_NAME
    if config.weights and not weights.is_file():
        raise RelreasonError(f"--weights {weights} is not a file; pass the path of a backbone.pt that relreason pretrain "
                             "exported, or of a training checkpoint")
    if not weights.is_file():
        raise RelreasonError(
            f"no backbone weights at {weights}; run `relreason pretrain --output-dir {weights.parent}` first "
            "or pass --weights"
        )
    if is_checkpoint_path(weights):
        checkpoint = load_checkpoint(weights)
        saved = checkpoint.get("config", {})
        meta = {key: saved[key] for key in ("backbone", "backbone_args", "dataset", "data_root", "test_fraction")
                if key in saved}
        if checkpoint.get("data_root"):  # absolute (older checkpoints: as typed, relative to where pretrain ran)
            meta["data_root"] = checkpoint["data_root"]
        meta |= checkpoint.get("geometry", {})
        if checkpoint.get("backbone_defaults") is not None:
            meta["backbone_defaults"] = checkpoint["backbone_defaults"]
        position = checkpoint.get("position", {})
        if position.get("steps_per_epoch"):  # how far it had trained, as backbone.json says of an export
            meta["epochs_done"] = position.get("epoch", 0) + position.get("step", 0) / position["steps_per_epoch"]
        state = checkpoint["backbone"]
    else:
        meta = _read_backbone_meta(weights.parent / BACKBONE_META_NAME)
        state = _load_state_dict(weights)
    if config.backbone and config.backbone != meta.get("backbone"):
        meta["backbone"] = config.backbone
        meta.pop("backbone_args", None)  # the recorded arguments were the other backbone's
        meta.pop("backbone_defaults", None)
    if config.backbone_args is not None:  # the user's word on how to build it (the defaults of the rest as trained)
        meta["backbone_args"] = config.backbone_args
    if "backbone" not in meta:
        raise RelreasonError(f"{weights} has no backbone.json beside it; pass --backbone NAME")
    build_as_trained(meta)
    return weights, meta, state


def build_as_trained(meta: dict[str, Any], speaks: bool = True) -> None:
    """Where the factory's defaults changed since the weights were trained, build with the ones they were trained
    with (as arguments), and say so (``speaks``): the same weights in another network would be judged in silence."""
    changed = changed_defaults(meta["backbone"], meta.get("backbone_args"), meta.get("backbone_defaults"))
    if changed:
        what, as_trained = describe_changed_defaults(meta.get("backbone_args"), changed)
        meta["backbone_args"] = {**(meta.get("backbone_args") or {}), **{k: then for k, (then, _) in changed.items()}}
        note(f"backbone '{meta['backbone']}' has other defaults than when these weights were trained ({what}); "
             f"evaluating the network as trained, built with --backbone-args {as_trained}", speaks)


def _read_backbone_meta(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise RelreasonError(
            f"{path} cannot be read ({one_line(error)}); restore it (pretrain rewrites it when rerun) or "
            "pass --backbone NAME with --weights"
        ) from None
    if not isinstance(meta, dict):
        raise RelreasonError(f"{path} does not hold backbone metadata; restore it or pass --backbone NAME")
    size = meta.get("image_size")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise RelreasonError(f"{path} gives image_size {size!r}, not a positive integer; restore it (pretrain rewrites "
                             "it when rerun) or pass --image-size")
    return meta


def _load_state_dict(weights: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for files that are not (whole) weights
        raise RelreasonError(
            f"{weights} cannot be read as backbone weights ({short_reason(error)}); pass the backbone.pt that "
            "relreason pretrain exports, a training checkpoint, or a state_dict saved with torch.save (not a whole "
            "pickled model, nor a damaged file)"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise RelreasonError(f"{weights} does not hold a state_dict of tensors; pass the backbone.pt that "
                             "relreason pretrain exports")
    return state


def load_matching_state(backbone: nn.Module, state: Mapping[str, torch.Tensor], weights: Path, name: str,
                        recorded: bool = False) -> None:
    """Load ``state`` into ``backbone`` (from a whole model's state_dict, the backbone's part of it: the tensors
    under one prefix such as ``backbone.`` or DDP's ``module.backbone.``), or say in one line how far apart they
    are. ``recorded``: ``name`` and the backbone's arguments are the ones the weights' metadata records."""
    expected = backbone.state_dict()
    mismatch = state_mismatch(expected, state)
    prefix = _backbone_prefix(expected, state) if mismatch else None
    if prefix is not None:
        note(f"{weights} holds a whole model; evaluating its backbone, the tensors under "
             f"'{prefix}'")
        state, mismatch = _under(state, prefix), None
    if mismatch and recorded:
        raise RelreasonError(f"{weights} does not fit backbone '{name}' ({mismatch}), though that is the backbone "
                             "and arguments its metadata records: did the backbone's code change since it was "
                             "trained? Evaluate it with that code")
    if mismatch:
        args = backbone_args_of(name, state)
        hint = (f": these are {name}'s weights at --backbone-args {' '.join(f'{k}={v}' for k, v in args.items())}"
                if args else "")
        raise RelreasonError(f"{weights} does not fit backbone '{name}' ({mismatch}); pass the --backbone (and "
                             f"--backbone-args) it was trained with{hint}")
    backbone.load_state_dict(state)


def _backbone_prefix(expected: Mapping[str, torch.Tensor], state: Mapping[str, Any]) -> str | None:
    """The prefix under which ``state`` holds exactly a backbone whose state_dict is ``expected`` (a whole model
    saved, with its head beside it); None when there is none."""
    if not expected:
        return None
    first = next(iter(expected))
    prefixes = {key[: -len(first)] for key in state if key.endswith("." + first)}
    fitting = sorted(prefix for prefix in prefixes if state_mismatch(expected, _under(state, prefix)) is None)
    if len(fitting) > 1:  # a momentum encoder beside the online one (MoCo, BYOL): which one is meant?
        under = ", ".join(map(repr, fitting))
        raise RelreasonError(f"the weights hold {len(fitting)} backbones that fit (under {under}); save the one to "
                             "evaluate alone, as a state_dict of its own")
    return fitting[0] if fitting else None


def _under(state: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """The entries of ``state`` under ``prefix``, named without it."""
    return {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
