"""The standard datasets (MNIST, Fashion-MNIST, CIFAR, STL-10, SVHN, digits): where their files live, fetching
them with torchvision, and reading them."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from relreason.data.array_dataset import ArrayImageDataset
from relreason.data.splits import stratified_split
from relreason.errors import RelreasonError, one_line, warn
from relreason.launch import is_first_process

from . import formats

#: Extra directories searched (after ``root``) for datasets installed system-wide.
#: ``dataset-fashion-mnist`` (Debian/Ubuntu) puts the four ``*.gz`` IDX files in
#: ``/usr/share/datasets/fashion-mnist``. Tests monkeypatch this mapping.
SYSTEM_DATASET_DIRS: dict[str, tuple[str, ...]] = {
    "fashion-mnist": ("/usr/share/datasets/fashion-mnist",),
}

_DIGIT_CLASSES = [str(d) for d in range(10)]

_CIFAR10_CLASSES = [
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
]

_STL10_CLASSES = [
    "airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck",
]

_FASHION_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]


@dataclass(frozen=True)
class _Layout:
    """Where a benchmark's files live and which files each split needs."""

    subdirs: tuple[str, ...]  # tried below root, in order ("" = root itself)
    files: Mapping[str, tuple[str, ...]]  # split -> required file names
    expected: Mapping[str, str]  # split -> human description for error messages
    gz_ok: bool = False  # a file may also be present as NAME.gz


def _idx_files(prefix: str) -> tuple[str, str]:
    return (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte")


_CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))

_STL_FILES = {
    "train": ("train_X.bin", "train_y.bin"),
    "test": ("test_X.bin", "test_y.bin"),
    "unlabeled": ("unlabeled_X.bin",),
    "train+unlabeled": ("train_X.bin", "train_y.bin", "unlabeled_X.bin"),
}

_MNIST_FILES = {"train": _idx_files("train"), "test": _idx_files("t10k")}


def _mnist_expected(sub: str) -> dict[str, str]:
    return {
        s: f"{sub}/{' and '.join(f + '[.gz]' for f in files)} or the same files in the root or its raw/"
        for s, files in _MNIST_FILES.items()
    }


_LAYOUTS: dict[str, _Layout] = {
    "cifar10": _Layout(
        ("cifar-10-batches-py", ""),
        {"train": _CIFAR10_TRAIN, "test": ("test_batch",)},
        {"train": "cifar-10-batches-py/data_batch_1..5", "test": "cifar-10-batches-py/test_batch"},
    ),
    "cifar100": _Layout(
        ("cifar-100-python", ""),
        {"train": ("train",), "test": ("test",)},
        {"train": "cifar-100-python/train", "test": "cifar-100-python/test"},
    ),
    "stl10": _Layout(
        ("stl10_binary", ""),
        _STL_FILES,
        {s: "stl10_binary/" + ", ".join(f) for s, f in _STL_FILES.items()},
    ),
    "svhn": _Layout(
        ("",),
        {"train": ("train_32x32.mat",), "test": ("test_32x32.mat",)},
        {"train": "train_32x32.mat", "test": "test_32x32.mat"},
    ),
    # "raw": a --data-root that names torchvision's MNIST or FashionMNIST folder itself
    "mnist": _Layout(("MNIST/raw", "raw", ""), _MNIST_FILES, _mnist_expected("MNIST/raw"), gz_ok=True),
    "fashion-mnist": _Layout(
        ("FashionMNIST/raw", "raw", ""), _MNIST_FILES, _mnist_expected("FashionMNIST/raw"), gz_ok=True
    ),
}
_LAYOUTS["cifar100-20"] = _LAYOUTS["cifar100"]


def _find_in(directory: Path, name: str, gz_ok: bool) -> Path | None:
    for candidate in (name, name + ".gz") if gz_ok else (name,):
        path = directory / candidate
        if path.is_file():
            return path
    return None


def _locate(key: str, root: Path | None, split: str) -> dict[str, Path] | None:
    """Paths of the files ``split`` needs, all from the first directory holding all of them (None: the system
    directories alone)."""
    layout = _LAYOUTS[key]
    dirs = [root / sub if sub else root for sub in layout.subdirs] if root is not None else []
    dirs += [Path(d) for d in SYSTEM_DATASET_DIRS.get(key, ())]
    names = layout.files[split]
    for directory in dirs:
        found = {name: _find_in(directory, name, layout.gz_ok) for name in names}
        if all(p is not None for p in found.values()):
            return found  # type: ignore[return-value]
    return None


def _not_found(key: str, root: Path | None, split: str) -> RelreasonError:
    expected = _LAYOUTS[key].expected[split]
    if root is None:  # load_dataset(name, None): the system directories alone were searched
        searched = ", ".join(SYSTEM_DATASET_DIRS.get(key, ()))
        return RelreasonError(f"dataset '{key}' (split '{split}') not found in {searched} (expected {expected}); "
                              "pass root= (--data-root) to point at it or to download it into")
    fix = "pass --download to fetch it or --data-root to point at it (load_dataset's download=True, root=)"
    if key == "fashion-mnist":
        searched = ", ".join(SYSTEM_DATASET_DIRS.get(key, ())) or "no system directory"
        fix = (
            "pass --download to fetch it, --data-root to point at it (load_dataset's download=True, root=), or run "
            "'apt-get install dataset-fashion-mnist'" + (f" (searched also {searched})" if root is not None else "")
        )
    where = f"under {root}" if root is not None else f"in {', '.join(SYSTEM_DATASET_DIRS.get(key, ()))}"
    return RelreasonError(f"dataset '{key}' (split '{split}') not found {where} (expected {expected}); {fix}")


def _not_made_by_download(key: str, root: Path, split: str) -> RelreasonError:
    expected = _LAYOUTS[key].expected[split]
    found = sorted(str(path.relative_to(root)) for path in root.rglob("*") if path.is_file()) if root.is_dir() else []
    found = found[:6]
    holds = f"it holds {', '.join(found)}" if found else "it holds no files"
    return RelreasonError(
        f"dataset '{key}' (split '{split}') is still not under {root} after torchvision's download (expected "
        f"{expected}; {holds}); download into an empty folder, or place the files there by hand"
    )


def _download(key: str, root: Path, split: str) -> None:
    """Fetch the files into ``root`` with torchvision's dataset classes."""
    import torchvision.datasets as tvd

    train = split == "train"
    makers: dict[str, Callable[[], object]] = {
        "cifar10": lambda: tvd.CIFAR10(str(root), train=train, download=True),
        "cifar100": lambda: tvd.CIFAR100(str(root), train=train, download=True),
        "cifar100-20": lambda: tvd.CIFAR100(str(root), train=train, download=True),
        # The STL-10 archive holds every split; load the smallest one afterwards.
        "stl10": lambda: tvd.STL10(str(root), split="test", download=True),
        "svhn": lambda: tvd.SVHN(str(root), split=split, download=True),
        "mnist": lambda: tvd.MNIST(str(root), train=train, download=True),
        "fashion-mnist": lambda: tvd.FashionMNIST(str(root), train=train, download=True),
    }
    made = [folder for folder in (root, *root.parents) if not folder.exists()]  # what a failure should not leave
    try:
        makers[key]()
    except Exception as exc:  # network errors, checksum failures, disk full ...
        for folder in made:  # deepest first; only those still empty
            try:
                folder.rmdir()
            except OSError:
                break
        msg = one_line(exc) or type(exc).__name__
        raise RelreasonError(
            f"could not download dataset '{key}' into {root} ({msg}); check the network "
            "connection or place the files there by hand"
        ) from None


def _read_cifar10(files: dict[str, Path], split: str) -> ArrayImageDataset:
    images, labels = [], []
    for path in files.values():
        batch = formats.read_cifar_pickle(path)
        x = formats.cifar_images(batch, path)
        images.append(x)
        labels.append(formats.cifar_labels(batch, "labels", path, len(x)))
    classes = _meta_names(next(iter(files.values())).parent / "batches.meta", "label_names", _CIFAR10_CLASSES)
    x = images[0] if len(images) == 1 else np.concatenate(images)
    return ArrayImageDataset(x, np.concatenate(labels), classes)


def _meta_names(path: Path, key: str, default: list[str] | None) -> list[str] | None:
    if not path.is_file():
        return default
    meta = formats.read_cifar_pickle(path)
    if key not in meta:
        return default
    return [n.decode("latin1") if isinstance(n, bytes) else str(n) for n in meta[key]]


def _read_cifar100(files: dict[str, Path], split: str, coarse: bool) -> ArrayImageDataset:
    (path,) = files.values()
    batch = formats.read_cifar_pickle(path)
    x = formats.cifar_images(batch, path)
    key = "coarse_labels" if coarse else "fine_labels"
    y = formats.cifar_labels(batch, key, path, len(x))
    classes = _meta_names(path.parent / "meta", "coarse_label_names" if coarse else "fine_label_names", None)
    if classes is None:
        classes = [str(i) for i in range(20 if coarse else 100)]
    return ArrayImageDataset(x, y, classes)


def _stl_classes(directory: Path) -> list[str]:
    path = directory / "class_names.txt"
    if path.is_file():
        names = formats.read_text_lines(path)
        if len(names) == 10:
            return names
    return list(_STL10_CLASSES)


#: Images in STL-10's unlabeled_X.bin. The file has no label file to count against, and an extraction cut short
#: (disk full, interrupted) can end on a whole image; torchvision checks its md5 for the same reason. Tests
#: monkeypatch it for their small files.
STL10_UNLABELED_IMAGES = 100_000


def _check_stl_unlabeled(path: Path) -> None:
    count = formats.stl_count(path)
    if count != STL10_UNLABELED_IMAGES:
        raise RelreasonError(f"STL-10 file {path} holds {count} images, not the {STL10_UNLABELED_IMAGES} of the "
                             "unlabeled split (cut short?); delete it and fetch it again (e.g. with --download)")


def _read_stl10(files: dict[str, Path], split: str) -> ArrayImageDataset:
    classes = _stl_classes(next(iter(files.values())).parent)
    if "unlabeled_X.bin" in files:
        _check_stl_unlabeled(files["unlabeled_X.bin"])
    if split == "unlabeled":
        return ArrayImageDataset(formats.read_stl_images(files["unlabeled_X.bin"]), None, None)
    x_name = "test_X.bin" if split == "test" else "train_X.bin"
    y_name = "test_y.bin" if split == "test" else "train_y.bin"
    y = formats.read_stl_labels(files[y_name])
    n = formats.stl_count(files[x_name])
    if y.shape[0] != n:
        raise RelreasonError(
            f"STL-10 files {files[x_name]} and {files[y_name]} hold {n} images but {y.shape[0]} labels; "
            "delete them and fetch them again (e.g. with --download)"
        )
    if split in ("train", "test"):
        return ArrayImageDataset(formats.read_stl_images(files[x_name]), y, classes)
    # train+unlabeled: one preallocated array, labelled images first (as torchvision).
    n_unl = formats.stl_count(files["unlabeled_X.bin"])
    images = np.empty((n + n_unl, 96, 96, 3), dtype=np.uint8)
    formats.read_stl_images(files[x_name], out=images[:n])
    formats.read_stl_images(files["unlabeled_X.bin"], out=images[n:])
    labels = np.concatenate([y, np.full(n_unl, -1, dtype=np.int64)])
    return ArrayImageDataset(images, labels, classes)


def _read_svhn(files: dict[str, Path], split: str) -> ArrayImageDataset:
    (path,) = files.values()
    x, y = formats.read_svhn_mat(path)
    return ArrayImageDataset(x, y, list(_DIGIT_CLASSES))


#: How many images of each digit MNIST's files hold: other datasets in the same IDX files (Fashion-MNIST,
#: KMNIST) hold as many of every class, so the counts tell a full-size file of theirs from MNIST's.
_MNIST_CLASS_COUNTS = {
    "train": (5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949),
    "test": (980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009),
}

#: SHA-256 of Fashion-MNIST's labels (the payload, as the gzip files of torchvision and of Debian differ).
_FASHION_LABELS_SHA256 = {
    "train": "657fbd221bfc9f4198cc14b5619cc33ec57c58dd0e47af4d99d6650759e869a7",
    "test": "3d0e6c6ea990b53b6f8f500a41cac93881d981b315f84578b7d915342ade01e9",
}


def _read_idx_or_gz(path: Path, ndim: int) -> np.ndarray:
    """An IDX file; when an unzipped one is damaged and its ``.gz`` sits beside it, the ``.gz``."""
    try:
        return formats.read_idx(path, expected_ndim=ndim)
    except RelreasonError:
        packed = path.with_name(path.name + ".gz")
        if path.suffix == ".gz" or not packed.is_file():
            raise
        array = formats.read_idx(packed, expected_ndim=ndim)
        if is_first_process():  # once under torchrun, as the trainer's own warnings
            warn(f"{path} is damaged; read {packed.name} beside it instead (delete {path.name} "
                 "to silence this)")
        return array


def _check_mnist_family_labels(key: str, labels: np.ndarray, path: Path, split: str) -> None:
    """Refuse another dataset's labels: all three datasets use the same file names, so a folder of the wrong one
    would otherwise train and evaluate under the wrong class names. Only a full-size file can be told apart."""
    full = sum(_MNIST_CLASS_COUNTS[split])
    if labels.shape[0] != full:
        return
    counts = tuple(int(c) for c in np.bincount(labels, minlength=10)[:10])
    balanced = counts == (full // 10,) * 10
    fashion = hashlib.sha256(labels.tobytes()).hexdigest() == _FASHION_LABELS_SHA256[split]
    mnist = counts == _MNIST_CLASS_COUNTS[split]
    if (key == "mnist" and mnist) or (key == "fashion-mnist" and fashion):
        return
    name = "MNIST" if key == "mnist" else "Fashion-MNIST"
    if fashion or mnist:
        other = "fashion-mnist" if fashion else "mnist"
        raise RelreasonError(f"{path} holds {'Fashion-MNIST' if fashion else 'MNIST'}'s labels, not {name}'s; pass "
                             f"--dataset {other} to use them, or point --data-root at {name}'s files")
    looks = "another dataset's (KMNIST's?)" if balanced else "damaged or another dataset's"
    raise RelreasonError(f"{path} holds labels that are not {name}'s but {looks}; point --data-root at {name}'s "
                         "files, or download them into an empty folder (--download)")


def _read_mnist_family(files: dict[str, Path], split: str, key: str, classes: list[str]) -> ArrayImageDataset:
    img_path, lab_path = files.values()
    y = _read_idx_or_gz(lab_path, 1)
    if y.dtype == np.uint8:  # the labels first: another dataset's files are refused before 47 MB of its images
        _check_mnist_family_labels(key, y, lab_path, split)
    x = _read_idx_or_gz(img_path, 3)
    if x.dtype != np.uint8 or y.dtype != np.uint8:
        raise RelreasonError(
            f"IDX files {img_path} / {lab_path} are not unsigned-byte files; delete them and fetch them again (e.g. with --download)"
        )
    if x.shape[0] != y.shape[0]:
        raise RelreasonError(
            f"{img_path} holds {x.shape[0]} images but {lab_path} holds {y.shape[0]} labels; "
            "delete them and fetch them again (e.g. with --download)"
        )
    return ArrayImageDataset(x, y.astype(np.int64), list(classes))


_READERS: dict[str, Callable[[dict[str, Path], str], ArrayImageDataset]] = {
    "cifar10": _read_cifar10,
    "cifar100": lambda f, s: _read_cifar100(f, s, coarse=False),
    "cifar100-20": lambda f, s: _read_cifar100(f, s, coarse=True),
    "stl10": _read_stl10,
    "svhn": _read_svhn,
    "mnist": lambda f, s: _read_mnist_family(f, s, "mnist", _DIGIT_CLASSES),
    "fashion-mnist": lambda f, s: _read_mnist_family(f, s, "fashion-mnist", _FASHION_CLASSES),
}


def load_digits(split: str) -> ArrayImageDataset:
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    images = np.clip(np.rint(bunch.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    labels = np.asarray(bunch.target, dtype=np.int64)
    train_idx, test_idx = stratified_split(labels)
    idx = train_idx if split == "train" else test_idx
    return ArrayImageDataset(np.ascontiguousarray(images[idx]), labels[idx], list(_DIGIT_CLASSES))


def load_benchmark(key: str, root: Path | None, split: str, download: bool) -> ArrayImageDataset:
    """Split ``split`` of benchmark ``key`` from its files under ``root`` (or a system directory; None: only
    there), fetched first when missing and ``download`` is true."""
    files = _locate(key, root, split)
    if files is None and download and root is not None:
        _download(key, root, split)
        files = _locate(key, root, split)
        if files is None:
            raise _not_made_by_download(key, root, split)
    if files is None:
        raise _not_found(key, root, split)
    dataset = _READERS[key](files, split)
    dataset.source_files = tuple(files.values())
    return dataset
