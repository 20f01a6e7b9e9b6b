"""Tests for relreason.evaluate: probes, k-NN, feature extraction and reporting."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from loop_reference import reference_knn_predict
from PIL import Image
from torch import nn
from torchvision.transforms import Compose, Resize, ToTensor

from relreason.errors import RelreasonError
from relreason.evaluate import (
    evaluate_features,
    extract_features,
    format_table,
    knn_accuracy,
    knn_predict,
    linear_probe,
    linear_probe_converged,
    train_linear_classifier,
    write_results_json,
)


def make_blobs(n_per_class: int, num_classes: int, dim: int, spread: float, seed: int):
    """Gaussian blobs with unit noise around class centres of norm ~ spread * sqrt(dim)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=g) * spread
    y = torch.arange(num_classes).repeat_interleave(n_per_class)
    x = centres[y] + torch.randn(y.shape[0], dim, generator=g)
    return x, y


@pytest.fixture(scope="module")
def blobs():
    """Well-separated 4-class blobs, split into train and test from the same centres."""
    x, y = make_blobs(n_per_class=150, num_classes=4, dim=16, spread=3.0, seed=0)
    g = torch.Generator().manual_seed(1)
    perm = torch.randperm(x.shape[0], generator=g)
    train, test = perm[:450], perm[450:]
    return x[train], y[train], x[test], y[test]


# --------------------------------------------------------------------------------------------
# Separable and unlearnable data
# --------------------------------------------------------------------------------------------


def test_all_protocols_solve_separable_blobs(blobs):
    tr_x, tr_y, te_x, te_y = blobs
    lin = linear_probe(tr_x, tr_y, te_x, te_y)  # the paper's 100 epochs
    conv = linear_probe_converged(tr_x, tr_y, te_x, te_y)
    knn = knn_accuracy(tr_x, tr_y, te_x, te_y, k=20)
    assert lin["test_accuracy"] >= 98.0 and lin["train_accuracy"] >= 98.0
    assert conv["train_accuracy"] == 100.0  # separable train set + converged probe
    assert conv["test_accuracy"] >= 98.0
    assert 1 <= conv["iterations"] < 1000  # stopped by tolerance, not by the cap
    assert knn >= 98.0


def test_random_labels_stay_near_chance():
    g = torch.Generator().manual_seed(3)
    num_classes = 4
    tr_x, te_x = torch.randn(400, 16, generator=g), torch.randn(400, 16, generator=g)
    tr_y = torch.randint(0, num_classes, (400,), generator=g)
    te_y = torch.randint(0, num_classes, (400,), generator=g)
    results = evaluate_features(tr_x, tr_y, te_x, te_y, linear_epochs=20, knn_k=50)
    chance = 100.0 / num_classes
    for protocol in ("linear", "linear_converged", "knn"):
        assert abs(results[protocol]["test_accuracy"] - chance) < 10.0, protocol
    # A converged probe can memorise some noise, but test accuracy must not follow it.
    assert results["linear_converged"]["train_accuracy"] > results["linear_converged"]["test_accuracy"]
    assert results["knn"]["k"] == 50


def test_knn_records_the_k_it_used_when_the_training_set_is_smaller():
    g = torch.Generator().manual_seed(4)
    tr_x, te_x = torch.randn(30, 8, generator=g), torch.randn(10, 8, generator=g)
    tr_y, te_y = torch.arange(30) % 3, torch.arange(10) % 3
    capped = evaluate_features(tr_x, tr_y, te_x, te_y, protocols=("knn",), knn_k=200)["knn"]
    every = evaluate_features(tr_x, tr_y, te_x, te_y, protocols=("knn",), knn_k=30)["knn"]
    assert capped == every and capped["k"] == 30  # every training image is a neighbour either way


# --------------------------------------------------------------------------------------------
# k-NN against an obviously correct reference
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 3, 10, 37, 60, 500])
@pytest.mark.parametrize("temperature", [0.07, 0.5])
def test_knn_matches_reference_loop(k, temperature):
    g = torch.Generator().manual_seed(10 * k + int(100 * temperature))
    tr_x, te_x = torch.randn(60, 6, generator=g), torch.randn(35, 6, generator=g)
    tr_y = torch.randint(0, 4, (60,), generator=g)
    te_y = torch.randint(0, 4, (35,), generator=g)
    expected = reference_knn_predict(tr_x, tr_y, te_x, k, temperature)
    # batch_size=8 forces several uneven chunks of test points.
    got = knn_predict(tr_x, tr_y, te_x, k=k, temperature=temperature, batch_size=8)
    assert got.dtype == torch.int64
    assert got.tolist() == expected
    expected_acc = 100.0 * sum(p == t for p, t in zip(expected, te_y.tolist())) / len(expected)
    assert knn_accuracy(tr_x, tr_y, te_x, te_y, k=k, temperature=temperature, batch_size=8) == pytest.approx(
        expected_acc
    )


def test_knn_is_scale_invariant_and_stable_at_tiny_temperature():
    g = torch.Generator().manual_seed(5)
    tr_x, te_x = torch.randn(50, 5, generator=g), torch.randn(20, 5, generator=g)
    tr_y = torch.randint(0, 3, (50,), generator=g)
    base = knn_predict(tr_x, tr_y, te_x, k=7)
    scaled = knn_predict(tr_x * 1000.0, tr_y, te_x * 0.001, k=7)
    assert torch.equal(base, scaled)  # cosine similarity ignores per-row scale
    # exp(1 / 1e-3) overflows float32; the vote must still equal the 1-NN answer.
    tiny_t = knn_predict(tr_x, tr_y, te_x, k=7, temperature=1e-3)
    assert torch.equal(tiny_t, knn_predict(tr_x, tr_y, te_x, k=1))


# --------------------------------------------------------------------------------------------
# Linear probes
# --------------------------------------------------------------------------------------------


def test_linear_probe_is_deterministic_for_a_seed():
    x, y = make_blobs(n_per_class=60, num_classes=3, dim=8, spread=0.6, seed=7)  # overlapping
    layer_a = train_linear_classifier(x, y, 3, epochs=3, seed=123)
    layer_b = train_linear_classifier(x, y, 3, epochs=3, seed=123)
    layer_c = train_linear_classifier(x, y, 3, epochs=3, seed=124)
    assert torch.equal(layer_a.weight, layer_b.weight) and torch.equal(layer_a.bias, layer_b.bias)
    assert not torch.equal(layer_a.weight, layer_c.weight)

    state = torch.random.get_rng_state()
    first = linear_probe(x[::2], y[::2], x[1::2], y[1::2], epochs=3, seed=123)
    second = linear_probe(x[::2], y[::2], x[1::2], y[1::2], epochs=3, seed=123)
    assert first == second
    assert torch.equal(state, torch.random.get_rng_state())  # the global RNG is left alone


def test_converged_probe_beats_short_probe_on_badly_scaled_features():
    # Dims 0-3 separate the classes (centres 6 * one-hot, unit noise; Bayes error ~1e-5);
    # dims 4-11 are pure noise blown up 1000x, swamping a barely trained raw-feature probe.
    g = torch.Generator().manual_seed(11)
    y = torch.arange(4).repeat_interleave(80)
    informative = 6.0 * torch.eye(4)[y] + torch.randn(320, 4, generator=g)
    x = torch.cat([informative, torch.randn(320, 8, generator=g) * 1000.0], dim=1)
    tr_x, tr_y, te_x, te_y = x[::2], y[::2], x[1::2], y[1::2]
    short = linear_probe(tr_x, tr_y, te_x, te_y, epochs=1)
    converged = linear_probe_converged(tr_x, tr_y, te_x, te_y)
    assert converged["test_accuracy"] >= 95.0
    assert converged["test_accuracy"] > short["test_accuracy"] + 30.0


def test_converged_probe_handles_constant_features_and_reports_iterations(blobs):
    tr_x, tr_y, te_x, te_y = blobs
    pad_tr = torch.cat([tr_x, torch.full((tr_x.shape[0], 3), 5.0)], dim=1)
    pad_te = torch.cat([te_x, torch.full((te_x.shape[0], 3), 5.0)], dim=1)
    result = linear_probe_converged(pad_tr, tr_y, pad_te, te_y)
    assert set(result) == {"train_accuracy", "test_accuracy", "iterations"}
    assert isinstance(result["iterations"], int)
    assert result["test_accuracy"] >= 98.0
    capped = linear_probe_converged(pad_tr, tr_y, pad_te, te_y, weight_decay=0.0, max_iter=3)
    assert capped["iterations"] == 3


def test_linear_probe_shuffles_rows_sorted_by_class():
    # Rows sorted by class, one epoch of small batches at a high lr: trained in the given order, the last
    # batches hold only the last class and drag every prediction there (the features share a large
    # common offset, so "more of the last class everywhere" is easy to learn).  Shuffled, both classes
    # are seen throughout and the probe separates them.
    g = torch.Generator().manual_seed(2)
    centres = torch.randn(2, 8, generator=g) * 2.0 + 5.0
    y = torch.arange(2).repeat_interleave(64)
    x = centres[y] + torch.randn(128, 8, generator=g)
    layer = train_linear_classifier(x, y, 2, epochs=1, lr=0.1, batch_size=8, seed=0)
    with torch.no_grad():
        predictions = layer(x).argmax(dim=1)
    accuracy = 100.0 * float((predictions == y).sum()) / y.shape[0]
    last_class_everywhere = 100.0 * float((y == 1).sum()) / y.shape[0]
    assert set(predictions.tolist()) == {0, 1}
    assert accuracy >= last_class_everywhere + 25.0


def test_converged_probe_standardises_test_rows_with_training_statistics():
    # The test rows are training rows of a single class.  A probe scoring 100% on every training row
    # scores 100% on them, whatever else is in the test set -- provided they are standardised with the
    # training mean and std.  Standardised with their own statistics they would be centred on the
    # training mean, where no class lives.
    x, y = make_blobs(n_per_class=50, num_classes=3, dim=4, spread=3.0, seed=2)
    one_class = linear_probe_converged(x, y, x[y == 2], y[y == 2])
    assert one_class["train_accuracy"] == 100.0
    assert one_class["test_accuracy"] == 100.0
    # Conversely, shifting every test row by the same vector moves the rows, not the statistics they are
    # standardised with: with class 0's centre moved onto the training mean, its rows are misclassified.
    shift = x[y == 0].mean(dim=0) - x.mean(dim=0)
    assert linear_probe_converged(x, y, x - shift, y)["test_accuracy"] < 90.0


def test_converged_probe_leaves_the_bias_unpenalised():
    # With an overwhelming weight decay the weights shrink to ~0 but the (unpenalised) bias still learns
    # the log class prior, so every row gets the majority class; at the default the features separate
    # the classes perfectly (a control: the majority answer comes from the weight decay, not the data).
    g = torch.Generator().manual_seed(4)

    def imbalanced(n0, n1):
        labels = torch.cat([torch.zeros(n0, dtype=torch.int64), torch.ones(n1, dtype=torch.int64)])
        return torch.tensor([[0.0, 0.0, 0.0], [6.0, 6.0, 6.0]])[labels] + torch.randn(n0 + n1, 3, generator=g), labels

    tr_x, tr_y = imbalanced(90, 10)
    te_x, te_y = imbalanced(45, 15)
    assert linear_probe_converged(tr_x, tr_y, te_x, te_y)["test_accuracy"] == 100.0
    heavy = linear_probe_converged(tr_x, tr_y, te_x, te_y, weight_decay=1e3)
    assert heavy["train_accuracy"] == pytest.approx(100.0 * float((tr_y == 0).sum()) / tr_y.shape[0])
    assert heavy["test_accuracy"] == pytest.approx(100.0 * float((te_y == 0).sum()) / te_y.shape[0])


def test_probes_reject_bad_input(blobs):
    tr_x, tr_y, te_x, te_y = blobs
    with pytest.raises(RelreasonError, match="feature dims"):
        linear_probe(tr_x, tr_y, te_x[:, :5], te_y)
    with pytest.raises(RelreasonError, match="labels"):
        linear_probe_converged(tr_x, tr_y[:-1], te_x, te_y)
    bad = tr_x.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(RelreasonError, match="NaN"):
        knn_accuracy(bad, tr_y, te_x, te_y)
    with pytest.raises(RelreasonError, match="unknown evaluation protocol"):
        evaluate_features(tr_x, tr_y, te_x, te_y, protocols=("linear", "svm"))


# --------------------------------------------------------------------------------------------
# Feature extraction
# --------------------------------------------------------------------------------------------


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, kernel_size=3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Sequential(nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Dropout(0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.bn(self.conv(x)))  # (N, 4, 1, 1): extract_features flattens it


class ExplodingNet(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise AssertionError("the backbone must not run when the cache exists")


def tiny_image_dataset(n: int = 10):
    rng = np.random.default_rng(0)
    return [
        (Image.fromarray(rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)), i % 3) for i in range(n)
    ]


def test_extract_features_shapes_modes_and_cache(tmp_path, capsys):
    torch.manual_seed(0)
    net = TinyNet()
    net.bn.running_mean.fill_(0.3)  # non-default stats, so eval-mode output is distinctive
    net.train()
    net.head.eval()  # a mixed train/eval state must survive exactly as it was
    stats_before = {k: v.clone() for k, v in net.bn.state_dict().items()}
    data = tiny_image_dataset(10)
    cache = tmp_path / "cache" / "feats.pt"

    feats, labels = extract_features(net, data, ToTensor(), batch_size=4, cache_path=cache)

    assert feats.shape == (10, 4) and feats.dtype == torch.float32 and feats.device.type == "cpu"
    assert labels.dtype == torch.int64 and labels.tolist() == [i % 3 for i in range(10)]
    assert net.training and net.conv.training and net.bn.training and not net.head.training
    for key, value in net.bn.state_dict().items():
        assert torch.equal(value, stats_before[key]), key
    # Same numbers as running the network in eval mode by hand.
    net.eval()
    with torch.no_grad():
        expected = net(torch.stack([ToTensor()(img) for img, _ in data])).flatten(1)
    assert torch.allclose(feats, expected, atol=1e-6)

    assert cache.exists()
    assert [p.name for p in cache.parent.iterdir()] == ["feats.pt"]  # no temp files left behind
    cached_feats, cached_labels = extract_features(ExplodingNet(), data, ToTensor(), cache_path=cache)
    assert torch.equal(cached_feats, feats) and torch.equal(cached_labels, labels)

    # A dataset of another length under the same cache path: the cache is stale and made again.
    fewer, fewer_labels = extract_features(net, data[:7], ToTensor(), cache_path=cache)
    assert "holds 10 items but the dataset has 7 now" in capsys.readouterr().err
    assert torch.allclose(fewer, feats[:7], atol=1e-6) and torch.equal(fewer_labels, labels[:7])
    assert torch.equal(extract_features(ExplodingNet(), data[:7], ToTensor(), cache_path=cache)[0], fewer)


def test_extract_features_restores_eval_mode_and_needs_tensor_transform():
    net = TinyNet().eval()
    feats, _ = extract_features(net, tiny_image_dataset(3), ToTensor(), batch_size=2)
    assert not any(m.training for m in net.modules())
    assert feats.shape == (3, 4)
    with pytest.raises(RelreasonError, match="ToTensor"):
        extract_features(net, tiny_image_dataset(3), None)


def test_threaded_extraction_gives_the_plain_loaders_features_in_order_and_skips_alike(tmp_path):
    from relreason.data import ImageFolderDataset

    root = tmp_path / "imgs"
    rng = np.random.default_rng(1)
    for i in range(11):
        (root / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (9 + i, 8, 3), dtype=np.uint8)).save(root / f"c{i % 2}" / f"{i:02d}.png")
    (root / "c1" / "05.png").write_bytes(b"broken")  # replaced by the next readable image, with its label
    torch.manual_seed(0)
    net = TinyNet().eval()
    transform = Compose([Resize((8, 8)), ToTensor()])
    plain_folder, threaded_folder = ImageFolderDataset(root), ImageFolderDataset(root)
    plain = extract_features(net, plain_folder, transform, batch_size=4, cache_path=tmp_path / "plain.pt")
    threaded = extract_features(net, threaded_folder, transform, batch_size=4, threads=3,
                                cache_path=tmp_path / "threaded.pt")
    assert torch.equal(plain[0], threaded[0]) and torch.equal(plain[1], threaded[1])
    assert plain_folder.paths[8].name == "05.png" and plain[1].tolist() == [0] * 6 + [1] * 5
    assert torch.equal(plain[0][8], plain[0][9]) and not torch.equal(plain[0][7], plain[0][9])  # c1/07 stands in
    assert threaded_folder.skipped == plain_folder.skipped and len(plain_folder.skipped) == 1
    assert not (tmp_path / "plain.pt").exists() and not (tmp_path / "threaded.pt").exists()  # replaced rows: no cache
    with pytest.raises(RelreasonError, match="ToTensor"):  # an item's error, raised from its thread
        extract_features(net, tiny_image_dataset(5), Resize((8, 8)), batch_size=2, threads=2)
    with pytest.raises(RelreasonError, match="threads"):
        extract_features(net, tiny_image_dataset(5), ToTensor(), threads=0)


def test_threaded_extraction_stops_reading_when_the_backbone_fails_and_pins_batches_for_cuda(monkeypatch):
    import threading
    import time

    from relreason.protocols.features import _threaded_batches

    fetched, lock = [], threading.Lock()

    class SlowImages:
        def __len__(self):
            return 400

        def __getitem__(self, index):
            time.sleep(0.002)
            with lock:
                fetched.append(index)
            return torch.zeros(3, 8, 8), index % 3

    with pytest.raises(AssertionError, match="the backbone must not run"):
        extract_features(ExplodingNet(), SlowImages(), None, batch_size=20, threads=4)
    count = len(fetched)
    assert count <= 40  # the failing batch and the one read ahead, not the other 360 images
    time.sleep(0.1)
    assert len(fetched) == count  # and nothing is read after the error
    pinned = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda tensor: pinned.append(tensor.shape) or tensor)
    batches = list(_threaded_batches(SlowImages(), 50, 20, 2, pin=True))
    assert [tuple(images.shape) for images, _ in batches] == [(20, 3, 8, 8), (20, 3, 8, 8), (10, 3, 8, 8)]
    assert [tuple(shape) for shape in pinned] == [(20, 3, 8, 8), (20,), (20, 3, 8, 8), (20,), (10, 3, 8, 8), (10,)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_extract_features_feeds_a_backbone_in_its_own_dtype(dtype):
    torch.manual_seed(0)
    net = TinyNet().eval()
    data = tiny_image_dataset(4)
    expected, _ = extract_features(net, data, ToTensor())
    feats, _ = extract_features(net.to(dtype), data, ToTensor())
    assert feats.dtype == torch.float32 and next(net.parameters()).dtype == dtype
    assert torch.allclose(feats, expected, atol=0.05 if dtype == torch.bfloat16 else 1e-6)


# --------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------


def test_format_table_has_labels_and_numbers():
    results = {
        "pretrained": {
            "linear": {"train_accuracy": 90.0, "test_accuracy": 71.234},
            "linear_converged": {"train_accuracy": 95.0, "test_accuracy": 74.5, "iterations": 40},
            "knn": {"test_accuracy": 66.666},
        },
        "random": {"linear": {"train_accuracy": 40.0, "test_accuracy": 30.1}, "knn": {"test_accuracy": 25.0}},
    }
    table = format_table(results)
    lines = table.splitlines()
    assert len(lines) == 4  # header, rule, two rows
    assert "linear_converged" in lines[0] and "knn" in lines[0]
    assert "pretrained" in lines[2] and "71.23" in lines[2] and "74.50" in lines[2] and "66.67" in lines[2]
    assert "random" in lines[3] and "30.10" in lines[3] and "25.00" in lines[3] and "-" in lines[3]
    assert len({len(line) for line in lines}) == 1  # fixed width


def test_write_results_json_round_trip(tmp_path):
    path = tmp_path / "out" / "results.json"
    payload = {"pretrained": {"knn": {"test_accuracy": 50.0}}, "features": torch.tensor([1.5]), "dir": tmp_path}
    write_results_json(path, payload)
    loaded = json.loads(path.read_text())
    assert loaded == {"pretrained": {"knn": {"test_accuracy": 50.0}}, "features": [1.5], "dir": str(tmp_path)}
    assert [p.name for p in path.parent.iterdir()] == ["results.json"]
    with pytest.raises(RelreasonError, match="JSON"):
        write_results_json(tmp_path / "bad.json", {"x": object()})
    assert not (tmp_path / "bad.json").exists()


# --- `relreason evaluate` on what users point it at ----------------------------------------------------------

def labelled_folder(root, corrupt=None):
    """train/ and test/ with two classes of 6 and 3 small images each; ``corrupt``: a relative path to spoil."""
    rng = np.random.default_rng(4)
    for split, count in (("train", 6), ("test", 3)):
        for label, name in enumerate(("cat", "dog")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 120, (12, 12, 3)) + 120 * label
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i}.png")
    if corrupt:
        (root / corrupt).write_bytes(b"not an image")
    return root


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    from relreason.train import PretrainConfig, pretrain

    base = tmp_path_factory.mktemp("folder-run")
    images = labelled_folder(base / "images")
    run = base / "run"
    pretrain(PretrainConfig(dataset="folder", data_root=str(images), image_size=12, num_views=2, batch_size=8,
                            epochs=1, device="cpu", progress=False, tensorboard=False, output_dir=str(run)))
    return images, run


def evaluate_args(*args):
    from relreason.cli import main

    return main(["evaluate", "--protocols", "knn", "--knn-k", "3", "--no-random-baseline", "--device", "cpu", *args])


def test_options_of_a_protocol_not_chosen_are_said_to_do_nothing(folder_run, tmp_path, capsys):
    _, run = folder_run
    out = ["--run-dir", str(run), "--output", str(tmp_path / "r.json")]
    assert evaluate_args(*out, "--label-fractions", "0.5", "--finetune-epochs", "3", "--finetune-head-lr", "0.01") == 0
    err = capsys.readouterr().err
    assert ("relreason: note: --label-fractions sets the few_label protocol, which --protocols does not include "
            "(knn); add few_label to use it") in err
    assert "note: --finetune-epochs and --finetune-head-lr set the finetune protocol" in err
    assert evaluate_args(*out, "--label-fractions", "0.01", "0.1", "0.25") == 0  # the defaults, typed: nothing to say
    assert "note: --label-fractions" not in capsys.readouterr().err


def test_evaluate_finds_the_runs_own_data_root_and_takes_a_training_checkpoint(folder_run, tmp_path, capsys):
    from relreason.checkpoint import list_checkpoints

    images, run = folder_run
    assert evaluate_args("--run-dir", str(run), "--output", str(tmp_path / "exported.json")) == 0  # no --data-root
    checkpoint = list_checkpoints(run)[0]
    assert evaluate_args("--weights", str(checkpoint), "--output", str(tmp_path / "checkpoint.json")) == 0
    exported, from_checkpoint = (json.loads((tmp_path / n).read_text()) for n in ("exported.json", "checkpoint.json"))
    assert from_checkpoint["results"] == exported["results"]  # the last checkpoint holds the exported backbone
    assert exported["test_size"] == 6
    # How far the weights had trained, from the export's backbone.json or the checkpoint's own position.
    assert from_checkpoint["pretraining"]["epochs_done"] == exported["pretraining"]["epochs_done"] > 0


@pytest.mark.parametrize("case,message", [
    ("not-weights", "cannot be read as backbone weights (KeyError: 101); pass the backbone.pt")
    , ("output-is-a-folder", "is a folder; give a file path")
    , ("broken-backbone-json", "backbone.json cannot be read (")
    , ("image-size-not-a-number", "backbone.json gives image_size 'big', not a positive integer; restore it")
])
def test_evaluate_refuses_unusable_paths_before_extracting_features(folder_run, tmp_path, capsys, case, message):
    import shutil

    _, run = folder_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("features", "evaluation*"))
    args = ["--run-dir", str(copy)]
    if case == "not-weights":
        (tmp_path / "notes.pt").write_text("hello")
        args = ["--weights", str(tmp_path / "notes.pt"), "--backbone", "conv4"]
    elif case == "output-is-a-folder":
        args += ["--output", str(tmp_path)]
    elif case == "image-size-not-a-number":
        meta = json.loads((copy / "backbone.json").read_text())
        (copy / "backbone.json").write_text(json.dumps(meta | {"image_size": "big"}))
    else:
        (copy / "backbone.json").write_text('{"backbone": ')
    assert evaluate_args(*args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (copy / "features").exists()


def test_a_read_only_weights_folder_keeps_its_feature_cache_beside_the_output(folder_run, tmp_path, monkeypatch):
    import os

    from relreason.evaluate import job

    _, run = folder_run
    monkeypatch.setattr(job.os, "access", lambda path, mode: Path(path) != run)  # root ignores chmod
    assert evaluate_args("--run-dir", str(run), "--output", str(tmp_path / "out" / "results.json")) == 0
    assert list((tmp_path / "out" / "features").glob("*.pt"))
    assert os.path.isfile(tmp_path / "out" / "results.json")


def test_weights_kept_in_the_image_folder_get_their_feature_cache_beside_the_output(folder_run, tmp_path):
    import shutil

    images, run = folder_run
    folder = shutil.copytree(images, tmp_path / "images")
    shutil.copy(run / "backbone.pt", folder / "backbone.pt")
    before = sorted(p.relative_to(folder) for p in folder.rglob("*"))
    assert evaluate_args("--weights", str(folder / "backbone.pt"), "--backbone", "conv4", "--dataset", "folder",
                         "--data-root", str(folder), "--output", str(tmp_path / "out" / "results.json")) == 0
    assert list((tmp_path / "out" / "features").glob("*.pt"))
    assert sorted(p.relative_to(folder) for p in folder.rglob("*")) == before  # the images' folder is only read


def test_an_unreadable_evaluation_image_is_left_out_not_replaced(folder_run, tmp_path, capsys):
    """As pretraining skips it, the evaluation leaves it out (not counted twice under another file's label), for
    the random baseline and fine-tuning too; no cache of the replaced rows is kept, so the next run checks again."""
    import json
    import shutil

    from relreason.cli import main

    run = tmp_path / "run"
    shutil.copytree(folder_run[1], run, ignore=shutil.ignore_patterns("features", "evaluation*"))
    images = labelled_folder(tmp_path / "images", corrupt="test/dog/1.png")
    output = tmp_path / "results.json"
    argv = ["evaluate", "--run-dir", str(run), "--dataset", "folder", "--data-root", str(images), "--output",
            str(output), "--protocols", "knn", "finetune", "--finetune-epochs", "1", "--knn-k", "3", "--device", "cpu"]
    for _ in range(2):  # the second time too: no cache of the spoilt rows is left behind
        assert main(argv) == 0
        err = capsys.readouterr().err
        assert "1 image(s) of the 'test' split cannot be read (e.g. " in err and "test/dog/1.png" in err
        assert "the evaluation leaves them out, on 5 images" in err
        results = json.loads(output.read_text())
        assert (results["train_size"], results["test_size"]) == (12, 5)
        assert results["unreadable_images_left_out"] == {"train": 0, "test": 1}
        cached = list((run / "features").glob("*-folder-test-*"))  # the random baseline's, made on the 5 read
        assert len(cached) == 1 and torch.load(cached[0], weights_only=True)["labels"].shape == (5,)


def test_fine_tuning_alone_leaves_unreadable_images_out_and_one_class_left_is_refused(folder_run, tmp_path, capsys):
    import json

    from relreason.cli import main
    from relreason.evaluate import extract_features

    images = labelled_folder(tmp_path / "images", corrupt="test/dog/1.png")
    output = tmp_path / "ft.json"
    argv = ["evaluate", "--run-dir", str(folder_run[1]), "--dataset", "folder", "--data-root", str(images),
            "--output", str(output), "--protocols", "finetune", "--finetune-epochs", "1", "--no-random-baseline",
            "--device", "cpu"]
    assert main(argv) == 0
    assert "1 image(s) of the 'test' split cannot be read" in capsys.readouterr().err
    results = json.loads(output.read_text())
    assert results["test_size"] == 5 and results["unreadable_images_left_out"] == {"train": 0, "test": 1}
    # Features of a folder that replaced an unreadable file are not cached (a later read would trust them).
    from relreason.data import ImageFolderDataset

    cache = tmp_path / "cache.pt"
    extract_features(nn.Flatten(), ImageFolderDataset(images / "test"), ToTensor(), cache_path=cache)
    assert not cache.exists()
    for i in range(6):  # a whole class unreadable: one class is left to train a probe on
        (images / "train" / "dog" / f"{i}.png").write_bytes(b"broken")
    assert main([*argv[:-5], "knn", "--device", "cpu"]) == 2
    assert "hold 1 class ('cat') once its 6 unreadable image(s) are left out" in capsys.readouterr().err


def test_an_unreadable_training_image_leaves_no_cache_of_its_split(folder_run, tmp_path, capsys):
    import shutil

    _, run = folder_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("features", "evaluation*"))
    images = labelled_folder(tmp_path / "images", corrupt="train/dog/1.png")
    assert evaluate_args("--run-dir", str(copy), "--dataset", "folder", "--data-root", str(images)) == 0
    assert "of the 'train' split cannot be read" in capsys.readouterr().err
    assert [p.name.split("-")[-3] for p in (copy / "features").glob("*.pt")] == ["test"]


def test_bare_weights_say_which_image_size_they_are_evaluated_at(folder_run, tmp_path, capsys):
    _, run = folder_run
    assert evaluate_args("--weights", str(run / "backbone.pt"), "--backbone", "conv4", "--dataset", "digits",
                         "--protocols", "knn", "--no-random-baseline", "--output", str(tmp_path / "r.json")) == 0
    assert "evaluating at" not in capsys.readouterr().err  # its backbone.json says
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "w.pt").write_bytes((run / "backbone.pt").read_bytes())
    assert evaluate_args("--weights", str(bare / "w.pt"), "--backbone", "conv4", "--dataset", "digits",
                         "--protocols", "knn", "--no-random-baseline", "--run-dir", str(run)) == 0
    err = capsys.readouterr().err
    assert "evaluating at 32 px, the dataset's own size (no backbone.json" in err
    assert f"note: --weights {bare / 'w.pt'} is evaluated; --run-dir {run} is not read" in err
    assert (bare / "evaluation.json").is_file()


def test_evaluating_a_run_stopped_early_says_so(folder_run, tmp_path, capsys):
    import shutil

    _, run = folder_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("features", "evaluation*"))
    meta = json.loads((copy / "backbone.json").read_text())
    meta |= {"finished": False, "stopped_by": "time limit", "epochs_done": 0.5}
    (copy / "backbone.json").write_text(json.dumps(meta))
    assert evaluate_args("--run-dir", str(copy)) == 0
    assert (f"relreason: note: {copy / 'backbone.pt'} is from a run stopped by its time limit after 0.50 epoch(s); "
            "the same pretrain command trains on from there") in capsys.readouterr().err
    recorded = json.loads((copy / "evaluation.json").read_text())["pretraining"]
    assert recorded == {"finished": False, "epochs_done": 0.5, "stopped_by": "time limit"}
    meta |= {"stopped_by": "SIGTERM"}  # stopped by something else than the user's budget: the run is unfinished
    (copy / "backbone.json").write_text(json.dumps(meta))
    assert evaluate_args("--run-dir", str(copy)) == 0
    assert "warning: " + f"{copy / 'backbone.pt'} is from a run stopped by SIGTERM after 0.50 epoch(s); rerun its " \
           "pretrain command to finish it" in capsys.readouterr().err


def test_a_cached_split_whose_files_were_relabelled_is_extracted_again(tmp_path):
    import shutil

    from relreason.cli import main
    from relreason.train import PretrainConfig, pretrain

    images = labelled_folder(tmp_path / "images")
    run = tmp_path / "run"
    pretrain(PretrainConfig(dataset="folder", data_root=str(images), image_size=12, num_views=2, batch_size=8,
                            epochs=1, device="cpu", progress=False, tensorboard=False, output_dir=str(run)))
    args = ["evaluate", "--run-dir", str(run), "--protocols", "knn", "--knn-k", "3", "--no-random-baseline",
            "--device", "cpu"]
    assert main(args) == 0
    before = json.loads((run / "evaluation.json").read_text())["results"]["pretrained"]["knn"]["test_accuracy"]
    # Swap the two test classes (same files, same count): every test label flips.
    test = images / "test"
    for source, target in (("cat", "tmp"), ("dog", "cat"), ("tmp", "dog")):
        shutil.move(test / source, test / target)
    assert main(args) == 0
    after = json.loads((run / "evaluation.json").read_text())["results"]["pretrained"]["knn"]["test_accuracy"]
    assert after == pytest.approx(100.0 - before)


def test_cached_features_with_other_labels_are_not_reused(tmp_path):
    class Labelled(list):
        @property
        def labels(self):
            return [label for _, label in self]

    images = tiny_image_dataset(6)
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4))
    cache = tmp_path / "cache.pt"
    extract_features(backbone, Labelled(images), ToTensor(), cache_path=cache)
    relabelled = Labelled((image, 2 - label) for image, label in images)
    _, labels = extract_features(backbone, relabelled, ToTensor(), cache_path=cache)
    assert labels.tolist() == relabelled.labels
    _, labels = extract_features(backbone, relabelled, ToTensor(), cache_path=cache)  # and the cache now holds them
    assert labels.tolist() == relabelled.labels


def test_a_vanished_file_is_left_out_in_one_line_and_an_unwritable_cache_only_warned(folder_run, tmp_path, monkeypatch,
                                                                                     capsys):
    from relreason.protocols import features

    _, run = folder_run
    images = labelled_folder(tmp_path / "images")
    (images / "test" / "dog" / "9.png").symlink_to(tmp_path / "nowhere.png")  # listed, but cannot be opened
    args = ["--run-dir", str(run), "--dataset", "folder", "--data-root", str(images), "--output",
            str(tmp_path / "results.json")]
    assert evaluate_args(*args) == 0
    err = capsys.readouterr().err
    assert "cannot be read" in err and "9.png" in err and "Traceback" not in err
    assert json.loads((tmp_path / "results.json").read_text())["test_size"] == 6
    (images / "test" / "dog" / "9.png").unlink()

    def refuse(*args):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(features, "atomic_torch_save", refuse)
    assert evaluate_args(*args) == 0
    assert "could not cache features" in capsys.readouterr().err
    assert json.loads((tmp_path / "results.json").read_text())["test_size"] == 6


def test_a_checkpoints_results_do_not_replace_the_exported_backbones(folder_run, tmp_path):
    import shutil

    from relreason.checkpoint import list_checkpoints

    _, run = folder_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("features", "evaluation*"))
    checkpoint = list_checkpoints(copy)[0]
    assert evaluate_args("--weights", str(checkpoint)) == 0
    assert (copy / f"evaluation-{checkpoint.stem}.json").is_file() and not (copy / "evaluation.json").exists()


def test_test_fraction_holds_out_a_stratified_seeded_share_of_one_labelled_folder(folder_run, tmp_path, capsys):
    import hashlib

    from relreason.data import ImageFolderDataset, split_image_folder

    images, run = folder_run
    one = tmp_path / "one"  # the train/ and test/ images merged into class folders, as a user's single folder
    for path in sorted(images.glob("*/*/*.png")):
        target = one / path.parent.name / f"{path.parent.parent.name}-{path.name}"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(path.read_bytes())
    train, test = split_image_folder(one, 0.25)
    whole = ImageFolderDataset(one)
    # The plain rule: in each class, the files first by sha1("0:<relative path>"), round(0.25 x 9) = 2 of them.
    expected = []
    for name in ("cat", "dog"):
        files = sorted((p.relative_to(one).as_posix() for p in (one / name).iterdir()),
                       key=lambda rel: hashlib.sha1(f"0:{rel}".encode()).hexdigest())
        expected += files[:2]
    assert sorted(p.relative_to(one).as_posix() for p in test.paths) == sorted(expected)
    assert sorted(map(str, train.paths + test.paths)) == sorted(map(str, whole.paths))
    assert test.labels.tolist() == [0, 0, 1, 1] and train.labels.tolist() == [0] * 7 + [1] * 7
    assert np.asarray(test[0][0]).shape == (12, 12, 3) and test.classes == ["cat", "dog"]
    assert [str(p) for p in split_image_folder(one, 0.25)[1].paths] == [str(p) for p in test.paths]  # same each time

    assert evaluate_args("--run-dir", str(run), "--data-root", str(one), "--test-fraction", "0.25",
                         "--output", str(tmp_path / "held-out.json")) == 0
    result = json.loads((tmp_path / "held-out.json").read_text())
    assert (result["train_size"], result["test_size"], result["test_fraction"]) == (14, 4, 0.25)


@pytest.mark.parametrize("where, fraction, message", [
    ("split", "0.25", "already holds train/ and test/ (or val/ or validation/); drop --test-fraction to use them"),
    ("digits", "0.25", "dataset 'digits' comes with its own test split; drop --test-fraction"),
    ("flat", "0.25", "has no classes (its 2 images lie directly in"),
    ("classes", "0.01", "rounds to no test image in any class; choose a larger fraction"),
    ("classes", "0.75", "--test-fraction 0.75 of class 'a' (2 image(s)) leaves none of it to train on"),
    ("classes", "1.5", "--test-fraction must lie in (0, 1), got 1.5"),
])
def test_test_fraction_refusals(folder_run, tmp_path, capsys, where, fraction, message):
    images, run = folder_run
    (tmp_path / "flat").mkdir()
    for name in ("a", "b"):
        Image.new("RGB", (8, 8)).save(tmp_path / "flat" / f"{name}.png")
        (tmp_path / "classes" / name).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (8, 8)).save(tmp_path / "classes" / name / f"{i}.png")
    root = {"split": images, "flat": tmp_path / "flat", "classes": tmp_path / "classes"}.get(where)
    args = ["--dataset", "digits"] if where == "digits" else ["--data-root", str(root)]
    assert evaluate_args("--run-dir", str(run), *args, "--test-fraction", fraction,
                         "--output", str(tmp_path / "out.json")) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_a_run_copied_from_another_machine_looks_for_a_named_dataset_in_data_here(tmp_path, monkeypatch, capsys):
    from idx_files import mnist_arrays, write_idx

    from relreason.train import PretrainConfig, pretrain

    raw = tmp_path / "elsewhere" / "data" / "MNIST" / "raw"
    for prefix, n, seed in (("train", 80, 1), ("t10k", 30, 2)):
        images, labels = mnist_arrays(n, seed)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images, compress=True)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels, compress=True)
    pretrain(PretrainConfig(dataset="mnist", image_size=12, num_views=2, batch_size=16, epochs=1, device="cpu",
                            progress=False, tensorboard=False, data_root=str(tmp_path / "elsewhere" / "data"),
                            output_dir=str(tmp_path / "run")))
    meta = json.loads((tmp_path / "run" / "backbone.json").read_text())
    assert meta["data_root"] == str(tmp_path / "elsewhere" / "data")  # absolute
    (tmp_path / "elsewhere" / "data").rename(tmp_path / "data")  # "another machine": the data lives in ./data there
    monkeypatch.chdir(tmp_path)
    assert evaluate_args("--run-dir", "run", "--output", "here.json") == 0
    assert json.loads((tmp_path / "here.json").read_text())["test_size"] == 30
    assert f"the run's data root {tmp_path / 'elsewhere' / 'data'} does not exist here; looking for mnist in ./data" \
        in capsys.readouterr().err


def test_a_held_out_file_keeps_its_side_when_other_files_come_and_go(tmp_path):
    from relreason.data import split_image_folder

    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        for i in range(40):
            Image.fromarray(rng.integers(0, 255, (6, 6), dtype=np.uint8)).save(tmp_path / name / f"{i:02d}.png")

    def sides():
        train, test = split_image_folder(tmp_path, 0.2)
        return {p.relative_to(tmp_path).as_posix() for p in train.paths}, {p.relative_to(tmp_path).as_posix() for p in test.paths}

    train, test = sides()
    assert len(test) == 16
    removed = sorted(test)[0]
    (tmp_path / removed).unlink()  # e.g. a corrupt file evaluate refused
    Image.new("L", (6, 6)).save(tmp_path / "b" / "new.png")
    train_after, test_after = sides()
    # Class a: 39 files, 8 held out (one came in for the one removed); class b: 41 files, 8 held out.
    assert len(test - test_after - {removed}) == 0 and len(test_after - test - {"b/new.png"}) <= 1
    assert (train - {removed}) - train_after == test_after - test - {"b/new.png"}


def test_an_imagenet_style_train_and_val_folder_is_its_own_split(tmp_path):
    from relreason.data import has_split_dirs, load_dataset

    for split, count in (("train", 3), ("val", 2)):
        for name in ("cat", "dog"):
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (8, 8)).save(tmp_path / split / name / f"{i}.png")
    assert has_split_dirs(tmp_path)
    train, test = load_dataset("folder", tmp_path, "train"), load_dataset("folder", tmp_path, "test")
    assert (len(train), len(test), test.classes) == (6, 4, ["cat", "dog"])
    assert all(p.parent.parent.name == "val" for p in test.paths)


def _class_folder(root, per_class=8, classes=("cat", "dog")):
    rng = np.random.default_rng(3)
    for label, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 120, (12, 12, 3)) + 120 * label
            Image.fromarray(pixels.astype(np.uint8)).save(root / name / f"{i}.png")
    return root


def test_pretraining_with_a_test_fraction_never_sees_the_images_evaluate_holds_out(tmp_path, capsys):
    from relreason.cli import main
    from relreason.data import split_image_folder

    images = _class_folder(tmp_path / "images")
    run = tmp_path / "run"
    args = ["pretrain", "--dataset", "folder", "--data-root", str(images), "--test-fraction", "0.25",
            "--image-size", "12", "-K", "2", "--batch-size", "4", "--no-progress", "--no-tensorboard",
            "--output-dir", str(run)]
    assert main([*args, "--epochs", "1"]) == 0
    out, err = capsys.readouterr()
    assert "12 images (4 more held out as the test set), 2 classes" in err
    assert f"evaluate with: relreason evaluate --run-dir {run}\n" in out  # the run knows its split
    assert json.loads((run / "backbone.json").read_text())["test_fraction"] == 0.25
    assert evaluate_args("--run-dir", str(run)) == 0
    result = json.loads((run / "evaluation.json").read_text())
    assert (result["train_size"], result["test_size"], result["test_fraction"]) == (12, 4, 0.25)
    held_out = {str(p) for p in split_image_folder(images, 0.25)[1].paths}
    assert len(held_out) == 4
    assert not result["test_images_seen_in_pretraining"]
    # A training checkpoint, and the run's folder named explicitly, hold the same share out.
    checkpoint = sorted(run.glob("checkpoint-*.pt"))[-1]
    for extra in (["--weights", str(checkpoint)], ["--run-dir", str(run), "--data-root", str(images)]):
        assert evaluate_args(*extra, "--output", str(tmp_path / "again.json")) == 0
        again = json.loads((tmp_path / "again.json").read_text())
        assert (again["train_size"], again["test_size"], again["test_fraction"]) == (12, 4, 0.25)
    capsys.readouterr()
    # A larger share than the run's reaches into images it trained on: allowed, said, and recorded.
    assert evaluate_args("--run-dir", str(run), "--test-fraction", "0.5", "--output", str(tmp_path / "more.json")) == 0
    assert "the test images that --test-fraction 0.5 holds out of " in (err := capsys.readouterr().err)
    assert "were partly seen in pretraining (it held out 0.25)" in err
    assert json.loads((tmp_path / "more.json").read_text())["test_images_seen_in_pretraining"] is True
    from relreason.train import PretrainConfig, pretrain

    for fraction, said in ((0.5, "--test-fraction: checkpoint 0.25 vs now 0.5"),
                           (None, "--test-fraction: checkpoint 0.25 vs now none")):  # as a user would write it
        with pytest.raises(RelreasonError, match=said):
            pretrain(PretrainConfig(dataset="folder", data_root=str(images), test_fraction=fraction, image_size=12,
                                    num_views=2, batch_size=4, epochs=2, device="cpu", progress=False,
                                    tensorboard=False, output_dir=str(run)))


def test_a_test_set_in_a_folder_that_holds_the_pretraining_one_is_said_to_be_seen(tmp_path, capsys):
    from relreason.cli import main

    root = tmp_path / "root"
    _class_folder(root / "cats")  # pretrained on root/cats, evaluated on root, whose classes include it
    for name in ("dogs", "birds"):
        _class_folder(root / name)
    run = tmp_path / "run"
    assert main(["pretrain", "--dataset", "folder", "--data-root", str(root / "cats"), "--image-size", "12", "-K", "2",
                 "--batch-size", "4", "--epochs", "1", "--no-progress", "--no-tensorboard", "--output-dir", str(run)]) == 0
    capsys.readouterr()
    assert evaluate_args("--run-dir", str(run), "--data-root", str(root), "--test-fraction", "0.25") == 0
    err = capsys.readouterr().err
    result = json.loads((run / "evaluation.json").read_text())
    inside = sum(str(p).startswith(str(root / "cats")) for p in result_test_paths(root))
    assert inside > 0 and f"{inside} of the {result['test_size']} test images lie in {root / 'cats'}" in err
    assert result["test_images_seen_in_pretraining"] is True
    # Another folder that does not hold it: nothing said.
    assert evaluate_args("--run-dir", str(run), "--data-root", str(root / "dogs"), "--test-fraction", "0.25",
                         "--output", str(tmp_path / "dogs.json")) == 0
    assert "lie in" not in capsys.readouterr().err
    assert json.loads((tmp_path / "dogs.json").read_text())["test_images_seen_in_pretraining"] is False


def result_test_paths(root):
    from relreason.data import split_image_folder

    return split_image_folder(root, 0.25)[1].paths


def test_pretraining_on_the_train_share_alone(tmp_path):
    # What the trainer sees: exactly the files split_image_folder leaves for training.
    from relreason.data import split_image_folder
    from relreason.train import PretrainConfig, build_pretrain_data

    images = _class_folder(tmp_path / "images")
    for augment in ("pil", "tensor"):
        dataset, _ = build_pretrain_data(PretrainConfig(dataset="folder", data_root=str(images), test_fraction=0.25,
                                                        image_size=12, augment=augment))
        folder = getattr(dataset.dataset, "folder", dataset.dataset)
        assert [str(p) for p in folder.paths] == [str(p) for p in split_image_folder(images, 0.25)[0].paths]
        assert len(dataset) == 12


def test_compare_holds_the_same_share_out_of_every_run(tmp_path):
    from relreason.cli import main

    images = _class_folder(tmp_path / "images", per_class=25)
    output = tmp_path / "compare"
    assert main(["compare", "--dataset", "folder", "--data-root", str(images), "--test-fraction", "0.2",
                 "--methods", "relational", "supervised", "--seeds", "1", "--epochs", "1", "--image-size", "12",
                 "--batch-size", "8", "-K", "2", "--protocols", "knn", "--embedding-points", "10", "--device", "cpu",
                 "--no-progress", "--output-dir", str(output)]) == 0
    for method in ("relational", "supervised"):
        result = json.loads((output / f"{method}-seed1" / "evaluation.json").read_text())
        assert (result["train_size"], result["test_size"], result["test_fraction"]) == (40, 10, 0.2)
        assert not result["test_images_seen_in_pretraining"]
        assert json.loads((output / f"{method}-seed1" / "backbone.json").read_text())["test_fraction"] == 0.2


def test_no_data_root_note_where_nothing_moved_or_no_files_are_read(tmp_path, monkeypatch, capsys):
    # README command 1: digits with the default --data-root, which never exists; evaluated from there and elsewhere.
    from relreason.train import PretrainConfig, pretrain

    monkeypatch.chdir(tmp_path)
    pretrain(PretrainConfig(dataset="digits", image_size=12, num_views=2, batch_size=64, epochs=1, device="cpu",
                            progress=False, tensorboard=False, output_dir="run"))
    capsys.readouterr()
    assert evaluate_args("--run-dir", "run") == 0
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert evaluate_args("--run-dir", "../run") == 0
    assert "note:" not in capsys.readouterr().err


def test_retrieval_warns_of_test_images_with_nothing_to_find(folder_run, tmp_path, capsys):
    images = labelled_folder(tmp_path / "images")
    for name in ("cat", "dog"):  # one test image per class: neither has another of its class to retrieve
        for extra in ("1.png", "2.png"):
            (images / "test" / name / extra).unlink()
    _, run = folder_run
    assert evaluate_args("--run-dir", str(run), "--dataset", "folder", "--data-root", str(images), "--protocols",
                         "retrieval", "--no-retrieval-plot", "--output", str(tmp_path / "results.json")) == 0
    err = capsys.readouterr().err
    assert "warning: 2 of the 2 test images have no other image of their class to find" in err
    result = json.loads((tmp_path / "results.json").read_text())["results"]["pretrained"]["retrieval"]
    assert result["queries_without_match"] == 2 and result["mAP"] == 0.0
    labelled_folder(tmp_path / "enough")  # three per class: nothing to warn of
    assert evaluate_args("--run-dir", str(run), "--dataset", "folder", "--data-root", str(tmp_path / "enough"),
                         "--protocols", "retrieval", "--no-retrieval-plot", "--output", str(tmp_path / "r2.json")) == 0
    assert "no other image of their class" not in capsys.readouterr().err


def test_fine_tuning_reads_a_folder_once_into_memory_with_the_results_of_reading_its_files(tmp_path, monkeypatch,
                                                                                          capsys):
    """Fine-tuning's transforms start from the evaluation's square, so the folder is decoded once at that square
    (for every backbone and protocol) instead of every epoch: the same pixels, the same results."""
    from relreason.cli import main
    from relreason.data import ImageFolderDataset
    from relreason.data.decoded_folder import DecodedImageFolder
    from relreason.data.image_folder import decoded_for
    from relreason.evaluate import data, job
    from relreason.protocols import finetune_transform
    from relreason.protocols._common import TransformedDataset
    from relreason.train import PretrainConfig, pretrain

    rng = np.random.default_rng(3)
    images = tmp_path / "images"
    for split, count in (("train", 6), ("test", 3)):
        for label, name in enumerate(("cat", "dog")):
            (images / split / name).mkdir(parents=True)
            for i in range(count):
                pixels = (rng.integers(0, 120, (10 + 7 * i, 16 + 3 * i, 3)) + 120 * label).astype(np.uint8)
                Image.fromarray(pixels).save(images / split / name / f"{i}.{'jpg' if i % 2 else 'png'}")
    Image.fromarray(rng.integers(0, 256, (150, 200, 3), dtype=np.uint8)).save(images / "train" / "cat" / "large.jpg")
    folder = decoded_for(ImageFolderDataset(images / "train"), 12)  # as evaluate reads it: JPEGs at 48 px or more
    assert folder[6][0].size == (100, 75)  # large.jpg, decoded at half its size
    decoded = data.decoded_once(folder, 12, "train")
    assert isinstance(decoded, DecodedImageFolder) and decoded.labels.tolist() == folder.labels.tolist()
    transform = finetune_transform(12, [0.5] * 3, [0.25] * 3)
    for index in range(len(folder)):  # the same random crop and flip of the same pixels, from files or memory
        torch.manual_seed(index)
        from_files = TransformedDataset(folder, transform)[index][0]
        torch.manual_seed(index)
        assert torch.equal(TransformedDataset(decoded, transform)[index][0], from_files), index
    assert data.decoded_once(decoded, 12, "train") is decoded  # not a folder: as it is

    run = tmp_path / "run"
    pretrain(PretrainConfig(dataset="folder", data_root=str(images), image_size=12, num_views=2, batch_size=4,
                            epochs=1, device="cpu", progress=False, tensorboard=False, output_dir=str(run)))
    calls, tuned_on = [], []
    decoded_once, fine_tune = job.decoded_once, job.fine_tune
    monkeypatch.setattr(job, "decoded_once", lambda *args: calls.append(args[2]) or decoded_once(*args))
    monkeypatch.setattr(job, "fine_tune", lambda backbone, **kw: tuned_on.append(type(kw["train_set"]).__name__)
                        or fine_tune(backbone, **kw))
    argv = ["evaluate", "--run-dir", str(run), "--protocols", "knn", "finetune", "few_label", "--label-fractions",
            "0.5", "--finetune-epochs", "2", "--knn-k", "3", "--device", "cpu"]
    assert main([*argv, "--output", str(tmp_path / "memory.json")]) == 0
    assert calls == ["train", "test"]  # once, for both backbones
    assert tuned_on == ["DecodedImageFolder"] * 4  # pretrained and random, all labels and half of them
    monkeypatch.setattr(data, "decoding_too_large", lambda *args, **kw: "needs 9 GB of memory, more than 50% of 1 GB")
    capsys.readouterr()
    assert main([*argv, "--output", str(tmp_path / "files.json")]) == 0
    assert "fine-tuning reads the train images from their files every epoch (decoding them into memory needs 9 GB" in \
        capsys.readouterr().err
    assert tuned_on[4:] == ["ImageFolderDataset"] * 4
    in_memory, from_files = (json.loads((tmp_path / f"{name}.json").read_text())["results"] for name in ("memory", "files"))
    assert in_memory == from_files
    assert in_memory["pretrained"]["finetune"]["train_accuracy"] > 0


@pytest.mark.parametrize("weight_decay", [1e-3, 0.05])
def test_converged_probe_minimises_the_same_objective_as_scikit_learn(weight_decay):
    """mean CE + wd * ||W||^2 on standardised features is scikit-learn's multinomial logistic regression with
    C = 1 / (2 * wd * N) (bias unpenalised): both land on the same classifier, so on overlapping classes the
    same predictions."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(4)
    centres = rng.normal(size=(3, 20)) * 0.6
    tr_y, te_y = rng.integers(0, 3, 60), rng.integers(0, 3, 3000)
    tr_x = centres[tr_y] + rng.normal(size=(60, 20)) * 1.5
    te_x = centres[te_y] + rng.normal(size=(3000, 20)) * 1.5
    ours = linear_probe_converged(torch.from_numpy(tr_x), torch.from_numpy(tr_y), torch.from_numpy(te_x),
                                  torch.from_numpy(te_y), weight_decay=weight_decay)
    scaler = StandardScaler().fit(tr_x)
    reference = LogisticRegression(C=1 / (2 * weight_decay * 60), tol=1e-12, max_iter=10_000)
    reference.fit(scaler.transform(tr_x), tr_y)
    assert ours["train_accuracy"] == pytest.approx(100 * reference.score(scaler.transform(tr_x), tr_y))
    assert ours["test_accuracy"] == pytest.approx(100 * reference.score(scaler.transform(te_x), te_y))
    assert 40 < ours["test_accuracy"] < 95  # overlapping classes: the regularisation decides borderline rows


def test_running_out_of_memory_while_evaluating_is_one_line(tmp_path, monkeypatch, capsys):
    from relreason.backbones import Conv4
    from relreason.cli import main
    from relreason.evaluate import job

    torch.save(Conv4().state_dict(), tmp_path / "weights.pt")

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")

    monkeypatch.setattr(job, "extract_features", out_of_memory)
    argv = ["evaluate", "--weights", str(tmp_path / "weights.pt"), "--backbone", "conv4", "--dataset", "digits",
            "--protocols", "knn", "--device", "cpu", "--batch-size", "512"]
    assert main(argv) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "relreason: error: out of memory evaluating (features are extracted in batches of 512 images); lower "
        "`relreason evaluate`'s --batch-size")
    assert main([*argv, "--protocols", "knn", "finetune"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "relreason: error: out of memory evaluating (features are extracted in batches of 512 images, fine-tuning's "
        "steps 128); lower `relreason evaluate`'s --batch-size, or leave finetune out of --protocols")


def test_evaluate_refuses_an_output_that_would_replace_the_weights_or_a_run_file(folder_run, tmp_path, capsys):
    _, run = folder_run
    for name, what in (("backbone.pt", "the weights evaluated"), ("config.json", "the run's config.json")):
        before = (run / name).read_bytes()
        assert evaluate_args("--run-dir", str(run), "--protocols", "knn", "--output", str(run / name)) == 2
        assert (f"--output {run / name} would replace {what}; give the results a file of their own, e.g. "
                f"{run / 'evaluation.json'}") in capsys.readouterr().err
        assert (run / name).read_bytes() == before


def test_the_run_s_own_train_folder_named_directly_is_known_as_seen(folder_run, tmp_path, capsys):
    """Pretrained on a root holding train/ and test/ (on train/): that train/ given as --data-root, split with
    --test-fraction, holds only images the backbone was trained on."""
    images, run = folder_run
    output = tmp_path / "own-train.json"
    assert evaluate_args("--run-dir", str(run), "--data-root", str(images / "train"), "--test-fraction", "0.34",
                         "--output", str(output)) == 0
    assert "were all seen in pretraining (it held none out)" in capsys.readouterr().err
    result = json.loads(output.read_text())
    assert result["test_images_seen_in_pretraining"] is True and result["cross_domain"] is False


def test_a_full_disk_while_evaluating_is_one_line(folder_run, tmp_path, monkeypatch, capsys):
    import errno

    from relreason.evaluate import report

    def disk_full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    _, run = folder_run
    monkeypatch.setattr(report, "atomic_write_bytes", disk_full)
    output = tmp_path / "full.json"
    assert evaluate_args("--run-dir", str(run), "--output", str(output)) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"relreason: error: cannot write {output} (No space left on device); free space there and rerun the same "
        "command: the features already cached are read, not extracted again")


def test_the_root_above_a_run_s_folder_is_another_folder_with_its_own_split(tmp_path, capsys):
    """Pretrained on R/train with a share held out: R itself (holding train/ and test/) is evaluated on its own
    split, not taken for the run's folder (whose held-out share R's train/ and test/ would refuse)."""
    from relreason.train import PretrainConfig, pretrain

    root = labelled_folder(tmp_path / "R")
    pretrain(PretrainConfig(dataset="folder", data_root=str(root / "train"), test_fraction=0.34, image_size=12,
                            num_views=2, batch_size=8, epochs=1, device="cpu", progress=False, tensorboard=False,
                            output_dir=str(tmp_path / "run")))
    assert evaluate_args("--run-dir", str(tmp_path / "run"), "--data-root", str(root)) == 0
    assert json.loads((tmp_path / "run" / "evaluation.json").read_text())["test_size"] == 6


def test_evaluate_writes_again_over_its_own_output_outside_a_run(folder_run, tmp_path):
    _, run = folder_run
    output = tmp_path / "elsewhere" / "steps.jsonl"  # a run file's name, but no run's folder
    for _ in range(2):
        assert evaluate_args("--run-dir", str(run), "--output", str(output)) == 0
