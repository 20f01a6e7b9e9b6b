"""The pretraining images as K-view batches: batched views on the device or torchvision's per image."""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any, cast

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from relreason.data import (
    ImageFolderDataset,
    MultiViewDataset,
    compute_normalization,
    dataset_info,
    held_out_split,
    load_dataset,
    relational_augmentation,
)
from relreason.data.array_dataset import ArrayImageDataset
from relreason.data.batch_augment import AugmentationRecipe, BatchRelationalAugmentation
from relreason.data.batch_views import BatchViewLoader, DeviceMultiViewDataset
from relreason.data.datasets import NORMALIZATION_METHOD
from relreason.data.decoded_folder import DecodedImageFolder
from relreason.data.image_folder import decoded_for, describe_left_out
from relreason.data.sampler import EpochBatchSampler
from relreason.data.sized_dataset import SizedDataset
from relreason.data.splits import TEST_DIR_NAMES
from relreason.data.transforms import smallest_crop_side
from relreason.distributed import DistributedContext
from relreason.errors import RelreasonError
from relreason.launch import is_first_process
from relreason.methods import method_class
from relreason.seeding import mix_seed
from relreason.train.config import PretrainConfig, views_used
from relreason.train.position import TrainingPosition
from relreason.train.stop import ignore_stop_signals, stop_signals_held

DOWNLOAD_TIMEOUT = datetime.timedelta(hours=12)  # how long the other ranks wait for a --download
_LOADER_STREAM = 0x10AD  # keeps the loader's seeds apart from the views' (seed, epoch, index) ones


def build_pretrain_data(
    config: PretrainConfig,
    device: torch.device = torch.device("cpu"),
    check_geometry: Callable[[dict[str, Any], Callable[[str], Any]], None] | None = None,
    context: DistributedContext = DistributedContext(),
) -> tuple[MultiViewDataset | DeviceMultiViewDataset, dict[str, Any]]:
    """The multi-view pretraining set and the image geometry/normalisation the backbone is trained with.

    In-memory datasets get their views made in batches on ``device`` (``--augment tensor``, the default for
    them; an image folder is decoded into memory at the training size first); image folders by default, or
    ``--augment pil``, get torchvision's per-image transforms in a DataLoader. ``check_geometry`` sees the
    geometry before a folder is decoded (which may take minutes), so that a resume it refuses is refused early,
    and a function that takes the images' statistics another way (``compute_normalization``'s ``method``).
    Under torchrun (``context``) a ``--download`` is made by one process at a time (:func:`load_downloading_once`).
    """
    info = dataset_info(config.dataset)
    method = method_class(config.method)
    # Supervised pretraining needs the labelled split (STL-10's unlabelled split has none).
    split = info.train_split if method is not None and method.needs_labels else info.pretrain_split
    dataset: SizedDataset
    if config.test_fraction is not None:  # the rest of the folder is for evaluate alone
        dataset = held_out_split(config.dataset, config.data_root, config.test_fraction)[0]
    else:
        dataset = load_downloading_once(config, split, context)
    image_size = config.image_size or info.image_size
    mean: Sequence[float]
    std: Sequence[float]
    if info.mean is None or info.std is None:
        mean, std = compute_normalization(dataset)
    else:
        mean, std = info.mean, info.std
    views = max(views_used(config), 1)
    batched = config.augment == "tensor" or (config.augment == "auto" and isinstance(dataset, ArrayImageDataset))
    batched = batched and not (method is None and isinstance(dataset, ImageFolderDataset))  # 'random' makes no views
    geometry: dict[str, Any] = {"image_size": image_size, "mean": [float(m) for m in mean], "std": [float(s) for s in std],
                "augment": "tensor" if batched else "pil"}  # the path taken, which 'auto' does not say
    if info.mean is None:
        geometry["normalization"] = NORMALIZATION_METHOD  # how the statistics were taken from the images
    if check_geometry is not None:
        # A resumed run may keep the normalisation it started with.
        check_geometry(geometry, lambda method: compute_normalization(dataset, method=method))
        mean, std = geometry["mean"], geometry["std"]
    if batched and isinstance(dataset, ImageFolderDataset):
        # Under torchrun every process decodes its own copy; process 0 alone shows how far it is.
        dataset = DecodedImageFolder(dataset, image_size, progress=config.progress and is_first_process())
    if batched:
        recipe = AugmentationRecipe.from_options(config.min_crop_scale, config.jitter_strength)
        augmentation = BatchRelationalAugmentation(image_size, mean, std, recipe, compile=config.compile)
        return DeviceMultiViewDataset(dataset, augmentation, views, config.seed, device), geometry
    transform = relational_augmentation(image_size, mean, std, config.min_crop_scale, config.jitter_strength)
    dataset = decoded_for(dataset, image_size, smallest_crop_side(config.min_crop_scale))  # its crops' pixels, no more
    return MultiViewDataset(dataset, transform, views, seed=config.seed), geometry


def load_downloading_once(config: PretrainConfig, split: str, context: DistributedContext) -> Any:
    """``load_dataset`` of the run's dataset; under torchrun with ``--download``, rank 0 fetches the files while the
    others wait, then the first process of every other machine fetches them where they are not (a data root on
    each machine's own disk; on a shared one they are there already), then the rest read them: torchvision writes
    an archive straight to its final name, so processes fetching at once would write over each other's file."""
    if not (config.download and context.enabled):
        return load_dataset(config.dataset, config.data_root, split, download=config.download)
    # A group of its own, patient beyond the default half hour (a large archive can take longer than that), made
    # before the download: making it is itself a wait for every rank.
    patient = cast(dist.ProcessGroup, dist.new_group(backend="gloo", timeout=DOWNLOAD_TIMEOUT))  # every rank's
    dataset = None
    try:
        for fetches in (context.is_main, context.local_rank == 0 and not context.is_main):
            error = None
            if fetches:
                try:
                    dataset = load_dataset(config.dataset, config.data_root, split, download=True)
                except RelreasonError as failure:
                    error = str(failure)
            errors: list[str | None] = [None] * context.world_size
            dist.all_gather_object(errors, error, group=patient)
            failed = next((e for e in errors if e is not None), None)
            if failed is not None:  # every rank stops with it, rather than waiting for ever
                raise RelreasonError(failed)
    finally:
        dist.destroy_process_group(patient)
    return dataset if dataset is not None else load_dataset(config.dataset, config.data_root, split, download=False)


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
        worker_init_fn=ignore_stop_signals,
        # Its own generator: each iter() draws the workers' base seed, which from the global one would put a run
        # resumed mid-epoch one draw ahead of an uninterrupted one (a method's dropout would then differ). The
        # views do not depend on it: each image's come from (seed, epoch, index).
        generator=torch.Generator().manual_seed(mix_seed(config.seed, position.epoch, context.rank, _LOADER_STREAM)),
    )


@contextlib.contextmanager
def loader_batches(loader: DataLoader | BatchViewLoader) -> Iterator[Iterator]:
    """The loader's batches, its workers started with the stop signals held (``stop_signals_held``) and shut down
    on the way out, also when an error escapes: they ignore SIGTERM, so the interpreter's exit could not end
    them, and a crash would hang instead of exiting."""
    with stop_signals_held():
        batches = iter(loader)
    try:
        yield batches
    finally:
        shutdown = getattr(batches, "_shutdown_workers", None)  # PyTorch's multi-process iterator
        if shutdown is not None:
            shutdown()


def loader_workers(requested: int | None, device: torch.device) -> int:
    """DataLoader workers for the per-image path: ``requested`` (--num-workers), else none on a CPU and up to 8 on
    CUDA."""
    if requested is not None:
        return requested
    # On CPU the training step already uses every core; extra augmentation processes only contend.
    return 0 if device.type == "cpu" else min(8, os.cpu_count() or 1)


def num_classes_of(dataset: MultiViewDataset | DeviceMultiViewDataset) -> int | None:
    """The number of classes of the pretraining labels; None without labels, or with one class (a folder of
    one subfolder: no classes to tell apart, so no online probe)."""
    labels = getattr(dataset.dataset, "labels", None)
    if labels is None or len(labels) == 0:
        return None
    count = int(np.max(labels)) + 1
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
    if folder.left_out:
        about += (f"; left out: {describe_left_out(folder.left_out)}, which relreason does not read (convert them to "
                  "JPEG or PNG to use them)")
    return f"image folder {folder.root}: {images}, {about}"


def no_labels_error(name: str, method: str = "supervised") -> RelreasonError:
    return RelreasonError(f"--method {method} needs labels and dataset '{name}' has none; "
                          "choose a labelled dataset or another method")


def check_every_image_labelled(dataset: MultiViewDataset | DeviceMultiViewDataset, name: str,
                               method: str = "supervised") -> None:
    """A one-line error unless every image of ``dataset`` has a label (unlabelled images are marked -1)."""
    labels = getattr(dataset.dataset, "labels", None)
    if labels is None or len(labels) == 0:
        raise no_labels_error(name, method)
    missing = int((np.asarray(labels) < 0).sum())
    if not missing and len(np.unique(np.asarray(labels))) < 2:
        raise RelreasonError(f"--method {method} needs images of at least 2 classes, and dataset '{name}' has one; "
                             "give one subfolder per class, or choose another method")
    if missing:
        raise RelreasonError(
            f"--method {method} needs a label for every image, and {missing} image(s) of dataset '{name}' have "
            "none; choose a labelled dataset/split or another method"
        )
