"""Pretrain on the embedded digits, resume, evaluate: the whole user path through the CLI."""

import json

import pytest
import torch

from relreason.cli import main


def pretrain(output_dir, *extra):
    argv = ["pretrain", "--dataset", "digits", "--backbone", "conv4", "-K", "4", "--batch-size", "64",
            "--seed", "3", "--device", "cpu", "--no-progress", "--output-dir", str(output_dir), *extra]
    assert main(argv) == 0


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    straight = tmp_path_factory.mktemp("straight")
    pretrain(straight, "--epochs", "8")
    resumed = tmp_path_factory.mktemp("resumed")
    pretrain(resumed, "--epochs", "4")
    pretrain(resumed, "--epochs", "8", "--resume")
    return straight, resumed


def test_run_folder_contents(runs):
    straight, _ = runs
    for name in ("checkpoint-e0008-s0000000.pt", "checkpoint-e0007-s0000000.pt", "backbone.pt", "backbone.json",
                 "metrics.jsonl", "config.json"):
        assert (straight / name).is_file(), name
    records = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == list(range(1, 9))
    assert records[-1]["loss"] < records[0]["loss"]
    assert records[-1]["relation_accuracy"] > 52.0
    assert not (straight / "checkpoint-e0006-s0000000.pt").exists()  # rotated: the newest two are kept
    checkpoint = torch.load(straight / "checkpoint-e0008-s0000000.pt", weights_only=False)
    assert checkpoint["epoch"] == 8
    assert {"backbone", "model", "optimizer", "scaler", "rng", "config", "position"} <= set(checkpoint)
    assert any(key.startswith("method.relation_head.") for key in checkpoint["model"])
    meta = json.loads((straight / "backbone.json").read_text())
    assert meta["backbone"] == "conv4" and meta["feature_dim"] == 64 and meta["image_size"] == 32


def test_resume_is_bit_identical_to_an_uninterrupted_run(runs):
    straight, resumed = runs
    a = torch.load(straight / "backbone.pt", weights_only=True)
    b = torch.load(resumed / "backbone.pt", weights_only=True)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    metrics_a = (straight / "metrics.jsonl").read_text().splitlines()
    metrics_b = (resumed / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["loss"] for x in metrics_a] == [json.loads(x)["loss"] for x in metrics_b]


def test_exported_backbone_loads_into_its_class(runs):
    from relreason.backbones import Conv4

    straight, _ = runs
    model = Conv4()
    model.load_state_dict(torch.load(straight / "backbone.pt", weights_only=True))
    # The trained weights, not a fresh Conv4's: every tensor is the final checkpoint's backbone.
    trained = torch.load(straight / "checkpoint-e0008-s0000000.pt", weights_only=False)["model"]
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, trained[f"method.backbone.{name}"]), name
    assert not torch.equal(model.state_dict()["layer1.0.weight"], Conv4().state_dict()["layer1.0.weight"])


def test_evaluate_pretrained_beats_random_knn(runs, capsys):
    straight, _ = runs
    argv = ["evaluate", "--run-dir", str(straight), "--device", "cpu", "--protocols", "knn", "linear",
            "--linear-epochs", "30"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "pretrained" in printed and "random" in printed
    payload = json.loads((straight / "evaluation.json").read_text())
    results = payload["results"]
    assert results["pretrained"]["knn"]["test_accuracy"] > results["random"]["knn"]["test_accuracy"]
    assert results["pretrained"]["linear"]["test_accuracy"] > results["random"]["linear"]["test_accuracy"]
    assert payload["test_size"] + payload["train_size"] == 1797
    # Features were cached: a second evaluation reads them back.
    assert len(list((straight / "features").glob("*.pt"))) == 4
    assert main(argv) == 0
    assert json.loads((straight / "evaluation.json").read_text())["results"] == results
