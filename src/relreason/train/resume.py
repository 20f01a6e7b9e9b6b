"""Checkpoints of a run: saving them (rank 0, atomically), finding the newest, and refusing a resume that
would not continue the same run."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from relreason.atomic_files import atomic_torch_save
from relreason.backbones.registry import build_difference, describe_changed_defaults, factory_defaults
from relreason.checkpoint import (
    checkpoint_path,
    list_checkpoints,
    load_newest_checkpoint,
    rng_state,
    rotate_checkpoints,
)
from relreason.data import dataset_info, same_dataset
from relreason.data.datasets import EARLIER_NORMALIZATION_METHODS, PATH_SAMPLED_METHODS
from relreason.distributed import DistributedContext, broadcast_object
from relreason.errors import RelreasonError, note, option_flag, option_value
from relreason.methods import is_built_in, method_class, views_per_image
from relreason.train.config import PretrainConfig
from relreason.train.position import TrainingPosition
from relreason.train.run_folder import absolute_data_root
from relreason.train.step_module import PretrainModule


def newest_checkpoint_everywhere(
    config: PretrainConfig, context: DistributedContext
) -> tuple[Path, dict[str, Any]] | None:
    """Rank 0 reads the newest checkpoint and every rank gets it, or the error that none reads back: an error
    raised on rank 0 alone would leave the others waiting for it."""
    found, refusal = None, None
    if context.is_main and config.resume:
        try:
            found = load_newest_checkpoint(Path(config.output_dir))
        except RelreasonError as error:
            refusal = str(error)
    found, refusal = broadcast_object((found, refusal), context)
    if refusal is not None:
        raise RelreasonError(refusal)
    return found


def without_probe(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint less an online probe this run no longer trains: earlier versions gave a folder of one
    class subfolder a probe (over that one class); such a run resumes without it."""
    model = {k: v for k, v in checkpoint["model"].items() if not k.startswith("probe.")}
    if len(model) == len(checkpoint["model"]):
        return checkpoint
    optimizer = checkpoint["optimizer"]
    kept = optimizer["param_groups"][:1]  # the method's parameters; the probe's group came second
    ids = {i for group in kept for i in group["params"]}
    state = {i: s for i, s in optimizer["state"].items() if i in ids}
    return checkpoint | {"model": model, "optimizer": {"state": state, "param_groups": kept}}


def keep_recorded_normalization(checkpoint: dict[str, Any], config: PretrainConfig, geometry: dict[str, Any],
                                context: DistributedContext | None = None,
                                statistics_by: Callable[[str], Any] | None = None) -> None:
    """A named dataset's normalisation is a constant of relreason's, not of the images: a run resumes with the
    one it started with, should a later version have changed it (STL-10's did), rather than be refused. So does
    an image folder's run whose statistics an earlier version took another way (weighted by pixels, from JPEGs at
    full size, sampled by index), which no longer compare with today's: on the same folder, or on a folder moved
    since whose statistics taken that earlier way (``statistics_by(method)``, where it still can) are the recorded
    ones. Otherwise a folder's statistics come from its images, and a change means other images."""
    saved = checkpoint.get("geometry", {})
    if saved.get("mean") is None or saved.get("std") is None:
        return
    if dataset_info(config.dataset).mean is None:
        if saved.get("normalization") == geometry.get("normalization"):
            return
        # Statistics of an earlier version's kind cannot tell other images: the same folder is the run's own, and
        # a folder elsewhere is when those statistics, taken the earlier way, are the recorded ones.
        recorded_root = checkpoint.get("data_root")
        method = saved.get("normalization")
        same_root = recorded_root is not None and Path(recorded_root) == Path(absolute_data_root(config) or "")
        if not same_root or method in PATH_SAMPLED_METHODS:  # those tell other images on the same folder too
            if statistics_by is None or method not in EARLIER_NORMALIZATION_METHODS:
                return  # compared, and refused, as other images
            then = statistics_by(method)
            if not all(_same_statistics(saved[key], values) for key, values in zip(("mean", "std"), then)):
                return
        # The kept statistics' own method goes on with the run: a later resume compares them the same way.
        if method is None:
            geometry.pop("normalization", None)
        else:
            geometry["normalization"] = method
    if saved["mean"] != geometry["mean"] or saved["std"] != geometry["std"]:
        if context is None or context.is_main:
            note(f"resuming with the normalisation the run started with (mean "
                 f"{_rounded(saved['mean'])}, std {_rounded(saved['std'])}), not this version's "
                 f"(mean {_rounded(geometry['mean'])}, std {_rounded(geometry['std'])})")
        geometry["mean"], geometry["std"] = list(saved["mean"]), list(saved["std"])


def check_resumable(checkpoint: dict[str, Any], config: PretrainConfig, geometry: dict, path: Path) -> None:
    """Refuse in one line to resume the checkpoint at ``path`` under options (or data geometry) that define another
    run, or with fewer --epochs than it has trained."""
    saved = checkpoint.get("config", {})
    trained = TrainingPosition(**checkpoint.get("position", {})).epochs_done
    if trained > config.epochs:  # exporting it would label weights of a longer run as a shorter one's
        raise RelreasonError(
            f"cannot resume {path} with --epochs {config.epochs}: the run has trained {trained:.4g} epochs, past it; "
            f"pass --epochs {math.ceil(trained)} or more to go on, or choose another --output-dir for a "
            f"{config.epochs}-epoch run"
        )
    defaults = PretrainConfig()  # for options that checkpoints from older versions do not record
    shaping: tuple[str, ...] = ("method", "backbone", "backbone_args", "dataset", "batch_size", "seed", "lr_schedule", "warmup_epochs",
               "online_probe", "min_crop_scale", "jitter_strength", "test_fraction")
    if config.method == "relational":  # the relation head's options, its loss, and K shape only this method's runs
        shaping += ("aggregation", "head_hidden", "num_views", "loss")
        if config.loss == "focal":
            shaping += ("focal_gamma", "focal_alpha")
    if config.method == "simclr":
        shaping += ("simclr_temperature",)
    user_method = method_class(config.method) if not is_built_in(config.method) else None
    saved_k = saved.get("num_views", config.num_views)
    if user_method is not None and views_per_image(user_method, saved_k, config.method) != views_per_image(
            user_method, config.num_views, config.method):
        shaping += ("num_views",)  # a method of the user's own whose views follow K
    recorded = {k: saved.get(k, getattr(defaults, k)) for k in shaping}
    mismatched = {k: (v, getattr(config, k)) for k, v in recorded.items() if v != getattr(config, k)}
    if "dataset" in mismatched and same_dataset(*mismatched["dataset"]):  # fashion_mnist is fashion-mnist
        del mismatched["dataset"]
    if checkpoint.get("backbone_defaults") is not None and "backbone" not in mismatched:
        _compare_built_backbones(checkpoint["backbone_defaults"], recorded["backbone_args"], config, path, mismatched)
    # The size the run trains at, not the option: no --image-size and the dataset's own size are the same run.
    saved_geometry = checkpoint.get("geometry", {})
    saved_size = saved_geometry.get("image_size", geometry["image_size"])
    if saved_size != geometry["image_size"]:
        mismatched["image_size"] = (saved_size, geometry["image_size"])
    # A folder's views differ in kind between the paths (crops of the original files or of the decoded square).
    saved_path, path_now = saved_geometry.get("augment"), geometry.get("augment")
    if dataset_info(config.dataset).name == "folder" and None not in (saved_path, path_now) and saved_path != path_now:
        mismatched["augment"] = (saved_path, path_now)
    if mismatched:
        detail = ", ".join(f"{option_flag(k)}: checkpoint {option_value(a)} vs now {option_value(b)}"
                           for k, (a, b) in mismatched.items())
        raise RelreasonError(f"cannot resume {path}: options differ ({detail}); rerun with the original options, or "
                             "choose another --output-dir for a new run")
    # Same statistics, same images: a folder moved elsewhere resumes, another folder (or one whose files
    # changed) does not, as its views would be normalised unlike the weights' first epochs.
    for key in ("mean", "std"):
        before, now = saved_geometry.get(key), geometry[key]
        if before is not None and not _same_statistics(before, now):
            then, now = _told_apart(before, now)
            raise RelreasonError(
                f"cannot resume {path}: the images differ from those the run started on (normalisation {key} "
                f"{then} then, {now} now: another --data-root than "
                f"{checkpoint.get('data_root') or saved.get('data_root')!r}, or files added or removed); rerun on the "
                "run's images or choose "
                "another --output-dir"
            )


def _compare_built_backbones(saved_defaults: dict[str, Any], saved_args: dict[str, Any] | None, config: PretrainConfig,
                             path: Path, mismatched: dict[str, tuple[Any, Any]]) -> None:
    """Compare the arguments the backbone was built with then and now, its factory's defaults included: giving the
    default it had as an argument is the same network, while a default changed since then is another one (refused
    in one line that names the arguments to go on as the run started)."""
    mismatched.pop("backbone_args", None)
    differing, moved = build_difference(config.backbone, saved_args, saved_defaults, config.backbone_args)
    if moved and len(moved) == len(differing):
        what, as_trained = describe_changed_defaults(saved_args, moved)
        raise RelreasonError(f"cannot resume {path}: backbone '{config.backbone}' has other defaults than when the run "
                             f"started ({what}); pass --backbone-args {as_trained} to go on as it started, or choose "
                             "another --output-dir for a new run")
    if differing:
        mismatched["backbone_args"] = (saved_args or {}, config.backbone_args)


#: Options a resumed run may change, each said when it does: they change how the rest trains, not what it is.
_CHANGEABLE_ON_RESUME = ("lr", "weight_decay", "amp")


def changed_option_notes(checkpoint: dict[str, Any], config: PretrainConfig, geometry: dict) -> list[str]:
    """One line per option that the resuming command changes from the one that wrote ``checkpoint``:
    ``config.json`` then records the new value, and the earlier part of the run trained with the old one."""
    saved = checkpoint.get("config", {})
    then = {name: saved[name] for name in _CHANGEABLE_ON_RESUME if name in saved}
    now = {name: getattr(config, name) for name in then}
    # The path the views came from, as resolved ('auto' is one or the other); a folder's is refused above.
    if checkpoint.get("geometry", {}).get("augment") not in (None, geometry.get("augment")):
        then["augment"], now["augment"] = checkpoint["geometry"]["augment"], geometry["augment"]

    def shown(value: Any) -> str:  # as typed on the command line
        return value if isinstance(value, str) else option_value(value)

    return [f"resuming with {option_flag(name)} {shown(now[name])}; the run so far trained with "
            f"{shown(then[name])}" for name in then if then[name] != now[name]]


def _same_statistics(recorded: Any, taken: Any) -> bool:
    """Whether normalisation statistics, recorded and taken now, are those of the same images (up to rounding)."""
    return bool(np.allclose(recorded, taken, rtol=1e-6, atol=1e-9))


def _rounded(values: list[float], digits: int = 4) -> list[float]:
    return [round(float(v), digits) for v in values]


def _told_apart(before: list[float], now: list[float]) -> tuple[list[float], list[float]]:
    """Both rounded to 4 decimals, or to as many more as it takes for the difference to show."""
    for digits in range(4, 17):
        if _rounded(before, digits) != _rounded(now, digits):
            break
    return _rounded(before, digits), _rounded(now, digits)


class CheckpointSaver:
    """Rank 0 writes a checkpoint atomically and keeps the newest few; other ranks do nothing."""

    def __init__(
        self,
        run_dir: Path,
        config: PretrainConfig,
        geometry: dict[str, Any],
        model: PretrainModule,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler,
        context: DistributedContext,
        device: torch.device,
        resumed_from: Path | None = None,
    ) -> None:
        self.run_dir, self.config, self.geometry, self.context, self.device = run_dir, config, geometry, context, device
        self.model, self.optimizer, self.scaler = model, optimizer, scaler
        self.resumed_from = resumed_from
        self.behind: list[Path] = []  # pruned at the next save whatever their names
        self.backbone_defaults = factory_defaults(config.backbone, config.backbone_args)

    def steps_renumbered(self, epoch: int, step: int) -> None:
        """The run resumed in ``epoch`` under more processes and counts its steps anew from ``step``: this epoch's
        checkpoints named after that step, up to the one it resumed from, hold less progress than any it writes
        now, though their names sort later."""
        if self.resumed_from is None:
            return
        # The one resumed from is of this epoch (only a mid-epoch resume renumbers), so the names between are too.
        start = checkpoint_path(self.run_dir, epoch, step).name
        self.behind = [path for path in list_checkpoints(self.run_dir) if start < path.name <= self.resumed_from.name]

    def save(self, position: TrainingPosition) -> None:
        if not self.context.is_main:
            return
        state = {
            "backbone": self.model.method.backbone.state_dict(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": position.epoch,
            "position": dataclasses.asdict(position),
            "config": dataclasses.asdict(self.config),
            "data_root": absolute_data_root(self.config),  # for `evaluate --weights` on this checkpoint
            "geometry": self.geometry,
            "backbone_defaults": self.backbone_defaults,  # read by check_resumable and evaluate --weights
            "rng": rng_state(self.device),
        }
        path = checkpoint_path(self.run_dir, position.epoch, position.step)
        atomic_torch_save(state, path)
        rotate_checkpoints(self.run_dir, self.config.keep_checkpoints, newest=path, behind=self.behind)
        self.behind = []


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any], groups: list[dict[str, Any]],
                         config: PretrainConfig) -> None:
    """A checkpoint's moments and step counts, with this command's --lr and --weight-decay and this device's kernel."""
    optimizer.load_state_dict(state)
    for group, fresh in zip(optimizer.param_groups, groups):
        group["base_lr"] = fresh["base_lr"]
        group["weight_decay"] = fresh.get("weight_decay", config.weight_decay)
        # A checkpoint from the CPU (or an older one) would otherwise unfuse a CUDA Adam, to which the fp16
        # GradScaler, still seeing a fused optimizer, hands flags the other kernels refuse.
        group["fused"], group["foreach"] = optimizer.defaults["fused"], optimizer.defaults["foreach"]
        for parameter in group["params"]:
            slots = optimizer.state.get(parameter, {})
            step = slots.get("step")
            if torch.is_tensor(step):  # where this kernel keeps it: beside the parameter if fused, else on the CPU
                place = parameter.device if group["fused"] else torch.device("cpu")
                slots["step"] = step.to(place, torch.float32)
            for name, moment in slots.items():
                # Saved under another memory format (a run resumed with or without --channels-last): CUDA's fused
                # Adam refuses moments whose strides are not the parameter's. A copy in its layout, same values.
                if torch.is_tensor(moment) and moment.shape == parameter.shape and moment.stride() != parameter.stride():
                    slots[name] = torch.empty_like(parameter, dtype=moment.dtype).copy_(moment)
