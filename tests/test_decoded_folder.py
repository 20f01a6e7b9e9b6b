"""An image folder decoded into memory for the batched augmentation (--augment tensor on a folder)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from bad_folder import EXPECTED_LABELS, EXPECTED_SOURCE, file_hashes, write_bad_folder
from PIL import Image

from relreason import memory
from relreason.cli import main
from relreason.data import ImageFolderDataset, decoded_folder, read_skip_log
from relreason.data.batch_views import DeviceMultiViewDataset
from relreason.data.decoded_folder import DecodedImageFolder
from relreason.errors import RelreasonError
from relreason.train import PretrainConfig, build_pretrain_data, pretrain


def _plain_decode(folder: ImageFolderDataset, size: int) -> tuple[np.ndarray, list[int]]:
    """The obvious way: each image as the per-image path reads it, through the evaluation's resize and crop."""
    images, labels = [], []
    for i in range(len(folder)):
        image, label = folder[i]
        image = TF.center_crop(TF.resize(image, size), size)
        images.append(np.asarray(image))
        labels.append(label)
    return np.stack(images), labels


def _write_mixed_folder(root: Path) -> None:
    """Colour and grey files of several sizes and aspect ratios, in two class folders."""
    rng = np.random.default_rng(0)
    for cls, sizes in (("cat", [(40, 30), (17, 23), (16, 16)]), ("dog", [(64, 20), (12, 50)])):
        (root / cls).mkdir(parents=True)
        for j, (w, h) in enumerate(sizes):
            arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / cls / f"{j}.png")
    Image.fromarray(rng.integers(0, 256, (30, 20), dtype=np.uint8)).save(root / "dog" / "grey.PNG")


@pytest.mark.parametrize("threads", [1, 3])
def test_decoded_folder_equals_per_image_resize_and_crop(tmp_path, threads):
    _write_mixed_folder(tmp_path / "imgs")
    folder = ImageFolderDataset(tmp_path / "imgs")
    decoded = DecodedImageFolder(folder, 16, threads=threads)
    expected, labels = _plain_decode(ImageFolderDataset(tmp_path / "imgs"), 16)
    assert decoded.images.shape == (6, 16, 16, 3) and decoded.images.dtype == np.uint8
    assert np.array_equal(decoded.images, expected)
    assert decoded.labels.tolist() == labels == [0, 0, 0, 1, 1, 1]
    assert decoded.classes == ["cat", "dog"]
    # The evaluation transform sees the same pixels (before its ToTensor/Normalize).
    image, _ = folder[0]
    assert np.array_equal(np.asarray(TF.center_crop(TF.resize(image, 16), 16)), decoded.images[0])


def test_bad_files_are_replaced_as_the_folder_replaces_them_and_logged(tmp_path):
    root = tmp_path / "imgs"
    _, bad = write_bad_folder(root)
    before = file_hashes(root)
    decoded = DecodedImageFolder(ImageFolderDataset(root), 12, threads=2)
    plain = ImageFolderDataset(root)
    for i, source in enumerate(EXPECTED_SOURCE):
        image = plain.load_image(source)
        assert np.array_equal(decoded.images[i], np.asarray(TF.center_crop(TF.resize(image, 12), 12)))
    assert decoded.labels.tolist() == EXPECTED_LABELS
    assert {Path(p).relative_to(root).as_posix() for p in decoded.skipped} == bad
    decoded.log_skips_to(tmp_path / "skip.log")  # the ones met while decoding reach the log
    assert set(read_skip_log(tmp_path / "skip.log")) == bad
    assert decoded.skip_log == tmp_path / "skip.log"
    assert file_hashes(root) == before


def test_a_grey_folder_is_kept_as_one_channel(tmp_path):
    root = tmp_path / "grey"
    root.mkdir()
    rng = np.random.default_rng(1)
    for j in range(3):
        Image.fromarray(rng.integers(0, 256, (20 + j, 18), dtype=np.uint8)).save(root / f"{j}.png")
    decoded = DecodedImageFolder(ImageFolderDataset(root), 8)
    assert decoded.images.shape == (3, 8, 8)
    assert decoded.labels is None
    expected, _ = _plain_decode(ImageFolderDataset(root), 8)
    assert np.array_equal(decoded.images, expected[..., 0])
    assert "grey" in decoded.describe() and "3 images" in decoded.describe()


def test_a_folder_too_large_for_memory_is_refused_before_decoding(tmp_path, monkeypatch):
    _write_mixed_folder(tmp_path / "imgs")
    # Two copies of 6 x 16 x 16 x 3 = 4,608 bytes (the array, and the tensor the views are made from).
    monkeypatch.setattr(decoded_folder, "available_memory_bytes", lambda: 18_000)
    with pytest.raises(RelreasonError, match=r"needs 9\.0 KB of memory, more than 50% of the 17\.6 KB available; use --augment pil"):
        DecodedImageFolder(ImageFolderDataset(tmp_path / "imgs"), 16)
    monkeypatch.setattr(decoded_folder, "available_memory_bytes", lambda: 19_000)
    assert len(DecodedImageFolder(ImageFolderDataset(tmp_path / "imgs"), 16)) == 6
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun: every process on this machine decodes its own copy
    with pytest.raises(RelreasonError, match=r"needs 18\.0 KB of memory \(2 processes\)"):
        DecodedImageFolder(ImageFolderDataset(tmp_path / "imgs"), 16)
    # One copy in one process (evaluate's fine-tuning keeps the array alone) whatever the environment says.
    assert decoded_folder.decoding_too_large(6, 16, copies=1, processes=1) is None
    monkeypatch.setattr(decoded_folder, "available_memory_bytes", lambda: 9_000)
    assert decoded_folder.decoding_too_large(6, 16, copies=1, processes=1) == ("needs 4.5 KB of memory, more than 50% "
                                                                               "of the 8.8 KB available")
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    monkeypatch.setattr(decoded_folder, "available_memory_bytes", lambda: None)  # unknown: no check
    assert len(DecodedImageFolder(ImageFolderDataset(tmp_path / "imgs"), 16)) == 6


def test_available_memory_is_read_from_the_kernel_and_the_tightest_cgroup_limit(tmp_path):
    real = memory.available_memory_bytes()
    assert real is None or real > 0
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       8000 kB\nMemFree:         100 kB\nMemAvailable:    5000 kB\n")
    root, own = tmp_path / "cgroup", tmp_path / "self-cgroup"
    job = root / "slurm" / "job7"
    job.mkdir(parents=True)
    own.write_text("0::/slurm/job7\n")

    def available():
        return memory.available_memory_bytes(str(meminfo), str(root), str(own))

    assert available() == 5000 * 1024  # no limit files: the machine's MemAvailable
    (job / "memory.max").write_text("3000000\n")
    (job / "memory.current").write_text("2500000\n")
    (job / "memory.stat").write_text("anon 1500000\nfile 1000000\ninactive_file 1000000\n")
    assert available() == 1_500_000  # the job's limit, its reclaimable file cache counted as free
    (root / "slurm" / "memory.max").write_text("1200000\n")  # a tighter limit on an ancestor
    (root / "slurm" / "memory.current").write_text("0\n")
    assert available() == 1_200_000
    (job / "memory.max").write_text("max\n")
    (root / "slurm" / "memory.max").write_text("max\n")
    assert available() == 5000 * 1024
    own.write_text("4:memory:/x\n")  # no cgroup v2 path: the v2 root alone is looked at
    (root / "memory.max").write_text("2000000\n")
    (root / "memory.current").write_text("500000\n")
    assert available() == 1_500_000
    (root / "memory.max").write_text("max\n")
    # cgroup v1 (older container hosts): the memory hierarchy, this process's folder and its ancestors.
    own.write_text("5:cpu,cpuacct:/docker/abc\n4:memory:/docker/abc\n0::/\n")
    v1 = root / "memory" / "docker" / "abc"
    v1.mkdir(parents=True)
    (v1 / "memory.limit_in_bytes").write_text(f"{2**63 - 4096}\n")  # no limit, as v1 writes it
    (v1 / "memory.usage_in_bytes").write_text("100\n")
    assert available() == 5000 * 1024
    (v1 / "memory.limit_in_bytes").write_text("3000000\n")
    (v1 / "memory.usage_in_bytes").write_text("2000000\n")
    (v1 / "memory.stat").write_text("cache 900000\ntotal_inactive_file 800000\n")
    assert available() == 1_800_000
    # Inside a container the hierarchy's root is often the container's own cgroup, and its path is not there.
    v1_root = root / "memory"
    for name in ("memory.limit_in_bytes", "memory.usage_in_bytes", "memory.stat"):
        (v1 / name).rename(v1_root / name)
    (v1_root / "memory.limit_in_bytes").write_text("2500000\n")
    assert available() == 1_300_000
    assert memory.available_memory_bytes(str(tmp_path / "none"), str(tmp_path / "none"), str(own)) is None


def test_augment_tensor_on_a_folder_makes_batched_views_and_auto_keeps_the_files(tmp_path):
    _write_mixed_folder(tmp_path / "imgs")
    common = dict(dataset="folder", data_root=str(tmp_path / "imgs"), image_size=16, num_views=2)
    dataset, geometry = build_pretrain_data(PretrainConfig(augment="tensor", **common))
    assert isinstance(dataset, DeviceMultiViewDataset) and isinstance(dataset.dataset, DecodedImageFolder)
    views, labels = dataset.views(torch.arange(4), torch.Generator().manual_seed(0))
    assert views.shape == (2, 4, 3, 16, 16) and torch.isfinite(views).all()
    assert labels.tolist() == [0, 0, 0, 1]
    auto, auto_geometry = build_pretrain_data(PretrainConfig(augment="auto", **common))
    assert isinstance(auto.dataset, ImageFolderDataset)  # crops from the original files by default
    assert (geometry.pop("augment"), auto_geometry.pop("augment")) == ("tensor", "pil")  # the path taken
    assert auto_geometry == geometry  # one normalisation whichever path: computed from the files


def test_pretraining_a_folder_with_batched_views_logs_skips_and_resumes(tmp_path, capsys):
    root = tmp_path / "imgs"
    _, bad = write_bad_folder(root)
    before = file_hashes(root)
    run = tmp_path / "run"
    args = ["pretrain", "--dataset", "folder", "--data-root", str(root), "--augment", "tensor", "--image-size", "16",
            "-K", "2", "--batch-size", "4", "--device", "cpu", "--no-progress", "--no-tensorboard",
            "--output-dir", str(run)]
    assert main([*args, "--epochs", "1"]) == 0
    assert f"decoded 10 images of {root} into memory at 16x16 RGB" in capsys.readouterr().err
    logged = set(read_skip_log(run / "skipped_images.txt"))
    assert logged == bad
    assert main([*args, "--epochs", "2"]) == 0  # resumes
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2] and records[-1]["skipped_images"] == len(bad)
    assert len((run / "skipped_images.txt").read_text().splitlines()) == len(bad)
    assert file_hashes(root) == before
    torch.load(run / "backbone.pt", weights_only=True)


def test_method_random_does_not_decode_the_folder(tmp_path, monkeypatch):
    _write_mixed_folder(tmp_path / "imgs")

    class Refused(DecodedImageFolder):
        def __init__(self, *args, **kwargs):
            raise AssertionError("decoded a folder for a method that makes no views")

    monkeypatch.setattr("relreason.train.data.DecodedImageFolder", Refused)
    pretrain(PretrainConfig(dataset="folder", data_root=str(tmp_path / "imgs"), augment="tensor", method="random",
                            image_size=16, device="cpu", progress=False, tensorboard=False,
                            output_dir=str(tmp_path / "run")))
    assert (tmp_path / "run" / "backbone.pt").is_file()


def test_images_too_large_for_the_gpu_are_refused_in_one_line(tmp_path, monkeypatch):
    from relreason.data import batch_views
    from relreason.data.batch_augment import BatchRelationalAugmentation

    _write_mixed_folder(tmp_path / "imgs")
    decoded = DecodedImageFolder(ImageFolderDataset(tmp_path / "imgs"), 16)  # 4,608 bytes as a tensor
    augmentation = BatchRelationalAugmentation(16, (0.5,) * 3, (0.25,) * 3)
    monkeypatch.setattr(batch_views, "free_device_memory", lambda device: 9_000 if device.type == "cuda" else None)
    with pytest.raises(RelreasonError, match=r"the images take 4\.5 KB on cuda and 8\.8 KB is free; use --augment pil"):
        DeviceMultiViewDataset(decoded, augmentation, 2, 0, "cuda")
    assert len(DeviceMultiViewDataset(decoded, augmentation, 2, 0, "cpu")) == 6
    batch_views.check_fits_on_device(4_500, torch.device("cuda"))  # within half of 9,000


def test_a_folder_run_resumes_only_on_the_augmentation_path_it_started_on(tmp_path):
    # The two paths crop different things for a folder (the original files, or the decoded square).
    _write_mixed_folder(tmp_path / "imgs")
    common = dict(dataset="folder", data_root=str(tmp_path / "imgs"), image_size=16, num_views=2, batch_size=3,
                  device="cpu", progress=False, tensorboard=False, output_dir=str(tmp_path / "run"))
    pretrain(PretrainConfig(augment="tensor", epochs=1, **common))
    with pytest.raises(RelreasonError, match="--augment: checkpoint 'tensor' vs now 'pil'"):
        pretrain(PretrainConfig(augment="auto", epochs=2, **common))  # auto takes the per-file path for a folder
    assert pretrain(PretrainConfig(augment="tensor", epochs=2, **common)).epochs_done == 2
    assert json.loads((tmp_path / "run" / "backbone.json").read_text())["augment"] == "tensor"


def test_a_refused_resume_is_refused_before_the_folder_is_decoded(tmp_path, monkeypatch):
    _write_mixed_folder(tmp_path / "imgs")
    common = dict(dataset="folder", data_root=str(tmp_path / "imgs"), augment="tensor", num_views=2, batch_size=3,
                  device="cpu", progress=False, tensorboard=False, output_dir=str(tmp_path / "run"))
    pretrain(PretrainConfig(image_size=16, epochs=1, **common))

    class Refused(DecodedImageFolder):
        def __init__(self, *args, **kwargs):
            raise AssertionError("decoded a folder for a resume that is refused")

    monkeypatch.setattr("relreason.train.data.DecodedImageFolder", Refused)
    with pytest.raises(RelreasonError, match="--image-size: checkpoint 16 vs now 24"):
        pretrain(PretrainConfig(image_size=24, epochs=2, **common))


def test_decoding_shows_a_progress_bar_when_asked_on_a_terminal_only(tmp_path, capsys, monkeypatch):
    import io

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    _write_mixed_folder(tmp_path / "imgs")
    DecodedImageFolder(ImageFolderDataset(tmp_path / "imgs"), 8)
    DecodedImageFolder(ImageFolderDataset(tmp_path / "imgs"), 8, progress=True)  # stderr is no terminal: a log file
    assert "decoding images" not in capsys.readouterr().err
    for progress in (False, True):
        terminal = Terminal()
        monkeypatch.setattr("sys.stderr", terminal)
        DecodedImageFolder(ImageFolderDataset(tmp_path / "imgs"), 8, progress=progress)
        assert ("decoding images" in terminal.getvalue()) is progress


def test_read_in_threads_reads_every_index_once_in_chunks_and_raises_a_readers_error():
    from relreason.data.image_folder import read_in_threads

    seen = []
    counts = list(read_in_threads(seen.append, 1000, threads=3, chunk=64))
    assert counts == [64] * 15 + [40] and sorted(seen) == list(range(1000))
    seen.clear()
    counts = list(read_in_threads(seen.append, 100, threads=8))  # small: chunks of 4, so all 8 threads have work
    assert counts == [4] * 25 and sorted(seen) == list(range(100))
    assert list(read_in_threads(seen.append, 0, threads=2)) == []

    def reader(index):
        if index == 70:
            raise RelreasonError("cannot read 70")

    with pytest.raises(RelreasonError, match="cannot read 70"):
        list(read_in_threads(reader, 150, threads=2, chunk=16))
