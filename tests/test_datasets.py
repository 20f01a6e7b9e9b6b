"""relreason.data.datasets: readers for the real on-disk formats, folders, registry.

Every test writes small files in the dataset's real format under tmp_path; nothing
touches the network.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from idx_files import idx_bytes, mnist_arrays, write_idx
from PIL import Image

from relreason.data import (
    DATASET_NAMES,
    ArrayImageDataset,
    DatasetInfo,
    ImageFolderDataset,
    compute_normalization,
    dataset_info,
    load_dataset,
    splits,
    standard_datasets,
)
from relreason.data.formats import read_idx
from relreason.errors import RelreasonError

DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")
_DEFAULT_SYSTEM_DIRS = dict(standard_datasets.SYSTEM_DATASET_DIRS)  # before the autouse fixture empties it


@pytest.fixture(autouse=True)
def _no_system_dirs(monkeypatch):
    """Tests see only what they write, unless they opt back in."""
    monkeypatch.setattr(standard_datasets, "SYSTEM_DATASET_DIRS", {})


def _check_item(ds, i, label):
    img, y = ds[i]
    assert isinstance(img, Image.Image) and img.mode == "RGB"
    assert isinstance(y, int) and y == label
    return img


# =========================================================================== CIFAR


def _cifar_rows(n, seed):
    """n CIFAR rows (3072 bytes, channel-major) and the (N, 32, 32, 3) images they encode."""
    images = np.random.default_rng(seed).integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
    rows = images.transpose(0, 3, 1, 2).reshape(n, 3072)
    return rows, images


def _dump(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        pickle.dump(obj, fh, protocol=2)


def _write_cifar10(root):
    base = root / "cifar-10-batches-py"
    train_imgs = []
    for b in range(1, 6):
        rows, imgs = _cifar_rows(2, seed=b)
        if b == 1:  # one exact byte: channel 2 (blue) at row 5, column 7 of image 0
            rows[0] = 0
            rows[0, 2 * 1024 + 5 * 32 + 7] = 200
            imgs[0] = 0
            imgs[0, 5, 7, 2] = 200
        train_imgs.append(imgs)
        _dump(base / f"data_batch_{b}", {"data": rows, "labels": [b - 1, 9 - b], "batch_label": "x"})
    rows, test_imgs = _cifar_rows(3, seed=9)
    _dump(base / "test_batch", {"data": rows, "labels": [3, 4, 5], "batch_label": "testing batch 1 of 1"})
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    _dump(base / "batches.meta", {"label_names": names, "num_vis": 3072})
    return np.concatenate(train_imgs), test_imgs


def test_cifar10_reads_real_pickle_layout(tmp_path):
    train_imgs, test_imgs = _write_cifar10(tmp_path)
    train = load_dataset("cifar10", tmp_path, "train")
    assert len(train) == 10
    assert train.labels.dtype == np.int64 and train.labels.shape == (10,)
    assert train.labels.tolist() == [0, 8, 1, 7, 2, 6, 3, 5, 4, 4]
    assert train.classes[0] == "airplane" and len(train.classes) == 10
    img = _check_item(train, 0, 0)
    assert img.size == (32, 32)
    arr = np.asarray(img)
    assert arr[5, 7, 2] == 200 and img.getpixel((7, 5)) == (0, 0, 200)
    assert int(arr.sum()) == 200  # nothing else leaked from that byte
    np.testing.assert_array_equal(train.images, train_imgs)
    np.testing.assert_array_equal(np.asarray(train[3][0]), train_imgs[3])

    test = load_dataset("cifar10", tmp_path, "test")
    assert len(test) == 3 and test.labels.tolist() == [3, 4, 5]
    np.testing.assert_array_equal(np.asarray(test[2][0]), test_imgs[2])

    # A batch re-saved from a pickle read with encoding="bytes" has bytes keys: read alike.
    rows = test_imgs.transpose(0, 3, 1, 2).reshape(3, 3072)
    _dump(tmp_path / "cifar-10-batches-py" / "test_batch", {b"data": rows, b"labels": [3, 4, 5]})
    again = load_dataset("cifar10", tmp_path, "test")
    assert again.labels.tolist() == [3, 4, 5]
    np.testing.assert_array_equal(again.images, test_imgs)


def _write_cifar100(root):
    base = root / "cifar-100-python"
    rows, imgs = _cifar_rows(4, seed=3)
    rows[1] = 0
    rows[1, 0 * 1024 + 31 * 32 + 0] = 77  # red, bottom-left corner of image 1
    imgs[1] = 0
    imgs[1, 31, 0, 0] = 77
    fine, coarse = [99, 0, 42, 17], [19, 4, 0, 7]
    _dump(base / "train", {"data": rows, "fine_labels": fine, "coarse_labels": coarse, "filenames": []})
    trows, timgs = _cifar_rows(2, seed=4)
    _dump(base / "test", {"data": trows, "fine_labels": [5, 6], "coarse_labels": [1, 2]})
    _dump(
        base / "meta",
        {"fine_label_names": [f"fine{i}" for i in range(100)], "coarse_label_names": [f"coarse{i}" for i in range(20)]},
    )
    return imgs, fine, coarse


def test_cifar100_fine_and_coarse_labels(tmp_path):
    imgs, fine, coarse = _write_cifar100(tmp_path)
    fine_ds = load_dataset("cifar100", tmp_path)
    coarse_ds = load_dataset("cifar100-20", tmp_path)
    assert len(fine_ds) == len(coarse_ds) == 4
    assert fine_ds.labels.tolist() == fine and coarse_ds.labels.tolist() == coarse
    assert fine_ds.classes == [f"fine{i}" for i in range(100)]
    assert coarse_ds.classes == [f"coarse{i}" for i in range(20)]
    img = _check_item(coarse_ds, 1, 4)
    assert img.getpixel((0, 31)) == (77, 0, 0)
    np.testing.assert_array_equal(np.asarray(fine_ds[2][0]), imgs[2])
    test = load_dataset("cifar100-20", tmp_path, "test")
    assert test.labels.tolist() == [1, 2]


def test_cifar_flat_root_and_corrupt_file(tmp_path):
    _write_cifar10(tmp_path)
    flat = tmp_path / "cifar-10-batches-py"  # pointing the root at the extracted folder works too
    assert len(load_dataset("cifar10", flat, "test")) == 3
    (flat / "test_batch").write_bytes(b"not a pickle at all")
    with pytest.raises(RelreasonError, match="test_batch"):
        load_dataset("cifar10", tmp_path, "test")


# =========================================================================== MNIST / Fashion-MNIST


def test_a_named_datasets_feature_cache_is_of_its_files(tmp_path):
    """Two MNIST roots with the same labels and other images (a corrupted copy of a test set, say) name two caches;
    so does one root whose files changed; the same files under another spelling of the root name one."""
    from relreason.evaluate.data import data_tag_of

    images, labels = mnist_arrays(6, seed=1)
    for root, pixels in (("plain", images), ("inverted", 255 - images)):
        for prefix in ("train", "t10k"):
            write_idx(tmp_path / root / "MNIST/raw" / f"{prefix}-images-idx3-ubyte", pixels, compress=False)
            write_idx(tmp_path / root / "MNIST/raw" / f"{prefix}-labels-idx1-ubyte", labels, compress=False)

    def tag(root):
        splits = [load_dataset("mnist", root, split) for split in ("train", "test")]
        assert all(split.labels.tolist() == labels.tolist() for split in splits)
        return data_tag_of("mnist", str(root), [0.5] * 3, [0.2] * 3, splits)

    plain = tag(tmp_path / "plain")
    assert tag(tmp_path / "inverted") != plain
    assert tag(tmp_path / "plain" / ".." / "plain") == plain
    write_idx(tmp_path / "plain" / "MNIST/raw" / "t10k-images-idx3-ubyte", images[::-1], compress=False)
    assert tag(tmp_path / "plain") != plain


@pytest.mark.parametrize("name,subdir", [("mnist", "MNIST/raw"), ("fashion-mnist", "FashionMNIST/raw")])
def test_mnist_family_idx_gz_and_plain(tmp_path, name, subdir):
    base = tmp_path / subdir
    tr_x, tr_y = mnist_arrays(6, seed=1)
    tr_x[2] = 0
    tr_x[2, 3, 20] = 250  # row 3, column 20
    te_x, te_y = mnist_arrays(4, seed=2)
    write_idx(base / "train-images-idx3-ubyte", tr_x, compress=True)
    write_idx(base / "train-labels-idx1-ubyte", tr_y, compress=True)
    write_idx(base / "t10k-images-idx3-ubyte", te_x, compress=False)
    write_idx(base / "t10k-labels-idx1-ubyte", te_y, compress=False)

    train = load_dataset(name, tmp_path, "train")
    assert len(train) == 6 and train.labels.dtype == np.int64
    assert train.labels.tolist() == tr_y.tolist()
    assert train.images.shape == (6, 28, 28)
    img = _check_item(train, 2, int(tr_y[2]))
    assert img.size == (28, 28)
    assert img.getpixel((20, 3)) == (250, 250, 250)  # grey -> equal RGB channels
    assert int(np.asarray(img).sum()) == 3 * 250
    assert len(train.classes) == 10

    test = load_dataset(name, tmp_path, "test")
    assert len(test) == 4 and test.labels.tolist() == te_y.tolist()
    np.testing.assert_array_equal(np.asarray(test[1][0])[..., 1], te_x[1])


def test_mnist_flat_root(tmp_path):
    x, y = mnist_arrays(3, seed=5)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", x, compress=True)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", y, compress=False)
    test = load_dataset("mnist", tmp_path, "test")
    assert test.labels.tolist() == y.tolist()


def test_idx_header_is_checked(tmp_path):
    x, y = mnist_arrays(3, seed=5)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", y, compress=False)
    bad = bytearray(idx_bytes(x))
    bad[0] = 0x12  # broken magic
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(bytes(bad))
    with pytest.raises(RelreasonError, match="magic"):
        load_dataset("mnist", tmp_path, "test")
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(idx_bytes(x)[:-5])  # truncated payload
    with pytest.raises(RelreasonError, match="data bytes"):
        load_dataset("mnist", tmp_path, "test")
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(idx_bytes(x))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", y[:2], compress=False)  # count mismatch
    with pytest.raises(RelreasonError, match="3 images but"):
        load_dataset("mnist", tmp_path, "test")


def test_corrupt_gzip_idx_is_a_one_line_error(tmp_path):
    # One byte flipped in the deflate stream: zlib.error, not OSError/EOFError/BadGzipFile.
    x, y = mnist_arrays(3, seed=5)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", y, compress=True)
    corrupt = bytearray(gzip.compress(idx_bytes(x), mtime=0))
    corrupt[10] ^= 0xFF  # the first byte after gzip.compress's 10-byte header
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(bytes(corrupt))
    with pytest.raises(RelreasonError, match=r"cannot read IDX file .*t10k-images-idx3-ubyte\.gz \(corrupt gzip data: "
                       r"Error -3 while decompressing data.*\); delete it and fetch it again") as caught:
        load_dataset("mnist", tmp_path, "test")
    assert "\n" not in str(caught.value)
    with pytest.raises(RelreasonError, match="corrupt gzip data"):
        read_idx(tmp_path / "t10k-images-idx3-ubyte.gz")


@pytest.mark.skipif(not DEBIAN_FASHION.is_dir(), reason="dataset-fashion-mnist is not installed")
def test_fashion_mnist_from_debian_location(tmp_path, monkeypatch):
    monkeypatch.setattr(standard_datasets, "SYSTEM_DATASET_DIRS", {"fashion-mnist": (str(DEBIAN_FASHION),)})
    train = load_dataset("fashion-mnist", tmp_path / "empty", "train")
    test = load_dataset("fashion-mnist", tmp_path / "empty", "test")
    assert len(train) == 60000 and len(test) == 10000
    assert train.images.shape == (60000, 28, 28)
    assert set(np.unique(test.labels).tolist()) == set(range(10))
    assert train.classes[0] == "T-shirt/top"
    _check_item(test, 0, int(test.labels[0]))


def test_fashion_mnist_without_a_root_is_read_from_the_system_directory_alone(tmp_path, monkeypatch):
    system = tmp_path / "system"
    images, labels = mnist_arrays(5, seed=3)
    write_idx(system / "t10k-images-idx3-ubyte", images, compress=True)
    write_idx(system / "t10k-labels-idx1-ubyte", labels, compress=True)
    monkeypatch.setattr(standard_datasets, "SYSTEM_DATASET_DIRS", {"fashion-mnist": (str(system),)})
    test = load_dataset("fashion-mnist", None, "test")
    assert np.array_equal(test.images, images) and np.array_equal(test.labels, labels)
    with pytest.raises(RelreasonError, match=rf"'fashion-mnist' \(split 'train'\) not found in {system} \(expected .*"
                       r"\); pass root= \(--data-root\) to point at it or to download it into$"):
        load_dataset("fashion-mnist", None, "train")
    with pytest.raises(RelreasonError, match="needs a data directory to download into; pass --data-root"):
        load_dataset("fashion-mnist", None, "train", download=True)  # nowhere to fetch it to
    with pytest.raises(RelreasonError, match="'mnist' needs a data directory; pass --data-root"):
        load_dataset("mnist", None, "test")  # no system directory of its own
    monkeypatch.setattr(standard_datasets, "SYSTEM_DATASET_DIRS", {"mnist": (str(system),), "fashion-mnist": ()})
    assert np.array_equal(load_dataset("mnist", None, "test").labels, labels)  # the mapping as it is at the call
    with pytest.raises(RelreasonError, match="'fashion-mnist' needs a data directory; pass --data-root"):
        load_dataset("fashion-mnist", None, "test")  # no system directory left


@pytest.mark.skipif(not DEBIAN_FASHION.is_dir(), reason="dataset-fashion-mnist is not installed")
def test_mnist_refuses_fashion_mnist_files(tmp_path):
    """The three datasets share their file names; a folder of the wrong one is refused, not read under the wrong
    class names."""
    for split in ("train", "test"):
        with pytest.raises(RelreasonError, match=r"t.*-labels-idx1-ubyte\.gz holds Fashion-MNIST's labels, not "
                           r"MNIST's; pass --dataset fashion-mnist to use them, or point --data-root at MNIST's files"):
            load_dataset("mnist", DEBIAN_FASHION, split)


def _full_size_test_split(folder: Path, labels: np.ndarray) -> None:
    write_idx(folder / "t10k-images-idx3-ubyte", np.zeros((labels.size, 28, 28), dtype=np.uint8), compress=True)
    write_idx(folder / "t10k-labels-idx1-ubyte", labels, compress=False)


def test_a_full_size_mnist_family_file_must_hold_its_datasets_labels(tmp_path):
    mnist_counts = standard_datasets._MNIST_CLASS_COUNTS["test"]
    mnist_like = np.random.default_rng(0).permutation(np.repeat(np.arange(10, dtype=np.uint8), mnist_counts))
    _full_size_test_split(tmp_path / "mnist", mnist_like)
    assert len(load_dataset("mnist", tmp_path / "mnist", "test")) == 10_000
    with pytest.raises(RelreasonError, match="holds MNIST's labels, not Fashion-MNIST's; pass --dataset mnist to use"):
        load_dataset("fashion-mnist", tmp_path / "mnist", "test")
    balanced = np.random.default_rng(0).permutation(np.repeat(np.arange(10, dtype=np.uint8), 1000))  # KMNIST-like
    _full_size_test_split(tmp_path / "kmnist", balanced)
    with pytest.raises(RelreasonError, match=r"not Fashion-MNIST's but another dataset's \(KMNIST's\?\)"):
        load_dataset("fashion-mnist", tmp_path / "kmnist", "test")
    with pytest.raises(RelreasonError, match=r"not MNIST's but another dataset's \(KMNIST's\?\); point --data-root"):
        load_dataset("mnist", tmp_path / "kmnist", "test")
    skewed = np.zeros(10_000, dtype=np.uint8)
    _full_size_test_split(tmp_path / "skewed", skewed)
    with pytest.raises(RelreasonError, match="not MNIST's but damaged or another dataset's"):
        load_dataset("mnist", tmp_path / "skewed", "test")


def test_a_damaged_unzipped_idx_file_gives_way_to_its_gz(tmp_path, capsys):
    x, y = mnist_arrays(3, seed=5)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", x, compress=False)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", y, compress=True)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(y)[:-1])  # an interrupted gunzip
    test = load_dataset("mnist", tmp_path, "test")
    assert test.labels.tolist() == y.tolist()
    assert capsys.readouterr().err == (f"relreason: warning: {tmp_path / 't10k-labels-idx1-ubyte'} is damaged; read "
                                       "t10k-labels-idx1-ubyte.gz beside it instead (delete t10k-labels-idx1-ubyte to "
                                       "silence this)\n")
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(b"\x1f\x8b broken")
    with pytest.raises(RelreasonError, match="t10k-labels-idx1-ubyte.gz"):
        load_dataset("mnist", tmp_path, "test")


@pytest.mark.parametrize("name,folder", [("mnist", "MNIST"), ("fashion-mnist", "FashionMNIST")])
def test_a_data_root_naming_torchvisions_own_folder(tmp_path, name, folder):
    x, y = mnist_arrays(3, seed=5)
    write_idx(tmp_path / folder / "raw" / "t10k-images-idx3-ubyte", x, compress=True)
    write_idx(tmp_path / folder / "raw" / "t10k-labels-idx1-ubyte", y, compress=True)
    for root in (tmp_path, tmp_path / folder, tmp_path / folder / "raw"):
        assert load_dataset(name, root, "test").labels.tolist() == y.tolist()


def test_a_download_that_leaves_no_readable_files_says_what_it_left(tmp_path, monkeypatch):
    import torchvision.datasets as tvd

    class OldLayoutMNIST:  # torchvision finds its older processed/ files and fetches nothing
        def __init__(self, root, train, download):
            (Path(root) / "MNIST" / "processed").mkdir(parents=True)
            (Path(root) / "MNIST" / "processed" / "test.pt").write_bytes(b"x")

    monkeypatch.setattr(tvd, "MNIST", OldLayoutMNIST)
    with pytest.raises(RelreasonError) as caught:
        load_dataset("mnist", tmp_path / "data", "test", download=True)
    message = str(caught.value)
    assert "is still not under" in message and "after torchvision's download" in message
    assert "holds MNIST/processed/test.pt" in message and "--download to fetch" not in message


def test_default_system_dirs_point_at_debian_location():
    assert str(DEBIAN_FASHION) in _DEFAULT_SYSTEM_DIRS["fashion-mnist"]


# =========================================================================== STL-10


def _write_stl(base: Path, n_train=3, n_test=2, n_unl=4):
    base.mkdir(parents=True)
    rng = np.random.default_rng(7)
    side = 96 * 96

    def raw(n):
        return rng.integers(0, 256, size=(n, 3 * side), dtype=np.uint8)

    train_x = raw(n_train)
    train_x[1] = 0
    # channel 1 (green), row 10, column 40: planes are column-major, so byte col*96 + row
    train_x[1, 1 * side + 40 * 96 + 10] = 123
    (base / "train_X.bin").write_bytes(train_x.tobytes())
    (base / "train_y.bin").write_bytes(np.array([1, 10, 5], dtype=np.uint8)[:n_train].tobytes())
    (base / "test_X.bin").write_bytes(raw(n_test).tobytes())
    (base / "test_y.bin").write_bytes(np.array([10, 1], dtype=np.uint8)[:n_test].tobytes())
    (base / "unlabeled_X.bin").write_bytes(raw(n_unl).tobytes())
    names = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
    (base / "class_names.txt").write_text("\n".join(names) + "\n")
    return train_x


def test_stl10_binaries(tmp_path, monkeypatch):
    monkeypatch.setattr(standard_datasets, "STL10_UNLABELED_IMAGES", 4)
    train_x = _write_stl(tmp_path / "stl10_binary")
    train = load_dataset("stl10", tmp_path, "train")
    assert len(train) == 3 and train.labels.tolist() == [0, 9, 4]
    assert train.classes[7] == "monkey"
    img = _check_item(train, 1, 9)
    assert img.size == (96, 96)
    assert img.getpixel((40, 10)) == (0, 123, 0)  # (x=col, y=row)
    assert int(np.asarray(img).sum()) == 123
    # same orientation as torchvision: reshape (N,3,96,96), swap H/W, then HWC
    expected = train_x.reshape(-1, 3, 96, 96).transpose(0, 1, 3, 2)[0].transpose(1, 2, 0)
    np.testing.assert_array_equal(np.asarray(train[0][0]), expected)

    test = load_dataset("stl10", tmp_path, "test")
    assert test.labels.tolist() == [9, 0]

    unl = load_dataset("stl10", tmp_path, "unlabeled")
    assert len(unl) == 4 and unl.labels is None
    _check_item(unl, 3, -1)

    both = load_dataset("stl10", tmp_path, "train+unlabeled")
    assert len(both) == 7
    assert both.labels.tolist() == [0, 9, 4, -1, -1, -1, -1]
    np.testing.assert_array_equal(both.images[:3], train.images)
    np.testing.assert_array_equal(both.images[3:], unl.images)
    assert dataset_info("stl10").pretrain_split == "unlabeled"
    assert dataset_info("stl10").mean == dataset_info("stl10").std == (0.5, 0.5, 0.5)  # the paper's code's constants


def test_stl10_bad_sizes(tmp_path, monkeypatch):
    monkeypatch.setattr(standard_datasets, "STL10_UNLABELED_IMAGES", 4)
    base = tmp_path / "stl10_binary"
    _write_stl(base)
    (base / "test_y.bin").write_bytes(bytes([1, 2, 3]))  # 3 labels for 2 images
    with pytest.raises(RelreasonError, match="labels"):
        load_dataset("stl10", tmp_path, "test")
    whole = (base / "unlabeled_X.bin").read_bytes()
    (base / "unlabeled_X.bin").write_bytes(whole[: 3 * 96 * 96 * 3])  # cut short on a whole image
    for split in ("unlabeled", "train+unlabeled"):
        with pytest.raises(RelreasonError, match=r"holds 3 images, not the 4 of the unlabeled split \(cut short\?\)"):
            load_dataset("stl10", tmp_path, split)
    (base / "unlabeled_X.bin").write_bytes(bytes(100))
    with pytest.raises(RelreasonError, match="multiple"):
        load_dataset("stl10", tmp_path, "unlabeled")


# =========================================================================== SVHN


def test_svhn_mat_labels_and_layout(tmp_path):
    rng = np.random.default_rng(11)
    x = rng.integers(0, 256, size=(32, 32, 3, 5), dtype=np.uint8)
    x[:, :, :, 3] = 0
    x[4, 9, 2, 3] = 180  # image 3, row 4, column 9, blue
    y = np.array([[10], [1], [9], [10], [5]], dtype=np.uint8)
    scipy.io.savemat(tmp_path / "train_32x32.mat", {"X": x, "y": y})
    scipy.io.savemat(tmp_path / "test_32x32.mat", {"X": x[..., :2], "y": y[:2]})
    train = load_dataset("svhn", tmp_path, "train")
    assert len(train) == 5 and train.labels.tolist() == [0, 1, 9, 0, 5]
    img = _check_item(train, 3, 0)
    assert img.getpixel((9, 4)) == (0, 0, 180)
    np.testing.assert_array_equal(np.asarray(train[0][0]), x[..., 0])
    assert len(load_dataset("svhn", tmp_path, "test")) == 2


# =========================================================================== digits


def test_digits_deterministic_stratified_split():
    train = load_dataset("digits", None, "train")
    test = load_dataset("digits", "/does/not/matter", "test")
    assert len(train) + len(test) == 1797
    assert abs(len(test) - 0.2 * 1797) < 10
    assert set(train.labels.tolist()) == set(range(10)) == set(test.labels.tolist())
    # stratified: every class is ~20% test
    for c in range(10):
        n_te, n_tr = int((test.labels == c).sum()), int((train.labels == c).sum())
        assert abs(n_te / (n_te + n_tr) - 0.2) < 0.01
    assert train.images.dtype == np.uint8 and train.images.shape[1:] == (8, 8)
    assert train.images.max() == 255
    _check_item(train, 0, int(train.labels[0]))
    # no overlap: compare the split indices and also the image rows themselves
    tr_idx, te_idx = splits.stratified_split(np.concatenate([train.labels, test.labels]))
    assert not set(tr_idx.tolist()) & set(te_idx.tolist())
    from sklearn.datasets import load_digits

    full = load_digits()
    tr_i, te_i = splits.stratified_split(full.target.astype(np.int64))
    assert not set(tr_i.tolist()) & set(te_i.tolist())
    assert len(tr_i) == len(train) and len(te_i) == len(test)
    np.testing.assert_array_equal(train.labels, full.target[tr_i])
    # deterministic across calls
    again = load_dataset("digits", None, "test")
    np.testing.assert_array_equal(again.images, test.images)
    np.testing.assert_array_equal(again.labels, test.labels)


def test_digits_registry_stats_match_data():
    full = np.concatenate([load_dataset("digits", None, s).images for s in ("train", "test")])
    x = full.astype(np.float64) / 255.0
    info = dataset_info("digits")
    assert info.mean == pytest.approx((x.mean(),) * 3, abs=1e-3)
    assert info.std == pytest.approx((x.std(),) * 3, abs=1e-3)


# =========================================================================== image folders


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_mixed_folder(root: Path) -> None:
    """Class folders 'cat' and 'dog' (with nested dirs) holding many modes and sizes."""
    (root / "cat" / "inner" / "deeper").mkdir(parents=True)
    (root / "dog").mkdir(parents=True)
    Image.new("L", (10, 12), 77).save(root / "cat" / "grey.png")
    Image.new("LA", (9, 9), (200, 10)).save(root / "cat" / "inner" / "la.PNG")
    pal = Image.new("P", (8, 6), 3)
    pal.putpalette([0, 0, 0] * 3 + [10, 20, 30] + [0, 0, 0] * 252)
    pal.save(root / "cat" / "inner" / "deeper" / "pal.gif")
    Image.new("RGBA", (16, 5), (1, 2, 3, 0)).save(root / "dog" / "rgba.png")
    Image.new("CMYK", (7, 7), (0, 0, 0, 0)).save(root / "dog" / "cmyk.jpg", quality=95)
    Image.fromarray(np.full((6, 4), 65535, dtype=np.uint16)).save(root / "dog" / "deep16.tif")
    (root / "dog" / "notes.txt").write_text("not an image")
    (root / "dog" / ".hidden.png").write_bytes(b"skipped: hidden")
    Image.new("RGB", (3, 3), (5, 6, 7)).save(root / "dog" / "plain.bmp")


def test_image_folder_labelled_nested_mixed_modes(tmp_path):
    root = tmp_path / "imgs"
    _write_mixed_folder(root)
    before = {p: _sha(p) for p in root.rglob("*") if p.is_file()}

    ds = ImageFolderDataset(root)
    rel = [p.relative_to(root).as_posix() for p in ds.paths]
    assert rel == [
        "cat/grey.png",
        "cat/inner/deeper/pal.gif",
        "cat/inner/la.PNG",
        "dog/cmyk.jpg",
        "dog/deep16.tif",
        "dog/plain.bmp",
        "dog/rgba.png",
    ]
    assert ds.classes == ["cat", "dog"]
    assert ds.labels.dtype == np.int64 and ds.labels.tolist() == [0, 0, 0, 1, 1, 1, 1]
    assert len(ds) == 7
    sizes = set()
    for i in range(len(ds)):
        img = _check_item(ds, i, int(ds.labels[i]))
        sizes.add(img.size)
    assert len(sizes) > 3  # images keep their own size
    assert ds[0][0].getpixel((0, 0)) == (77, 77, 77)
    assert ds[1][0].getpixel((0, 0)) == (10, 20, 30)  # palette resolved
    assert ds[2][0].getpixel((0, 0)) == (200, 200, 200)  # LA: alpha dropped
    assert all(abs(v - 255) <= 2 for v in ds[3][0].getpixel((0, 0)))  # CMYK zero ink = white
    assert ds[4][0].getpixel((0, 0)) == (255, 255, 255)  # 16-bit max -> 255, not clipped garbage
    assert ds[6][0].getpixel((0, 0)) == (1, 2, 3)
    # the user's files are untouched
    after = {p: _sha(p) for p in root.rglob("*") if p.is_file()}
    assert after == before
    # deterministic
    assert [p for p in ImageFolderDataset(root).paths] == ds.paths


def test_high_bit_depth_modes_are_scaled_not_clipped(tmp_path):
    ramp16 = (np.arange(16, dtype=np.uint16).reshape(4, 4) * 4369)  # 0 .. 65535
    Image.fromarray(ramp16).save(tmp_path / "a16.png")
    Image.fromarray(np.linspace(0.0, 1.0, 16, dtype=np.float32).reshape(4, 4)).save(tmp_path / "f.tif")
    Image.fromarray(np.arange(16, dtype=np.int32).reshape(4, 4) * 100000 - 50000).save(tmp_path / "i32.tif")
    ds = ImageFolderDataset(tmp_path)
    assert ds.labels is None and ds.classes is None
    by_name = {p.name: ds[i][0] for i, p in enumerate(ds.paths)}
    a16 = np.asarray(by_name["a16.png"])[..., 0]
    np.testing.assert_array_equal(a16, np.rint(ramp16 / 257.0).astype(np.uint8))
    assert a16.min() == 0 and a16.max() == 255 and len(np.unique(a16)) == 16
    f = np.asarray(by_name["f.tif"])[..., 0]
    assert f.min() == 0 and f.max() == 255 and len(np.unique(f)) == 16
    i32 = np.asarray(by_name["i32.tif"])[..., 0]
    assert i32.min() == 0 and i32.max() == 255 and len(np.unique(i32)) == 16


def test_image_folder_unlabelled_when_images_at_top_level(tmp_path):
    Image.new("RGB", (5, 5), (9, 9, 9)).save(tmp_path / "top.jpg")
    (tmp_path / "sub").mkdir()
    Image.new("L", (4, 4)).save(tmp_path / "sub" / "x.png")
    ds = ImageFolderDataset(tmp_path)
    assert len(ds) == 2 and ds.labels is None and ds.classes is None
    for i in range(2):
        _check_item(ds, i, -1)
    folder = load_dataset("folder", tmp_path)
    assert len(folder) == 2 and folder.labels is None


def test_image_folder_errors(tmp_path):
    with pytest.raises(RelreasonError, match="does not exist"):
        ImageFolderDataset(tmp_path / "missing")
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "readme.txt").write_text("hi")
    with pytest.raises(RelreasonError, match="no image files"):
        ImageFolderDataset(tmp_path / "empty")
    with pytest.raises(RelreasonError, match="no image files"):
        load_dataset("folder", tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "broken.png").write_bytes(b"\x89PNG garbage")
    broken = ImageFolderDataset(tmp_path / "bad")
    with pytest.raises(RelreasonError, match="broken.png"):
        broken[0]


def test_folder_train_test_subfolders_share_classes(tmp_path):
    for split, classes in (("train", ("a", "b", "c")), ("test", ("a", "c"))):
        for c in classes:
            (tmp_path / split / c).mkdir(parents=True)
            Image.new("RGB", (6, 6)).save(tmp_path / split / c / "1.png")
    train = load_dataset("folder", tmp_path, "train")
    test = load_dataset("folder", tmp_path, "test")
    assert train.classes == test.classes == ["a", "b", "c"]
    assert train.labels.tolist() == [0, 1, 2]
    assert test.labels.tolist() == [0, 2]  # 'c' keeps the train index
    # a folder without train/ and test/ has no test split
    with pytest.raises(RelreasonError, match="test"):
        load_dataset("folder", tmp_path / "train", "test")


# =========================================================================== arrays, registry, errors


def test_array_dataset_grey_and_rgb():
    grey = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    ds = ArrayImageDataset(grey, np.array([4, 1]), ["a", "b", "c", "d", "e"])
    assert ds.images is grey
    img = _check_item(ds, 1, 1)
    assert img.size == (4, 3) and img.getpixel((3, 2)) == (23, 23, 23)
    rgb = np.zeros((3, 2, 2, 3), dtype=np.uint8)
    rgb[2, 1, 0] = (1, 2, 3)
    ds = ArrayImageDataset(rgb)
    assert ds.labels is None and ds.classes is None and len(ds) == 3
    assert _check_item(ds, 2, -1).getpixel((0, 1)) == (1, 2, 3)
    with pytest.raises(RelreasonError, match="uint8"):
        ArrayImageDataset(rgb.astype(np.float32))
    with pytest.raises(RelreasonError, match="shape"):
        ArrayImageDataset(np.zeros((2, 4, 4, 2), dtype=np.uint8))
    with pytest.raises(RelreasonError, match="one integer label per image"):
        ArrayImageDataset(rgb, np.array([0, 1]))


def test_registry():
    assert set(DATASET_NAMES) == {
        "cifar10", "cifar100", "cifar100-20", "stl10", "svhn", "mnist", "fashion-mnist", "digits", "folder"
    }
    for name in DATASET_NAMES:
        info = dataset_info(name)
        assert isinstance(info, DatasetInfo) and info.name == name
        assert info.train_split == "train" and info.test_split == "test"
    c10 = dataset_info("cifar10")
    assert c10.image_size == 32 and c10.num_classes == 10 and c10.pretrain_split == "train"
    assert c10.mean == (0.491, 0.482, 0.447) and c10.std == (0.247, 0.243, 0.262)
    assert dataset_info("cifar100-20").num_classes == 20 and dataset_info("cifar100").num_classes == 100
    assert dataset_info("stl10").image_size == 96
    assert dataset_info("mnist").mean == (0.1307,) * 3
    assert dataset_info("digits").image_size == 32
    folder = dataset_info("folder")
    assert folder.mean is None and folder.std is None and folder.num_classes is None
    with pytest.raises(Exception):
        c10.name = "x"  # frozen


def test_dataset_normalization_is_the_fixed_statistics_or_a_pointer_to_computing_them():
    for name in DATASET_NAMES:
        info = dataset_info(name)
        if name == "folder":
            with pytest.raises(RelreasonError, match=r"no fixed normalisation.*compute_normalization\(images\)"):
                info.normalization()
        else:
            assert info.normalization() == (info.mean, info.std)


def test_compute_normalization():
    images = np.zeros((4, 2, 2, 3), dtype=np.uint8)
    images[:, :, :, 0] = 255  # red always on
    images[:2, :, :, 1] = 255  # green on in half of the images
    mean, std = compute_normalization(ArrayImageDataset(images))
    assert mean == pytest.approx((1.0, 0.5, 0.0))
    assert std == pytest.approx((1.0, 0.5, 1.0))  # zero-variance channels get std 1
    # a seeded subsample is deterministic
    big = np.random.default_rng(0).integers(0, 256, size=(50, 3, 3, 3), dtype=np.uint8)
    a = compute_normalization(ArrayImageDataset(big), max_images=10, seed=1)
    b = compute_normalization(ArrayImageDataset(big), max_images=10, seed=1)
    assert a == b
    full = compute_normalization(ArrayImageDataset(big), max_images=1000)
    x = big.reshape(-1, 3) / 255.0
    assert full[0] == pytest.approx(tuple(x.mean(0)))
    assert full[1] == pytest.approx(tuple(x.std(0)))


def test_compute_normalization_weighs_every_image_alike_whatever_its_size(tmp_path):
    """Plain per-image means, averaged: a large photo among small ones counts as one image, and is scaled down
    before its statistics are taken (a solid colour keeps its value)."""
    Image.new("RGB", (4, 4), (255, 0, 0)).save(tmp_path / "a.png")
    Image.new("RGB", (2, 2), (0, 0, 0)).save(tmp_path / "b.png")
    Image.new("RGB", (3000, 1000), (0, 0, 255)).save(tmp_path / "c.png")
    mean, std = compute_normalization(ImageFolderDataset(tmp_path))
    assert mean == pytest.approx((1 / 3, 0.0, 1 / 3))
    assert std == pytest.approx((np.sqrt(2) / 3, 1.0, np.sqrt(2) / 3))


def test_a_folders_statistics_leave_unreadable_files_out_and_keep_their_sample_as_files_come_and_go(tmp_path):
    rng = np.random.default_rng(0)
    pixels = {}
    for i in range(12):
        pixels[f"{i:02d}.png"] = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
        Image.fromarray(pixels[f"{i:02d}.png"]).save(tmp_path / f"{i:02d}.png")
    per_image = np.stack([p.reshape(-1, 3).mean(0) / 255 for p in pixels.values()])
    everything = compute_normalization(ImageFolderDataset(tmp_path))
    assert everything[0] == pytest.approx(tuple(per_image.mean(0)))
    # Unreadable files beside them count for nothing (not as the next image again): the very same statistics.
    (tmp_path / "05b.png").write_bytes(b"")
    (tmp_path / "07b.png").write_bytes(b"not an image")
    assert compute_normalization(ImageFolderDataset(tmp_path)) == everything
    # A sample smaller than the folder: the same images, with the unreadable files there or deleted.
    sampled = compute_normalization(ImageFolderDataset(tmp_path), max_images=5, seed=3)
    assert sampled != everything
    order = [ImageFolderDataset(tmp_path).paths[i].name for i in ImageFolderDataset(tmp_path).seeded_order(3)]
    chosen = [name for name in order if name in pixels][:5]
    assert sampled[0] == pytest.approx(tuple(np.mean([per_image[int(name[:2])] for name in chosen], axis=0)))
    for name in ("05b.png", "07b.png"):
        (tmp_path / name).unlink()
    assert compute_normalization(ImageFolderDataset(tmp_path), max_images=5, seed=3) == sampled
    # A file added takes its place in the seeded order; the others keep theirs.
    Image.fromarray(pixels["00.png"]).save(tmp_path / "new.png")
    grown = ImageFolderDataset(tmp_path)
    assert [n for n in (grown.paths[i].name for i in grown.seeded_order(3)) if n in pixels] == \
        [n for n in order if n in pixels]


def test_earlier_versions_statistics_can_still_be_taken_their_way(tmp_path):
    """By index (a seeded draw over a larger folder), an unreadable file standing for the next image, as a plain loop
    over ``dataset[i]`` takes them; 'per-image' decodes JPEGs at full size, 'per-image-draft' at reduced scale."""
    from relreason.data.image_folder import decoded_for

    rng = np.random.default_rng(1)
    for i in range(9):  # large enough for a reduced decoding: blocks of colour, which JPEG keeps small
        side = 2300 if i % 3 == 0 else 300  # a short side of 2190 px: decoded at 1/2
        blocks = Image.fromarray(rng.integers(0, 256, (21, 20, 3), dtype=np.uint8))
        blocks.resize((side * 20 // 21, side), Image.NEAREST).save(tmp_path / f"{i}.jpg", quality=60)
    (tmp_path / "3b.jpg").write_bytes(b"")

    def plain(dataset, max_images):
        n = len(dataset)
        chosen = range(n) if n <= max_images else np.sort(np.random.default_rng(0).choice(n, max_images, replace=False))
        means, squares = [], []
        for i in chosen:
            image = dataset[int(i)][0]
            scale = 256 / max(image.size)  # the long side to 256
            if scale < 1:
                size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
                image = image.resize(size, Image.BILINEAR, reducing_gap=3.0)
            pixels = np.asarray(image, dtype=np.float64).reshape(-1, 3) / 255
            means.append(pixels.mean(0))
            squares.append((pixels ** 2).mean(0))
        mean = np.mean(means, 0)
        return tuple(mean), tuple(np.sqrt(np.mean(squares, 0) - mean ** 2))

    folder = ImageFolderDataset(tmp_path)
    for max_images in (20, 6):
        for method, decoded in (("per-image", folder), ("per-image-draft", decoded_for(folder, 256))):
            taken = compute_normalization(ImageFolderDataset(tmp_path), max_images=max_images, method=method)
            expected = plain(decoded, max_images)
            assert taken[0] == pytest.approx(expected[0], abs=1e-12)
            assert taken[1] == pytest.approx(expected[1], abs=1e-12)
    assert compute_normalization(folder, method="per-image") != compute_normalization(folder, method="per-image-draft")
    with pytest.raises(RelreasonError, match="unknown normalisation method 'by-pixel'"):
        compute_normalization(folder, method="by-pixel")


@pytest.mark.parametrize(
    "name,expected",
    [
        ("cifar10", "cifar-10-batches-py"),
        ("cifar100", "cifar-100-python"),
        ("cifar100-20", "cifar-100-python"),
        ("stl10", "stl10_binary"),
        ("svhn", "train_32x32.mat"),
        ("mnist", "MNIST/raw"),
        ("fashion-mnist", "FashionMNIST/raw"),
    ],
)
def test_missing_dataset_says_download(tmp_path, name, expected):
    with pytest.raises(RelreasonError) as info:
        load_dataset(name, tmp_path, "train")
    msg = str(info.value)
    assert "--download" in msg and expected in msg and str(tmp_path) in msg
    assert "\n" not in msg
    if name == "fashion-mnist":
        assert "apt-get install dataset-fashion-mnist" in msg


def test_unknown_name_and_split(tmp_path):
    with pytest.raises(RelreasonError) as info:
        load_dataset("imagenet", tmp_path)
    for name in DATASET_NAMES:
        assert name in str(info.value)
    with pytest.raises(RelreasonError, match="imagenet"):
        dataset_info("imagenet")
    with pytest.raises(RelreasonError, match="unlabeled"):
        load_dataset("cifar10", tmp_path, "unlabeled")
    with pytest.raises(RelreasonError, match="train, test, unlabeled, train\\+unlabeled"):
        load_dataset("stl10", tmp_path, "validation")


def test_download_uses_torchvision_then_own_reader(tmp_path, monkeypatch):
    import torchvision.datasets as tvd

    calls = []

    class FakeSVHN:
        def __init__(self, root, split, download):
            calls.append((root, split, download))
            x = np.zeros((32, 32, 3, 2), dtype=np.uint8)
            scipy.io.savemat(Path(root) / f"{split}_32x32.mat", {"X": x, "y": np.array([[10], [3]])})

    monkeypatch.setattr(tvd, "SVHN", FakeSVHN)
    ds = load_dataset("svhn", tmp_path, "test", download=True)
    assert calls == [(str(tmp_path), "test", True)]
    assert ds.labels.tolist() == [0, 3]
    # already present: no second download
    load_dataset("svhn", tmp_path, "test", download=True)
    assert len(calls) == 1


def test_download_failure_is_one_line_error(tmp_path, monkeypatch):
    import torchvision.datasets as tvd

    def offline(*args, **kwargs):
        raise urllib.error.URLError("name resolution failed\nsecond line")

    monkeypatch.setattr(tvd, "CIFAR10", offline)
    with pytest.raises(RelreasonError) as info:
        load_dataset("cifar10", tmp_path, "train", download=True)
    msg = str(info.value)
    assert "could not download" in msg and "\n" not in msg and "name resolution failed" in msg
    assert not os.listdir(tmp_path)
    # Folders the download would have made are not left behind, empty.

    def offline_after_making_its_folder(root, *args, **kwargs):
        os.makedirs(root, exist_ok=True)
        raise urllib.error.URLError("name resolution failed")

    monkeypatch.setattr(tvd, "CIFAR10", offline_after_making_its_folder)
    with pytest.raises(RelreasonError, match="could not download"):
        load_dataset("cifar10", tmp_path / "data" / "cifar", "train", download=True)
    assert not os.listdir(tmp_path)


def test_a_file_name_that_is_not_utf8_is_ranked_and_held_out_like_any_other(tmp_path):
    """Linux file names are bytes: one in Latin-1 (café as b'caf\\xe9') reaches Python as a surrogate escape."""
    from PIL import Image

    from relreason.data import held_out_split

    for label in ("a", "b"):
        (tmp_path / label).mkdir()
        for number in range(4):
            Image.new("RGB", (8, 8), (40 * number, 0, 0)).save(tmp_path / label / f"{number}.png")
    odd = os.fsdecode(os.fsencode(str(tmp_path / "b")) + b"/caf\xe9.png")
    Image.new("RGB", (8, 8)).save(odd)
    folder = ImageFolderDataset(tmp_path)
    assert sorted(folder.seeded_order(0)) == list(range(9)) and folder.seeded_order(0) == folder.seeded_order(0)
    train, test = held_out_split("folder", tmp_path, 0.25)
    assert len(train) + len(test) == 9 and len(test) == 2
    assert Path(odd) in [Path(path) for path in (*train.paths, *test.paths)]
