"""Baselines through the one trainer, and `relreason compare` tables built from the runs' own evaluations."""

import json
import statistics

import pytest
import torch

from relreason.cli import main
from relreason.errors import RelreasonError
from relreason.train import PretrainConfig, pretrain

PNG = b"\x89PNG\r\n\x1a\n"


def config(tmp_path, method, **overrides):
    options = dict(method=method, dataset="digits", image_size=16, num_views=3, batch_size=64, epochs=1, seed=0,
                   device="cpu", progress=False, tensorboard=False, output_dir=str(tmp_path / method))
    return PretrainConfig(**(options | overrides))


@pytest.mark.parametrize("method,metric", [("simclr", "contrastive_accuracy"), ("rotation", "rotation_accuracy"),
                                           ("supervised", "train_accuracy")])
def test_baselines_train_through_the_trainer(tmp_path, method, metric):
    result = pretrain(config(tmp_path, method))
    record = result.history[0]
    assert metric in record and "probe_accuracy" in record and "relation_accuracy" not in record
    meta = json.loads((result.run_dir / "backbone.json").read_text())
    assert meta["method"] == method
    exported = torch.load(result.run_dir / "backbone.pt", weights_only=True)
    assert exported.keys() == result.model.backbone.state_dict().keys()


def test_random_method_exports_the_initialisation_untrained(tmp_path):
    result = pretrain(config(tmp_path, "random", epochs=5))
    assert result.epochs_done == 0 and result.history == []
    from relreason.backbones import build_backbone

    exported = torch.load(result.run_dir / "backbone.pt", weights_only=True)
    assert set(exported) == set(build_backbone("conv4").state_dict())


def test_supervised_refuses_unlabelled_data(tmp_path):
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    for i in range(4):
        Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(images / f"{i}.png")
    with pytest.raises(RelreasonError, match="needs labels"):
        pretrain(config(tmp_path, "supervised", dataset="folder", data_root=str(images)))


def test_online_probe_learns_alongside_and_leaves_the_method_untouched(tmp_path):
    with_probe = pretrain(config(tmp_path, "relational", epochs=2, output_dir=str(tmp_path / "probe")))
    without = pretrain(config(tmp_path, "relational", epochs=2, online_probe=False, output_dir=str(tmp_path / "none")))
    assert "probe_accuracy" in with_probe.history[-1] and "probe_accuracy" not in without.history[-1]
    assert with_probe.history[-1]["probe_accuracy"] > 15.0  # 10 classes: chance is 10%
    assert [r["loss"] for r in with_probe.history] == [r["loss"] for r in without.history]


def record_progress_bars(monkeypatch):
    """Every progress bar the commands make, by its description: whether it was shown where it could be (on a
    terminal) or turned off."""
    from tqdm import tqdm

    import relreason.data.decoded_folder
    import relreason.protocols.features
    import relreason.protocols.finetune
    import relreason.train.loop

    made = []

    class Recorded(tqdm):
        def __init__(self, *args, **kwargs):
            made.append((kwargs.get("desc"), kwargs.get("disable")))
            super().__init__(*args, **kwargs)

    for module in (relreason.data.decoded_folder, relreason.protocols.features, relreason.protocols.finetune,
                   relreason.train.loop):
        monkeypatch.setattr(module, "tqdm", Recorded)
    return made


def test_compare_writes_tables_and_plots_from_the_runs(tmp_path, capsys, monkeypatch):
    bars = record_progress_bars(monkeypatch)
    output = tmp_path / "compare"
    argv = ["compare", "--dataset", "digits", "--image-size", "16", "--methods", "relational", "random",
            "--seeds", "1", "2", "--epochs", "1", "--protocols", "knn", "--embedding-points", "120", "--log-every", "5",
            "--device", "cpu", "--no-progress", "--output-dir", str(output)]
    assert main(argv) == 0
    summary = json.loads((output / "compare.json").read_text())
    for method in ("relational", "random"):
        values = [json.loads((output / f"{method}-seed{seed}" / "evaluation.json").read_text())
                  ["results"]["pretrained"]["knn"]["test_accuracy"] for seed in (1, 2)]
        row = summary["table"][method]["knn"]
        assert row["mean"] == pytest.approx(statistics.fmean(values))
        assert row["std"] == pytest.approx(statistics.stdev(values))
        assert f"{row['mean']:.2f} ± {row['std']:.2f}" in (output / "compare.md").read_text()
    assert "Evaluation: `knn` with k=200.\n" in (output / "compare.md").read_text()
    assert summary["table"]["random"]["epochs"]["mean"] == 0
    assert summary["table"]["relational"]["epochs"]["mean"] == 1
    assert summary["table"]["relational"]["train_minutes"]["mean"] > 0
    assert all(run["steps"] for run in summary["runs"] if run["method"] == "relational")
    for name in ("training_curves.png", "embedding_map.png"):
        assert (output / name).read_bytes()[:8] == PNG
    # --no-progress: no bar of training, feature extraction or the map's features may show, even on a terminal.
    assert {desc for desc, _ in bars} >= {"epoch 1/1", "extracting features"}
    assert all(disable is True for _, disable in bars), bars
    # A second run resumes: nothing is trained again and the table is the same.
    capsys.readouterr()
    assert main(argv) == 0
    assert "epoch 1/1" not in capsys.readouterr().err
    assert json.loads((output / "compare.json").read_text())["table"] == summary["table"]


def refused_before_training(output, images, capsys, *extra):
    """compare on the image folder ``images``: exit 2 before any run trains; what it said on stderr."""
    argv = compare_argv(output, "--data-root", str(images), *extra)
    argv[argv.index("digits")] = "folder"
    assert main(argv) == 2
    assert not (output / "relational-seed1").exists()
    return capsys.readouterr().err


def compare_argv(output, *extra):
    return ["compare", "--dataset", "digits", "--image-size", "16", "-K", "3", "--methods", "relational", "--seeds",
            "1", "--epochs", "1", "--protocols", "knn", "--embedding-points", "60", "--device", "cpu", "--no-progress",
            "--output-dir", str(output), *extra]


def test_compare_refuses_runs_made_with_other_options_and_trains_on_for_more_epochs(tmp_path, capsys):
    output = tmp_path / "compare"
    assert main(compare_argv(output)) == 0
    capsys.readouterr()
    assert main(compare_argv(output, "--batch-size", "32")) == 2
    assert "was trained with other options (--batch-size: run 64 vs now 32)" in capsys.readouterr().err
    assert main(compare_argv(output, "--jitter-strength", "0.5")) == 2
    assert "was trained with other options (--jitter-strength: run 1.0 vs now 0.5)" in capsys.readouterr().err
    assert main(compare_argv(output, "--time-limit", "5")) == 2
    assert "holds runs trained with no --time-limit (now --time-limit 5)" in capsys.readouterr().err
    argv = compare_argv(output, "--epochs", "2", "--data-root", str(tmp_path / "elsewhere"))
    argv[argv.index("digits")] = "DIGITS"  # the same dataset, as typed otherwise (and digits reads no data root)
    assert main(argv) == 0
    assert "epoch 2/2" in capsys.readouterr().err
    assert json.loads((output / "compare.json").read_text())["table"]["relational"]["epochs"]["mean"] == 2
    before = (output / "compare.json").read_text()
    assert main(compare_argv(output, "--epochs", "1")) == 2  # fewer: not averaged with longer runs, nor reported
    assert ("has trained 2 epoch(s), more than --epochs 1, and runs of different lengths would be averaged together; "
            "pass --epochs 2 or more") in capsys.readouterr().err
    assert (output / "compare.json").read_text() == before
    (output / "relational-seed1" / "backbone.json").unlink()  # killed after a checkpoint, before its export
    assert main(compare_argv(output, "--epochs", "1")) == 2  # the checkpoint says how far it got
    assert "has trained 2 epoch(s), more than --epochs 1" in capsys.readouterr().err


def test_compare_refuses_an_output_folder_under_a_file(tmp_path, capsys):
    (tmp_path / "afile").write_text("")
    assert main(compare_argv(tmp_path / "afile" / "x")) == 2
    assert capsys.readouterr().err == (f"relreason: error: output folder {tmp_path / 'afile' / 'x'} is not writable "
                                       "(Not a directory); choose another --output-dir\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_compare_takes_the_size_its_runs_trained_at_as_their_own(tmp_path, capsys):
    output = tmp_path / "compare"
    argv = compare_argv(output, "--batch-size", "256")
    del argv[argv.index("--image-size"):argv.index("--image-size") + 2]  # the dataset's own size: 32 px
    assert main(argv) == 0
    capsys.readouterr()
    assert main([*argv, "--image-size", "32"]) == 0  # the same runs, named otherwise
    assert "trained in an earlier run" in capsys.readouterr().err
    assert main([*argv, "--image-size", "16"]) == 2
    assert "--image-size: run none vs now 16" in capsys.readouterr().err


def test_sigterm_during_a_run_ends_the_whole_comparison(tmp_path, monkeypatch, capsys):
    from relreason.train import StopRequest

    install = StopRequest.install

    def install_with_a_sigterm_received():
        request = install()
        request.requested = True
        return request

    monkeypatch.setattr(StopRequest, "install", staticmethod(install_with_a_sigterm_received))
    output = tmp_path / "compare"
    assert main(compare_argv(output, "--seeds", "1", "2")) == 143
    captured = capsys.readouterr()
    assert "stopped by SIGTERM during the run relational, seed 1" in captured.out
    assert "seed 2" not in captured.err and not (output / "relational-seed2").exists()


def test_a_run_ended_by_the_time_budget_is_not_called_unfinished(tmp_path, capsys):
    output = tmp_path / "compare"
    assert main(compare_argv(output, "--epochs", "50", "--time-limit", "0.005")) == 0
    err = capsys.readouterr().err
    assert json.loads((output / "relational-seed1" / "backbone.json").read_text())["stopped_by"] == "time limit"
    assert "rerun its pretrain command" not in err


def test_a_sigterm_in_the_last_step_of_a_run_still_ends_the_comparison(tmp_path, monkeypatch, capsys):
    from relreason.train import StopRequest

    uninstall = StopRequest.uninstall

    def uninstall_after_a_late_sigterm(self):
        self.requested = True  # arrived after the run's last stop vote: the run finishes
        uninstall(self)

    monkeypatch.setattr(StopRequest, "uninstall", uninstall_after_a_late_sigterm)
    output = tmp_path / "compare"
    assert main(compare_argv(output, "--seeds", "1", "2")) == 143
    assert json.loads((output / "relational-seed1" / "backbone.json").read_text())["finished"]
    assert not (output / "relational-seed2").exists()


def test_ctrl_c_during_a_run_checkpoints_it_and_ends_the_whole_comparison(tmp_path, monkeypatch, capsys):
    from relreason.train import StopRequest

    install = StopRequest.install

    def install_with_a_ctrl_c_received():
        request = install()
        request.requested = request.interrupted = True
        return request

    monkeypatch.setattr(StopRequest, "install", staticmethod(install_with_a_ctrl_c_received))
    output = tmp_path / "compare"
    assert main(compare_argv(output, "--seeds", "1", "2")) == 130
    err = capsys.readouterr().err
    assert "stopped during epoch 1 at step 1" in err and "relreason: interrupted; finished runs are kept" in err
    assert json.loads((output / "relational-seed1" / "backbone.json").read_text())["stopped_by"] == "Ctrl-C"
    assert not (output / "relational-seed2").exists()


def test_a_resumed_run_gets_what_is_left_of_its_time_budget(tmp_path):
    from relreason.compare import remaining_minutes

    pretrain(config(tmp_path, "relational", epochs=1))
    trained = json.loads((tmp_path / "relational" / "backbone.json").read_text())["train_seconds"] / 60
    assert remaining_minutes(tmp_path / "relational", 10.0) == pytest.approx(10.0 - trained)
    assert remaining_minutes(tmp_path / "relational", trained / 2) == pytest.approx(1e-9)
    assert remaining_minutes(tmp_path / "nothing-yet", 10.0) == 10.0
    assert remaining_minutes(tmp_path / "relational", None) is None


def test_compare_refuses_unlabelled_images_before_training(tmp_path, capsys):
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    for i in range(4):
        Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(images / f"{i}.png")
    assert "has no labels" in refused_before_training(tmp_path / "compare", images, capsys)


def test_the_embedding_map_follows_the_weights(tmp_path):
    output = tmp_path / "compare"
    assert main(compare_argv(output)) == 0
    assert main(compare_argv(output, "--epochs", "2")) == 0
    features = output / "relational-seed1" / "features"
    assert len(list(features.glob("*-test-*.pt"))) == 2  # one per exported backbone: the trained-on run's map is not the old one
    assert len(list(features.glob("*.pt"))) == 4  # evaluate's train and test features; the map reads its test file


def test_the_embedding_map_reads_evaluates_cache_of_a_named_dataset_from_files(tmp_path):
    """MNIST read from its IDX files: the map's test features are those the evaluation cached (one name for them),
    not extracted and stored a second time."""
    import numpy as np

    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, count in (("train", 60), ("t10k", 20)):
        images, labels = rng.integers(0, 256, (count, 28, 28)), np.arange(count) % 3
        for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
            array = np.asarray(array, dtype=np.uint8)
            header = bytes([0, 0, 8, array.ndim]) + np.asarray(array.shape, ">i4").tobytes()
            (raw / f"{prefix}-{kind}-ubyte").write_bytes(header + array.tobytes())
    output = tmp_path / "compare"
    argv = compare_argv(output, "--methods", "random", "--data-root", str(tmp_path / "data"))
    argv[argv.index("digits")] = "mnist"
    assert main(argv) == 0
    caches = sorted(p.name.split("-")[-3] for p in (output / "random-seed1" / "features").glob("*.pt"))
    assert caches == ["test", "train"]


def test_a_finished_comparison_trains_nothing_again_and_remakes_random_with_the_new_options(tmp_path, capsys):
    output = tmp_path / "compare"
    argv = compare_argv(output, "--methods", "relational", "random")
    assert main(argv) == 0
    capsys.readouterr()
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "epoch 1/1" not in err  # nothing trained, and the log says what it does instead
    assert "== relational, seed 1: trained in an earlier run ==" in err and "evaluating relational, seed 1: " in err
    assert "drawing the t-SNE map" in err
    assert main(compare_argv(output, "--methods", "random", "--image-size", "12")) == 0  # no training to refuse
    evaluation = json.loads((output / "random-seed1" / "evaluation.json").read_text())
    assert evaluation["image_size"] == 12


def test_random_runs_remade_for_other_data_or_budget_get_their_own_map(tmp_path):
    from PIL import Image

    images = tmp_path / "images"
    for split, count in (("train", 8), ("test", 4)):
        for label in range(2):
            (images / split / f"c{label}").mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (10, 10), (200 * label, 20 * i, 0)).save(images / split / f"c{label}" / f"{i}.png")
    output = tmp_path / "compare"
    random_only = compare_argv(output, "--methods", "random", "--embedding-points", "10", "--knn-k", "3")
    assert main(random_only + ["--time-limit", "1"]) == 0
    assert main(random_only + ["--time-limit", "2"]) == 0  # random trains nothing: no budget is bound
    on_folder = list(random_only)
    on_folder[on_folder.index("digits")] = "folder"
    assert main(on_folder + ["--data-root", str(images)]) == 0  # the same weights, another data set's map
    assert len(list((output / "random-seed1" / "features").glob("*-test-*.pt"))) == 2


def test_view_options_reach_every_methods_run_and_older_run_folders_read_as_defaults(tmp_path):
    from relreason.compare import CompareConfig, check_existing_runs, pretrain_config_for

    compare = CompareConfig(methods=("relational", "simclr"), seeds=(1,), min_crop_scale=0.3, jitter_strength=0.5,
                            output_dir=str(tmp_path / "compare"))
    for method in compare.methods:
        run = pretrain_config_for(compare, method, 1)
        assert (run.min_crop_scale, run.jitter_strength) == (0.3, 0.5)
    # A run folder written before these options existed records neither: it had the defaults.
    defaults = CompareConfig(methods=("simclr",), seeds=(1,), output_dir=str(tmp_path / "compare"))
    recorded = {k: v for k, v in vars(pretrain_config_for(defaults, "simclr", 1)).items()
                if k not in ("min_crop_scale", "jitter_strength")}
    (tmp_path / "compare" / "simclr-seed1").mkdir(parents=True)
    (tmp_path / "compare" / "simclr-seed1" / "config.json").write_text(json.dumps(recorded))
    check_existing_runs(defaults)
    with pytest.raises(RelreasonError, match=r"--jitter-strength: run 1.0 vs now 0.5"):
        check_existing_runs(CompareConfig(methods=("simclr",), seeds=(1,), jitter_strength=0.5,
                                          output_dir=str(tmp_path / "compare")))


@pytest.mark.parametrize("option, value, message", [
    ("--min-crop-scale", "0", "--min-crop-scale) must be a fraction"),
    ("--jitter-strength", "-1", "(--jitter-strength) must lie in [0, 2.5]"),
])
def test_compare_refuses_bad_view_options_before_training(tmp_path, capsys, option, value, message):
    assert main(["compare", "--output-dir", str(tmp_path / "compare"), option, value]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "compare").exists()


def test_one_seed_is_tabulated_without_a_spread_of_zero():
    from relreason.compare import CompareConfig, format_markdown, summarise

    for seeds, values, cell in (((1,), [81.5], "| 81.50 |"), ((1, 2), [81.0, 83.0], "| 82.00 ± 1.41 |")):
        config = CompareConfig(dataset="digits", methods=("relational",), seeds=seeds, protocols=("knn",))
        table = {"relational": {"epochs": summarise([1.0] * len(values)), "train_minutes": summarise([0.5] * len(values)),
                                "knn": summarise(values)}}
        text = format_markdown({"table": table}, config)
        assert text.rstrip().endswith(cell)
        assert ("mean ± std over seeds" in text) == (len(seeds) > 1)


def test_compare_refuses_a_labelled_folder_without_a_test_split_before_training(tmp_path, capsys):
    from PIL import Image

    images = tmp_path / "images"
    for name in ("cat", "dog"):
        (images / name).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(images / name / f"{i}.png")
    err = refused_before_training(tmp_path / "compare", images, capsys)
    assert "has no train/ and test/ (or val/ or validation/) subfolders, so it has no 'test' split" in err


@pytest.mark.parametrize("layout", ["split", "test-fraction"])
def test_compare_refuses_a_folder_of_one_class_before_training(tmp_path, capsys, layout):
    from PIL import Image

    images = tmp_path / "images"
    for split in (("train", "test") if layout == "split" else ("",)):
        (images / split / "photos").mkdir(parents=True)
        for i in range(6):
            Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(images / split / "photos" / f"{i}.png")
    extra = ["--test-fraction", "0.5"] if layout == "test-fraction" else []
    err = refused_before_training(tmp_path / "compare", images, capsys, *extra)
    said = ("holds one class ('photos'); --test-fraction holds out" if extra
            else "hold 1 class ('photos'); evaluation needs")
    assert said in err


def test_compare_takes_a_folder_named_otherwise_as_the_same_folder(tmp_path, capsys, monkeypatch):
    from relreason.compare import CompareConfig, check_existing_runs

    (tmp_path / "imgs").mkdir()
    monkeypatch.chdir(tmp_path)
    output = tmp_path / "compare"
    (output / "relational-seed1").mkdir(parents=True)
    recorded = {"method": "relational", "dataset": "folder", "data_root": "imgs", "num_views": 4, "seed": 1}
    (output / "relational-seed1" / "config.json").write_text(json.dumps(recorded))
    for spelling in ("imgs", "./imgs/", str(tmp_path / "imgs")):
        check_existing_runs(CompareConfig(dataset="folder", data_root=spelling, methods=("relational",), seeds=(1,),
                                          output_dir=str(output)))
    with pytest.raises(RelreasonError, match="--data-root: run 'imgs' vs now 'other'"):
        check_existing_runs(CompareConfig(dataset="folder", data_root="other", methods=("relational",), seeds=(1,),
                                          output_dir=str(output)))


def test_configs_built_in_python_may_hold_paths_and_numpy_numbers(tmp_path):
    """A Path or a NumPy number where the command line gives a string or an int: written to the run's JSON files
    as the plain values, not a crash after the work is done."""
    from pathlib import Path

    import numpy as np

    from relreason.compare import CompareConfig, run_compare

    result = pretrain(config(tmp_path, "relational", output_dir=tmp_path / "run", data_root=Path(tmp_path / "data"),
                             batch_size=np.int64(32), lr=np.float32(1e-3)))
    saved = json.loads((result.run_dir / "config.json").read_text())
    assert (saved["output_dir"], saved["data_root"]) == (str(tmp_path / "run"), str(tmp_path / "data"))
    assert saved["batch_size"] == 32
    assert saved["lr"] == pytest.approx(1e-3)
    summary = run_compare(CompareConfig(dataset="digits", image_size=16, methods=("random",), seeds=(1,),
                                        protocols=("knn",), embedding_points=60, device="cpu", progress=False,
                                        output_dir=tmp_path / "compare", data_root=Path(tmp_path / "data")))
    assert summary["table"]["random"]["knn"]["mean"] > 0
    written = json.loads((tmp_path / "compare" / "compare.json").read_text())["config"]
    assert written["output_dir"] == str(tmp_path / "compare")


def test_a_config_value_of_the_wrong_kind_is_one_line_naming_the_field(tmp_path):
    from relreason.compare import CompareConfig, run_compare
    from relreason.evaluate import EvaluateConfig, run_evaluation

    with pytest.raises(RelreasonError, match=r"^PretrainConfig.epochs must be an int, got '3'; pass e.g. 20$"):
        pretrain(config(tmp_path, "relational", epochs="3"))
    with pytest.raises(RelreasonError, match=r"^EvaluateConfig.batch_size must be an int, got 2.5"):
        run_evaluation(EvaluateConfig(run_dir=str(tmp_path / "none"), batch_size=2.5))
    with pytest.raises(RelreasonError, match=r"^each item of CompareConfig.seeds must be an int, got '1'"):
        run_compare(CompareConfig(seeds=("1",), output_dir=str(tmp_path / "compare")))
    assert not (tmp_path / "relational").exists() and not (tmp_path / "compare").exists()


def test_compare_refuses_a_pretrain_run_s_folder_as_its_output(tmp_path, capsys):
    run = pretrain(config(tmp_path, "relational")).run_dir
    curves = (run / "training_curves.png").read_bytes()
    assert main(compare_argv(run)) == 2
    assert f"--output-dir {run} is a pretrain run's folder" in capsys.readouterr().err
    assert (run / "training_curves.png").read_bytes() == curves


def test_a_full_disk_while_comparing_is_one_line(tmp_path, monkeypatch, capsys):
    import errno

    import relreason.compare

    def disk_full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(relreason.compare, "atomic_write_bytes", disk_full)  # compare.md
    output = tmp_path / "compare"
    assert main(compare_argv(output)) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"relreason: error: cannot write {output / 'compare.md'} (No space left on device); free space there and "
        "rerun the same command: finished runs and cached features are kept")
