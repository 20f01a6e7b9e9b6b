"""Mistakes a user makes with the building blocks in their own loop: each is a one-line RelreasonError naming the
problem and the fix, never a silently wrong result. The command line's own cases are in test_bad_input.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from relreason import RelationalReasoning, RelationHead, relation_pair_indices
from relreason.backbones import Conv4, build_backbone, register_backbone
from relreason.backbones.cifar_resnet import CifarResNet
from relreason.backbones.registry import BACKBONES
from relreason.data import BatchRelationalAugmentation, DeviceMultiViewDataset, MultiViewDataset
from relreason.data.array_dataset import ArrayImageDataset
from relreason.data.transforms import eval_transform, relational_augmentation
from relreason.errors import RelreasonError
from relreason.losses import FocalLoss
from relreason.pairing import AGGREGATIONS, aggregate_pairs, aggregation_width, make_relation_pairs
from relreason.schedule import check_schedule, learning_rate_factor

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


@pytest.fixture
def images() -> ArrayImageDataset:
    rng = np.random.default_rng(0)
    return ArrayImageDataset(rng.integers(0, 256, (10, 12, 12, 3), dtype=np.uint8), np.arange(10) % 3)


# --- the learning-rate schedule ---------------------------------------------------------------------------------

@pytest.mark.parametrize("args, fragment", [
    ((0, 100, 0.5, "cosine"), "warmup_steps (round a fractional warm-up to whole steps) must be a whole number"),
    ((2, 100, 2.5, "constant"), "must be a whole number, got 2.5"),
    ((0, 10, 20, "cosine"), "0 <= warmup_steps <= total_steps"),
    ((-5, 100, 0, "cosine"), "step >= 0"),
    ((0, 100, -1, "constant"), "0 <= warmup_steps"),
    (("3", 100, 0, "cosine"), "step must be a whole number"),
])
def test_learning_rate_factor_refuses_arguments_that_would_give_a_wrong_rate(args, fragment):
    with pytest.raises(RelreasonError) as error:
        learning_rate_factor(*args)
    assert fragment in one_line(error)


def test_learning_rate_factor_takes_whole_step_counts_given_as_floats():
    assert learning_rate_factor(2.0, 100.0, 5.0 * 2, "cosine") == learning_rate_factor(2, 100, 10, "cosine") == 0.3


def test_learning_rate_factor_never_exceeds_one_for_any_whole_warm_up():
    for warmup in range(0, 12):
        factors = [learning_rate_factor(step, 12, warmup, schedule) for step in range(20)
                   for schedule in ("constant", "cosine")]
        assert max(factors) == 1.0 and min(factors) >= 0.0


def test_check_schedule_names_a_warm_up_that_is_not_a_number():
    with pytest.raises(RelreasonError, match="--epochs must be a whole number, got '10'"):
        check_schedule("cosine", 0, "10")
    with pytest.raises(RelreasonError, match="--warmup-epochs must be a number"):
        check_schedule("cosine", "1", 10)


# --- normalisation and views ------------------------------------------------------------------------------------

@pytest.mark.parametrize("build", [
    lambda mean, std: BatchRelationalAugmentation(32, mean, std),
    lambda mean, std: relational_augmentation(32, mean, std),
    lambda mean, std: eval_transform(32, mean, std),
])
def test_normalisation_on_the_0_255_scale_is_refused(build):
    with pytest.raises(RelreasonError) as error:
        build((125.3, 123.0, 113.9), (63.0, 62.1, 66.7))
    assert "divided by 255" in one_line(error)
    build(MEAN, STD)  # the same values on the 0-1 scale are taken


def test_device_views_refuse_a_mask_or_fractional_positions(images):
    dataset = DeviceMultiViewDataset(images, BatchRelationalAugmentation(8, MEAN, STD), 2, seed=0)
    with pytest.raises(RelreasonError) as error:
        dataset.views(torch.arange(10) < 3)
    assert "got a boolean mask; turn it into positions with mask.nonzero().squeeze(1)" in one_line(error)
    views, labels = dataset.views(torch.arange(10).lt(3).nonzero().squeeze(1))  # the fix the message gives
    assert views.shape[:2] == (2, 3) and labels.tolist() == [0, 1, 2]
    for indices in (torch.tensor([0.9, 1.7]), [0.5, 1.0]):
        with pytest.raises(RelreasonError) as error:
            dataset.views(indices)
        assert "integer image positions, got torch.float32 ones" in one_line(error)
    assert dataset.views(torch.tensor([0.0, 2.0]).long())[1].tolist() == [0, 2]  # the fix for whole ones
    views, labels = dataset.views([])  # an empty list reads as float; it is no mistake
    assert views.shape[:2] == (2, 0) and labels.numel() == 0


@pytest.mark.parametrize("indices, shown", [([0, 10], "got 10"), ([-1, 2], "got -1")])
def test_device_views_refuse_positions_outside_the_dataset(images, indices, shown):
    dataset = DeviceMultiViewDataset(images, BatchRelationalAugmentation(8, MEAN, STD), 2)
    with pytest.raises(RelreasonError) as error:
        dataset.views(indices)
    assert "[0, 10)" in one_line(error) and shown in str(error.value)


def test_a_per_image_transform_is_refused_where_a_batch_augmentation_is_needed(images):
    with pytest.raises(RelreasonError) as error:
        DeviceMultiViewDataset(images, relational_augmentation(8, MEAN, STD), 2)
    assert "BatchRelationalAugmentation, or MultiViewDataset for a per-image transform" in one_line(error)

    def my_batch_augmentation(batch, num_views, generator=None):  # one's own batched function is taken
        return batch.float().div(255).repeat(num_views, 1, 1, 1).unflatten(0, (num_views, -1))

    views, _ = DeviceMultiViewDataset(images, my_batch_augmentation, 2).views([0, 1])
    assert views.shape == (2, 2, 3, 12, 12)


@pytest.mark.parametrize("seed", [1.5, "x", True, -1])
def test_multi_view_datasets_refuse_a_seed_that_is_not_an_integer(images, seed):
    for build in (lambda: MultiViewDataset(images, relational_augmentation(8, MEAN, STD), 2, seed=seed),
                  lambda: DeviceMultiViewDataset(images, BatchRelationalAugmentation(8, MEAN, STD), 2, seed=seed)):
        with pytest.raises(RelreasonError) as error:
            build()
        assert "seed must be None or an integer in [0, 2**63 - 1]" in one_line(error)
    dataset = MultiViewDataset(images, relational_augmentation(8, MEAN, STD), 2, seed=np.int64(3))
    assert dataset.seed == 3 and type(dataset.seed) is int
    with pytest.raises(RelreasonError, match="epoch must be a whole number"):
        dataset.set_epoch("a")


# --- pairing and the relation head ------------------------------------------------------------------------------

def test_pairing_names_a_list_of_per_view_features():
    with pytest.raises(RelreasonError) as error:
        make_relation_pairs([torch.randn(4, 8), torch.randn(4, 8)], 2)
    assert "torch.cat(features)" in one_line(error)


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("left_rows,right_rows", [(6, 5), (1, 6), (6, 1)])
def test_aggregate_pairs_refuses_members_of_other_counts_rather_than_broadcasting_them(left_rows, right_rows,
                                                                                      aggregation):
    with pytest.raises(RelreasonError) as error:
        aggregate_pairs(torch.randn(left_rows, 8), torch.randn(right_rows, 8), aggregation)
    assert one_line(error) == (f"aggregate_pairs joins row p of left with row p of right, (P, d) each, got "
                               f"({left_rows}, 8) and ({right_rows}, 8); index both with relation_pair_indices(K, B)")
    assert aggregate_pairs(torch.randn(6, 8), torch.randn(6, 8), aggregation).shape[0] == 6


@pytest.mark.parametrize("feature_dim", ["64", 2.5, -3, 0])
def test_aggregation_width_refuses_a_width_that_is_not_a_positive_integer(feature_dim):
    with pytest.raises(RelreasonError) as error:
        aggregation_width(feature_dim, "cat")
    assert "feature_dim" in one_line(error)


def test_score_pairs_refuses_features_of_another_dtype_outside_autocast():
    head, features = RelationHead(16), torch.randn(12, 8, dtype=torch.float64)
    left, right, _ = relation_pair_indices(3, 4)
    with pytest.raises(RelreasonError) as error:
        head.score_pairs(features, left, right)
    assert "torch.float64 and the relation head torch.float32" in one_line(error)
    scores = head.score_pairs(features.float(), left, right)
    with pytest.raises(RelreasonError, match="torch.bfloat16 and the relation head torch.float32"):
        head.score_pairs(features.bfloat16(), left, right)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts for us: allowed
        assert head.score_pairs(features.bfloat16(), left, right).shape == scores.shape


def test_score_pairs_refuses_left_and_right_of_different_lengths():
    left, right, _ = relation_pair_indices(3, 4)
    with pytest.raises(RelreasonError) as error:
        RelationHead(16).score_pairs(torch.randn(12, 8), left, right[:-1])
    assert "of one shape" in one_line(error)


# --- the model: loss and views ----------------------------------------------------------------------------------

def test_a_loss_class_or_a_non_callable_is_refused_when_the_model_is_built():
    backbone = nn.Flatten()
    with pytest.raises(RelreasonError) as error:
        RelationalReasoning(backbone, feature_dim=4, loss=FocalLoss)
    assert "loss=FocalLoss()" in one_line(error)
    with pytest.raises(RelreasonError, match="got int"):
        RelationalReasoning(backbone, feature_dim=4, loss=123)


def test_a_loss_that_does_not_reduce_to_one_number_is_refused():
    model = RelationalReasoning(nn.Flatten(), feature_dim=4, loss=nn.BCEWithLogitsLoss(reduction="none"))
    with pytest.raises(RelreasonError) as error:
        model(torch.randn(2, 3, 4, 1, 1))
    assert "reduction='mean'" in one_line(error)
    plain = RelationalReasoning(nn.Flatten(), feature_dim=4, loss=lambda z, y: (z - y).square().mean())
    assert plain(torch.randn(2, 3, 4, 1, 1)).loss.dim() == 0  # a plain function is a loss too


@pytest.mark.parametrize("views, fragment, fix", [
    (torch.randn(2, 3, 16, 16, 3), "look channels-last: pass views.movedim(-1, -3)", lambda v: v.movedim(-1, -3)),
    (list(torch.randn(2, 3, 16, 16, 3)), "look channels-last: pass views.movedim(-1, -3)",
     lambda v: [view.movedim(-1, -3) for view in v]),
    (torch.randn(2, 3, 1, 16, 16), "are grey: pass views.repeat_interleave(3, dim=-3)",
     lambda v: v.repeat_interleave(3, dim=-3)),
    (torch.randn(2, 3, 2, 16, 16), "views are (N, C, H, W) with the channels the backbone takes, got (6, 2, 16, 16)",
     lambda v: v[:, :, :1].repeat_interleave(3, dim=-3)),
    (torch.randn(2, 3, 3, 16, 16, dtype=torch.float64), "the views are torch.float64 and the backbone torch.float32; "
     "convert the views (views.to(torch.float32))", lambda v: v.to(torch.float32)),
    (torch.randint(0, 255, (2, 3, 3, 16, 16), dtype=torch.uint8), "BatchRelationalAugmentation",
     lambda v: BatchRelationalAugmentation(16, MEAN, STD)(v[0], 2)),
])
def test_views_the_backbone_cannot_take_are_named_with_a_fix_that_works(views, fragment, fix):
    model = RelationalReasoning(build_backbone("conv4"), image_size=16)
    with pytest.raises(RelreasonError) as error:
        model(views)
    assert fragment in one_line(error)
    assert model(fix(views)).loss.isfinite()


def test_other_backbone_errors_keep_their_own_traceback():
    class Broken(nn.Module):
        feature_dim = 4

        def forward(self, x):
            raise RuntimeError("my own bug")

    class WrongSecondLayer(nn.Module):  # the views are fine; the backbone's own layers do not fit together
        feature_dim = 8

        def __init__(self):
            super().__init__()
            self.layers = nn.Sequential(nn.Conv2d(3, 16, 3), nn.Conv2d(32, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())

        def forward(self, x):
            return self.layers(x)

    with pytest.raises(RuntimeError, match="my own bug"):
        RelationalReasoning(Broken())(torch.randn(2, 3, 3, 8, 8))
    with pytest.raises(RuntimeError, match="expected input.*to have 32 channels") as error:
        RelationalReasoning(WrongSecondLayer())(torch.randn(2, 3, 3, 8, 8))
    assert not isinstance(error.value, RelreasonError)


# --- backbones --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("build, fragment", [
    (lambda: CifarResNet(0), "blocks_per_stage must be a positive integer, got 0"),
    (lambda: CifarResNet(-1), "blocks_per_stage must be a positive integer"),
    (lambda: CifarResNet(1, channels=(16, 32)), "the 3 stages' widths"),
    (lambda: CifarResNet(1, in_channels=0), "in_channels must be a positive integer"),
    (lambda: Conv4(in_channels=0), "in_channels must be a positive integer"),
])
def test_impossible_backbone_sizes_are_refused(build, fragment):
    with pytest.raises(RelreasonError) as error:
        build()
    assert fragment in one_line(error)


def test_registering_a_backbone_checks_its_name_and_keeps_the_built_ins():
    factory = BACKBONES["conv4"]
    for name in (3, "", "pkg:thing"):
        with pytest.raises(RelreasonError, match="a backbone name must be a non-empty string"):
            register_backbone(name)
    with pytest.raises(RelreasonError) as error:
        register_backbone("conv4")(lambda: nn.Flatten())
    assert "register yours under another name, e.g. 'my-conv4'" in one_line(error)
    assert BACKBONES["conv4"] is factory and all(isinstance(name, str) for name in BACKBONES)
    try:  # one's own name registered again (a notebook cell run twice) is replaced
        register_backbone("api-test-net")(lambda: nn.Flatten())
        register_backbone("api-test-net")(lambda: nn.Identity())
        assert isinstance(BACKBONES["api-test-net"](), nn.Identity)
    finally:
        BACKBONES.pop("api-test-net", None)


def test_numpy_integers_are_taken_as_backbone_arguments():
    assert build_backbone("conv4", width=np.int64(2)).feature_dim == 128
