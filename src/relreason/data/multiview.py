"""Wrap a dataset so each item yields K independently augmented views of one image."""

from __future__ import annotations

from typing import Any, Callable

from torch.utils.data import Dataset

from relreason.errors import RelreasonError

__all__ = ["MultiViewDataset"]


class MultiViewDataset(Dataset):
    """``dataset[i] = (image, label)`` becomes ``([transform(image) for _ in range(K)], label)``.

    Each view is an independent call of ``transform`` on the same image, so with
    the default collate a batch is ``(list of K tensors (B, C, H, W), labels (B,))``,
    the layout the relational-reasoning trainer expects.
    """

    def __init__(self, dataset: Dataset, transform: Callable[[Any], Any], num_views: int) -> None:
        if isinstance(num_views, bool) or not isinstance(num_views, int) or num_views < 2:
            raise RelreasonError(
                f"number of augmentations (views) must be an integer of at least 2, got {num_views!r}; pass e.g. 4"
            )
        if not callable(transform):
            raise RelreasonError("the multi-view transform is not callable; pass e.g. relational_augmentation(...)")
        self.dataset = dataset
        self.transform = transform
        self.num_views = num_views

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[list[Any], int]:
        image, label = self.dataset[index]
        return [self.transform(image) for _ in range(self.num_views)], label
