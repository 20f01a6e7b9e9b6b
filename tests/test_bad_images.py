"""Training survives bad data: corrupt files in an image folder are skipped, logged and replaced.

Every test writes real files under tmp_path: valid PNG/JPEG images in class
folders next to a truncated JPEG, a zero-byte PNG, a text file named .jpg, a PNG
whose header is valid but whose compressed data is garbage, and a PNG whose
header claims a decompression-bomb size.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from bad_folder import EXPECTED_LABELS, EXPECTED_SOURCE, file_hashes, jpeg_bytes, noise, write_bad_folder
from PIL import Image, ImageFile
from torch.utils.data import DataLoader

from relreason.data import (
    ImageFolderDataset,
    MultiViewDataset,
    eval_transform,
    pil_to_rgb,
    read_skip_log,
    relational_augmentation,
)
from relreason.errors import RelreasonError

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


# =========================================================================== PIL itself


def test_pil_raises_on_truncated_files_and_relreason_leaves_it_so():
    import relreason.data

    assert relreason.data  # importing the data package must not switch it on

    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    whole = jpeg_bytes(1)
    with Image.open(io.BytesIO(whole[: len(whole) // 2])) as img:  # the header parses ...
        with pytest.raises(OSError, match="truncated"):
            img.load()  # ... decoding the missing half raises
    buf = io.BytesIO()
    noise(2, (64, 64)).save(buf, "PNG")
    with Image.open(io.BytesIO(buf.getvalue()[: len(buf.getvalue()) // 2])) as img:
        with pytest.raises(OSError, match="truncated"):
            img.load()


# =========================================================================== (a) substitution


def test_bad_images_are_replaced_by_next_readable_one(tmp_path):
    root = tmp_path / "imgs"
    rel, bad = write_bad_folder(root)
    ds = ImageFolderDataset(root)
    assert [p.relative_to(root).as_posix() for p in ds.paths] == rel
    assert ds.classes == ["a", "b"] and ds.skipped == {}

    images = []
    for i in range(len(ds)):
        image, label = ds[i]
        assert image.mode == "RGB" and label == EXPECTED_LABELS[i]
        images.append(np.asarray(image))
    for i, src in enumerate(EXPECTED_SOURCE):
        np.testing.assert_array_equal(images[i], images[src])
    assert images[0].shape == (20, 24, 3)
    assert not np.array_equal(images[0], images[4])

    assert set(ds.skipped) == {str(root / r) for r in bad}
    for path, reason in ds.skipped.items():
        assert reason and "\n" not in reason and "\t" not in reason, (path, reason)
    assert ds.skipped[str(root / "a" / "02_zero.png")] == "empty file (0 bytes)"
    assert "truncated" in ds.skipped[str(root / "b" / "04_trunc.jpg")]
    assert "not an image" in ds.skipped[str(root / "a" / "03_text.jpg")]
    assert "DecompressionBomb" in ds.skipped[str(root / "b" / "03_bomb.png")]

    # deterministic: a fresh dataset, visited in another order, substitutes the same way
    again = ImageFolderDataset(root)
    for i in reversed(range(len(again))):
        image, label = again[i]
        assert label == EXPECTED_LABELS[i]
        np.testing.assert_array_equal(np.asarray(image), images[i])
    assert set(again.skipped) == set(ds.skipped)
    np.testing.assert_array_equal(np.asarray(ds[-1][0]), images[0])  # negative index = last
    with pytest.raises(IndexError):
        ds[len(ds)]

    # direct callers of load_image still get the error, naming the file
    with pytest.raises(RelreasonError, match=r"04_trunc\.jpg.*truncated") as info:
        ds.load_image(9)
    assert "\n" not in str(info.value)
    with pytest.raises(RelreasonError, match="02_zero"):
        ds.load_image(2)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


# =========================================================================== (b) + (c) DataLoader


def test_multiview_dataloader_pass_with_workers_writes_skip_log(tmp_path):
    root = tmp_path / "imgs"
    _, bad = write_bad_folder(root)
    before = file_hashes(root)
    log = tmp_path / "logs" / "skipped.tsv"
    log.parent.mkdir()

    ds = ImageFolderDataset(root, skip_log=log)
    assert log.is_file() and read_skip_log(log) == {}  # opened (created) up front
    mv = MultiViewDataset(ds, relational_augmentation(32, MEAN, STD), num_views=2)
    loader = DataLoader(mv, batch_size=3, num_workers=2, shuffle=False)
    labels = []
    batches = 0
    for views, y in loader:
        batches += 1
        assert isinstance(views, list) and len(views) == 2
        for v in views:
            assert v.shape == (y.shape[0], 3, 32, 32) and torch.isfinite(v).all()
        labels.extend(y.tolist())
    assert batches == 4 and labels == EXPECTED_LABELS

    logged = read_skip_log(log)
    assert set(logged) == {Path(r).as_posix() for r in bad}  # paths inside the folder
    assert all(reason for reason in logged.values())
    assert "truncated" in logged["b/04_trunc.jpg"]
    raw_lines = log.read_bytes().split(b"\n")
    assert raw_lines[-1] == b""  # every record ends with a newline
    assert all(line.count(b"\t") == 1 for line in raw_lines[:-1])
    assert {line.split(b"\t")[0].decode() for line in raw_lines[:-1]} == set(logged)

    # (c) the user's files are untouched, and nothing was added to the folder
    assert file_hashes(root) == before


def test_skip_log_appends_and_reader_dedups(tmp_path):
    root = tmp_path / "imgs"
    _, bad = write_bad_folder(root)
    log = tmp_path / "skip.log"
    log.write_bytes(b"/earlier/run.png\told reason\n")
    for _ in range(2):  # two runs (a resume) in fresh processes: the second lists nothing the log holds
        ds = ImageFolderDataset(root, skip_log=str(log))
        for i in range(len(ds)):
            ds[i]
    lines = log.read_bytes().splitlines()
    assert len(lines) == 1 + len(bad)
    logged = read_skip_log(log)
    assert set(logged) == {"/earlier/run.png"} | {Path(r).as_posix() for r in bad}
    assert logged["/earlier/run.png"] == "old reason"
    assert read_skip_log(tmp_path / "missing.log") == {}
    with pytest.raises(RelreasonError, match="skip log"):
        ImageFolderDataset(root, skip_log=tmp_path / "no" / "such" / "dir" / "skip.log")


# =========================================================================== (d) nothing readable


def test_folder_with_only_bad_images_is_an_error(tmp_path):
    root = tmp_path / "allbad"
    (root / "x").mkdir(parents=True)
    (root / "x" / "empty.png").write_bytes(b"")
    (root / "x" / "text.jpg").write_text("hello")
    whole = jpeg_bytes(3)
    (root / "x" / "trunc.jpg").write_bytes(whole[: len(whole) // 2])
    log = tmp_path / "skip.log"
    ds = ImageFolderDataset(root, skip_log=log)
    for i in (0, 2, 1):
        with pytest.raises(RelreasonError, match="no readable image under") as info:
            ds[i]
        assert "\n" not in str(info.value) and str(root) in str(info.value)
    assert len(ds.skipped) == 3
    assert len(read_skip_log(log)) == 3
    assert len(log.read_bytes().splitlines()) == 3  # known-bad files are not retried or re-logged


# =========================================================================== (e) modes and tiny sizes

_ALL_MODES = ["1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr",
              "LAB", "HSV", "I;16", "I;16B", "I;16L", "I;16N", "I", "F"]
_SIZES = [(1, 1), (3, 5), (5, 3), (1, 50), (50, 1), (31, 33), (70, 40)]


def _random_image(mode: str, size: tuple[int, int], seed: int) -> Image.Image:
    """Random raw bytes in ``mode`` (for F this includes NaN and inf bit patterns)."""
    nbytes = len(Image.new(mode, size).tobytes())
    raw = np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8).tobytes()
    return Image.frombytes(mode, size, raw)


@pytest.mark.parametrize("mode", _ALL_MODES)
def test_every_mode_and_tiny_sizes_give_finite_32x32_tensors(mode):
    torch.manual_seed(0)
    aug = relational_augmentation(32, MEAN, STD)
    ev = eval_transform(32, MEAN, STD)
    images = [_random_image(mode, size, seed) for seed, size in enumerate(_SIZES)]
    if mode == "P":
        keyed = _random_image("P", (3, 5), 99)
        keyed.info["transparency"] = 0
        images.append(keyed)
        images.append(Image.new("P", (1, 1), 0))
    if mode == "F":
        images.append(Image.fromarray(np.array([[np.nan, np.inf], [-np.inf, 1e30]], dtype=np.float32)))
    for image in images:
        rgb = pil_to_rgb(image)
        assert rgb.mode == "RGB" and rgb.size == image.size
        for transform in (aug, ev):
            x = transform(rgb)
            assert x.shape == (3, 32, 32) and x.dtype == torch.float32, (mode, image.size)
            assert torch.isfinite(x).all(), (mode, image.size)


def test_files_of_many_modes_and_tiny_sizes_through_folder_and_transforms(tmp_path):
    rng = np.random.default_rng(0)
    Image.new("1", (1, 1), 1).save(tmp_path / "m1.png")
    Image.fromarray(rng.integers(0, 256, (5, 3), dtype=np.uint8)).save(tmp_path / "l.png")
    Image.new("LA", (3, 5), (9, 200)).save(tmp_path / "la.png")
    pal = Image.new("P", (2, 3), 1)
    pal.putpalette([0, 0, 0, 250, 0, 0] + [0, 0, 0] * 254)
    pal.save(tmp_path / "p.png")
    pal.save(tmp_path / "p_trns.png", transparency=1)
    Image.new("RGBA", (1, 7), (1, 2, 3, 4)).save(tmp_path / "rgba.png")
    Image.new("CMYK", (4, 4), (10, 20, 30, 40)).save(tmp_path / "cmyk.jpg")
    Image.new("CMYK", (2, 1), (10, 20, 30, 40)).save(tmp_path / "cmyk.tif")
    Image.new("YCbCr", (3, 3), (100, 120, 140)).save(tmp_path / "ycc.jpg")
    Image.fromarray(np.array([[0, 65535], [300, 7]], dtype=np.uint16)).save(tmp_path / "i16.png")
    Image.new("I;16B", (3, 2), 4000).save(tmp_path / "i16b.tif")
    Image.fromarray(np.array([[-5, 10**6]], dtype=np.int32)).save(tmp_path / "i32.tif")
    Image.fromarray(np.array([[0.25]], dtype=np.float32)).save(tmp_path / "f.tif")
    ds = ImageFolderDataset(tmp_path)
    aug = relational_augmentation(32, MEAN, STD)
    ev = eval_transform(32, MEAN, STD)
    torch.manual_seed(0)
    for i in range(len(ds)):
        image, _ = ds[i]
        assert image.mode == "RGB"
        for transform in (aug, ev):
            x = transform(image)
            assert x.shape == (3, 32, 32) and torch.isfinite(x).all(), ds.paths[i]
    assert ds.skipped == {}
    assert len(ds) == 13


def test_pretraining_on_a_folder_lists_every_bad_file_and_counts_them(tmp_path, monkeypatch, capsys):
    """The bad files are first met while the normalisation statistics are computed, before the run folder
    exists: they must still reach skipped_images.txt and the epoch record. A resume that spells the data root
    otherwise (here relative to the working folder) lists and counts the same files once."""
    import json

    from relreason.train import PretrainConfig, pretrain

    root = tmp_path / "imgs"
    _, bad = write_bad_folder(root)
    before = file_hashes(root)
    run = tmp_path / "run"
    pretrain(PretrainConfig(dataset="folder", data_root=str(root), image_size=16, num_views=2, batch_size=4,
                            epochs=1, device="cpu", progress=False, tensorboard=False, output_dir=str(run)))
    logged = set(read_skip_log(run / "skipped_images.txt"))
    assert logged == bad
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    pretrain(PretrainConfig(dataset="folder", data_root="imgs", image_size=16, num_views=2, batch_size=4,
                            epochs=3, device="cpu", progress=False, tensorboard=False, output_dir=str(run)))
    # Said after the first epoch of this run, not again after the next, which met no new one.
    assert capsys.readouterr().err.count(f"skipped {len(bad)} unreadable image(s) so far") == 1
    lines = (run / "skipped_images.txt").read_text().splitlines()
    assert len(lines) == len(bad)  # the resumed run met them again, and did not list them twice
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["skipped_images"] == len(bad)
    assert file_hashes(root) == before



def test_dataloader_workers_list_each_bad_file_once(tmp_path):
    """Workers are forked copies of the dataset; each learns from the log what the others listed."""
    import copy

    root = tmp_path / "imgs"
    _, bad = write_bad_folder(root)
    dataset = ImageFolderDataset(root)
    dataset.log_skips_to(tmp_path / "skip.log")
    workers = [copy.deepcopy(dataset) for _ in range(2)]
    for worker in workers:
        for i in range(len(worker)):
            worker[i]
    assert len((tmp_path / "skip.log").read_text().splitlines()) == len(bad)


def test_image_files_of_other_formats_are_left_out_and_counted(tmp_path):
    from relreason.train.data import describe_folder

    Image.new("RGB", (8, 8), (10, 20, 30)).save(tmp_path / "kept.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "saved-by-a-browser.jfif", format="JPEG")
    (tmp_path / "IMG_0001.HEIC").write_bytes(b"a phone's photo")
    (tmp_path / "IMG_0002.heic").write_bytes(b"a phone's photo")
    (tmp_path / "notes.txt").write_text("not an image, and not one to count")
    (tmp_path / "scan.pdf").write_bytes(b"%PDF")
    folder = ImageFolderDataset(tmp_path)
    assert [path.name for path in folder.paths] == ["kept.png"]
    assert folder.left_out == {".heic": 2, ".jfif": 1}
    assert describe_folder(folder).endswith("; left out: 3 files of other formats (2 .heic, 1 .jfif), which relreason "
                                            "does not read (convert them to JPEG or PNG to use them)")
    (tmp_path / "kept.png").unlink()
    with pytest.raises(RelreasonError, match=r"no image files .* found under .* \(it holds 3 files of other formats "
                       r"\(2 \.heic, 1 \.jfif\): convert them to JPEG or PNG\); put images there"):
        ImageFolderDataset(tmp_path)


def _sideways_photo(path: Path, height: int = 40, width: int = 24, **save) -> None:
    """A portrait photo as a phone stores it: pixels turned 90 degrees, EXIF orientation 6 saying how to turn them
    back. Upright, a white band runs across its top."""
    upright = np.zeros((height, width, 3), dtype=np.uint8)
    upright[: height // 5] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90).save(path, exif=exif, **save)


@pytest.mark.parametrize("suffix,draft", [(".png", None), (".jpg", None), (".jpg", 8)])
def test_a_photo_stored_sideways_is_read_upright(tmp_path, suffix, draft):
    _sideways_photo(tmp_path / f"photo{suffix}", **({"quality": 100} if suffix == ".jpg" else {}))
    folder = ImageFolderDataset(tmp_path).decoded_at_least(draft)
    read = np.asarray(folder.load_image(0))
    scale = 1 if draft is None else 2  # the draft decodes at half size, keeping both sides >= 8
    assert read.shape == (40 // scale, 24 // scale, 3)
    assert read[: 6 // scale].min() > 200 and read[10 // scale :].max() < 60  # the band is at the top, not a side
    assert np.asarray(folder.read_as_stored().load_image(0)).shape == (24 // scale, 40 // scale, 3)
