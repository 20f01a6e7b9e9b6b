"""JPEGs of an image folder decoded only as large as their use needs (PIL's draft), and nowhere else."""

from __future__ import annotations

import io
import json
import math
import os

import numpy as np
import pytest
import torchvision.transforms.functional as TF
from PIL import Image

from relreason.data import ImageFolderDataset, compute_normalization
from relreason.data.decoded_folder import DecodedImageFolder
from relreason.data.image_folder import DRAFT_MARGIN, decoded_for, read_threads
from relreason.data.transforms import smallest_crop_side
from relreason.errors import RelreasonError


def _photo(width: int, height: int, seed: int = 0) -> np.ndarray:
    """Colour gradients with a little noise, for tests that only need a picture of some size."""
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 1, width)[None, :, None]
    y = np.linspace(0, 1, height)[:, None, None]
    waves = 90 * np.sin(9 * x + 5 * y + np.array([0.0, 1.0, 2.0])) + 128
    return (waves + rng.normal(0, 6, (height, width, 3))).clip(0, 255).astype(np.uint8)


def _camera_photos() -> list[np.ndarray]:
    """scikit-learn's two bundled photographs (640x427 JPEGs): real detail, offline."""
    from sklearn.datasets import load_sample_images

    return list(load_sample_images().images)


def _plain_square(image: Image.Image, size: int) -> np.ndarray:
    return np.asarray(TF.center_crop(TF.resize(image, size), size))


@pytest.fixture
def photos(tmp_path):
    china, flower = _camera_photos()
    root = tmp_path / "photos"
    root.mkdir()
    Image.fromarray(china).save(root / "a.jpg", quality=92)
    Image.fromarray(flower).save(root / "b.png")
    Image.fromarray(flower).convert("CMYK").save(root / "c.jpg", quality=92)
    Image.fromarray(china).convert("L").save(root / "d.jpg", quality=92)
    return root


def test_a_folder_decodes_its_jpegs_at_the_largest_reduction_that_keeps_the_side_asked(photos):
    folder = ImageFolderDataset(photos)
    assert [p.name for p in folder.paths] == ["a.jpg", "b.png", "c.jpg", "d.jpg"]
    full = [folder[i][0] for i in range(4)]
    assert {image.size for image in full} == {(640, 427)}
    images = [folder.decoded_at_least(100)[i][0] for i in range(4)]
    # 427 // 100 = 4: a quarter; a PNG has no reduced decoding.
    assert [image.size for image in images] == [(160, 107), (640, 427), (160, 107), (160, 107)]
    assert {image.mode for image in images} == {"RGB"}  # CMYK and grey JPEGs still come out RGB
    assert np.array_equal(np.asarray(images[1]), np.asarray(full[1]))
    assert folder.decoded_at_least(200)[0][0].size == (320, 214)  # 427 // 200 = 2: a half
    assert folder.decoded_at_least(427)[0][0].size == (640, 427)  # no reduction keeps 427
    assert folder.decode_side is None and folder[0][0].size == (640, 427)  # the folder itself is left as it was
    assert folder.decoded_at_least(100).decoded_at_least(None)[0][0].size == (640, 427)
    for bad in (0, -3, 2.5, True, "200"):
        with pytest.raises(RelreasonError, match="decode side must be a positive whole number of pixels or None"):
            folder.decoded_at_least(bad)


def test_decoded_for_asks_the_margin_over_the_smallest_crop_and_passes_other_datasets():
    assert DRAFT_MARGIN == 4
    assert smallest_crop_side(1.0) == pytest.approx(math.sqrt(0.75))
    assert smallest_crop_side(0.08) == pytest.approx(math.sqrt(0.06))
    with pytest.raises(RelreasonError, match="--min-crop-scale"):
        smallest_crop_side(0)
    data = [1, 2, 3]
    assert decoded_for(data, 32) is data


def test_a_reduced_folder_shares_its_skipped_files_and_skip_log(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    Image.fromarray(_photo(64, 48)).save(root / "a.jpg")
    (root / "b.jpg").write_bytes(b"not a jpeg")
    folder = ImageFolderDataset(root, skip_log=tmp_path / "skipped.txt")
    reduced = decoded_for(folder, 8)
    assert reduced.decode_side == 32 and reduced[1][0].size == (64, 48)  # b is skipped: a, 48 // 32 = 1: full size
    assert list(folder.skipped) == [str(root / "b.jpg")] and reduced.skip_log == folder.skip_log
    assert "b.jpg" in (tmp_path / "skipped.txt").read_text()


def test_a_decoded_folder_reads_its_jpegs_reduced_and_stays_within_a_grey_level_of_full_decoding(photos):
    folder = ImageFolderDataset(photos)
    for size in (16, 24):
        decoded = DecodedImageFolder(folder, size, threads=2)
        reduced = folder.decoded_at_least(DRAFT_MARGIN * size)
        for i in range(4):
            expected = _plain_square(reduced[i][0], size)  # the plain way, from the reduced decoding: exactly
            assert np.array_equal(decoded.images[i], expected), i
            full = _plain_square(folder[i][0], size)
            difference = np.abs(decoded.images[i].astype(int) - full.astype(int))
            assert difference.mean() < 1.5 and difference.max() <= 20, (size, i, difference.mean(), difference.max())
        assert np.array_equal(decoded.images[1], _plain_square(folder[1][0], size))  # a PNG: untouched


def _plain_full_size_statistics(paths) -> tuple[np.ndarray, np.ndarray]:
    """Each file decoded whole, scaled to at most 256 px on its long side, its pixel mean and mean square
    averaged over the images: the statistics as they were before reduced decoding."""
    means, squares = [], []
    for path in paths:
        with Image.open(path) as image:
            image = image.convert("RGB")
        scale = 256 / max(image.size)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        pixels = np.asarray(image.resize(size, Image.BILINEAR, reducing_gap=3.0), dtype=np.float64).reshape(-1, 3)
        means.append((pixels / 255).mean(0))
        squares.append(np.square(pixels / 255).mean(0))
    mean = np.mean(means, axis=0)
    return mean, np.sqrt(np.mean(squares, axis=0) - np.square(mean))


def test_normalisation_statistics_read_jpegs_reduced_and_barely_move(tmp_path):
    china, flower = _camera_photos()
    Image.fromarray(flower).save(tmp_path / "small.jpg", quality=92)  # 427 px: no reduction keeps 1,024
    Image.fromarray(china).resize((3200, 2135), Image.BICUBIC).save(tmp_path / "large.jpg", quality=92)
    folder = ImageFolderDataset(tmp_path)
    reduced = folder.decoded_at_least(DRAFT_MARGIN * 256)
    assert reduced[0][0].size == (1600, 1068)
    mean, std = compute_normalization(folder)
    assert (mean, std) == compute_normalization(reduced)
    full_mean, full_std = _plain_full_size_statistics(folder.paths)
    assert mean != pytest.approx(full_mean, abs=1e-7)  # the large photo was read reduced ...
    assert mean == pytest.approx(full_mean, abs=2e-3) and std == pytest.approx(full_std, abs=2e-3)  # ... to no effect
    assert folder.decode_side is None


def test_the_per_image_path_and_evaluation_decode_what_their_crops_need(tmp_path, monkeypatch):
    from relreason.compare import CompareConfig, _test_features_source, plot_embeddings
    from relreason.evaluate import job
    from relreason.train import PretrainConfig, build_pretrain_data, pretrain

    root = tmp_path / "imgs"
    for split, count in (("train", 4), ("test", 2)):
        for label in ("cat", "dog"):
            (root / split / label).mkdir(parents=True)
            for i in range(count):
                Image.fromarray(_photo(96, 72, seed=i)).save(root / split / label / f"{i}.jpg")
    options = dict(dataset="folder", data_root=str(root), image_size=12, num_views=2, batch_size=4, epochs=1,
                   device="cpu", progress=False, tensorboard=False)
    for scale in (0.08, 0.5):
        views, _ = build_pretrain_data(PretrainConfig(**options, augment="pil", min_crop_scale=scale))
        assert views.dataset.decode_side == math.ceil(4 * 12 / math.sqrt(scale * 0.75))
        assert [view.shape for view in views[0][0]] == [(3, 12, 12)] * 2
    run = tmp_path / "compare" / "relational-seed1"  # as compare names its runs
    pretrain(PretrainConfig(**options, augment="pil", output_dir=str(run)))
    seen = []

    def recording(backbone, dataset, *args, **kwargs):
        seen.append((dataset.decode_side, kwargs["threads"]))
        return extract_features(backbone, dataset, *args, **kwargs)

    extract_features = job.extract_features
    monkeypatch.setattr(job, "extract_features", recording)
    from relreason.cli import main

    assert main(["evaluate", "--run-dir", str(run), "--protocols", "knn", "--knn-k", "2", "--no-random-baseline",
                 "--device", "cpu", "--output", str(tmp_path / "eval.json")]) == 0
    threads = min(8, os.cpu_count())  # a folder is read by threads (PIL decodes without the interpreter lock)
    assert seen == [(4 * 12, threads)] * 2  # train, test
    assert read_threads(ImageFolderDataset(root / "test")) == threads and read_threads([1, 2]) == 1
    assert json.loads((tmp_path / "eval.json").read_text())["test_size"] == 4
    comparison = CompareConfig(dataset="folder", data_root=str(root), methods=("relational",), seeds=(1,),
                               embedding_points=4, output_dir=str(tmp_path / "compare"))
    _, test, _, _ = _test_features_source(run, comparison)
    assert test.decode_side == 4 * 12 and len(test) == 4
    seen.clear()
    monkeypatch.setattr("relreason.evaluate.extract_features", recording)  # compare's t-SNE reads as evaluate
    plot_embeddings(comparison, tmp_path / "map.png")
    assert seen == [(4 * 12, threads)] and (tmp_path / "map.png").is_file()
    for cores, expected in ((12, 8), (3, 3), (None, 1)):  # up to 8 threads; one where the count is unknown
        monkeypatch.setattr(os, "cpu_count", lambda cores=cores: cores)
        assert read_threads(ImageFolderDataset(root / "test")) == expected, cores


def test_a_feature_cache_of_full_decoding_is_not_read_as_one_of_reduced_decoding(tmp_path, monkeypatch):
    from relreason.evaluate import data

    root = tmp_path / "imgs"
    root.mkdir()
    Image.fromarray(_photo(40, 30)).save(root / "a.jpg")
    folder = ImageFolderDataset(root)
    tag = data.data_tag_of("folder", str(root), [0.5] * 3, [0.2] * 3, (folder,))
    monkeypatch.setattr(data, "DRAFT_MARGIN", 8)
    assert data.data_tag_of("folder", str(root), [0.5] * 3, [0.2] * 3, (folder,)) != tag
    assert data.data_tag_of("digits", "data", [0.5] * 3, [0.2] * 3) == data.data_tag_of("digits", "x", [0.5] * 3,
                                                                                          [0.2] * 3)


def test_a_folder_spelt_otherwise_names_the_same_feature_cache(tmp_path, monkeypatch):
    from relreason.evaluate import data

    root = tmp_path / "imgs"
    root.mkdir()
    Image.fromarray(_photo(40, 30)).save(root / "a.jpg")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "link").symlink_to(root)
    tags = {data.data_tag_of("folder", spelt, [0.5] * 3, [0.2] * 3, (ImageFolderDataset(spelt),))
            for spelt in ("imgs", "./imgs", str(root), "imgs/../imgs", "link")}
    assert len(tags) == 1
    (root / "a.jpg").touch()  # its modification time: another cache
    assert data.data_tag_of("folder", "imgs", [0.5] * 3, [0.2] * 3, (ImageFolderDataset("imgs"),)) not in tags


def test_a_folder_run_whose_statistics_came_from_full_size_jpegs_resumes_with_them_on_its_folder(tmp_path):
    from relreason.data.datasets import NORMALIZATION_METHOD
    from relreason.train import PretrainConfig
    from relreason.train.resume import keep_recorded_normalization

    images = str(tmp_path / "images")
    saved = {"config": {"dataset": "folder"}, "data_root": images,
             "geometry": {"mean": [0.5] * 3, "std": [0.25] * 3, "normalization": "per-image"}}
    geometry = {"image_size": 32, "mean": [0.501] * 3, "std": [0.25] * 3, "normalization": NORMALIZATION_METHOD}
    assert NORMALIZATION_METHOD != "per-image"
    keep_recorded_normalization(saved, PretrainConfig(dataset="folder", data_root=images), geometry)
    assert geometry["mean"] == [0.5] * 3
    other = {"image_size": 32, "mean": [0.501] * 3, "std": [0.25] * 3, "normalization": NORMALIZATION_METHOD}
    keep_recorded_normalization(saved, PretrainConfig(dataset="folder", data_root=str(tmp_path / "other")), other)
    assert other["mean"] == [0.501] * 3  # another folder: compared (and refused) as other images


def test_jpeg_bytes_decode_as_before_without_a_side(tmp_path):
    """The reader's full decoding is PIL's own, byte for byte."""
    buffer = io.BytesIO()
    Image.fromarray(_photo(50, 40)).save(buffer, "JPEG")
    (tmp_path / "x.jpg").write_bytes(buffer.getvalue())
    with Image.open(io.BytesIO(buffer.getvalue())) as image:
        expected = np.asarray(image.convert("RGB"))
    assert np.array_equal(np.asarray(ImageFolderDataset(tmp_path)[0][0]), expected)
