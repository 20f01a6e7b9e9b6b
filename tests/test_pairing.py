import itertools

import pytest
import torch

from loop_reference import loop_aggregate
from relreason import AGGREGATIONS, RelreasonError, make_relation_pairs, relation_pair_indices
from relreason.pairing import shared_pair_indices


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("num_views,batch_size", list(itertools.product([2, 3, 4, 16], [2, 3, 7, 64])))
def test_vectorised_pairs_equal_loop(aggregation, num_views, batch_size):
    torch.manual_seed(num_views * 100 + batch_size)
    features = torch.randn(num_views * batch_size, 5)
    pairs, targets = make_relation_pairs(features, num_views, aggregation)
    expected_pairs, expected_targets = loop_aggregate(features, num_views, aggregation)
    assert pairs.shape == expected_pairs.shape
    assert torch.equal(pairs, expected_pairs)
    assert torch.equal(targets, expected_targets)


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_smaller_last_batch_equals_loop(aggregation):
    # A 1,797-image epoch with batch 64 ends on a batch of 5: pairs must still follow the shift rule.
    num_views = 4
    for batch_size in (64, 1797 % 64):
        features = torch.randn(num_views * batch_size, 3, dtype=torch.float64)
        pairs, targets = make_relation_pairs(features, num_views, aggregation)
        expected_pairs, expected_targets = loop_aggregate(features, num_views, aggregation)
        assert torch.equal(pairs, expected_pairs) and torch.equal(targets, expected_targets)


def test_pair_counts_and_no_self_negatives():
    num_views, batch_size = 5, 4
    left, right, targets = relation_pair_indices(num_views, batch_size)
    assert left.numel() == num_views * (num_views - 1) * batch_size
    assert targets.sum().item() == left.numel() // 2
    image_left, image_right = left % batch_size, right % batch_size
    view_left, view_right = left // batch_size, right // batch_size
    positive = targets == 1
    assert torch.equal(image_left[positive], image_right[positive])
    assert (image_left[~positive] != image_right[~positive]).all()
    assert (view_left < view_right).all()


def test_shift_wraps_to_one_before_batch_size():
    # 6 block pairs with B=3: shifts 1, 2, 1, 2, 1, 2 (never 3 == identity).
    left, right, targets = relation_pair_indices(4, 3)
    negatives = targets == 0
    shifts = ((left[negatives] - right[negatives]) % 3).reshape(6, 3)
    assert shifts[:, 0].tolist() == [1, 2, 1, 2, 1, 2]
    assert (shifts == shifts[:, :1]).all()


def test_batch_of_one_is_refused():
    with pytest.raises(RelreasonError, match="batch of 1"):
        make_relation_pairs(torch.randn(4, 8), num_views=4)


def test_single_view_and_ragged_blocks_are_refused():
    with pytest.raises(RelreasonError, match="at least 2 views"):
        relation_pair_indices(1, 8)
    with pytest.raises(RelreasonError, match="cannot be split"):
        make_relation_pairs(torch.randn(10, 8), num_views=3)
    with pytest.raises(RelreasonError, match="unknown aggregation"):
        make_relation_pairs(torch.randn(8, 8), num_views=2, aggregation="product")


def test_indices_follow_device_and_are_cached():
    first = shared_pair_indices(3, 4)
    second = shared_pair_indices(3, 4)
    assert first[0] is second[0]
    moved = relation_pair_indices(3, 4, device="cpu")
    assert moved[0].device.type == "cpu"
    assert all(torch.equal(a, b) for a, b in zip(moved, first))


def test_pair_indices_are_made_once_per_device():
    # An accelerator gets its copy once, not a host-to-device transfer per step ("meta" stands in for one).
    first = shared_pair_indices(4, 5, "meta")
    again = shared_pair_indices(4, 5, torch.device("meta"))
    assert all(a is b for a, b in zip(first, again)) and first[0].device.type == "meta"
    on_cpu = relation_pair_indices(4, 5, "cpu")
    assert all(torch.equal(a, b) for a, b in zip(on_cpu, relation_pair_indices(4, 5)))


def test_public_indices_are_the_callers_own():
    """In-place label smoothing of the returned targets must not reach the model's own pairs."""
    from torch import nn

    from relreason import RelationalReasoning

    left, right, targets = relation_pair_indices(2, 4)
    targets[targets == 0] = 0.1
    left.zero_()
    model = RelationalReasoning(nn.Flatten(), feature_dim=4)
    _, model_targets = model.relation_scores(torch.randn(8, 4), 2)
    assert set(model_targets.tolist()) == {0.0, 1.0}
    assert torch.equal(relation_pair_indices(2, 4)[0], shared_pair_indices(2, 4)[0])
    assert shared_pair_indices(2, 4)[0].sum() > 0


@pytest.mark.parametrize("num_views, batch_size", [(2.5, 4), (3, 4.5), ("3", 4), (3.0, 4), (3, True)])
def test_sizes_that_are_not_integers_are_refused(num_views, batch_size):
    """Floats, even whole ones, are refused as everywhere else in the library (check_positive_int)."""
    with pytest.raises(RelreasonError, match="whole number"):
        relation_pair_indices(num_views, batch_size)


def test_integers_of_other_types_are_accepted():
    import numpy as np

    expected = relation_pair_indices(3, 4)
    for num_views, batch_size in [(np.int64(3), np.int32(4)), (torch.tensor(3), torch.tensor(4))]:
        assert all(torch.equal(a, b) for a, b in zip(relation_pair_indices(num_views, batch_size), expected))


def test_returned_targets_are_the_callers_own():
    """Changing the targets a caller gets back must not change the cached ones later calls use."""
    from relreason import RelationalReasoning
    from relreason.backbones import build_backbone

    expected = relation_pair_indices(3, 4)[2].clone()
    _, targets = make_relation_pairs(torch.randn(12, 5), 3)
    targets.zero_()
    model = RelationalReasoning(build_backbone("conv4", image_size=32), image_size=32)
    model(torch.rand(3, 4, 3, 32, 32)).targets.zero_()
    assert torch.equal(relation_pair_indices(3, 4)[2], expected)
