import math

import pytest
import torch
from loop_reference import loop_nt_xent
from torch import nn

from relreason.errors import RelreasonError
from relreason.methods.rotation import RotationPrediction, rotate_batch
from relreason.methods.simclr import SimCLR, contrastive_accuracy, nt_xent_logits, nt_xent_loss
from relreason.methods.supervised import Supervised

FEATURES = 16


def tiny_backbone():
    # Flatten + Linear after the conv keeps spatial layout, so rotations are distinguishable.
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, FEATURES)
    )


class CountingBackbone(nn.Module):
    """No BatchNorm, so its output on a batch equals its output on any part of it; counts its calls."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, FEATURES))
        self.calls = []

    def forward(self, x):
        self.calls.append(x.shape[0])
        return self.net(x)


# ---------------------------------------------------------------- NT-Xent


@pytest.mark.parametrize("batch_size", [1, 2, 5])
@pytest.mark.parametrize("temperature", [0.1, 0.5, 2.0])
def test_nt_xent_equals_loop_with_gradients(batch_size, temperature):
    torch.manual_seed(batch_size)
    z1 = torch.randn(batch_size, 7, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(batch_size, 7, dtype=torch.float64, requires_grad=True)
    loss = nt_xent_loss(z1, z2, temperature)
    grads = torch.autograd.grad(loss, (z1, z2))
    expected = loop_nt_xent(z1, z2, temperature)
    expected_grads = torch.autograd.grad(expected, (z1, z2))

    assert loss.dtype == torch.float64
    assert torch.allclose(loss, expected, rtol=1e-10, atol=1e-12)
    for got, want in zip(grads, expected_grads):
        assert torch.allclose(got, want, rtol=1e-9, atol=1e-12)
    if batch_size == 1:  # the only other sample is the positive
        assert loss.item() == pytest.approx(0.0, abs=1e-12)


def test_nt_xent_scale_invariant_and_rejects_bad_input():
    torch.manual_seed(0)
    z1, z2 = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    assert torch.allclose(nt_xent_loss(z1, z2), nt_xent_loss(3 * z1, 0.5 * z2))  # cosine similarity
    assert not torch.allclose(nt_xent_loss(z1, z2, 0.5), nt_xent_loss(z1, z2, 0.2))
    with pytest.raises(RelreasonError, match="equal shape"):
        nt_xent_loss(z1, z2[:3])
    with pytest.raises(RelreasonError, match="temperature"):
        nt_xent_loss(z1, z2, 0.0)


def test_contrastive_accuracy_one_when_views_agree_and_separated():
    z = torch.eye(6, 8)  # orthogonal rows: well separated
    logits, positives = nt_xent_logits(z, z.clone())
    assert positives.tolist() == [6, 7, 8, 9, 10, 11, 0, 1, 2, 3, 4, 5]
    assert contrastive_accuracy(logits, positives).item() == 1.0
    # Swap two images' second views: those 4 anchors now find the wrong image's view most similar.
    swapped = z.clone()[[1, 0, 2, 3, 4, 5]]
    logits, positives = nt_xent_logits(z, swapped)
    assert contrastive_accuracy(logits, positives).item() == pytest.approx(8 / 12)


# ---------------------------------------------------------------- SimCLR


def test_simclr_identical_views_lower_loss_and_perfect_accuracy():
    torch.manual_seed(0)
    model = SimCLR(tiny_backbone(), FEATURES)
    images = torch.randn(8, 3, 8, 8)
    same = model([images, images.clone()], torch.full((8,), -1))
    different = model([images, torch.randn(8, 3, 8, 8)], torch.full((8,), -1))
    assert same.loss < different.loss
    assert same.metrics["contrastive_accuracy"].item() == 1.0
    assert different.metrics["contrastive_accuracy"].item() < 1.0


def test_simclr_one_backbone_call_features_and_metrics():
    torch.manual_seed(0)
    backbone = CountingBackbone()
    model = SimCLR(backbone, FEATURES, temperature=0.2, projection_dim=32)
    assert model.name == "simclr" and not model.needs_labels
    assert SimCLR.views_per_image(1) == SimCLR.views_per_image(4) == 2
    assert model.projection_head[-1].out_features == 32
    views = [torch.randn(5, 3, 8, 8), torch.randn(5, 3, 8, 8)]
    out = model(views, torch.full((5,), -1))

    assert backbone.calls == [10]  # both views in one call
    assert out.features.shape == (5, FEATURES) and not out.features.requires_grad
    # the first view's features (a batch of 10 and one of 5 round differently: ~1e-7 apart)
    assert torch.allclose(out.features, backbone.net(views[0]), atol=1e-6)
    assert set(out.metrics) == {"contrastive_accuracy"}
    accuracy = out.metrics["contrastive_accuracy"]
    assert accuracy.dim() == 0 and not accuracy.requires_grad and 0.0 <= accuracy.item() <= 1.0
    out.loss.backward()
    assert backbone.net[1].weight.grad is not None
    with pytest.raises(RelreasonError, match="2 views"):
        model(views[:1], torch.full((5,), -1))


# ---------------------------------------------------------------- rotation


def test_rotate_batch_moves_pixel_counter_clockwise_rotation_major():
    n = 5
    images = torch.zeros(2, 1, n, n)
    images[0, 0, 0, n - 1] = 1.0  # image 0: top-right corner
    images[1, 0, 1, 0] = 1.0  # image 1: row 1, left edge
    rotated, labels = rotate_batch(images)
    assert rotated.shape == (8, 1, n, n)
    assert labels.dtype == torch.int64 and labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]

    def bright(image):
        return tuple((image[0] == 1).nonzero()[0].tolist())

    # k counter-clockwise quarter turns as displayed: top-right -> top-left -> bottom-left -> bottom-right.
    assert [bright(rotated[2 * k]) for k in range(4)] == [(0, n - 1), (0, 0), (n - 1, 0), (n - 1, n - 1)]
    # One counter-clockwise quarter turn sends (row, col) to (n - 1 - col, row).
    position = (1, 0)
    for k in range(4):
        assert bright(rotated[2 * k + 1]) == position
        position = (n - 1 - position[1], position[0])
    assert torch.equal(rotated[:2], images)  # rotation 0 first, unchanged


def test_rotate_batch_refuses_non_square_and_bad_rank():
    with pytest.raises(RelreasonError, match="square"):
        rotate_batch(torch.zeros(2, 3, 8, 6))
    with pytest.raises(RelreasonError, match=r"\(B, C, H, W\)"):
        rotate_batch(torch.zeros(3, 8, 8))


def test_rotation_one_call_features_of_unrotated_view():
    backbone = CountingBackbone()
    model = RotationPrediction(backbone, FEATURES)
    assert model.name == "rotation" and not model.needs_labels and RotationPrediction.views_per_image(4) == 1
    images = torch.randn(3, 3, 8, 8)
    out = model([images], torch.full((3,), -1))
    assert backbone.calls == [12]
    assert torch.allclose(out.features, backbone.net(images)) and not out.features.requires_grad


# ---------------------------------------------------------------- training steps


def train_losses(model, views, labels, steps=15):
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(steps):
        out = model(views, labels)
        optimiser.zero_grad()
        out.loss.backward()
        optimiser.step()
        losses.append(out.loss.item())
    return losses, out


@pytest.mark.parametrize("kind", ["rotation", "supervised", "simclr"])
def test_few_adam_steps_reduce_loss(kind):
    torch.manual_seed(0)
    images = torch.randn(8, 3, 8, 8)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    if kind == "rotation":
        model, views, key = RotationPrediction(tiny_backbone(), FEATURES), [images], "rotation_accuracy"
    elif kind == "supervised":
        model, views, key = Supervised(tiny_backbone(), FEATURES, num_classes=3), [images], "train_accuracy"
    else:
        model, views, key = SimCLR(tiny_backbone(), FEATURES), [images, images.flip(3)], "contrastive_accuracy"
    losses, out = train_losses(model, views, labels)
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.7 * losses[0]
    assert set(out.metrics) == {key}
    metric = out.metrics[key]
    assert metric.dim() == 0 and not metric.requires_grad and 0.0 <= metric.item() <= 1.0


# ---------------------------------------------------------------- supervised


def test_supervised_refuses_unknown_and_out_of_range_labels():
    model = Supervised(tiny_backbone(), FEATURES, num_classes=3)
    assert model.name == "supervised" and model.needs_labels and Supervised.views_per_image(4) == 1
    images = torch.randn(3, 3, 8, 8)
    with pytest.raises(RelreasonError, match="needs labels for every image; choose a labelled dataset/split"):
        model([images], torch.tensor([0, -1, 1]))
    with pytest.raises(RelreasonError, match="num_classes"):
        model([images], torch.tensor([0, 3, 1]))
    with pytest.raises(RelreasonError, match="shape"):
        model([images], torch.tensor([0, 1]))
    out = model([images], torch.tensor([0, 2, 1]))
    assert out.features.shape == (3, FEATURES) and not out.features.requires_grad


def test_supervised_accuracy_matches_definition():
    torch.manual_seed(0)
    model = Supervised(tiny_backbone(), FEATURES, num_classes=4).eval()
    images, labels = torch.randn(6, 3, 8, 8), torch.tensor([0, 1, 2, 3, 0, 1])
    out = model([images], labels)
    predicted = model.classifier(model.backbone(images)).argmax(1)
    assert out.metrics["train_accuracy"].item() == pytest.approx((predicted == labels).float().mean().item())


# ---------------------------------------------------------------- autocast


@pytest.mark.parametrize("kind", ["simclr", "rotation", "supervised"])
def test_bfloat16_autocast_loss_is_float32(kind):
    torch.manual_seed(0)
    images = torch.randn(4, 3, 8, 8)
    labels = torch.tensor([0, 1, 2, 0])
    if kind == "simclr":
        model, views = SimCLR(tiny_backbone(), FEATURES), [images, images + 0.1 * torch.randn_like(images)]
    elif kind == "rotation":
        model, views = RotationPrediction(tiny_backbone(), FEATURES), [images]
    else:
        model, views = Supervised(tiny_backbone(), FEATURES, num_classes=3), [images]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(views, labels)
    assert out.features.dtype == torch.bfloat16  # autocast really ran the backbone in bf16
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_nt_xent_under_autocast_is_computed_in_float32():
    torch.manual_seed(0)
    z1, z2 = torch.randn(6, 9).bfloat16(), torch.randn(6, 9).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, _ = nt_xent_logits(z1, z2)
        loss = nt_xent_loss(z1, z2)
    assert logits.dtype == torch.float32
    assert torch.allclose(loss, nt_xent_loss(z1.float(), z2.float()), rtol=1e-6, atol=1e-7)


def test_supervised_label_values_can_be_checked_once_instead_of_every_step():
    model = Supervised(tiny_backbone(), FEATURES, num_classes=3)
    bad = torch.tensor([0, 5, 1])
    with pytest.raises(RelreasonError, match="num_classes"):
        model.check_labels(bad, 3)
    model.check_label_values = False  # what the trainer does after checking the dataset's labels once
    model.check_labels(bad, 3)  # no per-step look at the values (on a GPU it would wait for the device)
    with pytest.raises(RelreasonError, match="shape"):
        model.check_labels(torch.tensor([0, 1]), 3)


def test_trainer_checks_every_image_is_labelled_before_supervised_training():
    import numpy as np

    from relreason.data import ArrayImageDataset
    from relreason.train import check_every_image_labelled

    class Views:  # what the trainer holds: a K-view wrapper with the source dataset at .dataset
        def __init__(self, labels):
            self.dataset = ArrayImageDataset(np.zeros((len(labels), 4, 4), np.uint8), np.asarray(labels))

        def __len__(self):
            return len(self.dataset.labels)

    check_every_image_labelled(Views([0, 2, 1]), "toy")
    with pytest.raises(RelreasonError, match=r"2 image\(s\) of dataset 'toy' have none"):
        check_every_image_labelled(Views([0, -1, -1]), "toy")


_USER_METHOD = '''
import torch
import torch.nn.functional as F

from relreason.methods import PretrainMethod, StepOutput
from relreason.methods.base import view_list


class TwoViewCosine(PretrainMethod):
    """Agreement of the projected features of two views (a method of the user's own)."""

    name = "two-view-cosine"

    def __init__(self, backbone, feature_dim):
        super().__init__(backbone, feature_dim)
        self.projector = self.beside_backbone(torch.nn.Linear(feature_dim, 8))

    @staticmethod
    def views_per_image(num_views):
        return num_views

    def forward(self, views, labels=None):
        views = view_list(views, "TwoViewCosine")
        first = self.embed(views[0])
        loss = -F.cosine_similarity(self.projector(first), self.projector(self.embed(views[1]))).mean()
        return StepOutput(loss, {"agreement": -loss.detach()}, features=first.detach())


class NeedsLabels(TwoViewCosine):
    needs_labels = True


class LabelsAndClasses(TwoViewCosine):
    """Trains on labels: its constructor takes num_classes, which the trainer then passes."""

    needs_labels = True

    def __init__(self, backbone, feature_dim, num_classes):
        super().__init__(backbone, feature_dim)
        self.classes = num_classes


class OtherSignature(TwoViewCosine):
    def __init__(self, backbone, feature_dim, temperature):
        super().__init__(backbone, feature_dim)


class BrokenConstructor(TwoViewCosine):
    def __init__(self, backbone, feature_dim):
        raise ValueError("no projector size given")


class ViewsOnInstance(TwoViewCosine):
    def views_per_image(self, num_views):
        return 2


class HalfOfK(TwoViewCosine):
    @staticmethod
    def views_per_image(num_views):
        return max(2, num_views // 2)


class ReturnsTensor(TwoViewCosine):
    def forward(self, views, labels=None):
        return super().forward(views, labels).loss


class Detached(TwoViewCosine):
    def forward(self, views, labels=None):
        out = super().forward(views, labels)
        return StepOutput(out.loss.detach(), out.metrics, out.features)


class NoFeatures(TwoViewCosine):
    def forward(self, views, labels=None):
        out = super().forward(views, labels)
        return StepOutput(out.loss, out.metrics)


class FloatMetric(TwoViewCosine):
    def forward(self, views, labels=None):
        out = super().forward(views, labels)
        return StepOutput(out.loss, {"agreement": 0.5}, out.features)


class OnlyTwoViews(TwoViewCosine):
    @staticmethod
    def views_per_image(num_views):
        if num_views != 2:
            raise ValueError("takes K=2 only")
        return 2


class LossOfShapeOne(TwoViewCosine):
    def forward(self, views, labels=None):
        out = super().forward(views, labels)
        return StepOutput(out.loss.reshape(1), out.metrics, out.features)


class AllViewFeatures(TwoViewCosine):
    def forward(self, views, labels=None):
        out = super().forward(views, labels)
        return StepOutput(out.loss, out.metrics, torch.cat([out.features, out.features]))


class NoMetrics(TwoViewCosine):
    def forward(self, views, labels=None):
        out = super().forward(views, labels)
        return StepOutput(out.loss, None, out.features)


class MetricNamedLoss(TwoViewCosine):
    def forward(self, views, labels=None):
        out = super().forward(views, labels)
        return StepOutput(out.loss, {"loss": out.loss.detach()}, out.features)


not_a_method = torch.nn.Linear
'''


def test_a_method_of_ones_own_trains_by_module_and_class_name(tmp_path, monkeypatch, capsys):
    import json

    from relreason.cli import main

    (tmp_path / "my_methods.py").write_text(_USER_METHOD)
    monkeypatch.syspath_prepend(str(tmp_path))
    run = tmp_path / "run"
    argv = ["pretrain", "--dataset", "digits", "--method", "my_methods:TwoViewCosine", "--image-size", "16", "-K", "2",
            "--batch-size", "16", "--epochs", "1", "--no-progress", "--no-tensorboard", "--device", "cpu",
            "--output-dir", str(run)]
    assert main(argv) == 0
    record = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert "agreement" in record and "probe_accuracy" in record  # its own metric, and the online probe beside it
    assert json.loads((run / "backbone.json").read_text())["method"] == "my_methods:TwoViewCosine"
    assert main([*argv[:-2], "--epochs", "2", "--output-dir", str(run)]) == 0  # resumed by the same name
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
    capsys.readouterr()
    assert main([*argv[:-2], "--epochs", "3", "-K", "3", "--output-dir", str(run)]) == 2  # its views follow K
    assert "-K/--num-views: checkpoint 2 vs now 3" in capsys.readouterr().err
    assert main(["evaluate", "--run-dir", str(run), "--protocols", "knn", "--device", "cpu"]) == 0
    for method, message in [
        ("my_methods:not_a_method", "method 'my_methods:not_a_method' is class Linear, not a subclass of "
                                    "relreason.methods.PretrainMethod"),
        ("my_methods:Missing", "cannot load method class 'my_methods:Missing' (module 'my_methods'"),
        ("no_such_module:Method", "cannot load method class 'no_such_module:Method' (No module named"),
        ("simclear", "unknown method 'simclear'; choose one of relational, simclr"),
    ]:
        assert main([*argv[:4], method, *argv[5:-2], "--output-dir", str(tmp_path / "other")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("relreason: error:") and message in err and len(err.splitlines()) == 1, err
    from PIL import Image

    folder = tmp_path / "unlabelled" / "photos"  # one class subfolder: no classes to tell apart
    folder.mkdir(parents=True)
    for i in range(4):
        Image.new("RGB", (16, 16), (60 * i, 0, 0)).save(folder / f"{i}.png")
    assert main([*argv[:2], "folder", "--data-root", str(folder.parent), "--method", "my_methods:NeedsLabels",
                 *argv[5:-2], "--output-dir", str(tmp_path / "other")]) == 2
    assert "--method my_methods:NeedsLabels needs" in capsys.readouterr().err


def test_a_method_of_ones_own_that_the_trainer_cannot_use_is_one_line(tmp_path, monkeypatch, capsys):
    import json

    from relreason.cli import main

    (tmp_path / "my_methods.py").write_text(_USER_METHOD)
    monkeypatch.syspath_prepend(str(tmp_path))
    common = ["--dataset", "digits", "--image-size", "16", "-K", "2", "--batch-size", "16", "--epochs", "1",
              "--no-progress", "--no-tensorboard", "--device", "cpu"]

    def pretrain(method, *extra, output="run"):
        code = main(["pretrain", *common, "--method", f"my_methods:{method}", *extra,
                     "--output-dir", str(tmp_path / output)])
        return code, capsys.readouterr().err.strip()

    for method, message in [
        ("OtherSignature", "cannot be built as OtherSignature(backbone, feature_dim) (missing a required argument: "
                           "'temperature'); give its constructor those two parameters"),
        ("ViewsOnInstance", "views_per_image must be a @staticmethod taking K"),
        ("BrokenConstructor", "building method 'my_methods:BrokenConstructor' failed (ValueError: no projector size "
                              "given); fix its constructor"),
        ("ReturnsTensor", "method ReturnsTensor's forward returned Tensor; return relreason.methods.StepOutput"),
        ("Detached", "method Detached's loss does not depend on any parameter (was it detached?)"),
        ("NoFeatures", "method NoFeatures's StepOutput.features must be the first view's detached backbone features"),
        ("FloatMetric", "method FloatMetric's metrics 'agreement' must be 0-d tensors"),
        ("LossOfShapeOne", "method LossOfShapeOne's StepOutput.loss must be a 0-d tensor, got (1,)"),
        ("AllViewFeatures", "StepOutput.features must be the first view's detached backbone features, (16, 64), "
                            "which the online probe learns from; got shaped (32, 64)"),
        ("NoMetrics", "StepOutput.metrics must be a dict of name: 0-d tensor, got NoneType"),
        ("MetricNamedLoss", "metric name 'loss' is the trainer's own"),
    ]:
        code, err = pretrain(method, output=method)
        assert code == 2 and err.startswith("relreason: error:") and len(err.splitlines()) == 1, err
        assert message in err, err
    assert pretrain("NoFeatures", "--no-online-probe", output="no-probe")[0] == 0  # nothing learns from them then
    assert pretrain("OnlyTwoViews", output="two")[0] == 0  # asked at its own K alone
    code, err = pretrain("OnlyTwoViews", "-K", "3", output="three")
    assert code == 2 and "views_per_image(3) failed (ValueError: takes K=2 only)" in err, err
    code, err = pretrain("LabelsAndClasses")
    assert code == 0, err
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text())["agreement"] is not None
    # Its views follow K in steps: -K 4 and -K 5 both give 2 views (resumes), -K 6 gives 3 (refused).
    assert pretrain("HalfOfK", "-K", "4", output="half")[0] == 0
    assert pretrain("HalfOfK", "-K", "5", "--epochs", "2", output="half")[0] == 0
    code, err = pretrain("HalfOfK", "-K", "6", "--epochs", "3", output="half")
    assert code == 2 and "-K/--num-views: checkpoint 5 vs now 6" in err, err
    assert "does not change that" not in err
    code, err = pretrain("HalfOfK", "-K", "0", output="no-views")  # K is checked for a method of one's own
    assert code == 2 and "-K/--num-views must be >= 1, got 0; pass e.g. -K 4" in err, err
    import sys

    (tmp_path / "my_methods.py").write_text(_USER_METHOD.replace("Linear(feature_dim, 8)", "Linear(feature_dim, 16)"))
    monkeypatch.delitem(sys.modules, "my_methods")  # the method's code changed between the two runs
    code, err = pretrain("LabelsAndClasses", "--epochs", "2")
    assert code == 2 and "method.projector.weight is (8, 64) in the checkpoint, (16, 64) now); did the method's " \
        "code change? Rerun with the method the run started with" in err, err
