"""The pretraining loop: one readable loop over K-view batches, with metrics, checkpoints and resume.

The trainer is one user of the building blocks (pairing, head, losses, backbones, K-view data); nothing
in those blocks imports it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from relreason.backbones import build_backbone
from relreason.checkpoint import (
    atomic_torch_save,
    atomic_write_bytes,
    atomic_write_json,
    load_checkpoint,
    rng_state,
    set_rng_state,
)
from relreason.data import MultiViewDataset, compute_normalization, dataset_info, load_dataset, relational_augmentation
from relreason.errors import RelreasonError
from relreason.losses import build_loss
from relreason.model import RelationalReasoning
from relreason.pairing import AGGREGATIONS, check_pairing_sizes

AMP_MODES = ("off", "bf16", "fp16")
CHECKPOINT_NAME = "checkpoint.pt"
BACKBONE_NAME = "backbone.pt"
BACKBONE_META_NAME = "backbone.json"
METRICS_NAME = "metrics.jsonl"


@dataclass
class PretrainConfig:
    """Every option of ``relreason pretrain``; the CLI and YAML configs fill it by field name."""

    dataset: str = "digits"
    data_root: str = "data"
    download: bool = False
    backbone: str = "conv4"
    image_size: int | None = None  # None: the dataset's native size
    num_views: int = 4  # K
    batch_size: int = 64
    epochs: int = 20
    lr: float = 1e-3
    weight_decay: float = 0.0
    loss: str = "bce"
    focal_gamma: float = 2.0
    focal_alpha: float = 0.5
    aggregation: str = "cat"
    head_hidden: int = 256
    seed: int = 0
    device: str = "auto"
    amp: str = "off"
    num_workers: int | None = None  # None: 0 on CPU (the cores train), up to 8 on CUDA
    output_dir: str = "runs/relreason"
    resume: bool = False
    time_limit: float | None = None  # minutes
    progress: bool = True
    tensorboard: bool = True

    def validate(self) -> None:
        """Refuse bad options with one line each, before any data is read or any file written."""
        check_pairing_sizes(self.num_views, self.batch_size)
        if self.epochs < 1:
            raise RelreasonError(f"--epochs must be >= 1, got {self.epochs}")
        if not self.lr > 0:
            raise RelreasonError(f"--lr must be > 0, got {self.lr}")
        if self.aggregation not in AGGREGATIONS:
            raise RelreasonError(f"unknown --aggregation '{self.aggregation}'; choose one of {', '.join(AGGREGATIONS)}")
        if self.amp not in AMP_MODES:
            raise RelreasonError(f"unknown --amp '{self.amp}'; choose one of {', '.join(AMP_MODES)}")
        if self.image_size is not None and self.image_size < 8:
            raise RelreasonError(f"--image-size must be >= 8, got {self.image_size}")
        if self.num_workers is not None and self.num_workers < 0:
            raise RelreasonError(f"--num-workers must be >= 0, got {self.num_workers}")
        if self.time_limit is not None and not self.time_limit > 0:
            raise RelreasonError(f"--time-limit must be > 0 minutes, got {self.time_limit}")
        build_loss(self.loss, self.focal_gamma, self.focal_alpha)
        dataset_info(self.dataset)
        resolve_device(self.device)


@dataclass
class PretrainResult:
    run_dir: Path
    epochs_done: int
    history: list[dict[str, float]]
    stopped_early: bool


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise RelreasonError(f"unknown --device '{name}'; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RelreasonError("--device cuda requested but no CUDA GPU is visible; use --device cpu")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def autocast_dtype(amp: str) -> torch.dtype | None:
    return {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def prepare_output_dir(config: PretrainConfig) -> Path:
    run_dir = Path(config.output_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise RelreasonError(f"output folder {run_dir} is not writable ({error.strerror}); choose another --output-dir") from None
    if (run_dir / CHECKPOINT_NAME).exists() and not config.resume:
        raise RelreasonError(
            f"{run_dir} already holds a training checkpoint; pass --resume to continue it or choose another --output-dir"
        )
    return run_dir


class MetricsLog:
    """Per-epoch metrics as JSON lines, mirrored to TensorBoard when it is installed."""

    def __init__(self, run_dir: Path, use_tensorboard: bool) -> None:
        self.path = run_dir / METRICS_NAME
        self.writer = None
        if use_tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                pass
            else:
                self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def write(self, record: dict[str, float]) -> None:
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key != "epoch":
                    self.writer.add_scalar(f"pretrain/{key}", value, record["epoch"])
            self.writer.flush()

    def read(self) -> list[dict[str, float]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def truncate_after(self, epoch: int) -> None:
        """Drop records of epochs a resumed run will redo (written after the checkpoint it resumes)."""
        kept = [r for r in self.read() if r["epoch"] <= epoch]
        atomic_write_bytes(self.path, "".join(json.dumps(r) + "\n" for r in kept).encode())

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def build_pretrain_data(config: PretrainConfig) -> tuple[MultiViewDataset, dict[str, Any]]:
    """The K-view pretraining set and the image geometry/normalisation the backbone is trained with."""
    info = dataset_info(config.dataset)
    dataset = load_dataset(config.dataset, config.data_root, info.pretrain_split, download=config.download)
    image_size = config.image_size or info.image_size
    if info.mean is None:
        mean, std = compute_normalization(dataset)
    else:
        mean, std = info.mean, info.std
    transform = relational_augmentation(image_size, mean, std)
    geometry = {"image_size": image_size, "mean": [float(m) for m in mean], "std": [float(s) for s in std]}
    return MultiViewDataset(dataset, transform, config.num_views), geometry


def make_loader(dataset: MultiViewDataset, config: PretrainConfig, epoch: int, device: torch.device) -> DataLoader:
    # Shuffle order and worker seeds depend on (seed, epoch) only, so a resumed epoch replays exactly.
    generator = torch.Generator().manual_seed(config.seed * 100_003 + epoch)
    return DataLoader(
        dataset,
        batch_size=config.batch_size,
        shuffle=True,
        generator=generator,
        num_workers=loader_workers(config.num_workers, device),
        # A last batch of one image would have no negatives: drop it rather than fail.
        drop_last=len(dataset) % config.batch_size == 1,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )


def loader_workers(requested: int | None, device: torch.device) -> int:
    if requested is not None:
        return requested
    # On CPU the training step already uses every core; extra augmentation processes only contend.
    return 0 if device.type == "cpu" else min(8, os.cpu_count() or 1)


def build_model(config: PretrainConfig, image_size: int) -> RelationalReasoning:
    backbone = build_backbone(config.backbone, image_size=image_size)
    loss = build_loss(config.loss, config.focal_gamma, config.focal_alpha)
    return RelationalReasoning(
        backbone, backbone.feature_dim, config.aggregation, config.head_hidden, loss, image_size=image_size
    )


def export_backbone(run_dir: Path, model: RelationalReasoning, config: PretrainConfig, geometry: dict, epochs_done: int) -> None:
    """The trained backbone alone, as a plain state_dict, plus what is needed to rebuild and feed it."""
    state = {k: v.detach().cpu() for k, v in model.backbone.state_dict().items()}
    atomic_torch_save(state, run_dir / BACKBONE_NAME)
    meta = {
        "backbone": config.backbone,
        "feature_dim": model.feature_dim,
        "dataset": config.dataset,
        "epochs": epochs_done,
        "num_views": config.num_views,
        "seed": config.seed,
        **geometry,
    }
    atomic_write_json(run_dir / BACKBONE_META_NAME, meta)


def _model_fields(config: PretrainConfig) -> dict[str, Any]:
    return {k: getattr(config, k) for k in ("backbone", "aggregation", "head_hidden", "dataset", "image_size")}


def pretrain(config: PretrainConfig) -> PretrainResult:
    """Train ``config.backbone`` with relational reasoning on ``config.dataset``; see ``PretrainConfig``."""
    config.validate()
    device = resolve_device(config.device)
    run_dir = prepare_output_dir(config)
    seed_everything(config.seed)
    dataset, geometry = build_pretrain_data(config)
    if len(dataset) < 2:
        raise RelreasonError(f"dataset '{config.dataset}' has {len(dataset)} image(s); relational reasoning needs at least 2")
    model = build_model(config, geometry["image_size"]).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    amp_dtype = autocast_dtype(config.amp)
    scaler = torch.amp.GradScaler(device.type, enabled=config.amp == "fp16")
    metrics = MetricsLog(run_dir, config.tensorboard)

    start_epoch = 0
    checkpoint_path = run_dir / CHECKPOINT_NAME
    if config.resume and checkpoint_path.exists():
        checkpoint = load_checkpoint(checkpoint_path)
        saved = checkpoint.get("config", {})
        mismatched = {k: (saved.get(k), v) for k, v in _model_fields(config).items() if saved.get(k) != v}
        if mismatched:
            detail = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in mismatched.items())
            raise RelreasonError(f"cannot resume {checkpoint_path}: options differ ({detail}); use the original options")
        model.backbone.load_state_dict(checkpoint["backbone"])
        model.relation_head.load_state_dict(checkpoint["relation_head"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scaler.load_state_dict(checkpoint["scaler"])
        set_rng_state(checkpoint["rng"])
        start_epoch = checkpoint["epoch"]
        metrics.truncate_after(start_epoch)
        print(f"resuming {checkpoint_path} after epoch {start_epoch}", file=sys.stderr)
    elif config.resume:
        print(f"no checkpoint in {run_dir}; starting from scratch", file=sys.stderr)

    atomic_write_json(run_dir / "config.json", dataclasses.asdict(config) | {"geometry": geometry})
    started = time.monotonic()
    deadline = started + config.time_limit * 60 if config.time_limit else math.inf
    stopped_early = False
    epoch = start_epoch
    for epoch in range(start_epoch, config.epochs):
        record, stopped_early = train_one_epoch(
            model, optimizer, scaler, dataset, config, epoch, device, amp_dtype, deadline
        )
        if stopped_early:
            break
        metrics.write(record)
        atomic_torch_save(
            {
                "backbone": model.backbone.state_dict(),
                "relation_head": model.relation_head.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(),
                "epoch": epoch + 1,
                "config": dataclasses.asdict(config),
                "geometry": geometry,
                "rng": rng_state(),
            },
            checkpoint_path,
        )
        epoch += 1
    epochs_done = epoch
    export_backbone(run_dir, model, config, geometry, epochs_done)
    metrics.close()
    history = metrics.read()
    plot_training_curves(history, run_dir / "training_curves.png")
    if stopped_early:
        print(
            f"time limit of {config.time_limit} min reached during epoch {epochs_done + 1}; "
            f"exported the current backbone, checkpoint holds epoch {epochs_done}",
            file=sys.stderr,
        )
    return PretrainResult(run_dir, epochs_done, history, stopped_early)


def train_one_epoch(
    model: RelationalReasoning,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    dataset: MultiViewDataset,
    config: PretrainConfig,
    epoch: int,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    deadline: float,
) -> tuple[dict[str, float], bool]:
    """One pass over the data. Returns the epoch's metrics and whether the time limit cut it short."""
    model.train()
    loader = make_loader(dataset, config, epoch, device)
    # Sums stay on the device: reading them every step would stall a GPU on each batch.
    totals = torch.zeros(4, device=device, dtype=torch.float64)
    steps = 0
    views_seen = 0
    started = time.perf_counter()
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{config.epochs}", disable=not config.progress, leave=False, dynamic_ncols=True)
    for views, _ in bar:
        if time.monotonic() > deadline:
            bar.close()
            return {}, True
        views = [v.to(device, non_blocking=True) for v in views]
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            out = model(views)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(out.loss).backward()
        scaler.step(optimizer)
        scaler.update()
        totals += torch.stack([out.loss.detach(), out.accuracy, out.positive_accuracy, out.negative_accuracy]).double()
        steps += 1
        views_seen += len(views) * views[0].shape[0]
        if config.progress and (steps % 10 == 1 or steps == len(loader)):
            loss, accuracy = (totals[:2] / steps).tolist()
            bar.set_postfix(loss=f"{loss:.4f}", rel_acc=f"{100 * accuracy:.1f}%")
    bar.close()
    seconds = time.perf_counter() - started
    loss, accuracy, positive, negative = (totals / max(steps, 1)).tolist()
    if not math.isfinite(loss):
        raise RelreasonError(
            f"the loss became {loss} in epoch {epoch + 1}; lower --lr or turn off --amp fp16 "
            f"(the last good checkpoint is kept in {config.output_dir})"
        )
    record = {
        "epoch": epoch + 1,
        "loss": loss,
        "relation_accuracy": 100 * accuracy,
        "positive_accuracy": 100 * positive,
        "negative_accuracy": 100 * negative,
        "seconds": seconds,
        "views_per_second": views_seen / seconds if seconds > 0 else 0.0,
        "lr": optimizer.param_groups[0]["lr"],
    }
    print(
        f"epoch {epoch + 1}/{config.epochs}  loss {loss:.4f}  relation acc {100 * accuracy:.2f}% "
        f"(+ {100 * positive:.1f}%, - {100 * negative:.1f}%)  {seconds:.1f}s  {record['views_per_second']:.0f} views/s",
        flush=True,
    )
    return record, False


def plot_training_curves(history: list[dict[str, float]], path: Path) -> bool:
    """Loss and relation accuracy per epoch as a PNG; skipped (returns False) without matplotlib."""
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
    left.set(xlabel="epoch", ylabel="loss", title="relation loss")
    for key, label in (("relation_accuracy", "all"), ("positive_accuracy", "positives"), ("negative_accuracy", "negatives")):
        right.plot(epochs, [r[key] for r in history], marker="o", label=label)
    right.set(xlabel="epoch", ylabel="accuracy (%)", title="relation accuracy")
    right.legend()
    figure.tight_layout()
    buffer_path = path.with_suffix(".tmp.png")
    figure.savefig(buffer_path, dpi=100)
    plt.close(figure)
    os.replace(buffer_path, path)
    return True
