"""Which images each rank sees in each epoch, resumable at any point of it, under any number of ranks."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

from relreason.seeding import mix_seed


class EpochBatchSampler(Sampler[list[int]]):
    """This rank's batches for one epoch, from item ``start_item`` of the epoch's shuffled order on.

    All ranks draw one shuffle from ``(seed, epoch)``. What is left of it after ``start_item`` is padded
    (repeating the head of the shuffle, as ``DistributedSampler`` does) to a multiple of ``world_size``, and
    each rank takes every ``world_size``-th index, so ranks see disjoint images and the same number of
    batches. A last batch of one image has no negative pair and is dropped.

    After ``s`` steps at batch size ``B`` the ``world_size`` ranks together have used exactly the first
    ``s * B * world_size`` items of the shuffle, so a run resumed from ``start_item`` continues where it
    stopped, also under another number of ranks; under the same number it gets the very batches it would
    have had.
    """

    def __init__(
        self,
        num_items: int,
        batch_size: int,
        seed: int,
        epoch: int,
        rank: int = 0,
        world_size: int = 1,
        start_item: int = 0,
    ) -> None:
        if not 0 <= start_item <= num_items:
            raise ValueError(f"start_item must lie in [0, {num_items}], got {start_item}")
        self.num_items = num_items
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = epoch
        self.rank = rank
        self.world_size = world_size
        self.start_item = start_item

    def _steps(self, items: int) -> int:
        full, rest = divmod(math.ceil(items / self.world_size), self.batch_size)
        return full + (rest > 1)

    @property
    def steps_per_epoch(self) -> int:
        """Steps of a whole epoch at this number of ranks."""
        return self._steps(self.num_items)

    @property
    def start_step(self) -> int:
        """The step number of the first batch: the steps of a whole epoch less those still to come."""
        return self.steps_per_epoch - len(self)

    def __len__(self) -> int:
        return self._steps(self.num_items - self.start_item)

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
        order = torch.randperm(self.num_items, generator=generator)
        remaining = self.num_items - self.start_item
        padding = math.ceil(remaining / self.world_size) * self.world_size - remaining
        if padding:
            order = torch.cat([order, order[:padding]])
        mine = order[self.start_item + self.rank :: self.world_size].tolist()
        for step in range(len(self)):
            yield mine[step * self.batch_size : (step + 1) * self.batch_size]
