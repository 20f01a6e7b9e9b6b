"""Tests for the protocols beyond frozen-feature probes: retrieval, few labels, fine-tuning, cross-domain."""

from __future__ import annotations

import json
import math
from decimal import ROUND_HALF_UP, Decimal

import numpy as np
import pytest
import torch
from loop_reference import reference_knn_predict, reference_retrieval
from PIL import Image
from torch import nn

from relreason.cli import main
from relreason.data import ArrayImageDataset, compute_normalization, dataset_info, eval_transform, load_dataset
from relreason.errors import RelreasonError
from relreason.evaluate import (
    evaluate_features,
    extract_features,
    few_label_indices,
    fine_tune,
    finetune_transform,
    format_table,
    linear_probe,
    linear_probe_converged,
    plot_retrieval,
    retrieval_metrics,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------------------------
# Retrieval metrics
# --------------------------------------------------------------------------------------------


def test_retrieval_metrics_hand_computed():
    # Five 2-D points at angles (degrees) with labels; norms differ on purpose (cosine ignores them).
    #   item:   0    1    2    3    4
    #   angle:  0   10   30   70  100
    #   label:  A    A    B    A    B
    # Cosine similarity falls with the angle between items, so each query ranks the others by
    # angular distance (no ties):
    #   q0 (A): 1(10) 2(30) 3(70) 4(100) -> relevant 1 0 1 0, R=2
    #           P@1=1, P@2=1/2, P@3=2/3; AP = (1/1 + 2/3)/2 = 5/6
    #   q1 (A): 0(10) 2(20) 3(60) 4(90)  -> 1 0 1 0, R=2
    #           P@1=1, P@2=1/2, P@3=2/3; AP = 5/6
    #   q2 (B): 1(20) 0(30) 3(40) 4(70)  -> 0 0 0 1, R=1
    #           P@1=0, P@2=0,   P@3=0;   AP = 1/4
    #   q3 (A): 4(30) 2(40) 1(60) 0(70)  -> 0 0 1 1, R=2
    #           P@1=0, P@2=0,   P@3=1/3; AP = (1/3 + 2/4)/2 = 5/12
    #   q4 (B): 3(30) 2(70) 1(90) 0(100) -> 0 1 0 0, R=1
    #           P@1=0, P@2=1/2, P@3=1/3; AP = 1/2
    # Means over the 5 queries: P@1 = 2/5, P@2 = 1.5/5 = 3/10, P@3 = 2/5,
    # mAP = (10/12 + 10/12 + 3/12 + 5/12 + 6/12)/5 = 34/60 = 17/30.  Reported in percent.
    angles = torch.tensor([0.0, 10.0, 30.0, 70.0, 100.0]) * math.pi / 180
    norms = torch.tensor([1.0, 3.0, 0.5, 2.0, 7.0])
    features = torch.stack([torch.cos(angles), torch.sin(angles)], dim=1) * norms[:, None]
    labels = torch.tensor([0, 0, 1, 0, 1])
    result = retrieval_metrics(features, labels, ks=(1, 2, 3))
    assert result["precision@1"] == pytest.approx(100 * 2 / 5)
    assert result["precision@2"] == pytest.approx(100 * 3 / 10)
    assert result["precision@3"] == pytest.approx(100 * 2 / 5)
    assert result["mAP"] == pytest.approx(100 * 17 / 30)
    assert result["queries"] == 5 and result["queries_without_match"] == 0
    # k beyond the N-1 = 4 other items is clipped: precision@10 is then precision@4 = 2/4 for
    # every query except q2 and q4 (1/4 each): (2+2+1+2+1)/4/5 = 2/5.
    assert retrieval_metrics(features, labels, ks=(10,))["precision@10"] == pytest.approx(100 * 2 / 5)


def test_retrieval_metrics_match_plain_loop_and_do_not_depend_on_chunking():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(60, 6)).astype(np.float32)
    labels = rng.integers(0, 4, size=60)
    labels[17] = 9  # a class with a single member: no AP for that query
    expected = reference_retrieval(features.astype(np.float64), labels, (1, 5, 10))
    for batch_size in (None, 7, 60):
        result = retrieval_metrics(torch.from_numpy(features), torch.from_numpy(labels), batch_size=batch_size)
        for key, value in expected.items():
            assert result[key] == pytest.approx(value, abs=1e-9), (key, batch_size)
        assert result["queries_without_match"] == 1


def test_retrieval_metrics_reject_bad_input():
    with pytest.raises(RelreasonError, match="at least 2"):
        retrieval_metrics(torch.ones(1, 3), torch.tensor([0]))
    with pytest.raises(RelreasonError, match="labels"):
        retrieval_metrics(torch.ones(4, 3), torch.tensor([0, 1]))
    with pytest.raises(RelreasonError, match="positive integer"):
        retrieval_metrics(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]), ks=(0,))


def test_plot_retrieval_writes_png(tmp_path):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(12, 10, 10, 3), dtype=np.uint8)
    labels = np.arange(12) % 3
    dataset = ArrayImageDataset(images, labels, ["a", "b", "c"])
    features = torch.from_numpy(rng.normal(size=(12, 5)).astype(np.float32))
    path = plot_retrieval(dataset, features, torch.from_numpy(labels), tmp_path / "plots" / "r.png", num_queries=20, top=4)
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > 5000
    assert [p.name for p in path.parent.iterdir()] == ["r.png"]  # written atomically, no leftovers
    with pytest.raises(RelreasonError, match="feature rows"):
        plot_retrieval(dataset, features[:5], torch.from_numpy(labels[:5]), tmp_path / "bad.png")


# --------------------------------------------------------------------------------------------
# Few-label subsets
# --------------------------------------------------------------------------------------------


def test_few_label_indices_balanced_reproducible_nested():
    rng = np.random.default_rng(0)
    labels = rng.permutation(np.repeat(np.arange(5), [40, 41, 43, 39, 45]))  # 208 items, unequal classes
    idx = few_label_indices(labels, 0.1, seed=3)
    counts = np.bincount(labels[idx], minlength=5)
    assert (counts == counts[0]).all()  # class-balanced
    assert counts[0] == math.floor(0.1 * 208 / 5 + 0.5)  # stated rounding: 4.16 -> 4
    assert idx.dtype == np.int64 and (np.diff(idx) > 0).all()  # sorted, distinct
    assert idx.min() >= 0 and idx.max() < labels.shape[0]
    assert np.array_equal(idx, few_label_indices(labels, 0.1, seed=3))  # reproducible
    assert not np.array_equal(idx, few_label_indices(labels, 0.1, seed=4))  # another seed, another subset
    assert set(few_label_indices(labels, 0.01, seed=3)) <= set(few_label_indices(labels, 0.25, seed=3))
    tiny = few_label_indices(labels, 0.001, seed=0)
    assert np.array_equal(np.bincount(labels[tiny], minlength=5), np.ones(5))  # at least one per class
    big = few_label_indices(labels, 0.99, seed=0)
    assert np.array_equal(np.bincount(labels[big], minlength=5), np.full(5, 39))  # capped at the smallest class
    assert np.array_equal(few_label_indices(labels, 1.0, seed=0), np.arange(208))
    assert np.array_equal(few_label_indices(torch.from_numpy(labels), 0.1, seed=3), idx)


@pytest.mark.parametrize("fraction", [0.04, 0.25, 0.32, 0.38, 0.45, 0.95])
def test_few_label_indices_round_the_per_class_count_half_up(fraction):
    # 2 classes of 10: fraction * 20 / 2 per class, rounded half up (at least 1, at most the class size):
    # 0.4 -> 1, 2.5 -> 3, 3.2 -> 3, 3.8 -> 4, 4.5 -> 5, 9.5 -> 10.
    labels = np.tile([0, 1], 10)
    exact = Decimal(str(fraction)) * 20 / 2
    expected = min(10, max(1, int(exact.quantize(Decimal(1), rounding=ROUND_HALF_UP))))
    idx = few_label_indices(labels, fraction, seed=0)
    assert np.bincount(labels[idx], minlength=2).tolist() == [expected, expected]


def test_few_label_indices_draw_every_class_from_one_seeded_generator():
    # As documented: one numpy default_rng(seed), a permutation of each class's members in increasing
    # label order.  So two classes of equal size do not get the same relative positions.
    m = 50
    blocks = np.repeat([0, 1], m)  # class 0 at 0..49, class 1 at 50..99
    for seed in range(3):
        idx = few_label_indices(blocks, 0.2, seed=seed)
        first, second = idx[blocks[idx] == 0], idx[blocks[idx] == 1] - m
        assert first.shape == second.shape == (10,)
        assert not np.array_equal(first, second), seed

    labels = np.random.default_rng(1).permutation(np.repeat([0, 1, 2], [30, 30, 35]))
    per_class = math.floor(0.1 * 95 / 3 + 0.5)  # 3.17 -> 3
    rng = np.random.default_rng(7)
    expected = []
    for c in (0, 1, 2):
        members = np.flatnonzero(labels == c)
        expected += members[rng.permutation(members.shape[0])[:per_class]].tolist()
    assert few_label_indices(labels, 0.1, seed=7).tolist() == sorted(expected)


@pytest.mark.parametrize("fraction", [0, -0.1, 1.5, float("nan"), "x"])
def test_few_label_indices_reject_bad_fraction(fraction):
    with pytest.raises(RelreasonError, match="fraction"):
        few_label_indices(np.array([0, 1, 0, 1]), fraction, seed=0)


@pytest.mark.parametrize("seed", [-1, 2**63, 1.5, True])
def test_protocol_seeds_take_the_training_seed_range(seed):
    # The protocols seed numpy and torch generators: a seed either would reject is refused up front, with
    # the same range as --seed.
    with pytest.raises(RelreasonError, match=r"seed must be an integer in \[0, 2\*\*63 - 1\]"):
        few_label_indices(np.array([0, 1, 0, 1]), 0.5, seed=seed)
    few_label_indices(np.array([0, 1, 0, 1]), 0.5, seed=2**63 - 1)


def test_few_label_indices_reject_unlabelled():
    with pytest.raises(RelreasonError, match="unlabelled"):
        few_label_indices(np.array([0, -1, 1]), 0.5)


def test_evaluate_features_few_label_and_retrieval():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 8, generator=g) * 4
    tr_y = torch.arange(3).repeat_interleave(100)
    te_y = torch.arange(3).repeat_interleave(30)
    tr_x = centres[tr_y] + torch.randn(300, 8, generator=g)
    te_x = centres[te_y] + torch.randn(90, 8, generator=g)
    results = evaluate_features(tr_x, tr_y, te_x, te_y, protocols=["retrieval", "few_label", "linear_converged"],
                                label_fractions=[0.1, 0.5])
    assert list(results) == ["retrieval", "few_label", "linear_converged"]
    assert results["retrieval"]["mAP"] > 90 and results["retrieval"]["precision@10"] > 90
    few = results["few_label"]
    assert list(few) == ["0.1", "0.5"]
    assert few["0.1"]["train_size"] == 30 and few["0.5"]["train_size"] == 150
    assert set(few["0.1"]) == {"fraction", "train_size", "linear_converged"}  # only the chosen probe
    assert few["0.5"]["linear_converged"]["test_accuracy"] > 90
    # Without a linear probe chosen, few_label runs the paper's probe.
    alone = evaluate_features(tr_x, tr_y, te_x, te_y, protocols=["few_label"], label_fractions=[0.1], linear_epochs=2)
    assert set(alone["few_label"]["0.1"]) == {"fraction", "train_size", "linear"}
    with pytest.raises(RelreasonError, match="finetune"):
        evaluate_features(tr_x, tr_y, te_x, te_y, protocols=["finetune"])
    with pytest.raises(RelreasonError, match="fraction"):
        evaluate_features(tr_x, tr_y, te_x, te_y, protocols=["few_label"], label_fractions=[2.0])


def test_few_label_probes_train_on_the_chosen_rows_only():
    # Overlapping blobs, so a probe trained on 10% of the rows and one trained on all of them differ.
    g = torch.Generator().manual_seed(5)
    centres = torch.randn(3, 6, generator=g)
    tr_y = torch.arange(3).repeat_interleave(60)
    te_y = torch.arange(3).repeat_interleave(20)
    tr_x = centres[tr_y] + torch.randn(180, 6, generator=g)
    te_x = centres[te_y] + torch.randn(60, 6, generator=g)
    results = evaluate_features(tr_x, tr_y, te_x, te_y, protocols=["few_label", "linear", "linear_converged"],
                                label_fractions=[0.1], linear_epochs=5, seed=7)
    few = results["few_label"]["0.1"]
    rows = torch.from_numpy(few_label_indices(tr_y, 0.1, seed=7))
    assert few["train_size"] == rows.shape[0] == 18
    # Each probe is exactly that probe fitted on the chosen rows alone (same epochs and seed), tested on all.
    assert few["linear"] == linear_probe(tr_x[rows], tr_y[rows], te_x, te_y, epochs=5, seed=7)
    assert few["linear_converged"] == linear_probe_converged(tr_x[rows], tr_y[rows], te_x, te_y)
    # ... and not the full-data probe.
    assert few["linear"] != results["linear"]
    assert few["linear_converged"] != results["linear_converged"]


# --------------------------------------------------------------------------------------------
# Fine-tuning
# --------------------------------------------------------------------------------------------


def _bright_dark(n: int, seed: int) -> ArrayImageDataset:
    """8x8 grey images: odd items bright, even items dark, with pixel noise."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    base = np.where(labels == 1, 190, 70)[:, None, None]
    images = np.clip(base + rng.normal(0, 25, (n, 8, 8)), 0, 255).astype(np.uint8)
    return ArrayImageDataset(images, labels, ["dark", "bright"])


def _zero_conv_backbone() -> nn.Module:
    """BatchNorm (has running statistics) then a zero-initialised conv: its features start all zero,
    so a head alone cannot separate anything: only training the backbone can."""
    backbone = nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 2, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    nn.init.zeros_(backbone[1].weight)
    nn.init.zeros_(backbone[1].bias)
    return backbone


def test_fine_tune_trains_a_copy_with_decayed_lrs():
    train, test = _bright_dark(64, 0), _bright_dark(32, 1)
    mean, std = (0.5,) * 3, (0.25,) * 3
    backbone = _zero_conv_backbone()
    backbone.eval()
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    rng_before = torch.get_rng_state()
    args = (train, test, finetune_transform(8, mean, std), eval_transform(8, mean, std), 2)
    result = fine_tune(backbone, *args, epochs=4, backbone_lr=0.01, head_lr=0.1, batch_size=16)

    assert result["test_accuracy"] >= 95.0 and result["train_accuracy"] >= 95.0
    assert result["train_size"] == 64 and result["epochs"] == 4
    history = result["lr_history"]
    assert history["backbone"] == pytest.approx([0.01, 0.01, 0.001, 0.0001])  # x0.1 at 50% and 75%
    assert history["head"] == pytest.approx([0.1, 0.1, 0.01, 0.001])  # its own lr, decayed alike
    # The caller's backbone (weights, BatchNorm statistics, mode) and the global RNG are untouched.
    after = backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not backbone.training
    assert torch.equal(torch.get_rng_state(), rng_before)
    # Control: with the backbone (nearly) frozen the zero features stay useless -> chance.
    frozen = fine_tune(backbone, *args, epochs=4, backbone_lr=1e-9, head_lr=0.1, batch_size=16)
    assert frozen["test_accuracy"] == pytest.approx(50.0)
    # Same seed, same result.
    again = fine_tune(backbone, *args, epochs=4, backbone_lr=0.01, head_lr=0.1, batch_size=16)
    assert again["test_accuracy"] == result["test_accuracy"]


def test_fine_tune_takes_a_float64_backbone_and_grey_pil_images():
    from PIL import Image

    train, test = _bright_dark(64, 0), _bright_dark(32, 1)
    mean, std = (0.5,) * 3, (0.25,) * 3
    backbone = _zero_conv_backbone().double()
    result = fine_tune(backbone, train, test, finetune_transform(8, mean, std), eval_transform(8, mean, std), 2,
                       epochs=4, backbone_lr=0.01, head_lr=0.1, batch_size=16)
    assert result["test_accuracy"] >= 95.0 and next(backbone.parameters()).dtype == torch.float64
    assert finetune_transform(8, mean, std)(Image.new("L", (10, 12), 90)).shape == (3, 8, 8)


def test_fine_tune_trains_batchnorm_in_train_mode_and_measures_in_eval_mode():
    train, test = _bright_dark(20, 0), _bright_dark(10, 1)
    mean, std = (0.5,) * 3, (0.25,) * 3
    backbone = _zero_conv_backbone()
    backbone.eval()
    modes = []
    # The hook goes along with fine_tune's deep copy and still appends to this list.
    backbone[0].register_forward_pre_hook(lambda module, args: modes.append(module.training))
    fine_tune(backbone, train, test, finetune_transform(8, mean, std), eval_transform(8, mean, std), 2,
              epochs=2, batch_size=8)
    # One pass to learn the feature width (eval), ceil(20 / 8) training batches per epoch (train: the
    # BatchNorm learns batch statistics), then one accuracy batch of 256 each for train and test (eval).
    train_batches = 2 * math.ceil(20 / 8)
    assert modes == [False] + [True] * train_batches + [False] * (math.ceil(20 / 256) + math.ceil(10 / 256))


def test_fine_tune_label_indices_and_bad_input():
    train, test = _bright_dark(40, 0), _bright_dark(10, 1)
    mean, std = (0.5,) * 3, (0.25,) * 3
    args = (train, test, finetune_transform(8, mean, std), eval_transform(8, mean, std), 2)
    idx = few_label_indices(train.labels, 0.25, seed=0)
    result = fine_tune(_zero_conv_backbone(), *args, epochs=3, batch_size=8, label_indices=idx)
    assert result["train_size"] == idx.shape[0] == 10
    assert len(result["lr_history"]["backbone"]) == 3  # 3 epochs: decays at ceil(1.5)=2 and ceil(2.25)=3
    assert result["lr_history"]["backbone"] == pytest.approx([1e-4, 1e-4, 1e-5])
    with pytest.raises(RelreasonError, match="label_indices"):
        fine_tune(_zero_conv_backbone(), *args, epochs=1, label_indices=np.array([0, 40]))
    with pytest.raises(RelreasonError, match="num_classes"):
        fine_tune(_zero_conv_backbone(), train, test, args[2], args[3], 1, epochs=1)
    with pytest.raises(RelreasonError, match="epochs"):
        fine_tune(_zero_conv_backbone(), *args, epochs=0)


# --------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------


def test_format_table_new_protocols():
    results = {
        "pretrained": {
            "linear": {"train_accuracy": 90.0, "test_accuracy": 71.234},
            "finetune": {"train_accuracy": 99.0, "test_accuracy": 88.5, "lr_history": {"backbone": [1.0]}},
            "retrieval": {"precision@1": 61.25, "precision@5": 50.0, "mAP": 33.333},
            "few_label": {
                "0.01": {"fraction": 0.01, "train_size": 10, "linear": {"test_accuracy": 40.0}},
                "0.1": {"fraction": 0.1, "train_size": 100, "linear": {"test_accuracy": 55.5},
                        "finetune": {"test_accuracy": 60.0}},
            },
        },
        "random": {"linear": {"test_accuracy": 30.1}, "retrieval": {"precision@1": 20.0, "mAP": 10.0}},
    }
    main_table, few_table = format_table(results).split("\n\n")
    lines = main_table.splitlines()
    assert [c.strip() for c in lines[0].strip("|").split("|")] == [
        "backbone", "linear", "finetune", "retrieval mAP", "retrieval P@1"
    ]
    assert [c.strip() for c in lines[2].strip("|").split("|")] == ["pretrained", "71.23", "88.50", "33.33", "61.25"]
    assert [c.strip() for c in lines[3].strip("|").split("|")] == ["random", "30.10", "-", "10.00", "20.00"]
    few_lines = few_table.splitlines()
    assert [c.strip() for c in few_lines[0].strip("|").split("|")] == ["backbone", "labels", "linear", "finetune"]
    # The fraction asked for and the labels it came to (at least one per class).
    assert [c.strip() for c in few_lines[2].strip("|").split("|")] == ["pretrained", "1% (10)", "40.00", "-"]
    assert [c.strip() for c in few_lines[3].strip("|").split("|")] == ["pretrained", "10% (100)", "55.50", "60.00"]
    for table in (lines, few_lines):
        assert len({len(line) for line in table}) == 1  # fixed width


# --------------------------------------------------------------------------------------------
# The `relreason evaluate` job
# --------------------------------------------------------------------------------------------


def _save_random_conv4(directory, meta):
    from relreason.backbones import build_backbone

    torch.manual_seed(0)
    backbone = build_backbone("conv4", image_size=16)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(backbone.state_dict(), directory / "backbone.pt")
    (directory / "backbone.json").write_text(json.dumps(meta))
    return directory / "backbone.pt"


def test_cli_retrieval_few_label_linear_on_digits(tmp_path, capsys):
    weights = _save_random_conv4(tmp_path / "run", {"backbone": "conv4", "dataset": "digits", "image_size": 16})
    argv = ["evaluate", "--weights", str(weights), "--eval-dataset", "digits", "--device", "cpu",
            "--protocols", "retrieval", "few_label", "linear", "--linear-epochs", "3", "--label-fractions", "0.1"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "retrieval mAP" in printed and "10%" in printed and "cross-domain" not in printed
    payload = json.loads((tmp_path / "run" / "evaluation.json").read_text())
    assert payload["protocols"] == ["retrieval", "few_label", "linear"]
    assert payload["settings"]["label_fractions"] == [0.1]
    for label in ("pretrained", "random"):
        result = payload["results"][label]
        assert list(result) == ["linear", "retrieval", "few_label"]
        assert set(result["retrieval"]) >= {"precision@1", "precision@5", "precision@10", "mAP"}
        assert 0 < result["retrieval"]["mAP"] < 100
        few = result["few_label"]["0.1"]
        assert few["train_size"] == 10 * math.floor(0.1 * payload["train_size"] / 10 + 0.5)
        assert 0 <= few["linear"]["test_accuracy"] <= 100
        plot = tmp_path / "run" / f"evaluation-retrieval-{label}.png"
        assert payload["retrieval_plots"][label] == str(plot)
        assert plot.read_bytes()[:8] == PNG_SIGNATURE


def _write_folder(root, per_class: dict[str, int], seed: int) -> None:
    """root/train and root/test, classes 'red' and 'blue', 12x12 RGB PNGs with noise."""
    rng = np.random.default_rng(seed)
    colours = {"red": (200, 40, 40), "blue": (40, 40, 200)}
    for split, n in per_class.items():
        for name, colour in colours.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = np.clip(np.array(colour) + rng.normal(0, 30, (12, 12, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")


def test_cli_cross_domain_uses_the_evaluation_datasets_normalisation(tmp_path, capsys):
    digits = dataset_info("digits")
    meta = {"backbone": "conv4", "dataset": "digits", "image_size": 16,
            "mean": list(digits.mean), "std": list(digits.std)}
    weights = _save_random_conv4(tmp_path / "run", meta)
    first, second = tmp_path / "folder_a", tmp_path / "folder_b"
    _write_folder(first, {"train": 6, "test": 3}, seed=0)
    _write_folder(second, {"train": 5, "test": 4}, seed=1)

    base = ["evaluate", "--weights", str(weights), "--eval-dataset", "folder", "--device", "cpu",
            "--protocols", "knn", "linear_converged", "--knn-k", "3", "--no-random-baseline"]
    assert main([*base, "--data-root", str(first), "--output", str(tmp_path / "a.json")]) == 0
    assert "cross-domain: pretrained on digits, evaluated on folder" in capsys.readouterr().out
    payload = json.loads((tmp_path / "a.json").read_text())
    assert payload["pretrained_on"] == "digits" and payload["dataset"] == "folder"
    assert (payload["train_size"], payload["test_size"]) == (12, 6)
    expected_mean, expected_std = compute_normalization(load_dataset("folder", first, "train"))
    assert payload["normalization"]["mean"] == pytest.approx(list(expected_mean))
    assert payload["normalization"]["std"] == pytest.approx(list(expected_std))
    assert payload["normalization"]["mean"] != pytest.approx(meta["mean"], abs=0.01)
    # The k-NN result is that of features extracted with the folder's own statistics: the same weights,
    # the folder's mean and std, and a plain weighted cosine 3-NN vote over them.

    from relreason.backbones import build_backbone

    backbone = build_backbone("conv4", image_size=16)
    backbone.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    transform = eval_transform(16, expected_mean, expected_std)
    tr_x, tr_y = extract_features(backbone, load_dataset("folder", first, "train"), transform)
    te_x, te_y = extract_features(backbone, load_dataset("folder", first, "test"), transform)
    (cached,) = (tmp_path / "run" / "features").glob("*-train-*.pt")
    assert torch.allclose(torch.load(cached, weights_only=True)["features"], tr_x, atol=1e-5)
    digits_x, _ = extract_features(backbone, load_dataset("folder", first, "train"),
                                   eval_transform(16, meta["mean"], meta["std"]))
    assert not torch.allclose(digits_x, tr_x, atol=1e-3)  # the pretraining statistics would give others
    predicted = reference_knn_predict(tr_x, tr_y, te_x, k=3, temperature=0.07)
    expected_knn = 100.0 * sum(p == t for p, t in zip(predicted, te_y.tolist())) / len(predicted)
    assert payload["results"]["pretrained"]["knn"]["test_accuracy"] == pytest.approx(expected_knn)

    # The same weights on another folder: features are not taken from the first folder's cache.
    assert main([*base, "--data-root", str(second), "--output", str(tmp_path / "b.json")]) == 0
    payload_b = json.loads((tmp_path / "b.json").read_text())
    assert (payload_b["train_size"], payload_b["test_size"]) == (10, 8)
    assert len(list((tmp_path / "run" / "features").glob("*.pt"))) == 4


def test_a_folder_run_evaluated_on_another_folder_is_cross_domain(tmp_path, capsys):
    first, second = tmp_path / "folder_a", tmp_path / "folder_b"
    _write_folder(first, {"train": 6, "test": 3}, seed=0)
    _write_folder(second, {"train": 5, "test": 4}, seed=1)
    trained_on = compute_normalization(load_dataset("folder", first, "train"))
    meta = {"backbone": "conv4", "dataset": "folder", "data_root": str(first), "image_size": 16,
            "mean": list(trained_on[0]), "std": list(trained_on[1])}
    weights = _save_random_conv4(tmp_path / "run", meta)
    base = ["evaluate", "--weights", str(weights), "--device", "cpu", "--protocols", "knn", "--knn-k", "3",
            "--no-random-baseline"]
    assert main([*base, "--output", str(tmp_path / "own.json")]) == 0  # the run's own folder: in-domain
    assert "cross-domain" not in capsys.readouterr().out
    own = json.loads((tmp_path / "own.json").read_text())
    assert not own["cross_domain"] and own["data_root"] == own["pretrained_data_root"] == str(first)
    assert own["normalization"]["mean"] == meta["mean"]
    assert main([*base, "--data-root", str(second), "--output", str(tmp_path / "other.json")]) == 0
    assert f"cross-domain: pretrained on folder {first}, evaluated on folder {second}" in capsys.readouterr().out
    other = json.loads((tmp_path / "other.json").read_text())
    assert other["cross_domain"] and other["data_root"] == str(second)
    expected_mean, _ = compute_normalization(load_dataset("folder", second, "train"))
    assert other["normalization"]["mean"] == pytest.approx(list(expected_mean))  # its own, as another dataset's
    first.rename(tmp_path / "moved")  # the run's folder gone: the one given is taken for it
    assert main([*base, "--data-root", str(tmp_path / "moved"), "--output", str(tmp_path / "moved.json")]) == 0
    out, err = capsys.readouterr()
    assert "cross-domain" not in out and f"the run's folder {first} is not there; taking" in err
    assert json.loads((tmp_path / "moved.json").read_text())["normalization"]["mean"] == meta["mean"]
    # Pretrained on a root's train/ and evaluated on the root: the training images are the run's own.
    weights = _save_random_conv4(tmp_path / "run_on_train", meta | {"data_root": str(second / "train")})
    on_root = ["evaluate", *base[1:]]
    on_root[on_root.index(str(tmp_path / "run" / "backbone.pt"))] = str(weights)
    assert main([*on_root, "--data-root", str(second), "--output", str(tmp_path / "root.json")]) == 0
    assert "cross-domain" not in capsys.readouterr().out
    assert json.loads((tmp_path / "root.json").read_text())["cross_domain"] is False
    # Weights that name no dataset: whether another domain is not known.
    unnamed = _save_random_conv4(tmp_path / "unnamed", {"backbone": "conv4", "image_size": 16})
    on_root[on_root.index(str(weights))] = str(unnamed)
    assert main([*on_root, "--dataset", "folder", "--data-root", str(second),
                 "--output", str(tmp_path / "u.json")]) == 0
    assert json.loads((tmp_path / "u.json").read_text())["cross_domain"] is None


def test_cli_finetune_with_few_labels(tmp_path, capsys):
    weights = _save_random_conv4(tmp_path / "run", {"backbone": "conv4", "dataset": "folder", "image_size": 16})
    _write_folder(tmp_path / "data", {"train": 8, "test": 4}, seed=2)
    argv = ["evaluate", "--weights", str(weights), "--dataset", "folder", "--data-root", str(tmp_path / "data"),
            "--device", "cpu", "--protocols", "finetune", "few_label", "--label-fractions", "0.5",
            "--finetune-epochs", "2", "--finetune-head-lr", "0.01", "--linear-epochs", "2", "--no-random-baseline"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "finetune" in printed and "50%" in printed
    payload = json.loads((tmp_path / "run" / "evaluation.json").read_text())
    result = payload["results"]["pretrained"]
    assert list(result) == ["finetune", "few_label"]
    assert result["finetune"]["train_size"] == 16
    assert result["finetune"]["lr_history"] == {"backbone": pytest.approx([1e-4, 1e-5]),
                                                "head": pytest.approx([0.01, 0.001])}
    few = result["few_label"]["0.5"]
    assert few["train_size"] == 8 and few["finetune"]["train_size"] == 8 and "linear" in few
    assert payload["settings"]["finetune"]["lr_decay_epochs"] == [1, 2]


def test_cli_rejects_bad_protocol_options(tmp_path, capsys):
    weights = _save_random_conv4(tmp_path / "run", {"backbone": "conv4", "dataset": "digits", "image_size": 16})
    base = ["evaluate", "--weights", str(weights), "--device", "cpu"]
    assert main([*base, "--protocols", "few_label", "--label-fractions", "0"]) == 2
    err = capsys.readouterr().err
    assert "label fraction" in err and len(err.strip().splitlines()) == 1
    assert main([*base, "--protocols", "finetune", "--finetune-epochs", "0"]) == 2
    assert "--finetune-epochs" in capsys.readouterr().err
    assert main([*base, "--protocols", "nonsense"]) == 2
    assert not (tmp_path / "run" / "evaluation.json").exists()


def test_label_fractions_that_would_share_a_result_key_are_refused():
    from relreason.protocols.few_label import check_label_fractions

    assert check_label_fractions([0.1, 0.25]) == (0.1, 0.25)
    with pytest.raises(RelreasonError, match="too close to tell apart"):
        check_label_fractions([0.1, 0.1000001])


def test_precise_float_is_float32_only_on_mps():
    # Apple's MPS has no float64: the metric sums, the converged probe and retrieval use float32 there.
    from relreason.device import precise_float

    assert precise_float("cpu") == torch.float64
    assert precise_float(torch.device("cuda", 1)) == torch.float64
    assert precise_float("mps") == torch.float32
