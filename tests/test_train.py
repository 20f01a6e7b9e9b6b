"""The trainer's promises beyond the happy path: AMP, logs, time limit, non-finite loss, resume checks."""

import importlib.util
import json
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from relreason.checkpoint import list_checkpoints
from relreason.errors import RelreasonError
from relreason.train import PretrainConfig, TrainingPosition, make_loader, pretrain


def config(tmp_path, **overrides):
    options = dict(dataset="digits", image_size=16, num_views=3, batch_size=64, epochs=1, seed=0,
                   device="cpu", progress=False, output_dir=str(tmp_path / "run"))
    return PretrainConfig(**(options | overrides))


class NanAfter(nn.Module):
    """A backbone whose features turn to NaN after a given number of forward passes."""

    feature_dim = 4
    calls = 0

    def __init__(self, healthy_calls: int = 30) -> None:
        super().__init__()
        self.healthy_calls = healthy_calls
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x):
        NanAfter.calls += 1
        features = self.net(x)
        return features * float("nan") if NanAfter.calls > self.healthy_calls else features


class DtypeSpy(nn.Module):
    """A backbone that records the dtype its convolution computes in during training (autocast changes it)."""

    feature_dim = 4
    seen: set = set()

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x):
        features = self.net(x)
        if self.training:
            DtypeSpy.seen.add(features.dtype)
        return features


@pytest.mark.parametrize("amp,dtype", [("bf16", torch.bfloat16), ("off", torch.float32)])
def test_amp_option_sets_the_training_precision(tmp_path, monkeypatch, amp, dtype):
    DtypeSpy.seen = set()
    monkeypatch.setattr("relreason.backbones.registry.BACKBONES", {"dtype-spy": DtypeSpy})
    result = pretrain(config(tmp_path, backbone="dtype-spy", amp=amp, tensorboard=False))
    assert result.epochs_done == 1
    assert torch.isfinite(torch.tensor(result.history[0]["loss"]))
    assert DtypeSpy.seen == {dtype}
    assert all(p.dtype == torch.float32 for p in result.model.parameters())  # autocast: fp32 master weights


def test_the_relational_options_reach_the_model():
    """--loss, --focal-*, --aggregation and --head-hidden: the trainer's model is built with each."""
    from loop_reference import formula_focal

    from relreason.train import build_model

    model = build_model(PretrainConfig(dataset="digits", loss="focal", focal_gamma=1.5, focal_alpha=0.3,
                                       aggregation="max", head_hidden=32), 16)
    assert model.aggregation == "max" and model.relation_head[0].out_features == 32
    assert model.relation_head[0].in_features == model.feature_dim  # max keeps the feature width; cat doubles it
    out = model(torch.rand(3, 4, 3, 16, 16))
    assert torch.allclose(out.loss, formula_focal(1.5, 0.3)(out.scores, out.targets), atol=1e-6)


def test_channels_last_trains_and_exports_a_plain_state_dict(tmp_path):
    result = pretrain(config(tmp_path, amp="bf16", channels_last=True, tensorboard=False))
    assert torch.isfinite(torch.tensor(result.history[0]["loss"]))
    weight = next(p for p in result.model.backbone.parameters() if p.dim() == 4)
    assert weight.is_contiguous(memory_format=torch.channels_last)
    exported = torch.load(Path(result.run_dir) / "backbone.pt", weights_only=True)
    assert set(exported) == set(result.model.backbone.state_dict())
    assert all(tensor.is_contiguous() for tensor in exported.values())  # plain strides, as any loader expects


@pytest.mark.parametrize("augment", ["tensor", "pil"])
def test_both_augmentation_paths_train_and_are_reproducible(tmp_path, augment):
    first = pretrain(config(tmp_path / "a", augment=augment, tensorboard=False))
    second = pretrain(config(tmp_path / "b", augment=augment, tensorboard=False))
    assert first.history[0]["loss"] == second.history[0]["loss"]
    assert first.history[0]["relation_accuracy"] > 50.0


def test_metrics_tensorboard_and_plot(tmp_path):
    result = pretrain(config(tmp_path, epochs=2))
    record = result.history[-1]
    assert set(record) >= {"epoch", "loss", "relation_accuracy", "positive_accuracy", "negative_accuracy",
                           "seconds", "views_per_second", "lr"}
    # TensorBoard's files where it is installed (the dev extra installs it); without it, none and no error.
    has_tensorboard = importlib.util.find_spec("tensorboard") is not None
    assert bool(list((result.run_dir / "tensorboard").glob("events.out.tfevents.*"))) == has_tensorboard
    png = result.run_dir / "training_curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_time_limit_exports_current_backbone_and_checkpoints_the_step(tmp_path, capsys):
    import time

    from relreason.train.loop import _past_the_limit

    result = pretrain(config(tmp_path, epochs=5, time_limit=1e-9))
    assert result.stopped_early and result.epochs_done == 0
    assert (result.run_dir / "backbone.pt").is_file()
    assert [p.name for p in list_checkpoints(result.run_dir)] == ["checkpoint-e0000-s0000001.pt"]
    err = capsys.readouterr().err
    assert "stopped during epoch 1 at step 1 by the time limit" in err and "rerun" not in err
    # A step far longer than the limit (a large backbone on a CPU) is said, not left for the user to wonder at.
    assert _past_the_limit(PretrainConfig(time_limit=0.5), time.monotonic() - 90) == (
        ", 1.5 min past its 0.5 min (it is checked between steps, and a step takes long here)")
    assert _past_the_limit(PretrainConfig(time_limit=0.5), time.monotonic() - 1) == ""


def test_time_limit_counts_the_setup_too(tmp_path, monkeypatch):
    # Data that takes 1.5 s to prepare (a large folder decoded) under a 1.2 s limit: one step, then stop.
    import time

    from relreason.train import loop

    real = loop.build_pretrain_data

    def slow(*args, **kwargs):
        time.sleep(1.5)
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "build_pretrain_data", slow)
    result = pretrain(config(tmp_path, time_limit=0.02))
    assert result.stopped_early
    assert [p.name for p in list_checkpoints(result.run_dir)] == ["checkpoint-e0000-s0000001.pt"]


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    NanAfter.calls = 0
    monkeypatch.setattr("relreason.backbones.registry.BACKBONES", {"nan-after": NanAfter})
    with pytest.raises(RelreasonError, match=r"loss became nan in epoch 2.*last good checkpoint"):
        pretrain(config(tmp_path, backbone="nan-after", epochs=3))
    newest = list_checkpoints(tmp_path / "run")[0]
    assert newest.name == "checkpoint-e0001-s0000000.pt"
    checkpoint = torch.load(newest, weights_only=False)
    assert checkpoint["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in checkpoint["backbone"].values() if v.is_floating_point())


def test_a_non_finite_loss_before_any_checkpoint_says_none_was_written(tmp_path, monkeypatch):
    NanAfter.calls = 0
    monkeypatch.setattr("relreason.backbones.registry.BACKBONES", {"nan-after": lambda: NanAfter(healthy_calls=1)})
    with pytest.raises(RelreasonError, match=r"loss became nan in epoch 1.*\(no checkpoint had been written yet\)"):
        pretrain(config(tmp_path, backbone="nan-after", epochs=2))
    assert not list_checkpoints(tmp_path / "run")


def test_the_progress_bar_stays_out_of_a_log_file(tmp_path, capfd):
    pretrain(config(tmp_path, progress=True, tensorboard=False))  # stderr is a pipe here, not a terminal
    err = capfd.readouterr().err
    assert "\r" not in err and "epoch 1/1" in err


def test_resume_refuses_changed_model_options(tmp_path):
    pretrain(config(tmp_path))
    with pytest.raises(RelreasonError, match="options differ.*aggregation.*choose another --output-dir for a new run"):
        pretrain(config(tmp_path, epochs=2, resume=True, aggregation="sum"))


@pytest.mark.parametrize("first, then, message", [
    ({}, dict(loss="focal"), "--loss: checkpoint 'bce' vs now 'focal'"),
    (dict(loss="focal"), dict(loss="focal", focal_gamma=1.0), "--focal-gamma: checkpoint 2.0 vs now 1.0"),
    ({}, dict(min_crop_scale=0.5), "--min-crop-scale: checkpoint 0.08 vs now 0.5"),
    ({}, dict(jitter_strength=0.5), "--jitter-strength: checkpoint 1.0 vs now 0.5"),
    (dict(method="simclr"), dict(method="simclr", simclr_temperature=0.1), "--simclr-temperature: checkpoint 0.5 vs now 0.1"),
])
def test_resume_refuses_another_objective_or_crop(tmp_path, first, then, message):
    pretrain(config(tmp_path, **first))
    with pytest.raises(RelreasonError, match=re.escape(message)):
        pretrain(config(tmp_path, epochs=2, **then))


def test_resume_takes_a_dataset_name_as_typed_otherwise(tmp_path):
    from relreason.train import check_resumable

    geometry = {"image_size": 32, "mean": [0.3] * 3, "std": [0.4] * 3, "augment": "tensor"}
    saved = PretrainConfig(dataset="fashion-mnist")
    checkpoint = {"config": saved.__dict__, "geometry": geometry}
    check_resumable(checkpoint, PretrainConfig(dataset="Fashion_MNIST"), geometry, tmp_path / "c.pt")
    with pytest.raises(RelreasonError, match="--dataset: checkpoint 'fashion-mnist' vs now 'mnist'"):
        check_resumable(checkpoint, PretrainConfig(dataset="mnist"), geometry, tmp_path / "c.pt")


def test_a_refused_resume_shows_the_statistics_with_the_digits_that_tell_them_apart(tmp_path):
    from relreason.train import check_resumable

    saved = {"image_size": 32, "mean": [0.49621234, 0.498, 0.4973], "std": [0.25] * 3, "augment": "tensor"}
    now = saved | {"mean": [0.49621999, 0.498, 0.4973]}  # one image more among thousands
    checkpoint = {"config": PretrainConfig(dataset="folder").__dict__, "geometry": saved}
    with pytest.raises(RelreasonError, match=re.escape("mean [0.49621, 0.498, 0.4973] then, [0.49622, 0.498, 0.4973] "
                                                       "now")):
        check_resumable(checkpoint, PretrainConfig(dataset="folder"), now, tmp_path / "c.pt")


def _write_digit_pngs(root: Path, start: int, count: int) -> None:
    from PIL import Image
    from sklearn.datasets import load_digits

    root.mkdir(parents=True)
    for i, image in enumerate(load_digits().images[start:start + count]):
        Image.fromarray((image * 255 / 16).astype("uint8")).save(root / f"{i:03d}.png")


def test_resume_refuses_other_images_and_follows_a_moved_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _write_digit_pngs(tmp_path / "first", 0, 80)
    _write_digit_pngs(tmp_path / "other", 500, 80)
    folder = dict(dataset="folder", num_views=2, batch_size=16, output_dir="run", tensorboard=False)
    pretrain(config(tmp_path, data_root="first", **folder))
    # The run's folder named absolutely: the relative name it was given means nothing from another working folder.
    first = re.escape(str(tmp_path / "first"))
    with pytest.raises(RelreasonError, match=r"the images differ from those the run started on \(normalisation mean "
                                             rf".* another --data-root than '{first}', or files added or removed\)"):
        pretrain(config(tmp_path, data_root="other", epochs=2, **folder))
    assert json.loads((tmp_path / "run" / "backbone.json").read_text())["data_root"] == str(tmp_path / "first")
    (tmp_path / "first").rename(tmp_path / "moved")
    assert pretrain(config(tmp_path, data_root="moved", epochs=2, **folder)).epochs_done == 2  # same images
    assert json.loads((tmp_path / "run" / "backbone.json").read_text())["data_root"] == str(tmp_path / "moved")


def test_a_folder_run_resumes_after_its_unreadable_files_are_deleted(tmp_path, capsys):
    _write_digit_pngs(tmp_path / "images", 0, 40)
    (tmp_path / "images" / "010b.png").write_bytes(b"")  # between two images, as a user's folder has them
    folder = dict(dataset="folder", data_root=str(tmp_path / "images"), num_views=2, batch_size=16, tensorboard=False)
    run = pretrain(config(tmp_path, **folder)).run_dir
    assert "010b.png" in (run / "skipped_images.txt").read_text()
    (tmp_path / "images" / "010b.png").unlink()  # what a user does with the files the run listed
    assert pretrain(config(tmp_path, epochs=2, **folder)).epochs_done == 2


def test_an_earlier_versions_folder_run_moved_elsewhere_resumes_on_the_same_images(tmp_path, capsys):
    """Its statistics were taken by index, an unreadable file counted as the next image: taken that way again on the
    moved folder they match, so the run resumes with them; on other images they do not, and it is refused."""
    from relreason.data import ImageFolderDataset, compute_normalization

    _write_digit_pngs(tmp_path / "images", 0, 40)
    (tmp_path / "images" / "010b.png").write_bytes(b"")
    folder = dict(dataset="folder", num_views=2, batch_size=16, tensorboard=False)
    run = pretrain(config(tmp_path, data_root=str(tmp_path / "images"), **folder)).run_dir
    earlier = compute_normalization(ImageFolderDataset(tmp_path / "images"), method="per-image-draft")
    assert earlier != compute_normalization(ImageFolderDataset(tmp_path / "images"))  # 011.png counted twice then
    checkpoint_path = sorted(run.glob("checkpoint-*.pt"))[-1]
    checkpoint = torch.load(checkpoint_path, weights_only=False)
    checkpoint["geometry"] |= {"mean": list(earlier[0]), "std": list(earlier[1]), "normalization": "per-image-draft"}
    torch.save(checkpoint, checkpoint_path)
    _write_digit_pngs(tmp_path / "others", 300, 40)
    with pytest.raises(RelreasonError, match="the images differ from those the run started on"):
        pretrain(config(tmp_path, data_root=str(tmp_path / "others"), epochs=2, **folder))
    (tmp_path / "images").rename(tmp_path / "moved")
    capsys.readouterr()
    assert pretrain(config(tmp_path, data_root=str(tmp_path / "moved"), epochs=2, **folder)).epochs_done == 2
    assert "resuming with the normalisation the run started with" in capsys.readouterr().err
    assert json.loads((run / "backbone.json").read_text())["mean"] == list(earlier[0])


def test_an_earlier_versions_run_on_sideways_photos_resumes_and_still_tells_other_images(tmp_path, capsys):
    """Its statistics were taken from the photos as stored; today's reading turns them upright, which changes the
    statistics (the photos are not square). Taken the earlier way again they match: the run resumes with them.
    A file added since shows in them, on the same folder too: refused."""
    from PIL import Image

    from relreason.data import ImageFolderDataset, compute_normalization

    _write_digit_pngs(tmp_path / "images", 0, 30)
    exif = Image.Exif()
    exif[0x0112] = 6  # a portrait photo stored sideways; larger than the statistics' 256 px, so it is resized
    for i in range(6):
        pixels = np.random.default_rng(i).integers(0, 256, (300, 170, 3), dtype=np.uint8)
        Image.fromarray(pixels).transpose(Image.Transpose.ROTATE_90).save(tmp_path / "images" / f"phone{i}.png",
                                                                          exif=exif)
    folder = dict(dataset="folder", data_root=str(tmp_path / "images"), num_views=2, batch_size=16, tensorboard=False)
    run = pretrain(config(tmp_path, **folder)).run_dir
    as_stored = compute_normalization(ImageFolderDataset(tmp_path / "images"), method="per-image-draft-path-sample")
    assert as_stored != compute_normalization(ImageFolderDataset(tmp_path / "images"))
    checkpoint_path = sorted(run.glob("checkpoint-*.pt"))[-1]
    checkpoint = torch.load(checkpoint_path, weights_only=False)
    checkpoint["geometry"] |= {"mean": list(as_stored[0]), "std": list(as_stored[1]),
                               "normalization": "per-image-draft-path-sample"}
    torch.save(checkpoint, checkpoint_path)
    (tmp_path / "images" / "phone9.png").write_bytes((tmp_path / "images" / "phone0.png").read_bytes())
    with pytest.raises(RelreasonError, match="the images differ from those the run started on"):
        pretrain(config(tmp_path, epochs=2, **folder))
    (tmp_path / "images" / "phone9.png").unlink()
    capsys.readouterr()
    assert pretrain(config(tmp_path, epochs=2, **folder)).epochs_done == 2
    assert "resuming with the normalisation the run started with" in capsys.readouterr().err
    assert json.loads((run / "backbone.json").read_text())["mean"] == list(as_stored[0])
    assert json.loads((run / "backbone.json").read_text())["normalization"] == "per-image-draft-path-sample"
    (tmp_path / "images" / "phone9.png").write_bytes((tmp_path / "images" / "phone0.png").read_bytes())
    with pytest.raises(RelreasonError, match="the images differ"):  # a second resume still tells
        pretrain(config(tmp_path, epochs=3, **folder))


def test_rerunning_a_finished_run_says_so_instead_of_resuming_an_epoch_past_the_end(tmp_path, capsys):
    pretrain(config(tmp_path, tensorboard=False))
    capsys.readouterr()
    result = pretrain(config(tmp_path, tensorboard=False))
    err = capsys.readouterr().err
    assert "checkpoint-e0001-s0000000.pt ends the run's 1 epoch(s): nothing to train" in err
    assert "resuming" not in err and result.epochs_done == 1


def test_resume_ignores_relation_options_for_a_method_without_a_relation_head(tmp_path):
    pretrain(config(tmp_path, method="simclr"))  # two views whatever K is
    assert pretrain(config(tmp_path, method="simclr", epochs=2, num_views=8, aggregation="max")).epochs_done == 2


def test_resume_refuses_a_changed_schedule_and_reads_older_checkpoints_as_defaults(tmp_path):
    from relreason.train import check_resumable

    pretrain(config(tmp_path))
    with pytest.raises(RelreasonError, match="options differ.*--lr-schedule: checkpoint 'constant' vs now 'cosine'"):
        pretrain(config(tmp_path, epochs=2, resume=True, lr_schedule="cosine"))
    checkpoint = torch.load(list_checkpoints(tmp_path / "run")[0], weights_only=False)
    for option in ("lr_schedule", "warmup_epochs"):  # as a checkpoint written before these options existed
        del checkpoint["config"][option]
    check_resumable(checkpoint, config(tmp_path), checkpoint["geometry"], tmp_path / "old.pt")
    with pytest.raises(RelreasonError, match="--warmup-epochs: checkpoint 0.0 vs now 0.5"):
        check_resumable(checkpoint, config(tmp_path, epochs=2, warmup_epochs=0.5), checkpoint["geometry"], tmp_path / "old.pt")


def test_resuming_a_cosine_run_with_more_epochs_warns_of_the_new_curve(tmp_path, capsys):
    pretrain(config(tmp_path, lr_schedule="cosine"))
    capsys.readouterr()
    pretrain(config(tmp_path, epochs=2, resume=True, lr_schedule="cosine"))
    assert "the cosine schedule now spans the new length" in capsys.readouterr().err


def test_last_batch_of_one_image_is_dropped(tmp_path):
    from relreason.data import ArrayImageDataset, MultiViewDataset, relational_augmentation

    images = ArrayImageDataset(torch.randint(0, 255, (5, 8, 8), dtype=torch.uint8).numpy())
    views = MultiViewDataset(images, relational_augmentation(8, (0.5,) * 3, (0.5,) * 3), num_views=2)
    start = TrainingPosition()
    sizes = [len(labels) for _, labels in make_loader(views, config(tmp_path, batch_size=2), start, torch.device("cpu"))]
    assert sizes == [2, 2]
    sizes = [len(labels) for _, labels in make_loader(views, config(tmp_path, batch_size=3), start, torch.device("cpu"))]
    assert sizes == [3, 2]


def test_readme_python_examples_run_and_learn():
    """Each example's epoch of training lowers the relation loss on views it never saw, against the same model
    freshly initialised (same seed, same construction)."""
    from relreason import RelationalReasoning
    from relreason.backbones import build_backbone
    from relreason.data import dataset_info, load_dataset
    from relreason.data.batch_augment import BatchRelationalAugmentation
    from relreason.data.batch_views import images_as_tensor

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = re.search(r"## Python API(.*?)\n## ", readme, re.S).group(1)
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 2  # per-image views from a DataLoader, and views made in batches on the device
    info = dataset_info("digits")
    test_images = images_as_tensor(load_dataset("digits", root=None, split="test"), keep_grey=True)[:256]
    held_out = BatchRelationalAugmentation(32, info.mean, info.std)(test_images, 4, torch.Generator().manual_seed(9))
    for block, loss in zip(blocks, ("focal", "bce"), strict=True):
        torch.manual_seed(0)
        namespace = {}
        exec(compile(block, "README.md", "exec"), namespace)
        torch.manual_seed(0)
        fresh = RelationalReasoning(build_backbone("conv4"), loss=loss)
        assert namespace["model"].criterion.__class__ is fresh.criterion.__class__
        with torch.no_grad():
            trained_loss = namespace["model"](held_out.to(namespace.get("device", "cpu"))).loss.item()
            assert trained_loss < fresh(held_out).loss.item()


def test_compile_trains_and_keeps_plain_state_dict_keys(tmp_path):
    plain = pretrain(config(tmp_path / "plain", tensorboard=False))
    compiled = pretrain(config(tmp_path / "compiled", compile=True, tensorboard=False))
    # Same data, same initialisation: compiled kernels round differently but learn the same.
    assert abs(compiled.history[0]["loss"] - plain.history[0]["loss"]) < 0.02
    exported = torch.load(Path(compiled.run_dir) / "backbone.pt", weights_only=True)
    assert set(exported) == set(torch.load(Path(plain.run_dir) / "backbone.pt", weights_only=True))
    assert not any("_orig_mod" in key for key in exported)


def test_adam_is_fused_on_cuda_only_and_stays_so_when_resumed_from_a_cpu_checkpoint():
    # Fused on CUDA: with --amp fp16 the GradScaler then never reads its overflow flag on the host. The CPU keeps
    # PyTorch's default kernel, which its bit-exact resume tests were written against.
    from relreason.train import load_optimizer_state, make_optimizer

    parameter = nn.Parameter(torch.ones(3))
    groups = [{"params": [parameter], "base_lr": 1e-3}]
    cpu = make_optimizer(groups, PretrainConfig(), torch.device("cpu"))
    assert not cpu.defaults["fused"]
    parameter.sum().backward()
    cpu.step()
    # The fused kernel also runs on the CPU, so the CUDA optimizer can be exercised here on CPU tensors.
    cuda = make_optimizer(groups, PretrainConfig(), torch.device("cuda"))
    assert cuda.defaults["fused"] is True
    load_optimizer_state(cuda, cpu.state_dict(), groups, PretrainConfig())
    assert cuda.param_groups[0]["fused"] is True
    scaler = torch.amp.GradScaler("cpu")  # as fp16 does: it hands a fused optimizer its flags
    scaler.scale(parameter.sum()).backward()
    scaler.step(cuda)  # raised "Expected grad_scale and found_inf to be None" when the checkpoint unfused it
    scaler.update()
    assert torch.isfinite(parameter).all() and cuda.state[parameter]["step"].item() == 2
    # The fused kernel keeps its step counts beside the parameters; a CPU checkpoint keeps them on the CPU.
    # Parameters on the meta device stand for a GPU here.
    elsewhere = nn.Parameter(torch.ones(3, device="meta"))
    try:
        fused = make_optimizer([{"params": [elsewhere], "base_lr": 1e-3}], PretrainConfig(), torch.device("cuda"))
    except RuntimeError as error:  # torch 2.4 checks a fused optimizer's devices when it is built
        if "requires all the params to be floating point Tensors of supported devices" not in str(error):
            raise
        pytest.skip(f"torch {torch.__version__} builds no fused Adam on the meta device, the GPU's stand-in here")
    load_optimizer_state(fused, cpu.state_dict(), [{"params": [elsewhere], "base_lr": 1e-3}], PretrainConfig())
    step = fused.state[elsewhere]["step"]
    assert (step.device.type, step.dtype) == ("meta", torch.float32)


@pytest.mark.parametrize("saved_channels_last", [False, True])
def test_adam_moments_take_the_parameters_memory_format_on_resume(saved_channels_last):
    # CUDA's fused Adam refuses moments whose strides differ from the parameter's, as when a run is resumed with
    # --channels-last added or dropped; the CPU's kernels do not check, so the layout itself is checked here.
    from relreason.train import load_optimizer_state, make_optimizer

    def conv(channels_last):
        layer = nn.Conv2d(3, 4, 3)
        return layer.to(memory_format=torch.channels_last) if channels_last else layer

    before = conv(saved_channels_last)
    optimizer = make_optimizer([{"params": before.parameters(), "base_lr": 1e-3}], PretrainConfig(), torch.device("cpu"))
    before(torch.randn(2, 3, 8, 8)).sum().backward()
    optimizer.step()
    after = conv(not saved_channels_last)
    after.load_state_dict(before.state_dict())
    groups = [{"params": after.parameters(), "base_lr": 1e-3}]
    fused = make_optimizer(groups, PretrainConfig(), torch.device("cuda"))  # CUDA's kernel, on CPU tensors
    load_optimizer_state(fused, optimizer.state_dict(), groups, PretrainConfig())
    weight = after.weight
    for name in ("exp_avg", "exp_avg_sq"):
        moment = fused.state[weight][name]
        assert moment.stride() == weight.stride(), name
        assert torch.equal(moment, optimizer.state[before.weight][name]), name  # the same values


@pytest.mark.parametrize("interval, expected", [(1e9, 2), (0.0, 23)])
def test_progress_means_are_read_by_time_not_every_few_steps(tmp_path, monkeypatch, interval, expected):
    """Each refresh waits for the device; it happens on the first and last step and then by the clock."""
    import tqdm

    from relreason.train import loop

    shown = []
    monkeypatch.setattr(loop, "POSTFIX_SECONDS", interval)
    monkeypatch.setattr(tqdm.tqdm, "set_postfix", lambda self, values, **kwargs: shown.append(values))
    pretrain(config(tmp_path, progress=True, tensorboard=False))  # digits: 1,438 images, 23 steps
    assert len(shown) == expected and set(shown[-1]) >= {"loss", "relation"}


def test_compile_uses_static_shapes(tmp_path, monkeypatch):
    """An epoch's short last batch must not turn the backbone's graph dynamic for every later step."""
    calls = []
    original = nn.Module.compile

    def spy(self, *args, **kwargs):
        calls.append(kwargs)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(nn.Module, "compile", spy)
    pretrain(config(tmp_path / "run", compile=True, tensorboard=False))
    assert calls == [{"dynamic": False}]


@pytest.mark.parametrize("augment", ["tensor", "pil"])
def test_min_crop_scale_reaches_the_augmentation(tmp_path, augment):
    from torchvision import transforms as T

    from relreason.train import build_pretrain_data

    dataset, _ = build_pretrain_data(config(tmp_path, augment=augment, min_crop_scale=0.5))
    if augment == "tensor":
        assert dataset.augmentation.recipe.scale == (0.5, 1.0)
        params = dataset.augmentation.sample_parameters(4000, 8, 8, torch.Generator().manual_seed(0))
        areas = (params.boxes[:, 2] * params.boxes[:, 3]).float() / 64
        assert areas.min() >= 0.5 * 0.85  # rounding the crop sides to pixels moves small areas a little
    else:
        crop = next(t for t in dataset.transform.transforms if isinstance(t, T.RandomResizedCrop))
        assert crop.scale == (0.5, 1.0)


@pytest.mark.parametrize("augment", ["tensor", "pil"])
@pytest.mark.parametrize("strength", [0.0, 0.5, 1.0, 2.5])
def test_jitter_strength_reaches_the_augmentation(tmp_path, augment, strength):
    from torchvision import transforms as T

    from relreason.train import build_pretrain_data

    dataset, _ = build_pretrain_data(config(tmp_path, augment=augment, jitter_strength=strength))
    amounts = (0.8 * strength, 0.8 * strength, 0.8 * strength, 0.2 * strength)
    if augment == "tensor":
        recipe = dataset.augmentation.recipe
        assert (recipe.brightness, recipe.contrast, recipe.saturation, recipe.hue) == pytest.approx(amounts)
        factors = dataset.augmentation.sample_parameters(4000, 8, 8, torch.Generator().manual_seed(0)).factors
        low = [max(0.0, 1 - amounts[0])] * 3 + [-amounts[3]]
        high = [1 + amounts[0]] * 3 + [amounts[3]]
        assert (factors.min(0).values >= torch.tensor(low) - 1e-6).all()
        assert (factors.max(0).values <= torch.tensor(high) + 1e-6).all()
        assert (factors.max(0).values - factors.min(0).values >= 0.95 * (torch.tensor(high) - torch.tensor(low))).all()
    else:
        jitter = next(t for t in dataset.transform.transforms if isinstance(t, T.RandomApply)).transforms[0]
        expected = T.ColorJitter(*amounts)
        for name in ("brightness", "contrast", "saturation", "hue"):
            assert getattr(jitter, name) == getattr(expected, name), name


def test_supervised_on_partly_unlabelled_data_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    import numpy as np

    from relreason.data import ArrayImageDataset

    labels = np.array([0, 1, -1, 2] * 8)
    monkeypatch.setattr("relreason.train.data.load_dataset",
                        lambda *args, **kwargs: ArrayImageDataset(np.zeros((32, 8, 8), np.uint8), labels))
    with pytest.raises(RelreasonError, match=r"8 image\(s\) of dataset 'digits' have none"):
        pretrain(config(tmp_path, method="supervised"))
    assert not (tmp_path / "run").exists()


def stop_at_step(monkeypatch, step):
    """Make the stop vote say 'time limit' at ``step`` (its ``step``-th call), as a deadline passing there."""
    from relreason.train import StopRequest

    real, calls = StopRequest.agreed, []

    def agreed(self, deadline, context):
        calls.append(1)
        return real(self, -1.0 if len(calls) == step else deadline, context)

    monkeypatch.setattr(StopRequest, "agreed", agreed)


def test_resume_under_another_number_of_processes_goes_on_with_the_unused_images(tmp_path, monkeypatch, capsys):
    # digits: 1,438 training images, 23 steps of 64. A checkpoint after 5 steps of 2 processes has used 640.
    stop_at_step(monkeypatch, 5)
    pretrain(config(tmp_path))
    monkeypatch.undo()
    path = list_checkpoints(tmp_path / "run")[0]
    checkpoint = torch.load(path, weights_only=False)
    checkpoint["position"]["items"] = 5 * 64 * 2
    torch.save(checkpoint, path)
    capsys.readouterr()
    result = pretrain(config(tmp_path, log_every=1))
    err = capsys.readouterr().err
    assert "resumed under 1 process(es)" in err and "its 798 unused image(s), as step 10 of 23" in err
    steps = [json.loads(line) for line in (result.run_dir / "steps.jsonl").read_text().splitlines()]
    assert steps[0]["epoch"] == pytest.approx(5 / 23)  # where the first run stopped
    assert steps[1]["epoch"] == pytest.approx(11 / 23)  # the first step after the resume is step 11 of 23
    assert result.history[-1]["epoch"] == 1
    # The running sums stand for the 10 steps' worth of images now counted as done, not the 5 steps taken:
    # the first mean after the resume stays near the mean before it (unscaled sums would nearly halve it).
    mean_before = checkpoint["position"]["totals"]["loss"] / checkpoint["position"]["step"]
    assert steps[1]["loss"] == pytest.approx(mean_before, rel=0.15)


def test_a_fresh_start_drops_the_records_a_killed_run_left(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text('{"method": "relational"}')  # written first: killed before its first checkpoint
    (run / "steps.jsonl").write_text('{"epoch": 0.5, "loss": 9.0}\n')
    (run / "metrics.jsonl").write_text('{"epoch": 1, "loss": 9.0}\n')
    result = pretrain(config(tmp_path, log_every=10))
    steps = [json.loads(line) for line in (run / "steps.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in result.history] == [1] and result.history[0]["loss"] != 9.0
    assert all(r["loss"] != 9.0 for r in steps) and steps == sorted(steps, key=lambda r: r["epoch"])


def test_the_epoch_record_is_written_before_the_checkpoint_that_passes_it(tmp_path, monkeypatch):
    from relreason.train import resume

    seen = []
    real = resume.atomic_torch_save

    def save(state, path):
        if Path(path).name.startswith("checkpoint-"):
            seen.append((Path(path).name, len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines())))
        real(state, path)

    monkeypatch.setattr(resume, "atomic_torch_save", save)
    pretrain(config(tmp_path, epochs=2))
    assert seen == [("checkpoint-e0001-s0000000.pt", 1), ("checkpoint-e0002-s0000000.pt", 2)]


def test_resume_applies_this_commands_weight_decay_and_a_newly_enabled_fp16_scaler(tmp_path):
    pretrain(config(tmp_path, epochs=1))
    pretrain(config(tmp_path, epochs=2, weight_decay=0.1, amp="fp16"))
    checkpoint = torch.load(list_checkpoints(tmp_path / "run")[0], weights_only=False)
    assert [g["weight_decay"] for g in checkpoint["optimizer"]["param_groups"]] == [0.1, 0.0]  # the probe: none
    assert checkpoint["scaler"]  # the fp16 scaler's state, started afresh at the resume


def test_resume_refuses_a_changed_online_probe_and_accepts_the_dataset_size_given_explicitly(tmp_path):
    pretrain(config(tmp_path, image_size=None))
    with pytest.raises(RelreasonError, match="--online-probe: checkpoint True vs now False"):
        pretrain(config(tmp_path, image_size=None, epochs=2, online_probe=False))
    native = json.loads((tmp_path / "run" / "backbone.json").read_text())["image_size"]
    assert pretrain(config(tmp_path, image_size=native, epochs=2)).epochs_done == 2


def test_random_method_refuses_a_folder_with_another_run(tmp_path):
    pretrain(config(tmp_path))
    exported = (tmp_path / "run" / "backbone.pt").read_bytes()
    (tmp_path / "run" / ".checkpoint-e0000-s0000009.pt.x1.tmp").write_text("left by a killed write")
    before = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    with pytest.raises(RelreasonError, match="holds training checkpoints; choose another --output-dir"):
        pretrain(config(tmp_path, method="random"))
    assert {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()} == before  # untouched
    for path in list_checkpoints(tmp_path / "run"):
        path.unlink()
    with pytest.raises(RelreasonError, match="holds the backbone of a 'relational' run"):
        pretrain(config(tmp_path, method="random"))
    assert (tmp_path / "run" / "backbone.pt").read_bytes() == exported
    pretrain(config(tmp_path, method="random", output_dir=str(tmp_path / "random")))
    pretrain(config(tmp_path, method="random", output_dir=str(tmp_path / "random")))  # its own folder: fine


def test_stale_temporary_files_of_a_killed_write_are_removed(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    stale = [run / ".checkpoint-e0000-s0000003.pt.k2j4.tmp", run / ".backbone.pt.x9q1.tmp",
             run / ".training_curves.png.p0q1.tmp"]
    kept = run / ".notes.txt.a1b2.tmp"  # not a name relreason writes
    for path in (*stale, kept):
        path.write_bytes(b"partial")
    pretrain(config(tmp_path))
    assert not any(path.exists() for path in stale) and kept.exists()


def test_only_process_zero_prints_the_summary(monkeypatch, capsys):
    import argparse

    import relreason.train as train
    from relreason import cli

    result = train.PretrainResult(Path("runs/x"), 1, [], False, None)
    monkeypatch.setattr(train, "pretrain", lambda config: result)
    args = argparse.Namespace(dataset="digits")
    for rank, printed in (("1", False), ("0", True)):
        monkeypatch.setenv("RANK", rank)
        assert cli.run_pretrain(args) == 0
        assert ("done: 1 epoch(s)" in capsys.readouterr().out) == printed


def test_resume_after_a_class_folder_was_added_is_a_one_line_error(tmp_path):
    from PIL import Image

    images = tmp_path / "images"

    def add_class(index, name):
        (images / name).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (10, 10), (60 * index, 10 * i, 0)).save(images / name / f"{i}.png")

    add_class(0, "cat"), add_class(1, "dog")
    folder = dict(dataset="folder", data_root=str(images), image_size=8, num_views=2, batch_size=4)
    pretrain(config(tmp_path, **folder))
    # A class of copies of the others: the same normalisation statistics, so only the probe's size tells.
    (images / "owl").mkdir()
    for source in sorted(images.glob("[cd]*/*.png")):
        (images / "owl" / f"{source.parent.name}-{source.name}").write_bytes(source.read_bytes())
    with pytest.raises(RelreasonError, match=r"cannot resume .*no longer fits it \(probe\.\S+ is \(2, 64\) in the "
                                             r"checkpoint, \(3, 64\) now\); was a class folder added\? Rerun with"):
        pretrain(config(tmp_path, **folder, epochs=2))


def test_step_records_count_steps_over_the_run_and_close_each_epoch(tmp_path):
    # digits: 23 steps an epoch at batch 64. Every 10 steps of the run, and at each epoch's end.
    result = pretrain(config(tmp_path, epochs=2, log_every=10))
    steps = [json.loads(line) for line in (result.run_dir / "steps.jsonl").read_text().splitlines()]
    assert [round(r["epoch"] * 23) for r in steps] == [10, 20, 23, 30, 40, 46]
    assert steps[2]["loss"] == pytest.approx(result.history[0]["loss"])  # the epoch's end: the epoch's mean
    quiet = pretrain(config(tmp_path, epochs=2, log_every=50, output_dir=str(tmp_path / "quiet")))
    assert [r["epoch"] for r in map(json.loads, (quiet.run_dir / "steps.jsonl").read_text().splitlines())] == [1, 2]


def test_after_a_resume_that_counts_fewer_steps_the_next_resume_starts_from_the_new_checkpoint(tmp_path, monkeypatch):
    # As after a resume under more processes: the checkpoint says step 20, its images make step 5 here.
    stop_at_step(monkeypatch, 20)
    pretrain(config(tmp_path, batch_size=32))
    path = list_checkpoints(tmp_path / "run")[0]
    assert path.name == "checkpoint-e0000-s0000020.pt"
    checkpoint = torch.load(path, weights_only=False)
    checkpoint["position"]["items"] = 5 * 32
    torch.save(checkpoint, path)
    monkeypatch.undo()
    stop_at_step(monkeypatch, 3)
    pretrain(config(tmp_path, batch_size=32))
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["checkpoint-e0000-s0000008.pt"]


def test_a_later_checkpoint_that_could_not_be_read_once_survives_the_next_save(tmp_path, monkeypatch):
    import relreason.checkpoint as checkpoint_module

    pretrain(config(tmp_path, epochs=2, checkpoint_every=10))
    newest, previous = list_checkpoints(tmp_path / "run")
    assert (newest.name, previous.name) == ("checkpoint-e0002-s0000000.pt", "checkpoint-e0001-s0000020.pt")
    real, failed = checkpoint_module.load_checkpoint, []

    def fails_once_for_the_newest(path):
        if Path(path) == newest and not failed:
            failed.append(path)
            raise checkpoint_module.UnreadableCheckpoint(Path(path), "cannot be read (OSError: input/output error)",
                                                         "delete it or start a new --output-dir")
        return real(path)

    monkeypatch.setattr(checkpoint_module, "load_checkpoint", fails_once_for_the_newest)
    stop_at_step(monkeypatch, 1)
    pretrain(config(tmp_path, epochs=2, checkpoint_every=10))  # resumes from e0001-s20, stops at s21
    assert newest in list_checkpoints(tmp_path / "run")  # the finished epoch's checkpoint is not deleted


@pytest.mark.parametrize("set_from_python", [True, False])
def test_sigterm_handler_is_given_back_after_training(set_from_python):
    import signal

    from relreason.train import StopRequest

    def mine(signum, frame):
        pass

    original = signal.getsignal(signal.SIGTERM)
    try:
        signal.signal(signal.SIGTERM, mine)
        request = StopRequest.install()
        assert signal.getsignal(signal.SIGTERM) == request._handle
        if not set_from_python:
            request.previous[signal.SIGTERM] = None  # what signal.signal answers for a handler set outside Python
        request.uninstall()
        expected = mine if set_from_python else signal.SIG_DFL
        assert signal.getsignal(signal.SIGTERM) == expected
        signal.signal(signal.SIGTERM, mine)
        request.uninstall()  # a second call changes nothing
        assert signal.getsignal(signal.SIGTERM) == mine
    finally:
        signal.signal(signal.SIGTERM, original)


def test_notes_for_options_that_change_nothing_here_and_the_views_recorded(tmp_path, capsys):
    result = pretrain(config(tmp_path, method="simclr", num_views=8, sync_batchnorm=True, amp="fp16",
                             time_limit=1e-9, loss="focal", aggregation="max", download=True, num_workers=2))
    err = capsys.readouterr().err
    assert "method 'simclr' trains on 2 view(s) per image; -K 8 does not change that" in err
    assert "method 'simclr' does not use --aggregation, --loss ('relational' options)" in err
    assert "'digits' needs no download, so it does nothing" in err
    assert "--num-workers 2 does nothing on the batched path" in err
    assert "--sync-batchnorm does nothing in a single process" in err
    assert "--amp fp16 is slow on a CPU" in err
    assert json.loads((result.run_dir / "backbone.json").read_text())["num_views"] == 2
    pretrain(config(tmp_path, output_dir=str(tmp_path / "plain"), time_limit=1e-9))
    assert "note:" not in capsys.readouterr().err
    pretrain(config(tmp_path, output_dir=str(tmp_path / "own"), time_limit=1e-9, loss="focal", simclr_temperature=0.2,
                    augment="pil", num_workers=0))
    assert "note: method 'relational' does not use --simclr-temperature ('simclr' options)\n" in capsys.readouterr().err


def test_focal_options_without_the_focal_loss_get_a_note():
    from relreason.train.config import unused_option_notes

    assert unused_option_notes(PretrainConfig(focal_gamma=3.0, focal_alpha=0.25)) == [
        "--loss bce does not use --focal-gamma and --focal-alpha; pass --loss focal to train with the focal loss"]
    assert unused_option_notes(PretrainConfig(loss="focal", focal_gamma=3.0)) == []
    assert unused_option_notes(PretrainConfig(method="simclr", focal_alpha=0.25)) == [
        "method 'simclr' does not use --focal-alpha ('relational' options)"]


def test_a_one_class_run_that_trained_a_probe_resumes_without_it(tmp_path, monkeypatch):
    # Earlier versions trained an online probe over a folder's single class; such a run resumes, probe dropped.
    from relreason import train

    _write_digit_pngs(tmp_path / "one" / "photos", 0, 40)
    options = dict(dataset="folder", data_root=str(tmp_path / "one"), batch_size=16)
    monkeypatch.setattr(train.loop, "num_classes_of", lambda dataset: 1)
    pretrain(config(tmp_path, **options))
    assert any(k.startswith("probe.") for k in torch.load(list_checkpoints(tmp_path / "run")[0],
                                                          weights_only=False)["model"])
    monkeypatch.undo()
    result = pretrain(config(tmp_path, epochs=2, **options))
    assert result.epochs_done == 2
    assert not any(k.startswith("probe.") for k in torch.load(list_checkpoints(tmp_path / "run")[0],
                                                              weights_only=False)["model"])


def test_a_sigterm_while_the_finished_run_is_exported_lets_the_export_and_plot_finish(tmp_path, monkeypatch, capsys):
    import os
    import signal

    import relreason.train.loop as loop
    from relreason.cli import main

    real_export = loop.export_backbone

    def export_after_a_sigterm(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # a scheduler's notice in the run's last second
        real_export(*args, **kwargs)

    monkeypatch.setattr(loop, "export_backbone", export_after_a_sigterm)
    original = signal.getsignal(signal.SIGTERM)
    try:
        signal.signal(signal.SIGTERM, lambda signum, frame: pytest.fail("the default SIGTERM would have killed it"))
        code = main(["pretrain", "--dataset", "digits", "--image-size", "16", "-K", "2", "--epochs", "1",
                     "--no-progress", "--no-tensorboard", "--output-dir", str(tmp_path / "run")])
    finally:
        signal.signal(signal.SIGTERM, original)
    assert code == 0 and "done: 1 epoch(s)" in capsys.readouterr().out  # the run was finished: nothing to resume
    for name in ("backbone.pt", "backbone.json", "training_curves.png"):
        assert (tmp_path / "run" / name).is_file(), name
    assert json.loads((tmp_path / "run" / "backbone.json").read_text())["finished"] is True


def test_a_stop_at_an_epochs_end_says_after_that_epoch(tmp_path, monkeypatch, capsys):
    # digits: 1,438 training images, 23 steps of 64; the 24th vote is the one taken after the epoch's last step.
    stop_at_step(monkeypatch, 24)
    result = pretrain(config(tmp_path, epochs=2))
    assert result.stopped_early and not result.mid_epoch and result.epochs_done == 1
    err = capsys.readouterr().err
    assert "stopped after epoch 1 by the time limit; exported the current backbone" in err and "step 0" not in err
    monkeypatch.undo()
    stop_at_step(monkeypatch, 3)
    result = pretrain(config(tmp_path, epochs=3))  # resumes into epoch 2 and stops inside it
    assert result.stopped_early and result.mid_epoch
    assert "stopped during epoch 2 at step 3" in capsys.readouterr().err  # the 3rd vote: after step 3


def test_a_named_datasets_run_resumes_with_the_normalisation_it_started_with(tmp_path, capsys):
    """A named dataset's statistics are relreason's constants: should a version change them, a run resumes with
    those it started with (and says so); an image folder's come from its images, so a change there is refused."""
    from relreason.train.resume import check_resumable, keep_recorded_normalization

    first = pretrain(config(tmp_path, epochs=1))
    checkpoint_path = sorted(first.run_dir.glob("checkpoint-*.pt"))[-1]
    checkpoint = torch.load(checkpoint_path, weights_only=False)
    checkpoint["geometry"]["mean"] = [0.5, 0.5, 0.5]  # as if an older version had normalised digits so
    torch.save(checkpoint, checkpoint_path)
    capsys.readouterr()
    resumed = pretrain(config(tmp_path, epochs=2))
    assert "resuming with the normalisation the run started with (mean [0.5, 0.5, 0.5]" in capsys.readouterr().err
    assert json.loads((resumed.run_dir / "backbone.json").read_text())["mean"] == [0.5, 0.5, 0.5]
    folder_run = {"config": {"dataset": "folder"}, "geometry": {"mean": [0.5] * 3, "std": [0.25] * 3}}
    geometry = {"image_size": 32, "mean": [0.4] * 3, "std": [0.25] * 3}
    keep_recorded_normalization(folder_run, PretrainConfig(dataset="folder"), geometry)
    assert geometry["mean"] == [0.4] * 3
    with pytest.raises(RelreasonError, match="the images differ from those the run started on"):
        check_resumable(folder_run, PretrainConfig(dataset="folder", data_root="x"), geometry, Path("c.pt"))
    # A folder's statistics taken by an earlier version (by pixels, not per image) are kept on the run's own
    # folder, not compared; on another folder they are compared, and refused.
    geometry["normalization"] = "per-image"
    keep_recorded_normalization(folder_run | {"data_root": str(tmp_path / "other")},
                                PretrainConfig(dataset="folder", data_root=str(tmp_path / "images")), geometry)
    assert geometry["mean"] == [0.4] * 3
    keep_recorded_normalization(folder_run | {"data_root": str(tmp_path / "images")},
                                PretrainConfig(dataset="folder", data_root=str(tmp_path / "images")), geometry)
    assert geometry["mean"] == [0.5] * 3 and "normalization" not in geometry
    check_resumable(folder_run, PretrainConfig(dataset="folder", data_root="x"), geometry, Path("c.pt"))


def test_a_run_trained_past_epochs_is_refused_not_relabelled(tmp_path, capsys):
    pretrain(config(tmp_path, epochs=2, tensorboard=False))
    run = tmp_path / "run"
    before = {path.name: path.read_bytes() for path in run.iterdir() if path.is_file()}
    with pytest.raises(RelreasonError, match=r"cannot resume .*checkpoint-e0002-s0000000\.pt with --epochs 1: the run "
                       r"has "
                       r"trained 2 epochs, past it; pass --epochs 2 or more to go on, or choose another --output-dir"):
        pretrain(config(tmp_path, epochs=1, tensorboard=False))
    assert {path.name: path.read_bytes() for path in run.iterdir() if path.is_file()} == before
    # Mid-epoch: a checkpoint 1.5 epochs in is past --epochs 1 too.
    checkpoint = torch.load(run / "checkpoint-e0001-s0000000.pt", weights_only=False)
    checkpoint["position"] |= {"step": checkpoint["position"]["steps_per_epoch"] // 2}
    for path in list_checkpoints(run):
        path.unlink()
    torch.save(checkpoint, run / "checkpoint-e0001-s0000005.pt")
    with pytest.raises(RelreasonError, match=r"has trained 1\.\d+ epochs, past it; pass --epochs 2 or more"):
        pretrain(config(tmp_path, epochs=1, tensorboard=False))


def test_a_rerun_that_trains_nothing_keeps_the_options_that_trained_the_run(tmp_path, capsys):
    pretrain(config(tmp_path, tensorboard=False))
    recorded = (tmp_path / "run" / "config.json").read_text()
    pretrain(config(tmp_path, lr=5e-3, tensorboard=False))
    assert "nothing to train" in capsys.readouterr().err
    assert (tmp_path / "run" / "config.json").read_text() == recorded


def test_options_a_resume_may_change_are_said(tmp_path, capsys):
    pretrain(config(tmp_path, tensorboard=False))
    capsys.readouterr()
    pretrain(config(tmp_path, epochs=2, lr=2e-3, amp="bf16", augment="pil", tensorboard=False))
    err = capsys.readouterr().err
    assert "relreason: note: resuming with --lr 0.002; the run so far trained with 0.001" in err
    assert "relreason: note: resuming with --amp bf16; the run so far trained with off" in err
    assert "relreason: note: resuming with --augment pil; the run so far trained with tensor" in err
    assert "--weight-decay" not in err
    assert json.loads((tmp_path / "run" / "config.json").read_text())["lr"] == 2e-3


def test_a_run_folder_in_use_by_another_process_is_refused(tmp_path):
    from folder_lock import held_by_another_process

    run = tmp_path / "run"
    run.mkdir()
    with held_by_another_process(run):
        with pytest.raises(RelreasonError, match=f"run folder {run} is in use by another relreason process that is "
                           "training in it; wait for it to end \\(or stop it\\), or choose another --output-dir"):
            pretrain(config(tmp_path, tensorboard=False))
        assert list(run.iterdir()) == []  # refused before anything was written
    assert pretrain(config(tmp_path, tensorboard=False)).epochs_done == 1
    assert pretrain(config(tmp_path, epochs=2, tensorboard=False)).epochs_done == 2  # released when a run ends


def test_a_full_disk_is_one_line_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    import errno

    from relreason.cli import main
    from relreason.train import resume

    def argv(epochs):
        return ["pretrain", "--dataset", "digits", "--image-size", "16", "-K", "3", "--epochs", str(epochs),
                "--device", "cpu", "--no-progress", "--no-tensorboard", "--output-dir", str(tmp_path / "run")]

    assert main(argv(1)) == 0  # one epoch: its checkpoint is on the disk
    first = (tmp_path / "run" / "checkpoint-e0001-s0000000.pt").read_bytes()

    def disk_full(obj, path):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(resume, "atomic_torch_save", disk_full)
    capsys.readouterr()
    assert main(argv(2)) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (f"relreason: error: cannot write in {tmp_path / 'run'} (No space left on device); its newest whole "
                   "checkpoint, checkpoint-e0001-s0000000.pt, is kept: free space there and rerun the command to go on "
                   "from it")
    assert (tmp_path / "run" / "checkpoint-e0001-s0000000.pt").read_bytes() == first
    assert main([*argv(1)[:-1], str(tmp_path / "fresh")]) == 2  # a run stopped before its first checkpoint
    assert capsys.readouterr().err.strip().endswith("(No space left on device); no checkpoint had been written yet: "
                                                    "free space there (or choose another --output-dir) and rerun the "
                                                    "command")


def test_a_step_out_of_memory_is_one_line_saying_what_to_lower(tmp_path, monkeypatch, capsys):
    from relreason.cli import main
    from relreason.train import loop

    def argv(epochs, *more):
        return ["pretrain", "--dataset", "digits", "--image-size", "16", "-K", "3", "--epochs", str(epochs),
                "--device", "cpu", "--no-progress", "--no-tensorboard", "--output-dir", str(tmp_path / "run"), *more]

    real_step = loop.train_step

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(loop, "train_step", out_of_memory)
    assert main(argv(1)) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "relreason: error: out of host memory for a training step of 3 views of each of 64 images; lower --batch-size "
        "or -K, or pass --amp bf16; no checkpoint had been written yet")
    monkeypatch.setattr(loop, "train_step", real_step)
    assert main(argv(1)) == 0
    allocation = RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                              "memory: you tried to allocate 64424509440 bytes. Error code 12")
    monkeypatch.setattr(loop, "train_step", lambda *args, **kwargs: (_ for _ in ()).throw(allocation))
    assert main(argv(2, "--amp", "bf16")) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "relreason: error: out of host memory for a training step of 3 views of each of 64 images; lower --batch-size "
        "or -K; the newest checkpoint, checkpoint-e0001-s0000000.pt, is kept (a resume keeps -K and --batch-size: a "
        "smaller step starts afresh in another --output-dir)")
    other = RuntimeError("mat1 and mat2 shapes cannot be multiplied")  # not about memory: raised as it is
    monkeypatch.setattr(loop, "train_step", lambda *args, **kwargs: (_ for _ in ()).throw(other))
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        pretrain(config(tmp_path, epochs=2, output_dir=str(tmp_path / "other")))


def test_tensorboard_shows_a_resumed_epoch_once(tmp_path):
    pytest.importorskip("tensorboard", reason="TensorBoard comes with the dev extra")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    pretrain(config(tmp_path, epochs=2))
    (tmp_path / "run" / "checkpoint-e0002-s0000000.pt").unlink()  # as if killed before it: epoch 2 again
    pretrain(config(tmp_path, epochs=3, lr=2e-3))
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    steps = [event.step for event in events.Scalars("pretrain/loss")]
    assert steps == [1, 2, 3]
    history = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [event.value for event in events.Scalars("pretrain/loss")] == pytest.approx([r["loss"] for r in history])


def test_an_export_cut_short_leaves_no_description_of_other_weights(tmp_path, monkeypatch):
    from relreason.train import run_folder

    result = pretrain(config(tmp_path, tensorboard=False))
    run = tmp_path / "run"
    assert (run / "backbone.json").is_file()

    def killed(obj, path):
        raise KeyboardInterrupt  # as a kill between the weights and their description

    monkeypatch.setattr(run_folder, "atomic_torch_save", killed)
    position = TrainingPosition(epoch=1)
    with pytest.raises(KeyboardInterrupt):
        run_folder.export_backbone(run, result.model.backbone, config(tmp_path), {"image_size": 16}, position)
    assert not (run / "backbone.json").exists()


def test_a_run_stopped_inside_its_first_epoch_logs_where_it_stopped_and_draws_its_curve(tmp_path, monkeypatch):
    # digits: 23 steps an epoch; --log-every 10 would give no point before step 10.
    stop_at_step(monkeypatch, 3)
    result = pretrain(config(tmp_path, epochs=2, log_every=10))
    assert result.stopped_early and result.history == []
    steps = [json.loads(line) for line in (result.run_dir / "steps.jsonl").read_text().splitlines()]
    assert [round(r["epoch"] * 23) for r in steps] == [3]
    assert (result.run_dir / "training_curves.png").stat().st_size > 0
    monkeypatch.undo()
    resumed = pretrain(config(tmp_path, epochs=2, log_every=10))
    steps = [json.loads(line) for line in (resumed.run_dir / "steps.jsonl").read_text().splitlines()]
    # The stop's point is kept; the resumed run goes on with the run's own grid of steps.
    assert [round(r["epoch"] * 23) for r in steps] == [3, 10, 20, 23, 30, 40, 46]


def test_the_progress_bar_shows_the_loss_and_probe_first_under_short_names():
    from relreason.train.metrics_log import progress_fields

    means = {"relation_accuracy": 0.8312, "loss": 0.70401, "positive_accuracy": 0.5, "probe_accuracy": 0.25}
    assert progress_fields(means) == {"loss": "0.7040", "probe": "25.0%", "relation": "83.1%", "positive": "50.0%"}
    assert list(progress_fields(means)) == ["loss", "probe", "relation", "positive"]


def test_training_seconds_leave_out_the_checkpoints_written_inside_an_epoch(tmp_path, monkeypatch):
    from relreason.train.resume import CheckpointSaver

    real = CheckpointSaver.save

    def slow_save(self, position):
        time.sleep(1.0)
        real(self, position)

    monkeypatch.setattr(CheckpointSaver, "save", slow_save)
    started = time.perf_counter()
    result = pretrain(config(tmp_path, checkpoint_every=5, log_every=5))  # 23 steps: saves at 5, 10, 15, 20 and 23
    wall = time.perf_counter() - started
    assert result.history[0]["seconds"] <= wall - 4.5


def test_a_finished_run_whose_checkpoints_were_deleted_is_not_trained_over(tmp_path):
    first = pretrain(config(tmp_path))
    exported = (first.run_dir / "backbone.pt").read_bytes()
    for path in list_checkpoints(first.run_dir):
        path.unlink()
    for resume in (True, False):
        with pytest.raises(RelreasonError, match=r"holds an exported backbone \(backbone.pt, backbone.json\) but no "
                                                 r"checkpoint to go on from; choose another --output-dir"):
            pretrain(config(tmp_path, seed=5, resume=resume))
    assert (first.run_dir / "backbone.pt").read_bytes() == exported


def test_a_standard_error_that_cannot_be_written_does_not_stop_training(tmp_path, monkeypatch):
    """A log file on a full disk (2>/dev/full) or a closed stderr (2>&-): the run's lines are lost, not its work."""
    import errno
    import io
    import sys

    class FullDisk(io.TextIOBase):
        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(sys, "stderr", FullDisk())
    result = pretrain(config(tmp_path, epochs=2))
    assert result.epochs_done == 2 and not result.stopped_early
    assert [p.name for p in list_checkpoints(result.run_dir)] == ["checkpoint-e0002-s0000000.pt",
                                                                  "checkpoint-e0001-s0000000.pt"]


def test_a_folder_of_one_s_own_files_named_as_a_run_s_is_not_written_over(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    own = {"config.json": '{"learning_rate": 3}', "metrics.jsonl": '{"step": 1}\n', "training_curves.png": "png"}
    for name, text in own.items():
        (project / name).write_text(text)
    with pytest.raises(RelreasonError, match=r"holds config.json, metrics.jsonl, training_curves.png, which no "
                                             r"relreason run wrote there and a run would replace; choose another "
                                             r"--output-dir \(a folder of its own for each run\)"):
        pretrain(config(tmp_path, output_dir=str(project)))
    assert {name: (project / name).read_text() for name in own} == own
    (project / "config.json").unlink()
    (project / "training_curves.png").unlink()
    (project / "notes.txt").write_text("mine")  # files of other names are no run's business
    with pytest.raises(RelreasonError, match=r"holds metrics.jsonl, which no relreason run wrote"):
        pretrain(config(tmp_path, output_dir=str(project)))
    (project / "metrics.jsonl").unlink()
    assert pretrain(config(tmp_path, output_dir=str(project))).epochs_done == 1
    assert (project / "notes.txt").read_text() == "mine"


def test_a_random_export_killed_between_its_two_files_is_written_again(tmp_path):
    first = pretrain(config(tmp_path, method="random"))
    (first.run_dir / "backbone.json").unlink()  # killed after backbone.pt was replaced, before backbone.json
    again = pretrain(config(tmp_path, method="random"))
    assert (again.run_dir / "backbone.json").exists()
