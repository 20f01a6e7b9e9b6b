"""K views per image made a batch at a time on the device, from images kept there as one uint8 tensor."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import Subset

from relreason.checks import check_positive_int, whole_number
from relreason.data.batch_augment import BatchRelationalAugmentation
from relreason.data.sized_dataset import SizedDataset
from relreason.errors import RelreasonError, format_bytes
from relreason.seeding import check_optional_seed, mix_seed

__all__ = ["BatchViewLoader", "DeviceMultiViewDataset", "images_as_tensor"]


def images_as_tensor(dataset: SizedDataset, keep_grey: bool = False) -> torch.Tensor:
    """The images of an in-memory dataset as one ``(N, 3, H, W)`` uint8 tensor: relreason's ``ArrayImageDataset``
    (its ``images``), a torchvision dataset that keeps its images as one uint8 array and has no ``transform`` or
    ``target_transform`` of its own (its ``data``: MNIST, Fashion-MNIST, CIFAR, SVHN, STL-10), or a ``Subset`` of
    either.

    A grey dataset comes as three equal channels, or with ``keep_grey`` as ``(N, 1, H, W)``: a third of the
    memory, and ``BatchRelationalAugmentation`` makes its views at a third of the cost."""
    images = _through_subsets(dataset, _image_array)
    if images is None:
        raise RelreasonError(
            f"{type(dataset).__name__} does not hold its images as one uint8 array (an ArrayImageDataset's images, "
            "a torchvision dataset's data without a transform), so views cannot be made on the device; use "
            "per-image torchvision transforms for this dataset (MultiViewDataset; on the command line, --augment pil)"
        )
    tensor = torch.from_numpy(np.ascontiguousarray(images))
    if tensor.dim() == 4 and tensor.shape[3] == 1:
        tensor = tensor[..., 0]
    if tensor.dim() == 3:  # grey: three equal channels, as the PIL path's convert("RGB")
        return tensor[:, None] if keep_grey else tensor[:, None].expand(-1, 3, -1, -1).contiguous()
    return tensor.permute(0, 3, 1, 2).contiguous()


def _through_subsets(dataset: Any, read: Callable[[Any], np.ndarray | None]) -> np.ndarray | None:
    """``read(dataset)``, or for a ``Subset`` (of a subset ...) the rows of what ``read`` gives for the whole."""
    if isinstance(dataset, Subset):
        whole = _through_subsets(dataset.dataset, read)
        return None if whole is None else whole[np.asarray(dataset.indices, dtype=np.int64)]
    return read(dataset)


def _image_array(dataset: Any) -> np.ndarray | None:
    """The dataset's images as one uint8 array, ``(N, H, W)`` or ``(N, H, W, C)``; None when it keeps none."""
    images = getattr(dataset, "images", None)
    transforms = (getattr(dataset, "transform", None), getattr(dataset, "target_transform", None))
    if images is None and transforms == (None, None):  # a transform of its own would be passed over
        images = getattr(dataset, "data", None)
        if isinstance(images, torch.Tensor):
            images = images.numpy()
        # STL-10 and SVHN keep theirs channels first; MNIST's and CIFAR's are (N, H, W[, C]) as PIL reads them.
        if isinstance(images, np.ndarray) and images.ndim == 4:
            first, last = images.shape[1] in (1, 3), images.shape[3] in (1, 3, 4)
            if first and last:
                raise RelreasonError(f"{type(dataset).__name__}'s data of shape {images.shape} reads as channels "
                                     "first and as channels last; pass an ArrayImageDataset of (N, H, W, C) images")
            images = images.transpose(0, 2, 3, 1) if first else images
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim not in (3, 4):
        return None
    return images


def labels_of(dataset: Any) -> np.ndarray | None:
    """The labels of a dataset ``images_as_tensor`` reads (``labels``, or a torchvision dataset's ``targets``)."""
    return _through_subsets(dataset, _labels)


def _labels(dataset: Any) -> np.ndarray | None:
    labels = getattr(dataset, "labels", None)
    if labels is None:
        labels = getattr(dataset, "targets", None)
    if isinstance(labels, torch.Tensor):
        labels = labels.numpy()
    return None if labels is None else np.asarray(labels)


def free_device_memory(device: torch.device) -> int | None:
    """Free bytes on a CUDA device, None elsewhere (the host's memory is checked where images are decoded)."""
    return torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None


def check_fits_on_device(nbytes: int, device: torch.device, share: float = 0.5) -> None:
    """Refuse, in one line, a dataset that would take more than ``share`` of the device's free memory, leaving
    too little for the step itself."""
    free = free_device_memory(device)
    if free is not None and nbytes > share * free:
        raise RelreasonError(
            f"the images take {format_bytes(nbytes)} on {device} and {format_bytes(free)} is free; use --augment pil "
            "(views made on the CPU from images kept in host memory)"
        )


def check_batch_augmentation(augmentation: Any) -> None:
    """A one-line error unless ``augmentation`` can be called as ``augmentation(images, num_views, generator)``, the
    way a ``BatchRelationalAugmentation`` is: a per-image transform would fail only at the first batch."""
    if isinstance(augmentation, BatchRelationalAugmentation):
        return
    try:
        inspect.signature(augmentation).bind(None, 1, None)
    except TypeError:
        raise RelreasonError(
            f"the augmentation must be called as augmentation(uint8 images, num_views, generator) on a whole batch, "
            f"got {type(augmentation).__name__}; use BatchRelationalAugmentation, or MultiViewDataset for a per-image "
            "transform"
        ) from None
    except ValueError:  # no signature to read (a builtin): the first batch will tell
        pass


class DeviceMultiViewDataset:
    """A labelled image set held on ``device`` as uint8, and the batched augmentation that makes its views.

    ``views(indices, generator)`` returns ``(K, B, 3, S, S)`` float views and the ``(B,)`` labels. The source
    dataset stays reachable as ``.dataset`` (its labels, classes), as with ``MultiViewDataset``. With ``seed``
    None, ``BatchViewLoader`` draws the views from PyTorch's global generator (not reproducible by themselves).
    """

    def __init__(
        self,
        dataset: SizedDataset,
        augmentation: BatchRelationalAugmentation,
        num_views: int,
        seed: int | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        num_views = check_positive_int(num_views, "the number of views per image", example=4)
        check_batch_augmentation(augmentation)
        self.dataset = dataset
        self.augmentation = augmentation
        self.num_views = num_views
        self.seed = check_optional_seed(seed)
        self.device = torch.device(device)
        images = images_as_tensor(dataset, keep_grey=True)
        check_fits_on_device(images.nbytes, self.device)
        self.images = images.to(self.device)
        labels = labels_of(dataset)
        labels = np.full(len(self.images), -1) if labels is None else labels
        self.labels = torch.as_tensor(labels, dtype=torch.long).to(self.device)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Views differ from epoch to epoch (with a seed, they follow ``(seed, epoch, step)``); call before each
        epoch."""
        self.epoch = whole_number(epoch, "epoch")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def views(self, indices: torch.Tensor | Sequence[int], generator: torch.Generator | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``(K, B, 3, S, S)`` views and ``(B,)`` labels of the images at ``indices`` (integer positions, a
        tensor or a list), their random parameters drawn from ``generator`` (PyTorch's global one when None)."""
        indices = torch.as_tensor(indices)  # a list of indices as well
        # as_tensor(dtype=long) would read a mask as positions 0 and 1, and truncate 1.7 to 1, in silence
        if indices.dtype == torch.bool:
            raise RelreasonError("views() takes integer image positions, got a boolean mask; turn it into positions "
                                 "with mask.nonzero().squeeze(1)")
        if (indices.is_floating_point() or indices.is_complex()) and indices.numel():  # [] reads as float
            raise RelreasonError(f"views() takes integer image positions, got {indices.dtype} ones; pass integers "
                                 "(indices.long() where they are whole)")
        indices = indices.long()
        if indices.device.type == "cpu" and indices.numel():  # on the CPU, the range costs no device sync to check
            low, high = int(indices.min()), int(indices.max())
            if low < 0 or high >= len(self):
                raise RelreasonError(f"image positions must lie in [0, {len(self)}) for this dataset of {len(self)} "
                                     f"images, got {low if low < 0 else high}")
        if self.device.type == "cuda" and indices.device.type == "cpu":
            # From pageable memory the driver may wait for the stream before it stages the copy; pinned, never.
            indices = indices.pin_memory()
        indices = indices.to(self.device, non_blocking=True)
        batch = self.images.index_select(0, indices)
        return self.augmentation(batch, self.num_views, generator), self.labels.index_select(0, indices)


class SizedBatches(Protocol):
    """A batch sampler: batches of dataset positions, and how many there are."""

    def __iter__(self) -> Iterator[Sequence[int]]: ...

    def __len__(self) -> int: ...


class BatchViewLoader:
    """Iterates over ``(views, labels)`` for the batches of ``batch_sampler``, each made in one go on the device.

    The random parameters of step ``s`` come from a generator seeded by ``(seed, epoch, s, rank)`` alone, so
    a resumed epoch makes exactly the views it would have made (a dataset without a seed: PyTorch's global one).
    """

    def __init__(self, dataset: DeviceMultiViewDataset, batch_sampler: SizedBatches, rank: int = 0) -> None:
        self.dataset = dataset
        self.batch_sampler = batch_sampler
        self.rank = rank
        self.generator = torch.Generator(device=dataset.device)

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        sampler = self.batch_sampler
        # A resumable sampler (EpochBatchSampler) starts mid-epoch; any other batch sampler from step 0.
        for step, indices in enumerate(sampler, start=getattr(sampler, "start_step", 0)):
            generator = None
            if self.dataset.seed is not None:
                generator = self.generator
                generator.manual_seed(mix_seed(self.dataset.seed, self.dataset.epoch, step, self.rank))
            yield self.dataset.views(torch.as_tensor(indices, dtype=torch.long), generator)
