"""The pretraining loop: one readable loop over K-view batches, with metrics, checkpoints and resume.

The trainer is one user of the building blocks (pairing, head, losses, backbones, K-view data); nothing
in those blocks imports it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from relreason.backbones import build_backbone
from relreason.backbones.registry import check_backbone_name
from relreason.checkpoint import (
    atomic_torch_save,
    atomic_write_bytes,
    atomic_write_json,
    checkpoint_path,
    list_checkpoints,
    load_newest_checkpoint,
    remove_stale_temporaries,
    rng_state,
    rotate_checkpoints,
    set_rng_state,
)
from relreason.data import (
    ImageFolderDataset,
    MultiViewDataset,
    check_test_fraction,
    compute_normalization,
    dataset_info,
    held_out_split,
    load_dataset,
    read_skip_log,
    relational_augmentation,
    same_dataset,
)
from relreason.data.transforms import check_crop_scale, jitter_amounts
from relreason.data.batch_augment import AugmentationRecipe, BatchRelationalAugmentation
from relreason.data.batch_views import BatchViewLoader, DeviceMultiViewDataset
from relreason.data.datasets import TEST_DIR_NAMES, ArrayImageDataset
from relreason.data.decoded_folder import DecodedImageFolder
from relreason.data.sampler import EpochBatchSampler
from relreason.distributed import (
    DistributedContext,
    all_reduce_mean,
    barrier,
    broadcast_object,
    init_distributed,
    max_over_ranks,
    shutdown_distributed,
)
from relreason.errors import RelreasonError
from relreason.losses import build_loss
from relreason.methods import PretrainMethod, check_method_name, method_class
from relreason.methods.online_probe import OnlineProbe, PretrainModule
from relreason.pairing import AGGREGATIONS, check_pairing_sizes
from relreason.protocols._common import precise_float
from relreason.schedule import check_schedule, learning_rate_factor, set_learning_rate
from relreason.seeding import check_seed, seed_everything

AMP_MODES = ("off", "bf16", "fp16")
AUGMENT_MODES = ("auto", "tensor", "pil")
BACKBONE_NAME = "backbone.pt"
BACKBONE_META_NAME = "backbone.json"
METRICS_NAME = "metrics.jsonl"
STEPS_NAME = "steps.jsonl"
SKIPPED_IMAGES_NAME = "skipped_images.txt"
POSTFIX_SECONDS = 2.0  # how often the progress bar's running means are refreshed


@dataclass
class PretrainConfig:
    """Every option of ``relreason pretrain``; the CLI and YAML configs fill it by field name."""

    method: str = "relational"
    dataset: str = "digits"
    data_root: str = "data"
    download: bool = False
    backbone: str = "conv4"
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
    min_crop_scale: float = 0.08  # smallest random crop, as a fraction of the image area (the paper's 0.08)
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

    def validate(self) -> None:
        """Refuse bad options with one line each, before any data is read or any file written."""
        check_method_name(self.method)
        if self.method == "relational":
            check_pairing_sizes(self.num_views, self.batch_size)
        elif self.batch_size < 2:
            raise RelreasonError(f"--batch-size must be >= 2 (BatchNorm needs two images), got {self.batch_size}")
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
        build_loss(self.loss, self.focal_gamma, self.focal_alpha)
        check_test_fraction(self.dataset, self.test_fraction)
        if dataset_info(self.dataset).name == "folder":
            images, output = Path(self.data_root).expanduser().resolve(), Path(self.output_dir).expanduser().resolve()
            if output == images or images in output.parents:
                raise RelreasonError(
                    f"--output-dir {self.output_dir} lies inside --data-root {self.data_root}, so the run's own files "
                    "would be read as images; choose an --output-dir outside it"
                )
        check_backbone_name(self.backbone)
        resolve_device(self.device)


@dataclass
class PretrainResult:
    run_dir: Path
    epochs_done: int
    history: list[dict[str, float]]
    stopped_early: bool  # by --time-limit or SIGTERM, with a checkpoint at the step it stopped
    model: PretrainMethod | nn.Module  # the trained method (its .backbone); the bare backbone for 'random'
    preempted: bool = False  # stopped by SIGTERM rather than by --time-limit
    num_classes: int | None = None  # of the pretraining images; None when they have no labels
    sigterm_received: bool = False  # also when it came too late to stop the run (in its last step): stop what follows


def resolve_device(name: str) -> torch.device:
    """auto, cpu, cuda, cuda:N (a visible GPU) or mps (where available); anything else is refused in one line."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise RelreasonError("--device mps requested but MPS (Apple GPU) is not available here; use --device cpu")
        return torch.device("mps")
    if not isinstance(name, str) or re.fullmatch(r"cpu|cuda(:[0-9]+)?", name) is None:
        raise RelreasonError(f"unknown --device '{name}'; use auto, cpu, cuda, cuda:N or mps")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RelreasonError("--device cuda requested but no CUDA GPU is visible; use --device cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            visible = "cuda:0" if count == 1 else f"one of cuda:0 to cuda:{count - 1}"
            raise RelreasonError(f"--device {name} requested but only {count} CUDA GPU(s) are visible; use {visible}")
    return device


def autocast_dtype(amp: str) -> torch.dtype | None:
    return {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def prepare_output_dir(config: PretrainConfig, context: DistributedContext = DistributedContext()) -> Path:
    run_dir = Path(config.output_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{context.rank}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise RelreasonError(f"output folder {run_dir} is not writable ({error.strerror}); choose another --output-dir") from None
    if context.is_main:  # left by a run killed while writing them
        for name in ("checkpoint-e*-s*.pt", BACKBONE_NAME, BACKBONE_META_NAME, "config.json", METRICS_NAME, STEPS_NAME):
            remove_stale_temporaries(run_dir, name)
    if list_checkpoints(run_dir) and not config.resume:
        raise RelreasonError(
            f"{run_dir} already holds training checkpoints and --no-resume was given; "
            "drop --no-resume to continue them or choose another --output-dir"
        )
    return run_dir


class MetricsLog:
    """Per-epoch metrics (metrics.jsonl) and running means every few steps (steps.jsonl), as JSON lines;
    the epoch records are mirrored to TensorBoard when it is installed."""

    def __init__(self, run_dir: Path, use_tensorboard: bool) -> None:
        self.path = run_dir / METRICS_NAME
        self.steps_path = run_dir / STEPS_NAME
        self.writer = None
        if use_tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                pass
            else:
                self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def write(self, record: dict[str, float]) -> None:
        _append_json_line(self.path, record)
        if self.writer is not None:
            for key, value in record.items():
                if key != "epoch":
                    self.writer.add_scalar(f"pretrain/{key}", value, record["epoch"])
            self.writer.flush()

    def write_step(self, record: dict[str, float]) -> None:
        _append_json_line(self.steps_path, record)

    def read(self) -> list[dict[str, float]]:
        return _read_json_lines(self.path)

    def read_steps(self) -> list[dict[str, float]]:
        return _read_json_lines(self.steps_path)

    def truncate_after(self, epochs_done: float) -> None:
        """Drop records a resumed run will write again (those after the checkpoint it resumes)."""
        for path in (self.path, self.steps_path):
            kept = [r for r in _read_json_lines(path) if r["epoch"] <= epochs_done]
            atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in kept).encode())

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _append_json_line(path: Path, record: dict[str, float]) -> None:
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")


def _read_json_lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # a line cut short by a killed process; its steps are redone on resume
    return records


def build_pretrain_data(
    config: PretrainConfig,
    device: torch.device = torch.device("cpu"),
    check_geometry: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[MultiViewDataset | DeviceMultiViewDataset, dict[str, Any]]:
    """The multi-view pretraining set and the image geometry/normalisation the backbone is trained with.

    In-memory datasets get their views made in batches on ``device`` (``--augment tensor``, the default for
    them; an image folder is decoded into memory at the training size first); image folders by default, or
    ``--augment pil``, get torchvision's per-image transforms in a DataLoader. ``check_geometry`` sees the
    geometry before a folder is decoded (which may take minutes), so that a resume it refuses is refused early.
    """
    info = dataset_info(config.dataset)
    method = method_class(config.method)
    # Supervised pretraining needs the labelled split (STL-10's unlabelled split has none).
    split = info.train_split if method is not None and method.needs_labels else info.pretrain_split
    if config.test_fraction is not None:  # the rest of the folder is for evaluate alone
        dataset = held_out_split(config.dataset, config.data_root, config.test_fraction)[0]
    else:
        dataset = load_dataset(config.dataset, config.data_root, split, download=config.download)
    image_size = config.image_size or info.image_size
    if info.mean is None:
        mean, std = compute_normalization(dataset)
    else:
        mean, std = info.mean, info.std
    views = max(views_used(config), 1)
    batched = config.augment == "tensor" or (config.augment == "auto" and isinstance(dataset, ArrayImageDataset))
    batched = batched and not (method is None and isinstance(dataset, ImageFolderDataset))  # 'random' makes no views
    geometry = {"image_size": image_size, "mean": [float(m) for m in mean], "std": [float(s) for s in std],
                "augment": "tensor" if batched else "pil"}  # the path taken, which 'auto' does not say
    if check_geometry is not None:
        check_geometry(geometry)
    if batched and isinstance(dataset, ImageFolderDataset):
        # Under torchrun every process decodes its own copy; process 0 alone shows how far it is.
        dataset = DecodedImageFolder(dataset, image_size, progress=config.progress and os.environ.get("RANK", "0") == "0")
    if batched:
        brightness, contrast, saturation, hue = jitter_amounts(config.jitter_strength)
        recipe = AugmentationRecipe(scale=check_crop_scale(config.min_crop_scale), brightness=brightness,
                                    contrast=contrast, saturation=saturation, hue=hue)
        augmentation = BatchRelationalAugmentation(image_size, mean, std, recipe, compile=config.compile)
        return DeviceMultiViewDataset(dataset, augmentation, views, config.seed, device), geometry
    transform = relational_augmentation(image_size, mean, std, config.min_crop_scale, config.jitter_strength)
    return MultiViewDataset(dataset, transform, views, seed=config.seed), geometry


def make_loader(
    dataset: MultiViewDataset | DeviceMultiViewDataset,
    config: PretrainConfig,
    position: TrainingPosition,
    device: torch.device,
    context: DistributedContext = DistributedContext(),
) -> DataLoader | BatchViewLoader:
    """This rank's batches from ``position`` to the end of its epoch.

    Order comes from (seed, epoch), so a resumed epoch goes on with the images not yet used, also under another
    number of ranks; each image's views come from (seed, epoch, index) on the per-image path and from (seed,
    epoch, step, rank) on the batched one, so a resume under the same number of ranks repeats them exactly.
    """
    dataset.set_epoch(position.epoch)
    # Checkpoints from before ``items`` was recorded were taken under this number of ranks.
    start_item = position.items if position.items is not None else position.step * config.batch_size * context.world_size
    sampler = EpochBatchSampler(
        len(dataset), config.batch_size, config.seed, position.epoch, context.rank, context.world_size,
        min(start_item, len(dataset)),
    )
    if isinstance(dataset, DeviceMultiViewDataset):
        return BatchViewLoader(dataset, sampler, context.rank)
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=loader_workers(config.num_workers, device),
        pin_memory=device.type == "cuda",
        worker_init_fn=_ignore_ctrl_c,
    )


def _ignore_ctrl_c(worker_id: int) -> None:
    # Ctrl-C reaches the workers too; they must keep serving the step the main process finishes before it stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def make_optimizer(groups: list[dict[str, Any]], config: PretrainConfig, device: torch.device) -> torch.optim.Adam:
    """Adam as in the paper. On CUDA the fused kernel: one launch for all parameters, and with --amp fp16 the
    GradScaler hands it the overflow flag on the device instead of reading it on the host every step. On the
    CPU PyTorch's default (the per-parameter loop), which the bit-exact resume tests were written against."""
    return torch.optim.Adam(groups, lr=config.lr, weight_decay=config.weight_decay, fused=device.type == "cuda")


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
            step = optimizer.state.get(parameter, {}).get("step")
            if torch.is_tensor(step):  # where this kernel keeps it: beside the parameter if fused, else on the CPU
                place = parameter.device if group["fused"] else torch.device("cpu")
                optimizer.state[parameter]["step"] = step.to(place, torch.float32)


def loader_workers(requested: int | None, device: torch.device) -> int:
    if requested is not None:
        return requested
    # On CPU the training step already uses every core; extra augmentation processes only contend.
    return 0 if device.type == "cpu" else min(8, os.cpu_count() or 1)


def views_used(config: PretrainConfig) -> int:
    """The views per image the method trains on: -K for relational, the method's own number for the others."""
    method = method_class(config.method)
    return method.views_per_image(config.num_views) if method is not None else 0


def num_classes_of(dataset: MultiViewDataset | DeviceMultiViewDataset) -> int | None:
    """The number of classes of the pretraining labels; None without labels, or with one class (a folder of
    one subfolder: no classes to tell apart, so no online probe)."""
    labels = getattr(dataset.dataset, "labels", None)
    if labels is None or len(labels) == 0:
        return None
    count = int(max(labels)) + 1
    return count if count >= 2 else None


def describe_folder(folder: ImageFolderDataset) -> str:
    """What pretraining makes of an image folder, in one line: its images, and its classes or why it has none."""
    images = f"{len(folder)} image{'s' if len(folder) != 1 else ''}"
    if folder.held_out:
        images += f" ({folder.held_out} more held out as the test set)"
    classes = folder.classes or []
    if len(classes) >= 2:
        shown = ", ".join(classes[:6]) + (f", ... ({len(classes) - 6} more)" if len(classes) > 6 else "")
        about = f"{len(classes)} classes from its subfolders ({shown})"
        splits = [c for c in classes if c.lower() in ("train", "training", *TEST_DIR_NAMES)]  # a split misnamed
        if splits:
            about += (f"; note: subfolder(s) {', '.join(splits)} taken as classes: for a train/test split, give "
                      "train/ and test/ (or val/ or validation/) with one subfolder per class in each")
    elif classes:
        about = f"unlabelled: its one subfolder '{classes[0]}' holds one class, nothing to tell apart (no online probe)"
    else:
        about = f"unlabelled: {folder.why_unlabelled}"
    return f"image folder {folder.root}: {images}, {about}"


def no_labels_error(name: str) -> RelreasonError:
    return RelreasonError(f"--method supervised needs labels and dataset '{name}' has none; "
                          "choose a labelled dataset or another method")


def check_every_image_labelled(dataset: MultiViewDataset | DeviceMultiViewDataset, name: str) -> None:
    """A one-line error unless every image of ``dataset`` has a label (unlabelled images are marked -1)."""
    labels = getattr(dataset.dataset, "labels", None)
    if labels is None or len(labels) == 0:
        raise no_labels_error(name)
    missing = int((np.asarray(labels) < 0).sum())
    if not missing and len(np.unique(np.asarray(labels))) < 2:
        raise RelreasonError(f"--method supervised needs images of at least 2 classes, and dataset '{name}' has one; "
                             "give one subfolder per class, or choose another method")
    if missing:
        raise RelreasonError(
            f"--method supervised needs a label for every image, and {missing} image(s) of dataset '{name}' have "
            "none; choose a labelled dataset/split or another method"
        )


def build_model(config: PretrainConfig, image_size: int, num_classes: int | None = None) -> PretrainMethod:
    """The method ``config.method`` on a fresh ``config.backbone`` (None for ``random``, which trains nothing)."""
    backbone = build_backbone(config.backbone, image_size=image_size)
    method = method_class(config.method)
    if method is None:
        return None
    if config.method == "relational":
        loss = build_loss(config.loss, config.focal_gamma, config.focal_alpha)
        return method(backbone, backbone.feature_dim, config.aggregation, config.head_hidden, loss, image_size=image_size)
    if config.method == "simclr":
        return method(backbone, backbone.feature_dim, temperature=config.simclr_temperature)
    if config.method == "supervised":
        if num_classes is None:
            raise no_labels_error(config.dataset)
        return method(backbone, backbone.feature_dim, num_classes)
    return method(backbone, backbone.feature_dim)


def absolute_data_root(config: PretrainConfig) -> str | None:
    """The data root as an absolute path: `evaluate` finds the data from any working folder."""
    return str(Path(config.data_root).expanduser().resolve()) if config.data_root else None


def export_backbone(
    run_dir: Path,
    backbone: nn.Module,
    config: PretrainConfig,
    geometry: dict,
    position: TrainingPosition,
    stopped_by: str | None = None,
) -> None:
    """The trained backbone alone, as a plain state_dict, plus what is needed to rebuild and feed it."""
    # Contiguous: a --channels-last run's tensors would otherwise keep their strides into the file.
    state = {k: v.detach().cpu().contiguous() for k, v in backbone.state_dict().items()}
    atomic_torch_save(state, run_dir / BACKBONE_NAME)
    meta = {
        "backbone": config.backbone,
        "method": config.method,
        "feature_dim": backbone.feature_dim,
        "dataset": config.dataset,
        "data_root": absolute_data_root(config),
        "epochs": position.epoch,
        "epochs_done": position.epochs_done,
        "train_seconds": position.past_seconds + position.seconds,
        "finished": position.epoch >= config.epochs or config.method == "random",
        "stopped_by": stopped_by,
        "num_views": views_used(config),  # per image, as the method took them (SimCLR: 2 whatever -K says)
        "seed": config.seed,
        "test_fraction": config.test_fraction,  # evaluate holds the same share out by default
        **geometry,
    }
    atomic_write_json(run_dir / BACKBONE_META_NAME, meta)


def pretrain(config: PretrainConfig) -> PretrainResult:
    """Train ``config.backbone`` with relational reasoning on ``config.dataset``; see ``PretrainConfig``.

    Under ``torchrun`` each process trains on its own share of every epoch (pairs are formed inside each
    rank's batch) and rank 0 alone writes files; otherwise this is a plain single-process loop. SIGTERM and
    the time limit end it with a checkpoint at the current step (``stopped_early``); so does Ctrl-C, which
    then raises KeyboardInterrupt (a second Ctrl-C raises it at once).
    """
    config.validate()
    # The time limit counts from here, setup included (decoding a large folder takes minutes): a limit
    # chosen to fit a scheduler's wall clock then holds.
    deadline = time.monotonic() + config.time_limit * 60 if config.time_limit else math.inf
    context, device = init_distributed(resolve_device(config.device))
    try:
        return _pretrain(config, context, device, deadline)
    finally:
        shutdown_distributed(context)


def _pretrain(
    config: PretrainConfig, context: DistributedContext, device: torch.device, deadline: float
) -> PretrainResult:
    if config.sync_batchnorm and context.enabled and device.type != "cuda":
        raise RelreasonError("--sync-batchnorm needs CUDA devices (PyTorch's SyncBatchNorm is GPU-only); drop it on CPU")
    if config.sync_batchnorm and not context.enabled:
        log("relreason: note: --sync-batchnorm does nothing in a single process (it shares BatchNorm statistics "
            "across torchrun's processes)", context)
    if config.amp == "fp16" and device.type == "cpu":
        log("relreason: note: --amp fp16 is slow on a CPU (and needs a loss scaler); --amp bf16 is the CPU's "
            "half precision", context)
    if views_used(config) not in (0, config.num_views) and config.num_views != PretrainConfig.num_views:  # -K given
        log(f"relreason: note: method '{config.method}' trains on {views_used(config)} view(s) per image; "
            f"-K {config.num_views} does not change that", context)
    seed_everything(config.seed)
    method_type = method_class(config.method)
    # The checkpoint to resume is read before the data, so that a resume its options refuse is refused before a
    # folder is decoded. 'random' keeps none.
    found = newest_checkpoint_everywhere(config, context) if method_type is not None else None

    def check_resume(geometry: dict[str, Any]) -> None:
        if found is not None:
            check_resumable(found[1], config, geometry, found[0])

    dataset, geometry = build_pretrain_data(config, device, check_resume)
    folder = getattr(dataset.dataset, "folder", dataset.dataset)
    if isinstance(folder, ImageFolderDataset):
        log(describe_folder(folder), context)
    if isinstance(dataset.dataset, DecodedImageFolder):
        log(dataset.dataset.describe(), context)
    if len(dataset) < 2 * context.world_size:
        raise RelreasonError(
            f"dataset '{config.dataset}' has {len(dataset)} image(s); each of the {context.world_size} process(es) "
            "needs at least 2 (an image cannot be its own negative)"
        )
    if method_type is not None and method_type.needs_labels:
        check_every_image_labelled(dataset, config.dataset)  # before the output folder exists
    if method_type is None:
        check_no_other_run(Path(config.output_dir))  # before anything in that folder is touched
    num_classes = num_classes_of(dataset)
    method = build_model(config, geometry["image_size"], num_classes)  # a broken backbone factory fails here,
    run_dir = prepare_output_dir(config, context)  # before the output folder exists
    if method is None:  # 'random': the lower bound is the initialisation itself
        backbone = build_backbone(config.backbone, image_size=geometry["image_size"])
        if context.is_main:
            export_backbone(run_dir, backbone, config, geometry, TrainingPosition())
            log("method 'random': exported the randomly initialised backbone without training", context)
        barrier(context)
        return PretrainResult(run_dir, 0, [], False, backbone, num_classes=num_classes)
    if isinstance(dataset.dataset, (ImageFolderDataset, DecodedImageFolder)):
        dataset.dataset.log_skips_to(run_dir / SKIPPED_IMAGES_NAME)  # unreadable files are listed, not fatal
    if method.needs_labels:
        method.check_label_values = False  # checked once above, so no step waits on the device to check them
    probe = OnlineProbe(method.feature_dim, num_classes) if config.online_probe and num_classes else None
    model = PretrainModule(method, probe).to(device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if config.compile:
        # The backbone only: compiling the whole forward was faster at K=16 but slower at K=32 on the CPU (the
        # relation pairs' gradient becomes an atomic scatter-add, which is also not deterministic), while the
        # eager relation head is cheap. In place: the state_dict keys stay those of the plain backbone.
        # Static shapes: an epoch's short last batch then gets a graph of its own, instead of turning every
        # later step into a dynamic-shape graph.
        model.method.backbone.compile(dynamic=False)
    if config.sync_batchnorm and context.enabled:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    groups = [{"params": model.method.parameters(), "base_lr": config.lr}]
    if probe is not None:
        # The probe must keep up with features that move every step; on standardised features a 10x
        # larger step is safe, and it never touches the backbone.
        groups.append({"params": probe.parameters(), "lr": 10 * config.lr, "base_lr": 10 * config.lr, "weight_decay": 0.0})
    optimizer = make_optimizer(groups, config, device)
    amp_dtype = autocast_dtype(config.amp)
    scaler = torch.amp.GradScaler(device.type, enabled=config.amp == "fp16")
    metrics = MetricsLog(run_dir, config.tensorboard and context.is_main)
    position = TrainingPosition()

    if found is not None:
        path, checkpoint = found
        if probe is None:
            checkpoint = without_probe(checkpoint)
        try:
            model.load_state_dict(checkpoint["model"])
        except RuntimeError as error:  # e.g. a class folder added since: the online probe's output grew
            detail = next((line.strip() for line in str(error).splitlines() if "size mismatch" in line
                           or "Missing" in line or "Unexpected" in line), "")
            raise RelreasonError(
                f"cannot resume {path}: this run's model no longer fits it ({detail[:160]}); was data or a class "
                "folder added? Rerun with the original data or choose another --output-dir"
            ) from None
        load_optimizer_state(optimizer, checkpoint["optimizer"], groups, config)
        if checkpoint["scaler"]:  # empty when saved without --amp fp16: a newly enabled scaler starts afresh
            scaler.load_state_dict(checkpoint["scaler"])
        set_rng_state(checkpoint["rng"], device)
        position = TrainingPosition(**checkpoint["position"])
        if context.is_main:
            if position.epoch >= config.epochs:
                log(f"{path} ends the run's {position.epoch} epoch(s): nothing to train (pass a larger --epochs to "
                    "train on); exporting its backbone again", context)
            else:
                log(f"resuming {path}: epoch {position.epoch + 1}, step {position.step}", context)
            saved_epochs = checkpoint.get("config", {}).get("epochs", config.epochs)
            if config.lr_schedule == "cosine" and saved_epochs != config.epochs:
                log(f"relreason: warning: --epochs changed from {saved_epochs} to {config.epochs}: the cosine schedule "
                    "now spans the new length, so the learning rate jumps to that curve", context)

    if context.is_main:
        # Records past the starting point (all of them on a fresh start) are of steps about to be redone.
        metrics.truncate_after(position.epochs_done)
        atomic_write_json(run_dir / "config.json", dataclasses.asdict(config) | {"geometry": geometry})
    train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if context.enabled else model
    saver = CheckpointSaver(run_dir, config, geometry, model, optimizer, scaler, context, device,
                            resumed_from=found[0] if found is not None else None)
    stop = StopRequest.install()
    stopped_early = False
    try:
        while position.epoch < config.epochs and not stopped_early:
            record, stopped_early = train_one_epoch(
                train_model, optimizer, scaler, dataset, config, position, device, amp_dtype, deadline, stop, saver,
                context, metrics,
            )
    finally:
        stop.uninstall()
    stopped_early = stopped_early and position.epoch < config.epochs
    stopped_by = (stop.signal_name or "time limit") if stopped_early else None
    if context.is_main:
        export_backbone(run_dir, model.method.backbone, config, geometry, position, stopped_by)
        metrics.close()
        plot_training_curves(metrics.read(), run_dir / "training_curves.png")
        if stopped_early:
            log(f"stopped during epoch {position.epoch + 1} at step {position.step}; exported the current backbone "
                "and saved a checkpoint there: rerun the same command to continue", context)
    barrier(context)
    if stop.signal_name == "Ctrl-C" or stop.interrupted:
        # Ctrl-C still interrupts the caller (a loop over runs, compare), now with the run checkpointed; also when
        # it came during the last step, which ended the run anyway.
        raise KeyboardInterrupt
    history = metrics.read() if context.is_main else []
    return PretrainResult(run_dir, position.epoch, history, stopped_early, model.method,
                          stopped_early and stop.signalled, num_classes,
                          sigterm_received=stop.signalled or stop.requested)


@dataclass
class TrainingPosition:
    """Where training stands: epoch (0-based) in progress, steps done in it, and its running sums."""

    epoch: int = 0
    step: int = 0
    totals: dict[str, float] = dataclasses.field(default_factory=dict)  # loss and metrics summed over steps
    views: int = 0
    seconds: float = 0.0  # training time in this epoch
    past_seconds: float = 0.0  # training time in the epochs before it
    steps_per_epoch: int = 0
    items: int | None = None  # images of the epoch's shuffled order used so far by all ranks together

    @property
    def epochs_done(self) -> float:
        """Epochs trained, the current one counted by its fraction done."""
        return self.epoch + (self.step / self.steps_per_epoch if self.steps_per_epoch else 0.0)

    def next_epoch(self) -> None:
        self.past_seconds += self.seconds
        self.epoch, self.step, self.totals, self.views, self.seconds, self.items = self.epoch + 1, 0, {}, 0, 0.0, 0


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


def check_resumable(checkpoint: dict[str, Any], config: PretrainConfig, geometry: dict, path: Path) -> None:
    saved = checkpoint.get("config", {})
    defaults = PretrainConfig()  # for options that checkpoints from older versions do not record
    shaping = ("method", "backbone", "dataset", "batch_size", "seed", "lr_schedule", "warmup_epochs", "online_probe",
               "min_crop_scale", "jitter_strength", "test_fraction")
    if config.method == "relational":  # the relation head's options, its loss, and K shape only this method's runs
        shaping += ("aggregation", "head_hidden", "num_views", "loss")
        if config.loss == "focal":
            shaping += ("focal_gamma", "focal_alpha")
    if config.method == "simclr":
        shaping += ("simclr_temperature",)
    recorded = {k: saved.get(k, getattr(defaults, k)) for k in shaping}
    mismatched = {k: (v, getattr(config, k)) for k, v in recorded.items() if v != getattr(config, k)}
    if "dataset" in mismatched and same_dataset(*mismatched["dataset"]):  # fashion_mnist is fashion-mnist
        del mismatched["dataset"]
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
        detail = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in mismatched.items())
        raise RelreasonError(f"cannot resume {path}: options differ ({detail}); rerun with the original options")
    # Same statistics, same images: a folder moved elsewhere resumes, another folder (or one whose files
    # changed) does not, as its views would be normalised unlike the weights' first epochs.
    for key in ("mean", "std"):
        before, now = saved_geometry.get(key), geometry[key]
        if before is not None and not np.allclose(before, now, rtol=1e-6, atol=1e-9):
            raise RelreasonError(
                f"cannot resume {path}: the images differ from those the run started on (normalisation {key} "
                f"{_rounded(before)} then, {_rounded(now)} now: another --data-root than "
                f"{saved.get('data_root')!r}, or files added or removed); rerun on the run's images or choose "
                "another --output-dir"
            )


def _rounded(values: list[float]) -> list[float]:
    return [round(float(v), 4) for v in values]


def check_no_other_run(run_dir: Path) -> None:
    """``--method random`` writes its backbone without checkpoints: refuse a folder that holds another run's."""
    if list_checkpoints(run_dir):
        raise RelreasonError(f"{run_dir} holds training checkpoints; choose another --output-dir for the random backbone")
    try:
        other = json.loads((run_dir / BACKBONE_META_NAME).read_text()).get("method")
    except (OSError, ValueError, AttributeError):
        return  # no backbone (or none relreason can read) to overwrite
    if other != "random":
        raise RelreasonError(
            f"{run_dir} holds the backbone of a '{other}' run; choose another --output-dir for the random backbone"
        )


class CheckpointSaver:
    """Rank 0 writes a checkpoint atomically and keeps the newest few; other ranks do nothing."""

    def __init__(self, run_dir, config, geometry, model, optimizer, scaler, context, device,
                 resumed_from: Path | None = None) -> None:
        self.run_dir, self.config, self.geometry, self.context, self.device = run_dir, config, geometry, context, device
        self.model, self.optimizer, self.scaler = model, optimizer, scaler
        self.resumed_from = resumed_from
        self.behind: list[Path] = []  # pruned at the next save whatever their names

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
            "rng": rng_state(self.device),
        }
        path = checkpoint_path(self.run_dir, position.epoch, position.step)
        atomic_torch_save(state, path)
        rotate_checkpoints(self.run_dir, self.config.keep_checkpoints, newest=path, behind=self.behind)
        self.behind = []


class StopRequest:
    """SIGTERM (a scheduler's preemption notice) or a first Ctrl-C asks the loop to checkpoint and stop at the
    next step; a second Ctrl-C stops at once (KeyboardInterrupt), keeping the checkpoints written so far."""

    # The ranks' votes, the largest wins: a failure outranks a Ctrl-C, which outranks a SIGTERM, then the clock.
    GO_ON, TIME_LIMIT, SIGTERM, CTRL_C, FAILED = range(5)

    def __init__(self) -> None:
        self.requested = False  # set by the signal handler on this rank
        self.interrupted = False  # that signal was Ctrl-C (SIGINT)
        self.failed = False  # the ranks' agreed decision: stop because a rank found the training broken
        self.signal_name: str | None = None  # the agreed signal: 'SIGTERM' or 'Ctrl-C' (on any rank)
        self.previous: dict[int, Any] = {}

    @property
    def signalled(self) -> bool:
        """The ranks' agreed decision: stop because of a signal."""
        return self.signal_name is not None

    @classmethod
    def install(cls) -> StopRequest:
        request = cls()
        if threading.current_thread() is threading.main_thread():
            request.previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, request._handle)
            # Ctrl-C only where it would interrupt (not where it is ignored, as under nohup).
            if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
                request.previous[signal.SIGINT] = signal.signal(signal.SIGINT, request._handle)
        return request

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT:
            if self.interrupted:  # the second Ctrl-C: no waiting for the step
                self.uninstall()
                raise KeyboardInterrupt
            self.interrupted = True
            if os.environ.get("RANK", "0") == "0":  # os.write: a print could land inside another write of stderr
                os.write(2, b"\nrelreason: Ctrl-C: stopping after this step with a checkpoint (Ctrl-C again to quit "
                            b"at once)\n")
        self.requested = True

    def uninstall(self) -> None:
        for signum, previous in self.previous.items():
            # None: the handler before was not set from Python, so the default is the nearest to it.
            signal.signal(signum, signal.SIG_DFL if previous is None else previous)
        self.previous = {}

    def agreed(self, deadline: float, context: DistributedContext, failing: bool = False) -> bool:
        """Whether to stop after this step, decided alike on every rank (a SIGTERM on one counts for all).

        A rank that stopped alone, its own clock past the time limit, a SIGTERM reaching it first or an
        error (``failing``) found by it alone, would leave the others waiting in the next gradient all-reduce.
        """
        own = (self.FAILED if failing else self.CTRL_C if self.interrupted else self.SIGTERM if self.requested
               else self.TIME_LIMIT if time.monotonic() > deadline else self.GO_ON)
        vote = max_over_ranks(own, context)
        # The agreed reason, not this rank's flag (a SIGTERM may reach this rank after a time-limit vote):
        # every rank then reports the same reason and exits with the same status.
        self.failed = vote == self.FAILED
        self.signal_name = {self.SIGTERM: "SIGTERM", self.CTRL_C: "Ctrl-C"}.get(vote)
        return vote > self.GO_ON


def log(message: str, context: DistributedContext) -> None:
    if context.is_main:
        print(message, file=sys.stderr, flush=True)


def train_one_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    dataset: MultiViewDataset | DeviceMultiViewDataset,
    config: PretrainConfig,
    position: TrainingPosition,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    deadline: float,
    stop: StopRequest,
    saver: CheckpointSaver,
    context: DistributedContext,
    metrics: MetricsLog,
) -> tuple[dict[str, float] | None, bool]:
    """Train from ``position`` to the end of its epoch, advancing ``position`` in place.

    Returns the epoch's metrics (None when cut short) and whether a time limit or SIGTERM cut it short;
    either way a checkpoint at the current step has been written.
    """
    model.train()
    loader = make_loader(dataset, config, position, device, context)
    sampler = loader.batch_sampler
    steps_per_epoch = position.steps_per_epoch = sampler.steps_per_epoch
    position.items = sampler.start_item
    if position.step != sampler.start_step:
        # Resumed under another number of ranks: count the images already used in this run's steps, so
        # that the schedule, the progress and the running means go on from the same fraction of the epoch.
        log(f"resumed under {context.world_size} process(es), a different number from the checkpoint's: the "
            f"epoch goes on with its {len(dataset) - sampler.start_item} unused image(s), as step "
            f"{sampler.start_step} of {steps_per_epoch}", context)
        scale = sampler.start_step / position.step if position.step else 0.0
        position.totals = {name: value * scale for name, value in position.totals.items()}
        if sampler.start_step < position.step:
            saver.steps_renumbered(position.epoch, sampler.start_step)
        position.step = sampler.start_step
    # Sums stay on the device: reading them every step would stall a GPU on each batch.
    names = list(position.totals)
    totals = torch.tensor(list(position.totals.values()), device=device, dtype=precise_float(device))
    started = time.perf_counter() - position.seconds
    bar = tqdm(loader, desc=f"epoch {position.epoch + 1}/{config.epochs}", initial=position.step,
               total=steps_per_epoch, disable=not (config.progress and context.is_main), leave=False,
               dynamic_ncols=True)
    shown_at = -math.inf  # the first step's means are shown at once

    def sync_position(across_ranks: bool) -> None:
        """Copy the device sums into ``position``; ``across_ranks`` (every rank must call it then): their mean
        over the ranks, the same on each, which is what a checkpoint keeps (each rank resumes from it, and
        the epoch's mean of (shared + own) is shared + the mean of its own), checked finite on every rank alike."""
        values = all_reduce_mean(totals.clone(), context) if across_ranks else totals
        position.totals = dict(zip(names, values.tolist()))
        position.seconds = time.perf_counter() - started
        if across_ranks:
            check_finite(position, config)

    for views, labels in bar:
        if isinstance(views, torch.Tensor):  # (K, B, C, H, W), made on the device
            views = views.to(device, non_blocking=True)
        else:
            views = [v.to(device, non_blocking=True) for v in views]
        labels = labels.to(device, non_blocking=True)
        set_learning_rate(optimizer, learning_rate_factor(
            position.epoch * steps_per_epoch + position.step, config.epochs * steps_per_epoch,
            round(config.warmup_epochs * steps_per_epoch), config.lr_schedule))
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            total_loss, out = model(views, labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(total_loss).backward()
        scaler.step(optimizer)
        scaler.update()
        step_values = {"loss": out.loss.detach(), **out.metrics}
        if not names:
            names = list(step_values)
            totals = torch.zeros(len(names), device=device, dtype=precise_float(device))
        totals += torch.stack([step_values[name].float() for name in names]).to(totals.dtype)
        position.step += 1
        position.items += config.batch_size * context.world_size
        position.views += len(views) * views[0].shape[0] * context.world_size
        # Reading the sums waits for the device: at most every POSTFIX_SECONDS, not every few (fast) steps.
        if (config.progress and context.is_main
                and (time.perf_counter() - shown_at >= POSTFIX_SECONDS or position.step == steps_per_epoch)):
            means = dict(zip(names, (totals / position.step).tolist()))
            bar.set_postfix({name: format_metric(name, value) for name, value in means.items()})
            shown_at = time.perf_counter()
        failure = None
        # Counted over the whole run, so epochs shorter than --log-every still get points; the epoch's last
        # step is recorded at its end (below), with the means over all ranks.
        global_step = position.epoch * steps_per_epoch + position.step
        if (config.log_every and context.is_main and global_step % config.log_every == 0
                and position.step < steps_per_epoch):
            sync_position(across_ranks=False)  # rank 0's own running means: no collective on one rank
            failure = non_finite_loss(position, config)
            if failure is None:
                metrics.write_step(step_record(position))
        # The check above ran on rank 0 alone: its verdict is part of the vote, so every rank stops with it.
        interrupted = stop.agreed(deadline, context, failing=failure is not None)
        if stop.failed:
            raise failure or RelreasonError("process 0 found a non-finite loss; see its message")
        if position.step < steps_per_epoch and (interrupted or (
                config.checkpoint_every and position.step % config.checkpoint_every == 0)):
            sync_position(across_ranks=True)
            saver.save(position)
        if interrupted and position.step < steps_per_epoch:
            bar.close()
            return None, True
    bar.close()
    sync_position(across_ranks=True)
    means = {name: total / max(position.step, 1) for name, total in position.totals.items()}
    record = {
        "epoch": position.epoch + 1,
        **{name: 100 * value if name.endswith("accuracy") else value for name, value in means.items()},
        "seconds": position.seconds,
        "views_per_second": position.views / position.seconds if position.seconds > 0 else 0.0,
        "lr": optimizer.param_groups[0]["lr"],
    }
    skip_log = getattr(dataset.dataset, "skip_log", None)
    if skip_log is not None:
        record["skipped_images"] = len(read_skip_log(skip_log))
        if record["skipped_images"]:
            log(f"skipped {record['skipped_images']} unreadable image(s) so far, each replaced by the next readable "
                f"one; their paths are in {skip_log}", context)
    shown = "  ".join(f"{name} {format_metric(name, value)}" for name, value in means.items())
    log(f"epoch {position.epoch + 1}/{config.epochs}  {shown}  {position.seconds:.1f}s  "
        f"{record['views_per_second']:.0f} views/s", context)
    if context.is_main:
        if config.log_every:
            metrics.write_step(step_record(position))  # the curve's point at the epoch's end
        metrics.write(record)  # before the checkpoint that moves past it: a kill in between cannot lose it
    position.next_epoch()
    saver.save(position)
    return record, stop.agreed(deadline, context)


def step_record(position: TrainingPosition) -> dict[str, float]:
    """The running means of the current epoch, placed in training time and epochs, for fine-grained curves."""
    means = {name: total / max(position.step, 1) for name, total in position.totals.items()}
    return {
        "epoch": position.epochs_done,
        "minutes": (position.past_seconds + position.seconds) / 60,
        **{name: 100 * value if name.endswith("accuracy") else value for name, value in means.items()},
    }


def format_metric(name: str, value: float) -> str:
    return f"{100 * value:.2f}%" if name.endswith("accuracy") else f"{value:.4f}"


def non_finite_loss(position: TrainingPosition, config: PretrainConfig) -> RelreasonError | None:
    """The error to stop with when the running loss is no longer finite, else None."""
    loss = position.totals.get("loss", 0.0)
    if math.isfinite(loss):
        return None
    return RelreasonError(
        f"the loss became {loss / max(position.step, 1)} in epoch {position.epoch + 1}; lower --lr or turn off "
        f"--amp fp16 (the last good checkpoint is kept in {config.output_dir})"
    )


def check_finite(position: TrainingPosition, config: PretrainConfig) -> None:
    """Stop before a checkpoint could store weights a non-finite loss has already spoilt."""
    failure = non_finite_loss(position, config)
    if failure is not None:
        raise failure


def plot_training_curves(history: list[dict[str, float]], path: Path) -> bool:
    """Loss and every accuracy per epoch as a PNG; skipped (returns False) without matplotlib."""
    if not history:
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    epochs = [r["epoch"] for r in history]
    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.2))
    left.plot(epochs, [r["loss"] for r in history], marker="o")
    left.set(xlabel="epoch", ylabel="loss", title="training loss")
    for key in (k for k in history[-1] if k.endswith("accuracy")):
        right.plot(epochs, [r.get(key, math.nan) for r in history], marker="o", label=key.replace("_", " "))
    right.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracies")
    right.legend(fontsize="small")
    figure.tight_layout()
    temporary = path.with_suffix(".tmp.png")
    figure.savefig(temporary, dpi=100)
    plt.close(figure)
    os.replace(temporary, path)
    return True
