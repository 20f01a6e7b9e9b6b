"""Input checks and small helpers shared by the protocol modules and :mod:`relreason.evaluate`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from relreason.checks import check_positive_float, check_positive_int  # noqa: F401 (the protocols' import of them)
from relreason.device import precise_float  # noqa: F401 (the protocols' import of it)
from relreason.errors import RelreasonError
from relreason.seeding import check_seed  # noqa: F401 - the protocols' seed check, shared with training


def as_features(x: Any, name: str) -> torch.Tensor:
    """Return ``x`` as a finite float32 (N, d) CPU tensor with N >= 1, or raise RelreasonError."""
    try:
        t = torch.as_tensor(x)
    except Exception as exc:  # noqa: BLE001 - reported to the user as one line
        raise RelreasonError(
            f"{name} could not be converted to a tensor ({type(x).__name__}); pass a (N, d) "
            "torch.Tensor or numpy array"
        ) from exc
    if t.dim() != 2:
        raise RelreasonError(
            f"{name} must be 2-D (N, d) but has shape {tuple(t.shape)}; flatten the backbone "
            "output per sample"
        )
    if t.shape[0] == 0 or t.shape[1] == 0:
        raise RelreasonError(f"{name} is empty (shape {tuple(t.shape)}); pass at least one sample and one feature")
    if t.dtype == torch.bool or t.is_complex():
        raise RelreasonError(f"{name} has dtype {t.dtype}; pass real-valued features")
    t = t.detach().to(device="cpu", dtype=torch.float32)
    if not torch.isfinite(t).all():
        raise RelreasonError(
            f"{name} contains NaN or infinite values; check the backbone and checkpoint that produced them"
        )
    return t


def as_labels(y: Any, n: int, name: str) -> torch.Tensor:
    """Return ``y`` as an int64 (N,) CPU tensor of non-negative class indices, or raise."""
    try:
        t = torch.as_tensor(y)
    except Exception as exc:  # noqa: BLE001
        raise RelreasonError(
            f"{name} could not be converted to a tensor ({type(y).__name__}); pass a 1-D tensor of class indices"
        ) from exc
    if t.dim() != 1:
        raise RelreasonError(f"{name} must be 1-D but has shape {tuple(t.shape)}; pass one class index per sample")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise RelreasonError(f"{name} has dtype {t.dtype}; pass integer class indices (e.g. torch.int64)")
    if t.shape[0] != n:
        raise RelreasonError(
            f"{name} has {t.shape[0]} labels but the features have {n} rows; pass one label per feature row"
        )
    t = t.detach().to(device="cpu", dtype=torch.int64)
    if (t < 0).any():
        raise RelreasonError(f"{name} contains negative labels; pass class indices 0..C-1")
    return t


def as_device(device: Any) -> torch.device:
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise RelreasonError(f"unknown device {device!r}; use e.g. 'cpu' or 'cuda'") from exc


def module_device(module: nn.Module) -> torch.device | None:
    for parameter in module.parameters():
        return parameter.device
    for buffer in module.buffers():
        return buffer.device
    return None


def module_dtype(module: nn.Module) -> torch.dtype:
    """The floating dtype of ``module``'s first floating parameter (float32 when it has none): images go in as that,
    so a float64 or bfloat16 backbone takes them as they come."""
    weight = next((p for p in module.parameters() if p.is_floating_point()), None)
    return weight.dtype if weight is not None else torch.float32


class TransformedDataset(Dataset):
    """Apply ``transform`` to the image of each ``(image, label)`` item of ``base``."""

    def __init__(self, base: Any, transform: Callable[[Any], Any] | None) -> None:
        self.base = base
        self.transform = transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        item = self.base[index]
        try:
            image, label = item
        except (TypeError, ValueError) as exc:
            raise RelreasonError(
                f"dataset item {index} is not an (image, label) pair; wrap the dataset so it yields (image, int label)"
            ) from exc
        if self.transform is not None:
            image = self.transform(image)
        if not isinstance(image, torch.Tensor):
            raise RelreasonError(
                f"transform returned {type(image).__name__}, not a tensor; end the transform with "
                "torchvision.transforms.ToTensor()"
            )
        return image, int(label)


# Rows scored per forward pass when measuring accuracy (bounds memory, not results).
_SCORE_CHUNK = 8192


def matching_features(train_x: Any, test_x: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Both splits as float feature matrices of one width."""
    tr_x = as_features(train_x, "train_x")
    te_x = as_features(test_x, "test_x")
    if tr_x.shape[1] != te_x.shape[1]:
        raise RelreasonError(
            f"train_x has {tr_x.shape[1]} feature dims but test_x has {te_x.shape[1]}; extract both "
            "splits with the same backbone"
        )
    return tr_x, te_x


def checked_split(
    train_x: Any, train_y: Any, test_x: Any, test_y: Any
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Validate a train/test split of features and labels; also return the number of classes."""
    tr_x, te_x = matching_features(train_x, test_x)
    tr_y = as_labels(train_y, tr_x.shape[0], "train_y")
    te_y = as_labels(test_y, te_x.shape[0], "test_y")
    num_classes = int(max(int(tr_y.max()), int(te_y.max()))) + 1
    return tr_x, tr_y, te_x, te_y, num_classes


def percent_correct(predict: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> float:
    """Percent of rows of ``x`` whose argmax score under ``predict`` equals ``y``."""
    correct = 0
    with torch.no_grad():
        for start in range(0, x.shape[0], _SCORE_CHUNK):
            scores = predict(x[start : start + _SCORE_CHUNK])
            correct += int((scores.argmax(dim=1) == y[start : start + _SCORE_CHUNK]).sum())
    return 100.0 * correct / x.shape[0]
