"""Wrap a dataset so each item yields K independently augmented views of one image."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch.utils.data import Dataset

from relreason.checks import check_positive_int, whole_number
from relreason.data.sized_dataset import SizedDataset
from relreason.errors import RelreasonError
from relreason.seeding import check_optional_seed, mix_seed

__all__ = ["MultiViewDataset"]


class MultiViewDataset(Dataset):
    """``dataset[i] = (image, label)`` becomes ``([transform(image) for _ in range(K)], label)``.

    Each view is an independent call of ``transform`` on the same image, so with
    the default collate a batch is ``(list of K tensors (B, C, H, W), labels (B,))``,
    the layout the relational-reasoning trainer expects.

    With ``seed`` set, the views of item ``i`` in epoch ``e`` are drawn from a generator seeded by
    ``(seed, e, i)`` alone: the same views whichever worker, rank or resumed run fetches the item.
    Without it, views draw from the global torch RNG, as the reference does.
    """

    def __init__(
        self, dataset: SizedDataset, transform: Callable[[Any], Any], num_views: int, seed: int | None = None
    ) -> None:
        # One view is valid (rotation and supervised pretraining); relational pairs check K >= 2 themselves.
        num_views = check_positive_int(num_views, "the number of views per image", example=4)
        if not callable(transform):
            raise RelreasonError("the multi-view transform is not callable; pass e.g. relational_augmentation(...)")
        self.dataset = dataset
        self.transform = transform
        self.num_views = num_views
        self.seed = check_optional_seed(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Views differ from epoch to epoch; call before iterating over each epoch."""
        self.epoch = whole_number(epoch, "epoch")

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[list[Any], int]:
        image, label = self.dataset[index]
        if self.seed is None:
            return [self.transform(image) for _ in range(self.num_views)], label
        with torch.random.fork_rng(devices=[]):
            # The CPU generator alone: torch.manual_seed would also reseed every accelerator, ~100x slower.
            torch.default_generator.manual_seed(mix_seed(self.seed, self.epoch, index))
            return [self.transform(image) for _ in range(self.num_views)], label
