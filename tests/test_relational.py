import copy

import pytest
import torch
from loop_reference import formula_focal, loop_step, reference_head
from torch import nn

from relreason import FocalLoss, RelationalReasoning, RelationHead, RelreasonError, relation_pair_indices
from relreason.backbones import Conv4


def small_backbone(in_channels: int = 3):
    """A user's backbone without a feature_dim attribute: conv -> BatchNorm -> pool -> 6 features."""
    return nn.Sequential(nn.Conv2d(in_channels, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten())


@pytest.mark.parametrize("factorised, stacked", [(True, False), (False, False), (True, True)])
@pytest.mark.parametrize("aggregation", ["cat", "sum", "mean", "max"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_loss_scores_gradients_equal_loop(aggregation, dtype, factorised, stacked):
    """Against the notebook's step, with its head built independently; the views as a list of K tensors, or
    (``stacked``) as one (K, B, C, H, W) tensor, as the batched augmentation gives them."""
    torch.manual_seed(0)
    model = RelationalReasoning(small_backbone(), aggregation=aggregation, factorised_head=factorised).to(dtype)
    backbone = copy.deepcopy(model.backbone)
    head = reference_head(model.relation_head[0].in_features).to(dtype)
    head.load_state_dict(model.relation_head.state_dict())
    views = [torch.randn(5, 3, 8, 8, dtype=dtype) for _ in range(4)]

    out = model(torch.stack(views) if stacked else views)
    out.loss.backward()
    loss, scores, targets, first_view = loop_step(backbone, head, views, aggregation)
    loss.backward()

    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    assert torch.allclose(out.loss.to(dtype), loss, **tol)
    assert torch.allclose(out.scores, scores, **tol)
    assert torch.equal(out.targets, targets)
    assert torch.allclose(out.features, first_view.detach(), **tol)  # what the online probe learns from
    for fast, plain in zip(model.parameters(), list(backbone.parameters()) + list(head.parameters()), strict=True):
        assert torch.allclose(fast.grad, plain.grad, **tol)
    # BatchNorm running statistics move identically.
    assert torch.allclose(model.relation_head[1].running_mean, head[1].running_mean, **tol)
    assert torch.allclose(model.relation_head[1].running_var, head[1].running_var, **tol)


@pytest.mark.parametrize("factorised", [True, False])
@pytest.mark.parametrize("aggregation", ["cat", "max"])
def test_focal_loss_scores_gradients_equal_loop(aggregation, factorised):
    """The paper's configs train with the focal loss: the whole step under it against the loop and its formula."""
    torch.manual_seed(3)
    model = RelationalReasoning(small_backbone(), aggregation=aggregation, factorised_head=factorised,
                                loss=FocalLoss(1.5, 0.3)).double()
    backbone = copy.deepcopy(model.backbone)
    head = reference_head(model.relation_head[0].in_features).double()
    head.load_state_dict(model.relation_head.state_dict())
    views = [torch.randn(5, 3, 8, 8, dtype=torch.float64) for _ in range(4)]

    out = model(views)
    out.loss.backward()
    loss, scores, _, _ = loop_step(backbone, head, views, aggregation, criterion=formula_focal(1.5, 0.3))
    loss.backward()

    assert torch.allclose(out.loss, loss, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(out.loss, nn.BCEWithLogitsLoss()(scores, out.targets))  # it is not BCE's
    for fast, plain in zip(model.parameters(), list(backbone.parameters()) + list(head.parameters()), strict=True):
        assert torch.allclose(fast.grad, plain.grad, rtol=1e-10, atol=1e-12)


def test_accuracies_match_definition():
    torch.manual_seed(1)
    model = RelationalReasoning(Conv4())
    views = torch.randn(3, 4, 3, 32, 32)  # (K, B, C, H, W)
    out = model(views)
    predicted = (out.scores > 0).float()
    assert out.accuracy.item() == pytest.approx((predicted == out.targets).float().mean().item())
    pos = out.targets == 1
    assert out.positive_accuracy.item() == pytest.approx((predicted[pos] == 1).float().mean().item())
    assert out.negative_accuracy.item() == pytest.approx((predicted[~pos] == 0).float().mean().item())
    assert not out.accuracy.requires_grad


def test_feature_dim_read_inferred_and_head_width():
    assert RelationalReasoning(Conv4()).relation_head[0].in_features == 128
    model = RelationalReasoning(small_backbone(), aggregation="sum")
    assert model.feature_dim == 6 and model.relation_head[0].in_features == 6
    bn = model.backbone[1]
    assert bn.num_batches_tracked.item() == 0  # inference ran in eval mode


def test_focal_loss_by_name_and_module_train_untouched():
    model = RelationalReasoning(Conv4(), loss="focal")
    assert model.criterion.gamma == 2.0 and model.criterion.alpha == 0.5
    model.eval()
    assert not model.backbone.training and not model.relation_head.training
    model.train()
    assert model.relation_head.training


def test_head_layout_matches_reference_keys():
    head = RelationHead(128)
    assert list(head.state_dict()) == [
        "0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var",
        "1.num_batches_tracked", "3.weight", "3.bias",
    ]
    assert RelationHead(10, hidden_features=32)[0].out_features == 32


def test_bad_views_are_refused():
    model = RelationalReasoning(Conv4())
    with pytest.raises(RelreasonError, match="share one shape"):
        model([torch.randn(4, 3, 32, 32), torch.randn(3, 3, 32, 32)])
    with pytest.raises(RelreasonError, match=r"batch of images \(B, C, H, W\).*unsqueeze"):
        model([torch.randn(3, 32, 32), torch.randn(3, 32, 32)])
    with pytest.raises(RelreasonError, match="batch of 1"):
        model([torch.randn(1, 3, 32, 32), torch.randn(1, 3, 32, 32)])


@pytest.mark.parametrize("factorised", [True, False])
def test_training_after_scoring_under_inference_mode(factorised):
    # The pair indices are cached per (K, B, device): those first made under inference_mode must still be
    # usable (saved for backward) by every later training step.
    from relreason.pairing import _cached_pair_indices

    _cached_pair_indices.cache_clear()
    torch.manual_seed(2)
    model = RelationalReasoning(small_backbone(), factorised_head=factorised)
    views = [torch.randn(3, 3, 8, 8) for _ in range(3)]
    model.eval()
    with torch.inference_mode():
        model(views)
    model.train()
    model(views).loss.backward()
    assert all(p.grad is not None for p in model.relation_head.parameters())
    features = torch.randn(9, 6, requires_grad=True)
    scores = model.relation_head.score_pairs(features, *relation_pair_indices(3, 3)[:2], stream_tail=True)
    scores.sum().backward()
    assert features.grad is not None


def test_inferring_the_width_keeps_each_submodules_mode():
    """A user's frozen BatchNorm (eval inside a training model) stays frozen after the dummy batch."""
    backbone = small_backbone()
    conv, norm = backbone[0], backbone[1]
    norm.eval()
    statistics = norm.running_mean.clone()
    RelationalReasoning(backbone)
    assert backbone.training and not norm.training and conv.training
    assert torch.equal(norm.running_mean, statistics)


@pytest.mark.parametrize("in_channels, dtype", [(1, torch.float32), (3, torch.float64), (3, torch.bfloat16)])
def test_width_is_inferred_for_other_channels_and_dtypes(in_channels, dtype):
    assert RelationalReasoning(small_backbone(in_channels).to(dtype)).feature_dim == 6


def test_a_backbone_the_dummy_batch_does_not_suit_is_a_clear_error():
    class NeedsFourDims(nn.Module):
        def forward(self, x):
            return x.view(x.shape[0], 17)  # fails on any image batch

    with pytest.raises(RelreasonError, match=r"feature width from a dummy batch.*pass feature_dim="):
        RelationalReasoning(NeedsFourDims())
    assert RelationalReasoning(NeedsFourDims(), feature_dim=17).feature_dim == 17


@pytest.mark.parametrize("method_name", ["simclr", "rotation", "supervised"])
def test_baselines_infer_the_width_too(method_name):
    from relreason.methods import method_class

    kwargs = {"num_classes": 3} if method_name == "supervised" else {}
    method = method_class(method_name)(small_backbone(), **kwargs)
    assert method.feature_dim == 6
    views = [torch.rand(4, 3, 8, 8) for _ in range(method.views_per_image(2))]
    assert torch.isfinite(method(views, torch.tensor([0, 1, 2, 0])).loss)


def test_supervised_without_a_class_count_is_refused():
    from relreason.methods import Supervised

    with pytest.raises(RelreasonError, match="num_classes="):
        Supervised(small_backbone())


class DropsARow(nn.Module):
    def forward(self, x):
        return x.flatten(1)[:-1, :4]


@pytest.mark.parametrize("backbone, feature_dim, found", [
    (DropsARow(), 4, r"\(11, 4\)"),  # one image fewer: the pairs would silently shift
    (nn.Conv2d(3, 4, 3), 4, r"\(12, 4, 2, 2\)"),  # no pooling
    (nn.Flatten(), 4, r"\(12, 48\)"),  # wider than feature_dim
])
def test_backbone_output_of_the_wrong_shape_is_refused(backbone, feature_dim, found):
    model = RelationalReasoning(backbone, feature_dim=feature_dim)
    with pytest.raises(RelreasonError, match=r"turned 12 images into features of shape " + found):
        model(torch.rand(3, 4, 3, 4, 4))


def test_relation_scores_refuse_rows_that_do_not_split_into_views():
    model = RelationalReasoning(nn.Flatten(), feature_dim=4)
    with pytest.raises(RelreasonError, match="cannot be split into K=3"):
        model.relation_scores(torch.randn(10, 4), 3)


def test_width_is_inferred_when_a_conv_is_defined_before_the_stem():
    """Definition order is not call order: a 16-channel projection defined first must not make the dummy
    batch 16-channel for good."""

    class ProjectionFirst(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.project = nn.Conv2d(16, 32, 1)
            self.stem = nn.Conv2d(3, 16, 3, padding=1)
            self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())

        def forward(self, x):
            return self.pool(self.project(self.stem(x)))

    assert RelationalReasoning(ProjectionFirst()).feature_dim == 32
    from relreason.model import RelationalReasoning as FromItsFormerModule
    from relreason.model import infer_feature_dim  # still importable from its former module

    assert FromItsFormerModule is RelationalReasoning
    assert infer_feature_dim(ProjectionFirst(), in_channels=3) == 32


def test_common_view_mistakes_are_one_line_errors():
    model = RelationalReasoning(Conv4())
    views = [torch.randn(4, 3, 32, 32) for _ in range(2)]
    with pytest.raises(RelreasonError, match=r"whole \(views, labels\) batch.*views, labels = batch"):
        model([views, torch.zeros(4)])  # a K-view loader's batch, not unpacked
    for uint8_views in ([v.to(torch.uint8) for v in views], torch.stack(views).to(torch.uint8)):
        with pytest.raises(RelreasonError, match="backbone cannot take torch.uint8 views.*BatchRelationalAugmentation"):
            model(uint8_views)
    with pytest.raises(RelreasonError, match="must be tensors"):
        model([views[0], views[1].numpy()])


def test_a_backbone_that_takes_uint8_images_itself_gets_them():
    class Normalising(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = small_backbone()

        def forward(self, x):
            return self.body(x.float() / 255)

    model = RelationalReasoning(Normalising())
    views = torch.randint(0, 256, (2, 4, 3, 8, 8), dtype=torch.uint8)
    assert torch.isfinite(model(views).loss)


@pytest.mark.parametrize("method_name", ["relational", "simclr", "rotation", "supervised"])
def test_heads_are_built_beside_a_float64_backbone(method_name):
    from relreason.methods import method_class

    kwargs = {"num_classes": 3} if method_name == "supervised" else {}
    method = method_class(method_name)(small_backbone().double(), **kwargs)
    assert {p.dtype for p in method.parameters()} == {torch.float64}
    views = [torch.rand(4, 3, 8, 8, dtype=torch.float64) for _ in range(method.views_per_image(2))]
    out = method(views, torch.tensor([0, 1, 2, 0]))
    out.loss.backward()
    assert out.loss.dtype == torch.float64


@pytest.mark.parametrize("method_name", ["rotation", "supervised"])
def test_single_view_methods_take_one_image_batch_as_their_view(method_name):
    from relreason.methods import method_class

    kwargs = {"num_classes": 3} if method_name == "supervised" else {}
    torch.manual_seed(0)
    method = method_class(method_name)(small_backbone(), **kwargs)
    images, labels = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 0])
    torch.manual_seed(1)
    as_tensor = method(images, labels).loss
    torch.manual_seed(1)
    assert torch.equal(as_tensor, method([images], labels).loss)
    with pytest.raises(RelreasonError, match="exactly 1 view per image, got 2"):
        method(torch.stack([images, images]), labels)


def test_simclr_refuses_a_batch_without_negatives():
    from relreason.methods import SimCLR

    method = SimCLR(small_backbone())
    with pytest.raises(RelreasonError, match="batch of one image has no negatives"):
        method([torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8)])
    with pytest.raises(RelreasonError, match="exactly 2 views per image, got 1"):
        method(torch.rand(2, 3, 8, 8))  # one (B, C, H, W) batch is one view, not two


@pytest.mark.parametrize("feature_dim", [0, -3, 2.5])
def test_a_feature_width_that_is_not_a_positive_integer_is_refused(feature_dim):
    with pytest.raises(RelreasonError, match="feature_dim .*must be a positive integer"):
        RelationalReasoning(Conv4(), feature_dim=feature_dim)
