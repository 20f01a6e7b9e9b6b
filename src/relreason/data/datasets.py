"""Image datasets by name: what each is (size, normalisation, splits), :func:`load_dataset`, the statistics of
a dataset without known ones, and a folder's held-out split.

Every dataset :func:`load_dataset` returns is a :class:`torch.utils.data.Dataset` whose ``__getitem__(i)``
returns ``(PIL.Image in mode "RGB", label)`` with ``label == -1`` for unlabelled
images, and which has ``.labels`` (int64 ``(N,)`` array, or ``None`` when the whole
dataset is unlabelled) and ``.classes`` (``list[str]`` or ``None``).

The kinds of dataset live beside this module: :mod:`~relreason.data.array_dataset` (images in memory),
:mod:`~relreason.data.image_folder` (a folder of files), :mod:`~relreason.data.standard_datasets` (the standard
benchmarks, read from their real on-disk formats by :mod:`relreason.data.formats`; torchvision only
*downloads* them) and :mod:`~relreason.data.splits` (train/test splits).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from relreason.data import standard_datasets
from relreason.data.array_dataset import ArrayImageDataset, pil_to_rgb
from relreason.data.image_folder import ImageFolderDataset, decoded_for
from relreason.data.sized_dataset import SizedDataset
from relreason.data.splits import check_fraction_range, has_split_dirs, load_folder_split, split_image_folder
from relreason.data.standard_datasets import load_benchmark, load_digits
from relreason.errors import RelreasonError

__all__ = [
    "DATASET_NAMES",
    "DatasetInfo",
    "check_test_fraction",
    "compute_normalization",
    "dataset_info",
    "held_out_split",
    "load_dataset",
    "same_dataset",
]

#: What ``load_dataset`` gives: arrays in memory, or an image folder read from its files.
LoadedDataset = ArrayImageDataset | ImageFolderDataset

DATASET_NAMES: tuple[str, ...] = (
    "cifar10",
    "cifar100",
    "cifar100-20",
    "stl10",
    "svhn",
    "mnist",
    "fashion-mnist",
    "digits",
    "folder",
)


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a named dataset: input size, normalisation and splits.

    ``mean``/``std`` are per-channel (RGB, 0..1 scale); they are ``None`` for
    ``folder``, whose statistics come from :func:`compute_normalization`.
    ``num_classes`` is ``None`` when it depends on the data (``folder``).
    """

    name: str
    image_size: int
    mean: tuple[float, float, float] | None
    std: tuple[float, float, float] | None
    num_classes: int | None
    pretrain_split: str = "train"
    train_split: str = "train"
    test_split: str = "test"

    def normalization(self) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
        """``(mean, std)`` to normalise this dataset's views with; refused for ``folder``, which has none of its
        own (``compute_normalization(images)`` gives a folder's)."""
        if self.mean is None or self.std is None:
            raise RelreasonError(f"dataset '{self.name}' has no fixed normalisation; compute it from its images: "
                                 "mean, std = compute_normalization(images)")
        return self.mean, self.std


def _grey(v: float) -> tuple[float, float, float]:
    return (v, v, v)


_INFO: dict[str, DatasetInfo] = {
    "cifar10": DatasetInfo("cifar10", 32, (0.491, 0.482, 0.447), (0.247, 0.243, 0.262), 10),
    "cifar100": DatasetInfo("cifar100", 32, (0.507, 0.487, 0.441), (0.267, 0.256, 0.276), 100),
    "cifar100-20": DatasetInfo("cifar100-20", 32, (0.507, 0.487, 0.441), (0.267, 0.256, 0.276), 20),
    # The paper's code normalises STL-10 with 0.5 / 0.5, not with the data's own statistics.
    "stl10": DatasetInfo("stl10", 96, _grey(0.5), _grey(0.5), 10, pretrain_split="unlabeled"),
    "svhn": DatasetInfo("svhn", 32, (0.438, 0.444, 0.473), (0.198, 0.201, 0.197), 10),
    "mnist": DatasetInfo("mnist", 32, _grey(0.1307), _grey(0.3081), 10),
    "fashion-mnist": DatasetInfo("fashion-mnist", 32, _grey(0.2860), _grey(0.3530), 10),
    # Computed once over all 1797 images after scaling 0..16 -> 0..255 (see tests).
    "digits": DatasetInfo("digits", 32, _grey(0.3053), _grey(0.3759), 10),
    "folder": DatasetInfo("folder", 32, None, None, None),
}

_SPLITS: dict[str, tuple[str, ...]] = {
    name: ("train", "test") for name in DATASET_NAMES
}
_SPLITS["stl10"] = ("train", "test", "unlabeled", "train+unlabeled")


def _canonical_name(name: str) -> str:
    key = str(name).strip().lower().replace("_", "-")
    if key not in _INFO:
        raise RelreasonError(
            f"unknown dataset '{name}'; choose one of: {', '.join(DATASET_NAMES)}"
        )
    return key


def dataset_info(name: str) -> DatasetInfo:
    """Return the :class:`DatasetInfo` of a dataset name (see :data:`DATASET_NAMES`)."""
    return _INFO[_canonical_name(name)]


def same_dataset(name: str | None, other: str | None) -> bool:
    """Whether two names, as typed, name one dataset (``fashion_mnist`` is ``fashion-mnist``); unknown: no."""
    try:
        return name is not None and other is not None and _canonical_name(name) == _canonical_name(other)
    except RelreasonError:  # a name this version does not know (e.g. from a foreign backbone.json)
        return False


NORMALIZATION_SIDE = 256  # images larger than this are scaled down to it for their statistics
# Recorded with a run, so that a resume knows how its statistics were taken ("per-image": JPEGs at full size;
# "per-image-draft": a folder's sample drawn by index, an unreadable file replaced by the next image;
# "per-image-draft-path-sample": photos as stored, their EXIF orientation not applied).
NORMALIZATION_METHOD = "per-image-draft-path-sample-upright"
# The earlier ways compute_normalization can still take (``method=``), to tell whether an older run's folder, moved
# since, holds the same images.
EARLIER_NORMALIZATION_METHODS = ("per-image", "per-image-draft", "per-image-draft-path-sample")
#: The methods whose sample is a folder's own files, whatever is added or removed: their statistics tell other images.
PATH_SAMPLED_METHODS = (NORMALIZATION_METHOD, "per-image-draft-path-sample")


def compute_normalization(
    dataset: SizedDataset, max_images: int = 2000, seed: int = 0, method: str = NORMALIZATION_METHOD
) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """Per-channel RGB mean and std (0..1 scale) over a seeded sample of images.

    Up to ``max_images`` images: all of them when there are no more, else a seeded sample. Each is converted to
    RGB, scaled down to at most ``NORMALIZATION_SIDE`` px on its long side (a JPEG decoded at reduced scale first,
    :func:`relreason.data.image_folder.decoded_for`), and weighs the same whatever its size: one 100-megapixel
    photo among thumbnails must not decide the statistics (nor the memory they take). A channel with zero
    variance gets std 1.

    An image folder's sample is its first ``max_images`` readable files in an order seeded by their paths, so that
    the statistics stay those of the same images when an unreadable file is deleted (it was never counted) and
    move by one image when a file is added; an in-memory dataset's is drawn with
    ``numpy.random.default_rng(seed)``. ``method`` names one of ``EARLIER_NORMALIZATION_METHODS`` to take the
    statistics as earlier versions did (photos as stored, not turned upright by their EXIF orientation; before
    that, a folder sampled as an in-memory dataset, an unreadable file replaced by the next image; "per-image":
    JPEGs decoded at full size).
    """
    if method != NORMALIZATION_METHOD and method not in EARLIER_NORMALIZATION_METHODS:
        raise RelreasonError(f"unknown normalisation method {method!r}; use one of "
                             f"{', '.join((NORMALIZATION_METHOD, *EARLIER_NORMALIZATION_METHODS))}")
    n = len(dataset)
    if n == 0:
        raise RelreasonError("cannot compute normalisation of an empty dataset; check the data root")
    if method != "per-image":
        dataset = decoded_for(dataset, NORMALIZATION_SIDE)
    if method != NORMALIZATION_METHOD and hasattr(dataset, "read_as_stored"):
        dataset = dataset.read_as_stored()  # the earlier methods predate turning photos upright
    if max_images < 1:
        raise RelreasonError(f"max_images must be at least 1, got {max_images}; pass a positive number")
    read_or_skip = getattr(dataset, "read_or_skip", None) if method in PATH_SAMPLED_METHODS else None
    if read_or_skip is not None:
        candidates = dataset.seeded_order(seed)  # type: ignore[attr-defined]  # read_or_skip's dataset has it
    elif n <= max_images:
        candidates = range(n)
    else:
        candidates = np.sort(np.random.default_rng(seed).choice(n, size=max_images, replace=False))
    moments: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # index: the image's per-channel mean and mean square
    for i in candidates:
        if len(moments) == max_images:
            break
        image = read_or_skip(int(i)) if read_or_skip is not None else dataset[int(i)][0]
        if image is None:  # left out, not replaced by the next image (which would then count twice)
            continue
        image = pil_to_rgb(image)
        scale = NORMALIZATION_SIDE / max(image.size)
        if scale < 1:
            size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
            image = image.resize(size, Image.Resampling.BILINEAR, reducing_gap=3.0)
        arr = np.asarray(image, dtype=np.float64).reshape(-1, 3) / 255.0
        moments[int(i)] = (arr.mean(axis=0), np.square(arr).mean(axis=0))
    if not moments:
        dataset[0]  # raises the dataset's own error, naming a file, when no image at all can be read
        raise RelreasonError("none of the images sampled for the normalisation statistics can be read; replace the "
                             "broken files or point --data-root at a folder of valid images")
    total = np.zeros(3, dtype=np.float64)
    total_sq = np.zeros(3, dtype=np.float64)
    for i in sorted(moments):  # summed in the dataset's order, whatever order the images were read in
        total += moments[i][0]
        total_sq += moments[i][1]
    mean = total / len(moments)
    var = np.maximum(total_sq / len(moments) - np.square(mean), 0.0)
    std = np.sqrt(var)
    std = np.where(std > 1e-8, std, 1.0)
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)  # type: ignore[return-value]


def check_test_fraction(name: str, test_fraction: float | None) -> None:
    """``--test-fraction`` needs a fraction in (0, 1) and an image folder (named datasets have a test split)."""
    if test_fraction is None:
        return
    check_fraction_range(test_fraction)
    if dataset_info(name).name != "folder":
        raise RelreasonError(f"--test-fraction splits an image folder, and dataset '{name}' comes with its own test "
                             "split; drop --test-fraction")


def held_out_split(
    name: str, root: str | os.PathLike, test_fraction: float
) -> tuple[ImageFolderDataset, ImageFolderDataset]:
    """The train and test parts of a labelled folder split by ``--test-fraction`` (see :func:`split_image_folder`),
    from one scan of the folder."""
    check_test_fraction(name, test_fraction)
    if has_split_dirs(root):
        raise RelreasonError(f"image folder {Path(root).expanduser()} already holds train/ and test/ (or val/ or validation/); drop "
                             "--test-fraction to use them")
    return split_image_folder(root, test_fraction)


def load_dataset(
    name: str,
    root: str | os.PathLike | None,
    split: str = "train",
    download: bool = False,
) -> LoadedDataset:
    """Load split ``split`` of dataset ``name`` (one of :data:`DATASET_NAMES`) from ``root``.

    Files are looked for in torchvision's layout under ``root`` (and in ``root``
    itself; for ``fashion-mnist`` also in :data:`SYSTEM_DATASET_DIRS`, and there alone when
    ``root`` is None). If they are missing and ``download`` is true, torchvision fetches
    them into ``root`` first.
    ``digits`` needs no files (scikit-learn bundles it); ``folder`` reads ``root``
    as an image folder (``root/train`` and ``root/test`` when both exist).
    """
    key = _canonical_name(name)
    valid = _SPLITS[key]
    if split not in valid:
        raise RelreasonError(
            f"unknown split '{split}' for dataset '{key}'; choose one of: {', '.join(valid)}"
        )
    if key == "digits":
        return load_digits(split)
    if root is None and (not standard_datasets.SYSTEM_DATASET_DIRS.get(key) or download):
        fetch = " to download into" if download else ""
        raise RelreasonError(f"dataset '{key}' needs a data directory{fetch}; pass --data-root (load_dataset's root=)")
    if root is None:  # the system directories alone
        return load_benchmark(key, None, split, download=False)
    root = Path(root).expanduser()
    if key == "folder":
        return load_folder_split(root, split)
    return load_benchmark(key, root, split, download)
