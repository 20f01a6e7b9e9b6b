import dataclasses
import json
import re
import subprocess
import sys

import pytest
import yaml

from relreason.cli import build_parser, main, parse_options
from relreason.errors import RelreasonError


def run_cli(*argv):
    return subprocess.run([sys.executable, "-m", "relreason", *argv], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("command", [[], ["pretrain"], ["evaluate"]])
def test_help(command):
    result = run_cli(*command, "--help")
    assert result.returncode == 0
    assert "usage: relreason" in result.stdout


def test_console_script_installed():
    result = subprocess.run(["relreason", "list"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    assert "fashion-mnist" in result.stdout and "resnet32" in result.stdout


def test_config_file_sets_options_and_flags_override(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"dataset": "fashion-mnist", "num-views": 8, "batch_size": 32, "K": 8, "lr": 0.01}))
    args = parse_options(build_parser(), ["pretrain", "--config", str(config), "--batch-size", "16"])
    assert (args.dataset, args.num_views, args.batch_size, args.lr) == ("fashion-mnist", 8, 16, 0.01)


def test_config_file_takes_exponent_floats_as_the_command_line_does(tmp_path, capsys):
    # YAML 1.1 reads 1e-3 (no dot) as the string '1e-3'; `--lr 1e-3` on the command line is a float.
    config = tmp_path / "c.yaml"
    config.write_text("lr: 1e-3\nweight-decay: 5e-4\n")
    args = parse_options(build_parser(), ["pretrain", "--config", str(config)])
    assert (args.lr, args.weight_decay) == (1e-3, 5e-4)
    assert type(args.lr) is float and type(args.weight_decay) is float
    evaluate = tmp_path / "e.yaml"
    evaluate.write_text("label-fractions: [1e-2, 0.1]\nfinetune-head-lr: 2E-4\n")
    args = parse_options(build_parser(), ["evaluate", "--config", str(evaluate)])
    assert args.label_fractions == [0.01, 0.1] and args.finetune_head_lr == 2e-4
    not_a_number = tmp_path / "n.yaml"
    not_a_number.write_text("lr: fast\n")
    expect_error(capsys, ["pretrain", "--config", str(not_a_number)], "must be a number, got 'fast'")
    misspelt = tmp_path / "p.yaml"
    misspelt.write_text("protocols: [knn, linaer]\n")  # the one entry at fault is named
    expect_error(capsys, ["evaluate", "--config", str(misspelt)], "few_label, got 'linaer' in ['knn', 'linaer']")


def test_config_file_takes_text_options_as_written(tmp_path, capsys):
    # YAML 1.1 reads off as false, 2024 as a number and 1e3 (here) as a float; typed after --amp, --data-root and
    # --output-dir they are text.
    config = tmp_path / "c.yaml"
    config.write_text("amp: off\ndata-root: 2024\noutput-dir: 1e3\nlr: 1e-3\nchannels-last: yes\n")
    args = parse_options(build_parser(), ["pretrain", "--config", str(config)])
    assert (args.amp, args.data_root, args.output_dir) == ("off", "2024", "1e3")
    assert (args.lr, args.channels_last) == (1e-3, True)  # numbers and switches as before
    evaluate = tmp_path / "e.yaml"
    evaluate.write_text("protocols: [knn, linear]\nweights: 7\n")
    args = parse_options(build_parser(), ["evaluate", "--config", str(evaluate)])
    assert (args.protocols, args.weights) == (["knn", "linear"], "7")
    merged = tmp_path / "merged.yaml"  # a merge key reads its keys first: each value still meets its own key
    merged.write_text("data-root: 2024\noutput-dir: 2025\ndataset: folder\n<<: {seed: 3}\n")
    args = parse_options(build_parser(), ["pretrain", "--config", str(merged)])
    assert (args.data_root, args.output_dir, args.dataset, args.seed) == ("2024", "2025", "folder", 3)
    wrong = tmp_path / "w.yaml"
    wrong.write_text("amp: no\n")  # a word the option does not take, named as written
    expect_error(capsys, ["pretrain", "--config", str(wrong)], "must be one of off, bf16, fp16, got 'no'")
    mapping = tmp_path / "m.yaml"
    mapping.write_text("data-root: {a: 1}\n")
    expect_error(capsys, ["pretrain", "--config", str(mapping)], "must be a string, got {'a': 1}")


def test_shipped_configs_parse_by_name_from_any_folder(tmp_path, monkeypatch):
    from relreason.backbones import build_backbone
    from relreason.bundled_configs import bundled_config_names
    from relreason.train import PretrainConfig

    monkeypatch.chdir(tmp_path)  # no configs/ folder here: the names must resolve inside the package
    names = bundled_config_names()
    assert {"digits_conv4", "cifar10_conv4", "stl10_resnet32", "fashion_mnist_conv4_10min",
            "fashion_mnist_wide_conv4_10min"} <= set(names)
    for name in names:
        args = parse_options(build_parser(), ["pretrain", "--config", name])
        config = PretrainConfig(**{k: v for k, v in vars(args).items() if k in PretrainConfig.__dataclass_fields__ and v is not None})
        config.validate()
    paper = parse_options(build_parser(), ["pretrain", "--config", "cifar10_resnet32.yaml"])  # the file name works too
    assert (paper.dataset, paper.backbone, paper.num_views, paper.batch_size, paper.epochs, paper.loss) == (
        "cifar10", "resnet32", 32, 64, 200, "focal")
    wide = parse_options(build_parser(), ["pretrain", "--config", "fashion_mnist_wide_conv4_10min"])
    assert build_backbone(wide.backbone, args=wide.backbone_args).feature_dim == 256


def test_paper_configs_hold_the_papers_settings():
    from relreason.bundled_configs import bundled_config_names

    paper_names = [n for n in bundled_config_names() if n.split("_")[0] in {"cifar10", "cifar100", "stl10"}]
    assert len(paper_names) == 6
    for name in paper_names:
        a = parse_options(build_parser(), ["pretrain", "--config", name])
        # The paper's code: K=32, batch 64, Adam 1e-3, focal loss (2, 0.5); 200 epochs, 300 for STL-10.
        assert (a.num_views, a.batch_size, a.lr, a.aggregation, a.loss, a.focal_gamma, a.focal_alpha) == (
            32, 64, 1e-3, "cat", "focal", 2.0, 0.5), name
        assert a.epochs == (300 if a.dataset == "stl10" else 200), name


def test_repository_configs_folder_is_the_shipped_one():
    from pathlib import Path

    from relreason.bundled_configs import CONFIG_DIR

    root_configs = Path(__file__).parent.parent / "configs"
    assert root_configs.resolve() == CONFIG_DIR.resolve()


def test_a_file_on_disk_wins_over_a_shipped_config_name(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "digits_conv4").write_text("epochs: 3\n")  # the user's own file, named like a shipped one
    assert parse_options(build_parser(), ["pretrain", "--config", "digits_conv4"]).epochs == 3
    assert parse_options(build_parser(), ["pretrain", "--config", "digits_conv4.yaml"]).epochs == 20
    expect_error(capsys, ["pretrain", "--config", "digits_conv5"], "config file digits_conv5 not found (did you mean "
                 "digits_conv4?)")
    (tmp_path / "fashion_mnist_conv4").mkdir()  # a folder (a run folder named after its config) is no config
    assert parse_options(build_parser(), ["pretrain", "--config", "fashion_mnist_conv4"]).dataset == "fashion-mnist"
    # A path is never taken for a name (elsewhere/x.yaml that is not there is not the shipped x), only pointed at it.
    expect_error(capsys, ["pretrain", "--config", "elsewhere/digits_conv4.yaml"],
                 "config file elsewhere/digits_conv4.yaml not found (did you mean digits_conv4?)")


def test_list_names_the_shipped_configs_with_a_summary():
    result = run_cli("list")
    assert result.returncode == 0
    lines = {line.split()[0]: line for line in result.stdout.splitlines() if line.startswith("  ")}
    assert "CIFAR-10 setting with ResNet-32" in lines["cifar10_resnet32"]
    assert "digits" in lines["digits_conv4"]
    assert "  --backbone-args for resnet18, resnet34, resnet50: small_stem (default true)" in result.stdout
    assert "  --backbone-args for conv4: width (default 1)" in result.stdout


def test_a_built_wheel_ships_the_configs(tmp_path):
    """What `pip install relreason` gets holds the configs (package data), not only a source checkout."""
    import zipfile
    from pathlib import Path

    from relreason.bundled_configs import bundled_config_names

    root = Path(__file__).parent.parent
    # Built offline with the installed setuptools (no build isolation), which must read pyproject's SPDX licence
    # string; the dev extra installs one new enough.
    setuptools = pytest.importorskip("setuptools")
    if int(setuptools.__version__.split(".")[0]) < 77:
        pytest.skip(f"setuptools {setuptools.__version__} is older than the 77 pyproject.toml's build-system needs")
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "wheel"),
         str(root)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert build.returncode == 0, build.stderr
    (wheel,) = (tmp_path / "wheel").glob("relreason-*.whl")
    shipped = {name for name in zipfile.ZipFile(wheel).namelist() if name.startswith("relreason/configs/")}
    assert shipped == {f"relreason/configs/{name}.yaml" for name in bundled_config_names()}


def expect_error(capsys, argv, fragment):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("relreason: error:") and len(err.splitlines()) == 1, err
    assert fragment in err, err


def test_bad_inputs_are_one_line_errors(capsys, tmp_path):
    out = ["--output-dir", str(tmp_path / "run")]
    expect_error(capsys, ["pretrain", "-K", "1", *out], "-K/--num-views must be >= 2")
    expect_error(capsys, ["pretrain", "--batch-size", "1", *out], "--batch-size must be >= 2")
    expect_error(capsys, ["pretrain", "--epochs", "0", *out], "--epochs must be >= 1")
    expect_error(capsys, ["pretrain", "--dataset", "imagenet-99", *out], "unknown dataset")
    expect_error(capsys, ["pretrain", "--backbone", "vgg99", "--epochs", "1", *out], "unknown backbone")
    expect_error(capsys, ["pretrain", "--dataset", "cifar10", "--data-root", str(tmp_path / "empty"), *out], "--download")
    bad_config = tmp_path / "bad.yaml"
    bad_config.write_text("epochz: 3\n")
    expect_error(capsys, ["pretrain", "--config", str(bad_config)], "unknown option 'epochz'")
    expect_error(capsys, ["pretrain", "--config", str(tmp_path / "missing.yaml")], "missing.yaml not found; give the path")
    expect_error(capsys, ["pretrain", "--config", str(tmp_path)], "cannot read config file")  # a folder
    expect_error(capsys, ["evaluate", "--run-dir", str(tmp_path / "nothing")], "no backbone weights")
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_unwritable_output_dir(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("user data")
    expect_error(capsys, ["pretrain", "--output-dir", str(blocker / "run")], "not writable")
    assert blocker.read_text() == "user data"


def test_existing_checkpoints_are_never_overwritten_by_no_resume(capsys, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint-e0001-s0000000.pt").write_bytes(b"previous work")
    expect_error(capsys, ["pretrain", "--output-dir", str(run), "--no-resume"], "drop --no-resume")
    assert (run / "checkpoint-e0001-s0000000.pt").read_bytes() == b"previous work"


def test_every_relreason_command_in_the_readme_parses(capsys, monkeypatch):
    """The README's shell examples use options that exist (and config files that parse)."""
    import re
    import shlex
    from pathlib import Path

    from relreason.cli import build_parser, parse_options

    root = Path(__file__).parent.parent
    monkeypatch.chdir(root)  # the examples name config files relative to the repository
    readme = (root / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", readme, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            for part in line.split("#")[0].split("&&"):
                if part.strip().startswith("relreason "):
                    commands.append(shlex.split(part)[1:])
    assert len(commands) >= 10
    for argv in commands:
        try:
            parse_options(build_parser(), argv)
        except SystemExit as stop:  # --help prints and exits 0; anything else is a broken example
            assert stop.code == 0 and "--help" in argv, (argv, capsys.readouterr().err)


def test_version(capsys):
    import relreason

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"relreason {relreason.__version__}"


def _digit_pngs(root, count, classes=None):
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for i in range(count):
        folder = root / f"digit{digits.target[i]}" if classes else root
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((digits.images[i] * 255 / 16).astype("uint8")).save(folder / f"{i:03d}.png")


TINY = ["--image-size", "16", "-K", "2", "--batch-size", "16", "--epochs", "1", "--no-progress", "--no-tensorboard"]


def test_pretraining_an_unlabelled_folder_says_so_and_how_to_evaluate(tmp_path, capsys):
    _digit_pngs(tmp_path / "photos", 40)
    assert main(["pretrain", "--dataset", "folder", "--data-root", str(tmp_path / "photos"), *TINY,
                 "--output-dir", str(tmp_path / "run")]) == 0
    out, err = capsys.readouterr()
    assert f"image folder {tmp_path / 'photos'}: 40 images, unlabelled: its 40 images lie directly in" in err
    # The command ends the line, so it pastes as it is (with DIR replaced).
    assert out.rstrip("\n").endswith("evaluate with (DIR: train/ and test/, each with one subfolder per class): "
                                      f"relreason evaluate --run-dir {tmp_path / 'run'} --data-root DIR")


def test_one_stray_file_is_named_when_it_leaves_a_class_folder_unlabelled(tmp_path, capsys):
    _digit_pngs(tmp_path / "classes", 40, classes=True)
    (tmp_path / "classes" / "digit0" / "000.png").rename(tmp_path / "classes" / "stray.png")
    assert main(["pretrain", "--dataset", "folder", "--data-root", str(tmp_path / "classes"), *TINY,
                 "--output-dir", str(tmp_path / "run")]) == 0
    err = capsys.readouterr().err
    assert "40 images, unlabelled: 1 of its 40 images lies directly in" in err
    assert "outside the class subfolders (e.g. stray.png)" in err
    (tmp_path / "classes" / "stray.png").unlink()
    assert main(["pretrain", "--dataset", "folder", "--data-root", str(tmp_path / "classes"), *TINY,
                 "--output-dir", str(tmp_path / "run2")]) == 0
    out, err = capsys.readouterr()
    assert "39 images, 10 classes from its subfolders" in err
    assert ("evaluate with (its held-out images were seen, unlabelled, in pretraining): relreason evaluate --run-dir "
            f"{tmp_path / 'run2'} --test-fraction 0.2\n") in out
    # Trained on every label: holding some out afterwards would test on training labels.
    assert main(["pretrain", "--dataset", "folder", "--data-root", str(tmp_path / "classes"), *TINY,
                 "--method", "supervised", "--output-dir", str(tmp_path / "run3")]) == 0
    assert "--test-fraction" not in capsys.readouterr().out


def test_a_folder_of_one_subfolder_is_unlabelled_and_not_evaluated_as_one_class(tmp_path, capsys):
    _digit_pngs(tmp_path / "root" / "photos", 40)
    root = str(tmp_path / "root")
    assert main(["pretrain", "--dataset", "folder", "--data-root", root, *TINY, "--output-dir", str(tmp_path / "run")]) == 0
    out, err = capsys.readouterr()
    assert "40 images, unlabelled: its one subfolder 'photos' holds one class, nothing to tell apart (no online probe)" in err
    assert "--data-root DIR" in out and "probe" not in (tmp_path / "run" / "metrics.jsonl").read_text()
    # Every classifier is right on a test set of one class: refused, not reported as 100%.
    assert main(["evaluate", "--run-dir", str(tmp_path / "run"), "--test-fraction", "0.2"]) == 2
    assert (f"image folder {root} holds one class ('photos'); --test-fraction holds out a share of each class for "
            "evaluation, which needs at least 2" in capsys.readouterr().err)
    assert main(["pretrain", "--dataset", "folder", "--data-root", root, *TINY, "--test-fraction", "0.2",
                 "--output-dir", str(tmp_path / "run-held-out")]) == 2  # refused alike, not trained for nothing
    assert "holds one class ('photos')" in capsys.readouterr().err and not (tmp_path / "run-held-out").exists()
    assert main(["pretrain", "--dataset", "folder", "--data-root", root, *TINY, "--method", "supervised",
                 "--output-dir", str(tmp_path / "run2")]) == 2
    assert "needs images of at least 2 classes" in capsys.readouterr().err
    # train/ and test/ of one class each: no plain `evaluate --run-dir` hint either, which would then be refused.
    for split in ("train", "test"):
        _digit_pngs(tmp_path / "split" / split / "photos", 20)
    assert main(["pretrain", "--dataset", "folder", "--data-root", str(tmp_path / "split"), *TINY,
                 "--output-dir", str(tmp_path / "run3")]) == 0
    assert "(DIR: train/ and test/, each with one subfolder per class): relreason evaluate" in capsys.readouterr().out


def test_split_folders_named_validation_or_misnamed(tmp_path, capsys):
    for split in ("train", "validation"):
        _digit_pngs(tmp_path / "split" / split, 40, classes=True)
    assert main(["pretrain", "--dataset", "folder", "--data-root", str(tmp_path / "split"), *TINY,
                 "--output-dir", str(tmp_path / "run")]) == 0
    out, err = capsys.readouterr()
    assert f"image folder {tmp_path / 'split' / 'train'}: 40 images, 10 classes from its subfolders (digit0, " in err
    assert "--data-root DIR" not in out and "--test-fraction" not in out  # validation/ is its test set
    (tmp_path / "split" / "validation").rename(tmp_path / "split" / "holdout")
    assert main(["pretrain", "--dataset", "folder", "--data-root", str(tmp_path / "split"), *TINY,
                 "--output-dir", str(tmp_path / "run2")]) == 0
    err = capsys.readouterr().err
    assert ("80 images, 2 classes from its subfolders (holdout, train); note: subfolder(s) train taken as classes: "
            "for a train/test split, give train/ and test/ (or val/ or validation/)") in err


def test_evaluate_finds_a_runs_relative_data_root_from_another_folder(tmp_path, monkeypatch, capsys):
    for split in ("train", "test"):
        _digit_pngs(tmp_path / "work" / "labelled" / split, 60, classes=True)
    monkeypatch.chdir(tmp_path / "work")
    assert main(["pretrain", "--dataset", "folder", "--data-root", "labelled", *TINY, "--output-dir", "run"]) == 0
    out = capsys.readouterr().out
    assert "--data-root DIR" not in out  # its own folder has train/ and test/
    monkeypatch.chdir(tmp_path)
    assert main(["evaluate", "--run-dir", "work/run", "--protocols", "knn", "--no-random-baseline"]) == 0
    assert "knn" in capsys.readouterr().out
    checkpoint = sorted((tmp_path / "work" / "run").glob("checkpoint-*.pt"))[-1]  # a checkpoint records it too
    assert main(["evaluate", "--weights", str(checkpoint), "--protocols", "knn", "--no-random-baseline"]) == 0


@pytest.mark.parametrize("command, says", [
    ("pretrain", "relreason: interrupted; the checkpoints written so far are kept, and the same command (without "
                 "--no-resume) resumes from the newest\n"),
    ("compare", "relreason: interrupted; finished runs are kept, and the same command goes on from where it stopped\n"),
    ("evaluate", "relreason: interrupted\n"),  # it keeps no checkpoints
])
def test_an_interrupt_says_what_is_kept_for_the_command_it_stopped(monkeypatch, capsys, tmp_path, command, says):
    import relreason.cli

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "relreason").mkdir(parents=True)  # pretrain's default --output-dir, with a checkpoint
    (tmp_path / "runs" / "relreason" / "checkpoint-e0000-s0000005.pt").write_bytes(b"")

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(relreason.cli, "run_compare_command" if command == "compare" else f"run_{command}", interrupted)
    assert main([command]) == 130
    assert capsys.readouterr().err == says


def test_the_evaluate_hint_expands_a_home_relative_data_root(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(tmp_path))
    for split in ("train", "test"):
        _digit_pngs(tmp_path / "lab" / split, 30, classes=True)
    assert main(["pretrain", "--dataset", "folder", "--data-root", "~/lab", *TINY,
                 "--output-dir", str(tmp_path / "run")]) == 0
    assert f"evaluate with: relreason evaluate --run-dir {tmp_path / 'run'}\n" in capsys.readouterr().out


def test_the_evaluate_hint_can_be_pasted_into_a_shell(tmp_path, capsys):
    import shlex

    run = tmp_path / "my runs" / "digits"
    assert main(["pretrain", "--dataset", "digits", *TINY, "--output-dir", str(run)]) == 0
    hint = capsys.readouterr().out.split("evaluate with: ")[1].strip()
    assert shlex.split(hint) == ["relreason", "evaluate", "--run-dir", str(run)]


def test_a_runs_config_json_is_a_config_file_from_any_working_folder(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    options = ["--dataset", "digits", "--image-size", "16", "-K", "2", "--epochs", "1", "--device", "cpu",
               "--no-progress", "--no-tensorboard", "--output-dir", "run"]  # relative, as typed
    assert main(["pretrain", *options]) == 0
    run = tmp_path / "run"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # its paths were recorded absolute: the same run, not a new one here
    assert main(["pretrain", "--config", str(run / "config.json"), "--epochs", "2"]) == 0  # its geometry is passed over
    assert "done: 2 epoch(s)" in capsys.readouterr().out
    assert json.loads((run / "config.json").read_text())["num_views"] == 2
    assert list(elsewhere.iterdir()) == []


def test_a_runs_config_json_rerun_under_another_number_of_processes_says_so(capsys, tmp_path, monkeypatch):
    run = tmp_path / "run"
    assert main(["pretrain", "--dataset", "digits", *TINY, "--output-dir", str(run)]) == 0
    recorded = json.loads((run / "config.json").read_text())
    assert recorded["processes"] == 1
    capsys.readouterr()
    assert main(["pretrain", "--config", str(run / "config.json"), "--print-config"]) == 0
    assert "note" not in capsys.readouterr().err  # the same number of processes
    (tmp_path / "four.json").write_text(json.dumps(recorded | {"processes": 4}))
    assert main(["pretrain", "--config", str(tmp_path / "four.json"), "--print-config"]) == 0
    err = capsys.readouterr().err
    assert f"relreason: note: {tmp_path / 'four.json'} was trained by 4 process(es) and this run has 1" in err
    assert f"a step now takes 1 batch(es) of {recorded['batch_size']} instead of 4" in err
    assert "torchrun --nproc-per-node 4" in err and err.count("\n") == 1
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "0")
    assert main(["pretrain", "--config", str(tmp_path / "four.json"), "--print-config"]) == 0
    assert "note" not in capsys.readouterr().err  # launched as it was trained


def test_a_run_record_key_is_an_unknown_option_outside_pretrain(capsys, tmp_path):
    config = tmp_path / "evaluate.yaml"
    config.write_text("knn-k: 5\nprocesses: 4\n")  # a run's record, not an option of evaluate or compare
    expect_error(capsys, ["evaluate", "--config", str(config), "--print-config"], "unknown option 'processes'")
    config.write_text("seeds: [1]\ngeometry: {}\n")
    expect_error(capsys, ["compare", "--config", str(config), "--print-config"], "unknown option 'geometry'")


def test_a_bad_value_from_a_config_file_names_the_file_and_a_typed_one_does_not(capsys, tmp_path):
    config = tmp_path / "mine.yaml"
    config.write_text("lr: -1\nepochs: 2\nfocal-alpha: 3\n")
    out = ["--output-dir", str(tmp_path / "run")]
    expect_error(capsys, ["pretrain", "--config", str(config), *out],
                 f"--lr must be a finite number > 0, got -1.0; pass e.g. 0.001 (--lr is set in config file {config})")
    assert main(["pretrain", "--config", str(config), "--lr", "-2", *out]) == 2
    err = capsys.readouterr().err
    assert "got -2.0; pass e.g. 0.001" in err and "config file" not in err
    expect_error(capsys, ["pretrain", "--config", str(config), "--lr", "1e-3", *out],
                 f"--focal-alpha must lie in [0, 1], got 3.0; pass e.g. 0.5 (--focal-alpha is set in config file {config})")
    assert not (tmp_path / "run").exists()
    # An option the file leaves unset (null) is not blamed on it; any option of the message that the file set is.
    config.write_text("output-dir: null\ndata-root: null\n")
    assert main(["pretrain", "--config", str(config), "--output-dir", ""]) == 2
    assert "config file" not in capsys.readouterr().err
    images = tmp_path / "images"
    (images / "cats").mkdir(parents=True)
    config.write_text(f"dataset: folder\ndata-root: {images}\n")
    expect_error(capsys, ["pretrain", "--config", str(config), "--output-dir", str(images / "run")],
                 f"lies inside --data-root {images}, so the run's own files would be read as images; choose an "
                 f"--output-dir outside it (--data-root is set in config file {config})")


def test_none_on_the_command_line_clears_an_optional_option_a_config_file_sets(capsys, tmp_path):
    from relreason.cli import _config_from, config_class

    config = tmp_path / "ten-minutes.yaml"
    config.write_text("time-limit: 10\nimage-size: 28\nnum-workers: 2\n")

    def options(*flags):
        return _config_from(parse_options(build_parser(), ["pretrain", "--config", str(config), *flags]),
                            config_class("pretrain"))

    assert (options().time_limit, options().image_size, options().num_workers) == (10.0, 28, 2)
    cleared = options("--time-limit", "none", "--image-size", "None", "--num-workers", "null")
    assert (cleared.time_limit, cleared.image_size, cleared.num_workers) == (None, None, None)
    assert options("--time-limit", "5").time_limit == 5.0
    expect_error(capsys, ["pretrain", "--time-limit", "soon"], "argument --time-limit: invalid float value: 'soon'")
    config.write_text("time-limit: none\nimage-size: 28\n")  # `none` in the file too: left unset
    assert (options().time_limit, options().image_size) == (None, 28)


def test_an_unknown_option_points_at_its_own_commands_help(capsys):
    expect_error(capsys, ["evaluate", "--knn", "5"],
                 "unrecognized arguments: --knn 5 (did you mean --knn-k?); see `relreason evaluate --help`")
    expect_error(capsys, ["pretrain", "--frobnicate"], "unrecognized arguments: --frobnicate; see `relreason pretrain --help`")
    # Near in meaning (other tools' names), but not in spelling alone: --lr is not --help, nor --loss --progress.
    expect_error(capsys, ["pretrain", "--gpu"], "(did you mean --device?)")
    expect_error(capsys, ["pretrain", "--run-dir", "x"], "(did you mean --output-dir?)")
    expect_error(capsys, ["compare", "--lr", "0.1"], "unrecognized arguments: --lr 0.1 (--lr is an option of `relreason "
                 "pretrain`; compare trains every method with pretrain's default for it)")
    expect_error(capsys, ["compare", "--loss", "focal"], "(--loss is an option of `relreason pretrain`;")
    expect_error(capsys, ["evaluate", "--epochs", "3"], "(--epochs is an option of `relreason pretrain`); see")
    expect_error(capsys, ["compare", "--weights", "x.pt"], "(--weights is an option of `relreason evaluate`); see")
    expect_error(capsys, ["compare", "--finetune-epochs", "3"], "(--finetune-epochs is an option of `relreason evaluate`)")
    expect_error(capsys, ["evaluate", "--views", "4"], "(--num-views is an option of `relreason pretrain`); see")
    expect_error(capsys, ["compare", "--seed", "3"], "(did you mean --seeds?)")


def test_ctrl_c_before_the_first_checkpoint_says_so(capsys, tmp_path, monkeypatch):
    import relreason.train as train

    def interrupted(config):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "pretrain", interrupted)
    run = tmp_path / "run"
    assert main(["pretrain", "--output-dir", str(run)]) == 130
    assert capsys.readouterr().err.strip() == ("relreason: interrupted before the run's first checkpoint; the same "
                                               "command starts it again")
    run.mkdir()
    (run / "checkpoint-e0000-s0000005.pt").write_bytes(b"")
    assert main(["pretrain", "--output-dir", str(run)]) == 130
    assert "the checkpoints written so far are kept" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [
    ["pretrain", "--config", "cifar10_resnet32", "-K", "8", "--epochs", "5", "--amp", "bf16", "--no-online-probe",
     "--weight-decay", "1e-5", "--time-limit", "2.5"],
    ["evaluate", "--run-dir", "runs/x", "--eval-dataset", "cifar100", "--protocols", "knn", "retrieval",
     "--label-fractions", "0.05", "0.5", "--knn-k", "20", "--no-progress"],
    ["compare", "--methods", "relational", "simclr", "--seeds", "3", "4", "--time-limit", "1", "--jitter-strength", "0"],
])
def test_print_config_reads_back_to_the_same_options(argv, tmp_path, monkeypatch, capsys):
    from relreason.cli import _config_from, config_class

    monkeypatch.chdir(tmp_path)
    command = argv[0]
    options_class = config_class(command)
    asked = _config_from(parse_options(build_parser(), argv), options_class)
    assert main([*argv, "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []  # printing runs nothing and writes nothing
    (tmp_path / "printed.yaml").write_text(printed)
    again = _config_from(parse_options(build_parser(), [command, "--config", "printed.yaml"]), options_class)

    def options(config):  # a default list of names is a tuple, the same list read from a file a list
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}

    assert options(again) == options(asked)
    assert asked != options_class()  # the options above are not all defaults: the file carried them


def test_evaluate_turns_its_progress_bars_off_as_pretrain_does():
    from relreason.cli import _config_from, config_class

    for command in ("pretrain", "evaluate", "compare"):
        assert _config_from(parse_options(build_parser(), [command]), config_class(command)).progress is True
        assert _config_from(parse_options(build_parser(), [command, "--no-progress"]),
                            config_class(command)).progress is False


def test_print_config_refuses_what_the_command_would_refuse(capsys):
    expect_error(capsys, ["pretrain", "-K", "1", "--print-config"], "got 1; pass e.g. -K 4")
    assert capsys.readouterr().out == ""
    for command in ("pretrain", "evaluate", "compare"):
        expect_error(capsys, [command, "--device", "gpu", "--print-config"], "unknown --device 'gpu'")


def test_print_config_writes_a_gpu_config_on_a_machine_without_one(capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    expect_error(capsys, ["pretrain", "--device", "cuda:1"], "no CUDA GPU is visible")  # running it here: refused
    for command in ("pretrain", "evaluate", "compare"):
        assert main([command, "--device", "cuda:1", "--print-config"]) == 0
        printed = yaml.safe_load(capsys.readouterr().out)
        assert printed["device"] == "cuda:1"
    assert printed["time-limit"] is None  # chosen at run time, written as null: every option is in the file


def test_print_config_under_torchrun_prints_once(capsys, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    assert main(["pretrain", "--print-config"]) == 0
    assert capsys.readouterr().out == ""
    monkeypatch.setenv("RANK", "0")
    assert main(["pretrain", "--print-config"]) == 0
    assert "num-views: 4" in capsys.readouterr().out


def test_a_shipped_pretrain_config_given_to_another_command_says_so(capsys):
    expect_error(capsys, ["evaluate", "--config", "digits_conv4"],
                 "digits_conv4 is a config for `relreason pretrain`")
    expect_error(capsys, ["compare", "--config", "fashion_mnist_conv4"],
                 "run `relreason pretrain --config fashion_mnist_conv4`")


def test_home_is_expanded_in_every_path_option_a_shell_did_not_expand(tmp_path, monkeypatch, capsys):
    """``--output-dir=~/runs`` and paths in YAML configs meet no shell: a folder named '~' must never appear."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    for split in ("train", "test"):
        _digit_pngs(tmp_path / "home" / "lab" / split, 30, classes=True)
    (tmp_path / "run.yaml").write_text("output_dir: ~/runs/x\ndata_root: ~/lab\ndataset: folder\n")
    assert main(["pretrain", "--config", "run.yaml", *TINY]) == 0
    assert (tmp_path / "home" / "runs" / "x" / "backbone.pt").is_file()
    assert main(["evaluate", "--run-dir=~/runs/x", "--protocols", "knn", "--no-random-baseline",
                 "--output=~/results/x.json"]) == 0
    assert (tmp_path / "home" / "results" / "x.json").is_file()
    assert main(["compare", "--dataset", "digits", "--methods", "random", "--seeds", "1", "--protocols", "knn",
                 "--output-dir=~/compare"]) == 0
    assert (tmp_path / "home" / "compare" / "compare.md").is_file()
    assert not (tmp_path / "~").exists()


def test_a_sigterm_during_evaluate_is_said_in_one_line_with_exit_143(monkeypatch, capsys):
    import os
    import signal

    import relreason.cli

    def terminated_midway(args):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM did not stop the evaluation")

    monkeypatch.setattr(relreason.cli, "run_evaluate", terminated_midway)
    before = signal.getsignal(signal.SIGTERM)
    assert main(["evaluate"]) == 143
    assert capsys.readouterr().err == ("relreason: stopped by SIGTERM; the features already extracted stay cached, so "
                                       "the same command goes on from them\n")
    assert signal.getsignal(signal.SIGTERM) == before  # given back


def test_evaluate_keeps_its_results_out_of_the_image_folders_it_reads(tmp_path, capsys):
    import shutil

    for split in ("train", "test"):
        _digit_pngs(tmp_path / "images" / split, 30, classes=True)
    assert main(["pretrain", "--dataset", "digits", *TINY, "--output-dir", str(tmp_path / "run")]) == 0
    # A run folder elsewhere in the root holds no images evaluate reads: its results may go there.
    (tmp_path / "images" / "runs").mkdir()
    shutil.copy(tmp_path / "run" / "backbone.pt", tmp_path / "images" / "runs" / "w.pt")
    common = ["--backbone", "conv4", "--dataset", "folder", "--data-root", str(tmp_path / "images"),
              "--protocols", "knn", "--no-random-baseline"]
    assert main(["evaluate", "--weights", str(tmp_path / "images" / "runs" / "w.pt"), *common]) == 0
    assert (tmp_path / "images" / "runs" / "evaluation.json").is_file()
    # Weights inside train/: their default results place is refused, in words that fit what was typed.
    shutil.copy(tmp_path / "run" / "backbone.pt", tmp_path / "images" / "train" / "w.pt")
    before = sorted(p.name for p in (tmp_path / "images" / "train").iterdir())
    capsys.readouterr()
    assert main(["evaluate", "--weights", str(tmp_path / "images" / "train" / "w.pt"), *common]) == 2
    assert (f"the results would go beside the weights, {tmp_path / 'images' / 'train' / 'evaluation.json'}, inside "
            f"the image folder {tmp_path / 'images' / 'train'}" in capsys.readouterr().err)
    assert sorted(p.name for p in (tmp_path / "images" / "train").iterdir()) == before
    # pretrain draws the same line: a run folder beside train/ and test/ is read by neither.
    from relreason.errors import RelreasonError
    from relreason.train import PretrainConfig

    PretrainConfig(dataset="folder", data_root=str(tmp_path / "images"),
                   output_dir=str(tmp_path / "images" / "runs" / "r")).validate()
    # val/ as the test split: a run folder made as test/ would take its place.
    (tmp_path / "images" / "test").rename(tmp_path / "images" / "val")
    for inside in ("train", "val", "test", "validation"):
        with pytest.raises(RelreasonError, match="lies inside --data-root"):
            PretrainConfig(dataset="folder", data_root=str(tmp_path / "images"),
                           output_dir=str(tmp_path / "images" / inside / "r")).validate()


def test_home_is_expanded_in_path_objects_from_python_code(tmp_path, monkeypatch):
    from pathlib import Path

    from relreason.checks import with_home_expanded
    from relreason.train import PretrainConfig

    monkeypatch.setenv("HOME", str(tmp_path))
    config = with_home_expanded(PretrainConfig(output_dir=Path("~/runs"), data_root="data"), "output_dir", "data_root")
    assert (config.output_dir, config.data_root) == (str(tmp_path / "runs"), "data")


def test_a_sigterm_while_evaluate_decodes_images_is_not_taken_for_a_bad_image(tmp_path, monkeypatch, capsys):
    import os
    import signal

    import relreason.data.image_folder as image_folder

    for split in ("train", "test"):
        _digit_pngs(tmp_path / "images" / split, 30, classes=True)
    assert main(["pretrain", "--dataset", "digits", *TINY, "--output-dir", str(tmp_path / "run")]) == 0
    real, calls = image_folder.pil_to_rgb, []

    def decoded_then_terminated(image):  # inside the image reader's `except Exception`
        calls.append(1)
        if len(calls) == 5:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(image)

    monkeypatch.setattr(image_folder, "pil_to_rgb", decoded_then_terminated)
    argv = ["evaluate", "--weights", str(tmp_path / "run" / "backbone.pt"), "--dataset", "folder", "--data-root",
            str(tmp_path / "images"), "--protocols", "knn", "--no-random-baseline", "--output", str(tmp_path / "e.json")]
    capsys.readouterr()
    assert main(argv) == 143
    assert capsys.readouterr().err.endswith("relreason: stopped by SIGTERM; the features already extracted stay cached, "
                                            "so the same command goes on from them\n")
    monkeypatch.setattr(image_folder, "pil_to_rgb", real)
    assert main(argv) == 0  # no image was taken for unreadable


@pytest.mark.parametrize("command", ["evaluate", "compare"])
def test_evaluate_and_compare_under_torchrun_are_refused_in_one_line(command, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert main([command]) == 2
    assert capsys.readouterr().err == (f"relreason: error: `relreason {command}` runs in one process (every rank would do "
                                       "all its work); launch it without torchrun: `relreason pretrain` alone trains "
                                       "on several\n")


def test_a_sigterm_during_compares_evaluation_is_said_in_one_line(tmp_path, monkeypatch, capsys):
    import os
    import signal

    import relreason.evaluate

    def terminated(config):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM did not stop the comparison")

    monkeypatch.setattr(relreason.evaluate, "run_evaluation", terminated)
    before = signal.getsignal(signal.SIGTERM)
    assert main(["compare", "--dataset", "digits", "--methods", "relational", "--seeds", "1", "--epochs", "1",
                 "-K", "2", "--image-size", "16", "--protocols", "knn", "--no-progress",
                 "--output-dir", str(tmp_path / "c")]) == 143
    assert capsys.readouterr().err.endswith("relreason: stopped by SIGTERM; finished runs and extracted features are "
                                            "kept, and the same command goes on from where it stopped\n")
    assert signal.getsignal(signal.SIGTERM) == before
    assert (tmp_path / "c" / "relational-seed1" / "backbone.pt").is_file()


def test_the_torchrun_refusal_leaves_pretrain_list_and_print_config_alone(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert main(["evaluate", "--print-config"]) == 0
    assert main(["list"]) == 0
    monkeypatch.setenv("WORLD_SIZE", "")  # set but empty: not a torchrun launch
    monkeypatch.delenv("RANK")
    assert main(["evaluate", "--run-dir", str(tmp_path / "none")]) == 2
    assert "no backbone weights" in capsys.readouterr().err


def test_a_sigterm_before_pretrain_trains_is_one_line(monkeypatch, capsys, tmp_path):
    import os
    import signal

    import relreason.train.loop as loop

    def terminated(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM did not stop the setup")

    monkeypatch.setattr(loop, "build_pretrain_data", terminated)
    assert main(["pretrain", "--dataset", "digits", "--output-dir", str(tmp_path / "run")]) == 143
    assert capsys.readouterr().err.endswith("relreason: stopped by SIGTERM outside training; the same command resumes "
                                            "from the newest checkpoint (or starts the run, if it has none)\n")


@pytest.mark.parametrize("unbuffered", ["1", ""])
def test_output_into_a_closed_pipe_ends_quietly(unbuffered):
    """`relreason list | head -1`: the reader leaves early; no traceback, the shell's status for SIGPIPE."""
    import os

    read, write = os.pipe()
    os.close(read)  # gone before the command writes anything
    try:
        result = subprocess.run([sys.executable, "-m", "relreason", "list"], stdout=write, stderr=subprocess.PIPE,
                                text=True, timeout=120, env={**os.environ, "PYTHONUNBUFFERED": unbuffered})
    finally:
        os.close(write)
    assert result.returncode == 141
    assert result.stderr == ""


def test_output_with_standard_output_closed_is_no_failure():
    """Started with fd 1 closed (a daemon, `>&-`): Python has no sys.stdout; the command still succeeds."""
    import os

    result = subprocess.run([sys.executable, "-m", "relreason", "list"], preexec_fn=lambda: os.close(1),
                            stderr=subprocess.PIPE, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_a_broken_pipe_elsewhere_is_not_taken_for_a_gone_reader(monkeypatch, tmp_path):
    """Only standard output's own reader leaving is quiet: a broken pipe inside a command (a worker's) still raises."""
    import relreason.cli as cli

    def broken(_):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(cli, "run_list", broken)
    with open(tmp_path / "out.txt", "w") as stdout:  # a file: standard output itself is fine
        monkeypatch.setattr(sys, "stdout", stdout)
        with pytest.raises(BrokenPipeError):
            cli.main(["list"])


def test_pretrain_options_of_the_wrong_type_are_one_line_errors_in_python_too():
    from relreason.train import PretrainConfig

    for options, message in ((dict(batch_size="64"), "--batch-size must be a whole number, got '64'"),
                             (dict(num_views=2.5), "-K/--num-views must be a whole number, got 2.5"),
                             (dict(focal_gamma="2"), "--focal-gamma must be a number, got '2'"),
                             (dict(focal_alpha=True), "--focal-alpha must be a number, got True")):
        with pytest.raises(RelreasonError, match=re.escape(message)):
            PretrainConfig(**options).validate(on_this_machine=False)
    # A baseline makes its own views whatever -K says (a note says so): its K is not refused.
    PretrainConfig(method="simclr", num_views=0).validate(on_this_machine=False)


def test_a_key_given_twice_inside_backbone_args_is_refused():
    from relreason.config_files import backbone_args_from

    assert backbone_args_from(["widths={a: 1, b: 2}"]) == {"widths": {"a": 1, "b": 2}}
    with pytest.raises(RelreasonError, match=r"--backbone-args widths=\{a: 1, a: 2\} gives 'a' twice; keep one"):
        backbone_args_from(["widths={a: 1, a: 2}"])
