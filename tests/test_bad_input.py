"""Every bad input a user may give: a one-line error naming the problem and the fix, exit 2, nothing written.

docs/bad-input.md shows the message for each of these cases.
"""

import pytest
import torch

from relreason.cli import main

# (case, argv after the subcommand, a fragment of the message). {tmp} is a fresh temporary folder.
PRETRAIN_CASES = [
    ("K below 2", ["-K", "1"], "need at least 2 views per image"),
    ("batch below 2", ["--batch-size", "1"], "no negative pairs"),
    ("negative epochs", ["--epochs", "-3"], "--epochs must be >= 1"),
    ("zero learning rate", ["--lr", "0"], "--lr must be > 0"),
    ("unknown learning-rate schedule", ["--lr-schedule", "step"], "invalid choice: 'step'"),
    ("warm-up as long as the run", ["--epochs", "5", "--warmup-epochs", "5"], "--warmup-epochs must lie in [0, --epochs)"),
    ("not a number", ["--epochs", "ten"], "invalid int value: 'ten'"),
    ("unknown dataset", ["--dataset", "imagenet-99"], "unknown dataset"),
    ("unknown backbone", ["--backbone", "vgg99"], "unknown backbone 'vgg99'"),
    ("backbone factory not importable", ["--backbone", "no_such_module:make"], "cannot load backbone factory"),
    ("unknown loss", ["--loss", "hinge"], "invalid choice: 'hinge'"),
    ("unknown aggregation", ["--aggregation", "product"], "invalid choice: 'product'"),
    ("unknown AMP mode", ["--amp", "fp8"], "invalid choice: 'fp8'"),
    ("unknown augmentation path", ["--augment", "gpu"], "invalid choice: 'gpu'"),
    ("batched augmentation of an image folder", ["--augment", "tensor", "--dataset", "folder"], "use --augment pil"),
    ("focal alpha out of range", ["--loss", "focal", "--focal-alpha", "2"], "alpha must lie in [0, 1]"),
    ("unknown device", ["--device", "tpu"], "unknown --device 'tpu'"),
    ("image size too small", ["--image-size", "4"], "--image-size must be >= 8"),
    ("crop scale out of range", ["--min-crop-scale", "1.5"], "--min-crop-scale) must be a fraction"),
    ("negative checkpoint interval", ["--checkpoint-every", "-1"], "--checkpoint-every must be >= 0"),
    ("keep no checkpoints", ["--keep-checkpoints", "0"], "--keep-checkpoints must be >= 1"),
    ("zero time limit", ["--time-limit", "0"], "--time-limit must be > 0"),
    ("unwritable output folder", ["--output-dir", "{tmp}/a-file/run"], "is not writable"),
    ("missing dataset", ["--dataset", "cifar10", "--data-root", "{tmp}/empty"], "--download"),
    ("missing image folder", ["--dataset", "folder", "--data-root", "{tmp}/nowhere"], "does not exist"),
    ("image folder without images", ["--dataset", "folder", "--data-root", "{tmp}/no-images"], "no image files"),
    ("missing config file", ["--config", "{tmp}/missing.yaml"], "cannot read config file"),
    ("unknown key in config", ["--config", "{tmp}/unknown-key.yaml"], "unknown option 'epochz'"),
    ("wrong type in config", ["--config", "{tmp}/wrong-type.yaml"], "must be an integer, got [1, 2]"),
    ("config is not YAML", ["--config", "{tmp}/broken.yaml"], "is not valid YAML"),
    ("--no-resume over checkpoints", ["--no-resume", "--output-dir", "{tmp}/has-checkpoint"], "drop --no-resume"),
]
if not torch.cuda.is_available():
    PRETRAIN_CASES.append(("CUDA asked, none present", ["--device", "cuda"], "no CUDA GPU is visible"))

EVALUATE_CASES = [
    ("no pretrained run", ["--run-dir", "{tmp}/nothing"], "no backbone weights"),
    ("weights without metadata", ["--weights", "{tmp}/bare/weights.pt"], "pass --backbone NAME"),
    ("weights of another backbone", ["--weights", "{tmp}/bare/weights.pt", "--backbone", "resnet8",
                                     "--dataset", "digits"], "does not fit backbone 'resnet8'"),
    ("unknown protocol", ["--run-dir", "{tmp}", "--protocols", "svm"], "invalid choice: 'svm'"),
    ("unlabelled images", ["--weights", "{tmp}/bare/weights.pt", "--backbone", "conv4", "--dataset", "folder",
                           "--data-root", "{tmp}/unlabelled"], "has no labels"),
]


@pytest.fixture
def workspace(tmp_path):
    from PIL import Image

    from relreason.backbones import Conv4

    (tmp_path / "a-file").write_text("user data")
    (tmp_path / "empty").mkdir()
    (tmp_path / "no-images").mkdir()
    (tmp_path / "no-images" / "notes.txt").write_text("not an image")
    (tmp_path / "unknown-key.yaml").write_text("epochz: 3\n")
    (tmp_path / "wrong-type.yaml").write_text("epochs: [1, 2]\n")
    (tmp_path / "broken.yaml").write_text("epochs: [1, 2\n")
    (tmp_path / "has-checkpoint").mkdir()
    (tmp_path / "has-checkpoint" / "checkpoint-e0001-s0000000.pt").write_bytes(b"earlier work")
    (tmp_path / "bare").mkdir()
    torch.save(Conv4().state_dict(), tmp_path / "bare" / "weights.pt")
    for split in ("train", "test"):
        (tmp_path / "unlabelled" / split).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "unlabelled" / split / "x.png")
    return tmp_path


def run_case(workspace, capsys, command, argv):
    argv = [a.replace("{tmp}", str(workspace)) for a in argv]
    if command == "pretrain" and "--output-dir" not in argv:
        argv += ["--output-dir", str(workspace / "run")]
    before = sorted(p.relative_to(workspace) for p in workspace.rglob("*"))
    code = main([command, *argv])
    err = capsys.readouterr().err.strip()
    after = sorted(p.relative_to(workspace) for p in workspace.rglob("*"))
    return code, err, before, after


@pytest.mark.parametrize("case,argv,fragment", PRETRAIN_CASES, ids=[c[0] for c in PRETRAIN_CASES])
def test_pretrain_bad_input(workspace, capsys, case, argv, fragment):
    code, err, before, after = run_case(workspace, capsys, "pretrain", argv)
    assert code == 2
    assert err.startswith("relreason: error:") and "\n" not in err, err
    assert fragment in err, err
    assert after == before, "a refused run must write nothing"
    assert (workspace / "a-file").read_text() == "user data"
    assert (workspace / "has-checkpoint" / "checkpoint-e0001-s0000000.pt").read_bytes() == b"earlier work"


@pytest.mark.parametrize("case,argv,fragment", EVALUATE_CASES, ids=[c[0] for c in EVALUATE_CASES])
def test_evaluate_bad_input(workspace, capsys, case, argv, fragment):
    code, err, before, after = run_case(workspace, capsys, "evaluate", argv)
    assert code == 2
    assert err.startswith("relreason: error:") and "\n" not in err, err
    assert fragment in err, err
    assert after == before
