"""Fine-tuning: a linear head on the backbone, both trained with labels (the backbone is not frozen)."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset
from torchvision import transforms as T
from tqdm import tqdm

from relreason.errors import RelreasonError
from relreason.protocols._common import (
    TransformedDataset,
    as_device,
    check_positive_float,
    check_positive_int,
    check_seed,
    module_dtype,
)
from relreason.seeding import seed_torch

__all__ = [
    "FINETUNE_BATCH_SIZE",
    "FINETUNE_LR_DECAY",
    "FINETUNE_MILESTONES",
    "fine_tune",
    "finetune_milestones",
    "finetune_transform",
]

#: Points of training (fractions of the epochs) where both learning rates are multiplied by FINETUNE_LR_DECAY.
FINETUNE_MILESTONES: tuple[float, ...] = (0.5, 0.75)
FINETUNE_LR_DECAY = 0.1
FINETUNE_BATCH_SIZE = 128


def finetune_transform(image_size: int, mean: Sequence[float], std: Sequence[float]) -> T.Compose:
    """Light crop-and-flip augmentation for fine-tuning.

    Resize the short side and centre-crop to ``image_size`` (as the evaluation transform),
    then a random ``image_size`` crop of the image zero-padded by ``max(1, round(image_size / 8))``
    pixels per side (4 at 32 px, the usual CIFAR recipe), a horizontal flip with probability
    0.5, ToTensor and Normalize.
    """
    from relreason.data import ToRGB, eval_transform
    from relreason.data.transforms import square_crop

    eval_transform(image_size, mean, std)  # the same checks of size, mean and std
    padding = max(1, round(image_size / 8))
    return T.Compose(
        [
            ToRGB(),
            *square_crop(image_size).transforms,  # as evaluation sees the image, then the padded crop
            T.RandomCrop(image_size, padding=padding),
            T.RandomHorizontalFlip(p=0.5),
            T.ToTensor(),
            T.Normalize(tuple(float(m) for m in mean), tuple(float(s) for s in std)),
        ]
    )


def finetune_milestones(epochs: int) -> list[int]:
    """Epochs (0-based) from which the learning rates are decayed once more: ``ceil(f * epochs)``.

    An epoch runs at the decayed rate when it starts at or after the milestone point, so 100
    epochs decay at 50 and 75 and 4 epochs run at ``[lr, lr, 0.1 lr, 0.01 lr]``.
    """
    return [math.ceil(f * epochs) for f in FINETUNE_MILESTONES]


def _dataset_labels(dataset: Any) -> np.ndarray | None:
    labels = getattr(dataset, "labels", None)
    return None if labels is None else np.asarray(labels)


def _check_labels(dataset: Any, indices: np.ndarray | None, num_classes: int, name: str) -> None:
    labels = _dataset_labels(dataset)
    if labels is None:
        return
    if indices is not None:
        labels = labels[indices]
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise RelreasonError(
            f"{name} has labels outside 0..{num_classes - 1} (found {int(labels.min())}..{int(labels.max())}); "
            "pass num_classes > the largest label and a fully labelled split"
        )


def _accuracy(model: nn.Module, head: nn.Linear, dataset: Any, transform: Callable[[Any], Any] | None,
              batch_size: int, device: torch.device, num_workers: int) -> float:
    loader = DataLoader(TransformedDataset(dataset, transform), batch_size=batch_size, shuffle=False,
                        num_workers=num_workers, pin_memory=device.type == "cuda")
    model.eval()
    head.eval()
    correct = total = 0
    dtype = module_dtype(model)
    with torch.no_grad():
        for images, labels in loader:
            out = model(images.to(device, dtype, non_blocking=True))
            predictions = head(out.reshape(out.shape[0], -1)).argmax(dim=1).cpu()
            correct += int((predictions == labels).sum())
            total += labels.shape[0]
    return 100.0 * correct / total


def fine_tune(
    backbone: nn.Module,
    train_set: Any,
    test_set: Any,
    train_transform: Callable[[Any], Any] | None,
    test_transform: Callable[[Any], Any] | None,
    num_classes: int,
    epochs: int = 20,
    backbone_lr: float = 1e-4,
    head_lr: float = 1e-3,
    batch_size: int = FINETUNE_BATCH_SIZE,
    seed: int = 0,
    device: str | torch.device = "cpu",
    label_indices: Any = None,
    num_workers: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Train a copy of ``backbone`` with a new ``nn.Linear`` head on labelled images; test it.

    Adam with two parameter groups (backbone at ``backbone_lr``, head at ``head_lr``),
    cross-entropy on shuffled mini-batches of ``train_transform``-ed images; both learning
    rates are multiplied by 0.1 at 50% and 75% of the epochs (``MultiStepLR`` stepped once per
    epoch, milestones :func:`finetune_milestones`).  BatchNorm layers train as usual; a last
    batch of a single image is dropped (BatchNorm cannot train on one).  ``label_indices``
    restricts training to those items of ``train_set`` (e.g. :func:`few_label_indices`).

    The caller's ``backbone`` is deep-copied and never modified.  Initialisation, shuffling
    and augmentation draw from RNGs seeded with ``seed`` inside ``torch.random.fork_rng``, so
    the global RNG state is left as it was.

    Returns ``{"train_accuracy", "test_accuracy"}`` in percent (both measured in eval mode with
    ``test_transform``; train accuracy on the images trained on), ``"train_size"``, ``"epochs"``
    and ``"lr_history": {"backbone": [...], "head": [...]}`` -- the learning rate each group
    used in each epoch, read from the optimizer.
    """
    if not isinstance(backbone, nn.Module):
        raise RelreasonError(f"backbone must be a torch.nn.Module, got {type(backbone).__name__}")
    num_classes = check_positive_int(num_classes, "num_classes")
    epochs = check_positive_int(epochs, "epochs")
    backbone_lr = check_positive_float(backbone_lr, "backbone_lr")
    head_lr = check_positive_float(head_lr, "head_lr")
    batch_size = check_positive_int(batch_size, "batch_size")
    seed = check_seed(seed)
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise RelreasonError(f"num_workers must be a non-negative integer, got {num_workers!r}")
    target = as_device(device)

    n_train = len(train_set)
    indices = None
    if label_indices is not None:
        indices = np.asarray(label_indices)
        if indices.ndim != 1 or indices.dtype.kind not in "iu":
            raise RelreasonError("label_indices must be a 1-D array of integer indices; pass few_label_indices(...)")
        if indices.size and (indices.min() < 0 or indices.max() >= n_train):
            raise RelreasonError(
                f"label_indices must lie in 0..{n_train - 1} (the training set's size is {n_train}); "
                "compute them from this training set's labels"
            )
        train_base = Subset(train_set, indices.tolist())
    else:
        train_base = train_set
    if len(train_base) == 0:
        raise RelreasonError("the fine-tuning training set is empty; check the dataset or label_indices")
    if len(test_set) == 0:
        raise RelreasonError("the fine-tuning test set is empty; check the dataset's test split")
    _check_labels(train_set, indices, num_classes, "the training set")
    _check_labels(test_set, None, num_classes, "the test set")

    cuda_devices = [target.index if target.index is not None else torch.cuda.current_device()] \
        if target.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_devices):
        seed_torch(seed, target)
        model = copy.deepcopy(backbone).to(target)
        model.requires_grad_(True)
        model.eval()
        with torch.no_grad():  # one image tells the feature width
            sample = TransformedDataset(train_base, test_transform)[0][0].unsqueeze(0)
            dtype = module_dtype(model)  # images and head in the backbone's own dtype
            feature_dim = model(sample.to(target, dtype)).reshape(1, -1).shape[1]
        head = nn.Linear(feature_dim, num_classes).to(target, dtype)
        optimizer = torch.optim.Adam(
            [
                {"params": list(model.parameters()), "lr": backbone_lr, "name": "backbone"},
                {"params": list(head.parameters()), "lr": head_lr, "name": "head"},
            ]
        )
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, finetune_milestones(epochs), gamma=FINETUNE_LR_DECAY)
        loader = DataLoader(
            TransformedDataset(train_base, train_transform),
            batch_size=batch_size,
            shuffle=True,
            drop_last=len(train_base) % batch_size == 1 and len(train_base) > 1,
            generator=torch.Generator().manual_seed(seed),
            num_workers=num_workers,
            pin_memory=target.type == "cuda",
        )
        history: dict[str, list[float]] = {group["name"]: [] for group in optimizer.param_groups}
        with torch.enable_grad():
            for _ in tqdm(range(epochs), desc="fine-tuning", unit="epoch", disable=None if progress else True,
                          leave=False):
                for group in optimizer.param_groups:
                    history[group["name"]].append(float(group["lr"]))
                model.train()
                head.train()
                for images, labels in loader:
                    out = model(images.to(target, dtype, non_blocking=True))
                    loss = F.cross_entropy(head(out.reshape(out.shape[0], -1)), labels.to(target))
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                scheduler.step()
        eval_batch = max(batch_size, 256)
        train_accuracy = _accuracy(model, head, train_base, test_transform, eval_batch, target, num_workers)
        test_accuracy = _accuracy(model, head, test_set, test_transform, eval_batch, target, num_workers)

    return {
        "train_accuracy": train_accuracy,
        "test_accuracy": test_accuracy,
        "train_size": len(train_base),
        "epochs": epochs,
        "lr_history": history,
    }
