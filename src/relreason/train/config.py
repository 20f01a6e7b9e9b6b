"""The options of ``relreason pretrain`` (checked in one line each) and what a run returns."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from relreason.backbones.registry import check_backbone
from relreason.checks import check_folder_given, whole_number
from relreason.data import check_test_fraction, dataset_info
from relreason.data.splits import image_folders_read
from relreason.data.transforms import MIN_CROP_SCALE, check_crop_scale, jitter_amounts
from relreason.device import AMP_MODES, check_device_name, resolve_device
from relreason.errors import RelreasonError, option_flag
from relreason.losses import build_loss, check_focal_parameters
from relreason.methods import PretrainMethod, check_method_name, is_built_in, method_class, views_per_image
from relreason.pairing import AGGREGATIONS
from relreason.schedule import check_schedule
from relreason.seeding import check_seed

AUGMENT_MODES = ("auto", "tensor", "pil")


@dataclass
class PretrainConfig:
    """Every option of ``relreason pretrain``; the CLI and YAML configs fill it by field name."""

    method: str = "relational"
    dataset: str = "digits"
    data_root: str = "data"
    download: bool = False
    backbone: str = "conv4"
    backbone_args: dict[str, Any] = field(default_factory=dict)  # keyword arguments of the backbone's factory
    image_size: int | None = None  # None: the dataset's native size
    num_views: int = 4  # K
    batch_size: int = 64
    epochs: int = 20
    lr: float = 1e-3
    lr_schedule: str = "constant"  # the paper's; or cosine decay towards 0 at the last epoch
    warmup_epochs: float = 0.0  # linear warm-up of the learning rate, in epochs
    weight_decay: float = 0.0
    loss: str = "bce"
    focal_gamma: float = 2.0
    focal_alpha: float = 0.5
    aggregation: str = "cat"
    head_hidden: int = 256
    simclr_temperature: float = 0.5
    online_probe: bool = True  # a linear classifier on detached features, when the data has labels
    seed: int = 0
    device: str = "auto"
    amp: str = "off"
    min_crop_scale: float = MIN_CROP_SCALE  # smallest random crop, as a fraction of the image area (the paper's 0.08)
    jitter_strength: float = 1.0  # colour jitter amounts as a multiple of the paper's (0.8, 0.8, 0.8, 0.2)
    augment: str = "auto"  # tensor: batched on the device; pil: per-image torchvision; auto: tensor when possible
    test_fraction: float | None = None  # a labelled folder: train on all but this held-out share of each class
    channels_last: bool = False
    compile: bool = False  # torch.compile the backbone and the batched colour jitter
    num_workers: int | None = None  # None: 0 on CPU (the cores train), up to 8 on CUDA
    output_dir: str = "runs/relreason"
    resume: bool = True  # continue from the newest valid checkpoint in output_dir
    checkpoint_every: int = 0  # steps between mid-epoch checkpoints; 0: at epoch ends only
    keep_checkpoints: int = 2
    sync_batchnorm: bool = False
    time_limit: float | None = None  # minutes
    progress: bool = True
    tensorboard: bool = True
    log_every: int = 50  # steps (counted over the run) between running-mean records in steps.jsonl, plus one at
    # each epoch's end; 0: none

    def validate(self, on_this_machine: bool = True) -> None:
        """Refuse bad options with one line each, before any data is read or any file written.

        ``on_this_machine=False`` leaves out what depends on the machine (whether ``--device`` is there), for
        options written down to run elsewhere (``--print-config``)."""
        check_method_name(self.method)
        check_folder_given(self.output_dir)
        relational = self.method == "relational"
        batch_size, num_views = whole_number(self.batch_size, "--batch-size"), whole_number(self.num_views, "-K/--num-views")
        if batch_size < 2:
            why = "each image needs another one as its negative" if relational else "BatchNorm needs two images"
            raise RelreasonError(f"--batch-size must be >= 2 ({why}), got {batch_size}; pass e.g. --batch-size 64")
        # The built-in baselines make their own number of views whatever K says (a note tells so): K is checked for
        # the methods that use it.
        if (relational or not is_built_in(self.method)) and num_views < (2 if relational else 1):
            raise RelreasonError(f"-K/--num-views must be >= 2 for relational reasoning (a positive pair takes two "
                                 f"views of an image), got {num_views}; pass e.g. -K 4" if relational else
                                 f"-K/--num-views must be >= 1, got {num_views}; pass e.g. -K 4")
        if self.epochs < 1:
            raise RelreasonError(f"--epochs must be >= 1, got {self.epochs}")
        if not self.simclr_temperature > 0:
            raise RelreasonError(f"--simclr-temperature must be > 0, got {self.simclr_temperature}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise RelreasonError(f"--lr must be a finite number > 0, got {self.lr}; pass e.g. 0.001")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise RelreasonError(
                f"--weight-decay must be a finite number >= 0, got {self.weight_decay}; pass e.g. 0 or 5e-4"
            )
        if self.head_hidden < 1:
            raise RelreasonError(f"--head-hidden must be >= 1, got {self.head_hidden}")
        check_seed(self.seed, "--seed")
        check_schedule(self.lr_schedule, self.warmup_epochs, self.epochs)
        if self.aggregation not in AGGREGATIONS:
            raise RelreasonError(f"unknown --aggregation '{self.aggregation}'; choose one of {', '.join(AGGREGATIONS)}")
        if self.amp not in AMP_MODES:
            raise RelreasonError(f"unknown --amp '{self.amp}'; choose one of {', '.join(AMP_MODES)}")
        if self.augment not in AUGMENT_MODES:
            raise RelreasonError(f"unknown --augment '{self.augment}'; choose one of {', '.join(AUGMENT_MODES)}")
        check_crop_scale(self.min_crop_scale)
        jitter_amounts(self.jitter_strength)
        if self.image_size is not None and self.image_size < 8:
            raise RelreasonError(f"--image-size must be >= 8, got {self.image_size}")
        if self.num_workers is not None and self.num_workers < 0:
            raise RelreasonError(f"--num-workers must be >= 0, got {self.num_workers}")
        if self.checkpoint_every < 0:
            raise RelreasonError(f"--checkpoint-every must be >= 0 steps, got {self.checkpoint_every}")
        if self.log_every < 0:
            raise RelreasonError(f"--log-every must be >= 0 steps, got {self.log_every}")
        if self.keep_checkpoints < 1:
            raise RelreasonError(f"--keep-checkpoints must be >= 1, got {self.keep_checkpoints}")
        if self.time_limit is not None and not self.time_limit > 0:
            raise RelreasonError(f"--time-limit must be > 0 minutes, got {self.time_limit}")
        # Checked whatever --loss is: unused, a value out of range is a mistake all the same.
        check_focal_parameters(self.focal_gamma, self.focal_alpha, "--focal-gamma", "--focal-alpha")
        build_loss(self.loss, self.focal_gamma, self.focal_alpha)
        check_test_fraction(self.dataset, self.test_fraction)
        if dataset_info(self.dataset).name == "folder":
            output = Path(self.output_dir).expanduser().resolve()
            if any(output.is_relative_to(folder.resolve()) for folder in image_folders_read(self.data_root)):
                raise RelreasonError(
                    f"--output-dir {self.output_dir} lies inside --data-root {self.data_root}, so the run's own files "
                    "would be read as images; choose an --output-dir outside it"
                )
        check_backbone(self.backbone, self.backbone_args)
        if on_this_machine:
            resolve_device(self.device)  # checks the name too
        else:
            check_device_name(self.device)


@dataclass
class PretrainResult:
    """What ``pretrain`` returns: where the run is, how far it trained, its epoch records and the trained model."""

    run_dir: Path
    epochs_done: int
    history: list[dict[str, float]]
    stopped_early: bool  # by --time-limit or SIGTERM, with a checkpoint at the step it stopped
    model: PretrainMethod | nn.Module  # the trained method (its .backbone); the bare backbone for 'random'
    preempted: bool = False  # stopped by SIGTERM rather than by --time-limit
    num_classes: int | None = None  # of the pretraining images; None when they have no labels
    sigterm_received: bool = False  # also when it came too late to stop the run (in its last step): stop what follows
    mid_epoch: bool = False  # stopped early inside an epoch (not at an epoch's end)


def views_used(config: PretrainConfig) -> int:
    """The views per image the method trains on: --num-views (-K) for relational, the method's own number for the
    others, 0 for random (which trains nothing)."""
    method = method_class(config.method)
    return views_per_image(method, config.num_views, config.method) if method is not None else 0


#: Options that only one method reads, by that method.
_METHOD_OPTIONS = {
    "relational": ("aggregation", "head_hidden", "loss", "focal_gamma", "focal_alpha"),
    "simclr": ("simclr_temperature",),
}


def unused_option_notes(config: PretrainConfig) -> list[str]:
    """One line for each group of options given (set away from their defaults) that this run does not read: a
    silently ignored option looks like one that took effect."""
    notes, defaults = [], PretrainConfig()
    # A method of one's own may need K views in its own way: only the built-in ones are known to ignore K.
    if (is_built_in(config.method) and views_used(config) not in (0, config.num_views)
            and config.num_views != defaults.num_views):
        notes.append(f"method '{config.method}' trains on {views_used(config)} view(s) per image; "
                     f"-K {config.num_views} does not change that")
    for method, names in _METHOD_OPTIONS.items():
        given = [name for name in names if getattr(config, name) != getattr(defaults, name)]
        if config.method != method and given:
            flags = ", ".join(option_flag(name) for name in given)
            notes.append(f"method '{config.method}' does not use {flags} ('{method}' options)")
    focal = [name for name in ("focal_gamma", "focal_alpha") if getattr(config, name) != getattr(defaults, name)]
    if config.method == "relational" and config.loss != "focal" and focal:
        flags = " and ".join(option_flag(name) for name in focal)
        notes.append(f"--loss {config.loss} does not use {flags}; pass --loss focal to train with the focal loss")
    if config.download and dataset_info(config.dataset).name in ("folder", "digits"):
        notes.append(f"--download fetches the named datasets; '{config.dataset}' needs no download, so it does nothing")
    return notes
