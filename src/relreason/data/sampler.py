"""Which images each rank sees in each epoch, resumable at any step."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

from relreason.data.multiview import mix_seed


class EpochBatchSampler(Sampler[list[int]]):
    """This rank's batches for one epoch, starting at ``start_step``.

    All ranks draw one shuffle from ``(seed, epoch)``, pad it (repeating its head, as
    ``DistributedSampler`` does) to a multiple of ``world_size`` and take every ``world_size``-th
    index, so ranks see disjoint images and the same number of batches. A last batch of one image
    has no negative pair and is dropped. ``start_step`` skips batches already trained on, which is how
    a run resumed mid-epoch continues exactly where it stopped.
    """

    def __init__(
        self,
        num_items: int,
        batch_size: int,
        seed: int,
        epoch: int,
        rank: int = 0,
        world_size: int = 1,
        start_step: int = 0,
    ) -> None:
        self.num_items = num_items
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = epoch
        self.rank = rank
        self.world_size = world_size
        self.start_step = start_step

    @property
    def per_rank(self) -> int:
        return math.ceil(self.num_items / self.world_size)

    @property
    def steps_per_epoch(self) -> int:
        full, rest = divmod(self.per_rank, self.batch_size)
        return full + (rest > 1)

    def __len__(self) -> int:
        return max(self.steps_per_epoch - self.start_step, 0)

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
        order = torch.randperm(self.num_items, generator=generator)
        padding = self.per_rank * self.world_size - self.num_items
        if padding:
            order = torch.cat([order, order[:padding]])
        mine = order[self.rank :: self.world_size].tolist()
        for step in range(self.start_step, self.steps_per_epoch):
            yield mine[step * self.batch_size : (step + 1) * self.batch_size]
