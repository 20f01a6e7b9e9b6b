"""Which images each rank gets: disjoint shards, and resuming from any point under any number of ranks."""

import itertools

import pytest

from relreason.data.sampler import EpochBatchSampler


def batches(num_items, batch_size, world_size, start_item=0, epoch=0):
    return [list(EpochBatchSampler(num_items, batch_size, 7, epoch, rank, world_size, start_item))
            for rank in range(world_size)]


def test_each_epoch_is_its_own_shuffle_of_every_item():
    first, second = (sum(batches(40, 4, 1, epoch=epoch)[0], []) for epoch in (0, 1))
    assert sorted(first) == sorted(second) == list(range(40))
    assert first != second and first != list(range(40))
    assert sum(batches(40, 4, 1, epoch=0)[0], []) == first  # and the same again for the same epoch


@pytest.mark.parametrize("num_items,batch_size,world_size", [(37, 4, 1), (37, 4, 3), (64, 8, 2), (10, 3, 2)])
def test_resuming_under_the_same_ranks_gives_the_very_batches_left(num_items, batch_size, world_size):
    whole = batches(num_items, batch_size, world_size)
    steps = len(whole[0])
    for step in range(steps):
        resumed = batches(num_items, batch_size, world_size, start_item=step * batch_size * world_size)
        assert resumed == [rank_batches[step:] for rank_batches in whole]
        sampler = EpochBatchSampler(num_items, batch_size, 7, 0, 0, world_size, step * batch_size * world_size)
        assert (sampler.start_step, sampler.steps_per_epoch) == (step, steps)


@pytest.mark.parametrize("before,after", [(2, 1), (1, 2), (2, 3), (4, 2)])
def test_resuming_under_other_ranks_uses_each_image_of_the_epoch_once(before, after):
    num_items, batch_size, steps_done = 96, 4, 3  # what is left splits evenly: no padding, no dropped batch
    done = [b for rank in batches(num_items, batch_size, before) for b in rank[:steps_done]]
    start = steps_done * batch_size * before
    rest = [b for rank in batches(num_items, batch_size, after, start_item=start) for b in rank]
    used = list(itertools.chain(*done, *rest))
    assert sorted(used) == list(range(num_items))
    sampler = EpochBatchSampler(num_items, batch_size, 7, 0, 0, after, start)
    assert sampler.start_step == sampler.steps_per_epoch - len(rest) // after
    # The same point of the epoch in the new, larger or smaller, steps (to within one of them).
    assert abs(sampler.start_step * batch_size * after - start) < batch_size * after


def test_padding_and_a_dropped_single_image_batch():
    shards = batches(11, 5, 2)  # 11 images: one repeated to make 12, 6 per rank -> a batch of 5 and one of 1
    assert [len(b) for rank in shards for b in rank] == [5, 5]
    assert len(set().union(*map(set, shards[0])) & set().union(*map(set, shards[1]))) <= 1
    assert EpochBatchSampler(11, 5, 7, 0, 0, 2, start_item=11).__len__() == 0


def test_start_item_out_of_range_is_refused():
    with pytest.raises(ValueError, match="start_item"):
        EpochBatchSampler(10, 4, 7, 0, start_item=11)
