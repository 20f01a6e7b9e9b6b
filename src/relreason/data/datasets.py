"""Image datasets: in-memory arrays, image folders, and the standard benchmarks.

Every dataset here is a :class:`torch.utils.data.Dataset` whose ``__getitem__(i)``
returns ``(PIL.Image in mode "RGB", label)`` with ``label == -1`` for unlabelled
images, and which has ``.labels`` (int64 ``(N,)`` array, or ``None`` when the whole
dataset is unlabelled) and ``.classes`` (``list[str]`` or ``None``).

The benchmark files are read from their real on-disk formats by the readers in
:mod:`relreason.data.formats`; torchvision is only used to *download* them.
"""

from __future__ import annotations

import copy
import hashlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from relreason.errors import RelreasonError

from . import formats

__all__ = [
    "ArrayImageDataset",
    "ImageFolderDataset",
    "DatasetInfo",
    "DATASET_NAMES",
    "IMAGE_EXTENSIONS",
    "SYSTEM_DATASET_DIRS",
    "dataset_info",
    "load_dataset",
    "compute_normalization",
    "pil_to_rgb",
    "read_skip_log",
]

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

#: Extra directories searched (after ``root``) for datasets installed system-wide.
#: ``dataset-fashion-mnist`` (Debian/Ubuntu) puts the four ``*.gz`` IDX files in
#: ``/usr/share/datasets/fashion-mnist``. Tests monkeypatch this mapping.
SYSTEM_DATASET_DIRS: dict[str, tuple[str, ...]] = {
    "fashion-mnist": ("/usr/share/datasets/fashion-mnist",),
}

IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm",
)

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


# =========================================================================== registry


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


def _grey(v: float) -> tuple[float, float, float]:
    return (v, v, v)


_INFO: dict[str, DatasetInfo] = {
    "cifar10": DatasetInfo("cifar10", 32, (0.491, 0.482, 0.447), (0.247, 0.243, 0.262), 10),
    "cifar100": DatasetInfo("cifar100", 32, (0.507, 0.487, 0.441), (0.267, 0.256, 0.276), 100),
    "cifar100-20": DatasetInfo("cifar100-20", 32, (0.507, 0.487, 0.441), (0.267, 0.256, 0.276), 20),
    "stl10": DatasetInfo(
        "stl10", 96, (0.447, 0.440, 0.407), (0.260, 0.257, 0.271), 10, pretrain_split="unlabeled"
    ),
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


def same_dataset(name: str, other: str | None) -> bool:
    """Whether two names, as typed, name one dataset (``fashion_mnist`` is ``fashion-mnist``); unknown: no."""
    try:
        return other is not None and _canonical_name(name) == _canonical_name(other)
    except RelreasonError:  # a name this version does not know (e.g. from a foreign backbone.json)
        return False


# =========================================================================== datasets


def _check_labels(labels, n: int) -> np.ndarray | None:
    if labels is None:
        return None
    arr = np.asarray(labels)
    if arr.ndim != 1 or arr.shape[0] != n:
        raise RelreasonError(
            f"labels have shape {arr.shape} but there are {n} images; pass one integer label per image"
        )
    if arr.dtype.kind not in "iub":
        raise RelreasonError(f"labels have dtype {arr.dtype}; pass integer labels (-1 for unlabelled)")
    return arr.astype(np.int64, copy=False)


class ArrayImageDataset(Dataset):
    """Images held in memory as a uint8 array ``(N, H, W)`` (grey) or ``(N, H, W, 3)``.

    ``images`` is kept as given (no copy). Grey images are returned as 3-channel
    RGB PIL images. ``labels`` may be ``None`` (unlabelled: every label is -1).
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray | None = None,
        classes: list[str] | None = None,
    ) -> None:
        if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
            kind = images.dtype if isinstance(images, np.ndarray) else type(images).__name__
            raise RelreasonError(f"images must be a uint8 numpy array, got {kind}; convert with np.asarray(x, dtype=np.uint8)")
        grey = images.ndim == 3 or (images.ndim == 4 and images.shape[3] == 1)
        if not (grey or (images.ndim == 4 and images.shape[3] == 3)):
            raise RelreasonError(
                f"images have shape {images.shape}; pass (N, H, W) grey or (N, H, W, 3) RGB uint8 images"
            )
        self.images = images
        self.labels = _check_labels(labels, images.shape[0])
        self.classes = list(classes) if classes is not None else None
        self._grey = grey

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        index = int(index)
        arr = self.images[index]
        if self._grey:
            if arr.ndim == 3:
                arr = arr[..., 0]
            image = Image.fromarray(np.ascontiguousarray(arr)).convert("RGB")
        else:
            image = Image.fromarray(np.ascontiguousarray(arr))
        label = -1 if self.labels is None else int(self.labels[index])
        return image, label


def _scale_to_uint8(arr: np.ndarray, mode: str) -> np.ndarray:
    """Map a 16-bit / int32 / float image to 0..255 without clipping its range away.

    * ``I;16*``: full 16-bit range, divided by 257.
    * ``F`` with values in [0, 1]: times 255.
    * ``I``/``F`` already within 0..255: kept; within 0..65535: divided by 257
      (16-bit PNGs often open as ``I``); anything else: min-max stretched.
    """
    raw = np.asarray(arr)
    with np.errstate(invalid="ignore"):  # signalling-NaN bit patterns in F images
        a = raw.astype(np.float64)
    if a.ndim == 3:  # some decoders give (H, W, 1)
        a = a[..., 0]
    a = np.where(np.isfinite(a), a, 0.0)
    if mode.startswith("I;16") and raw.dtype.kind == "u":
        a = a / 257.0
    else:
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
        if mode == "F" and lo >= 0.0 and hi <= 1.0:
            a = a * 255.0
        elif lo >= 0.0 and hi <= 255.0:
            pass
        elif lo >= 0.0 and hi <= 65535.0:
            a = a / 257.0
        elif hi > lo:
            a = (a - lo) * (255.0 / (hi - lo))
        else:
            a = np.zeros_like(a)
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


def pil_to_rgb(image: Image.Image) -> Image.Image:
    """Convert a PIL image of any mode to RGB.

    Alpha is dropped (as torchvision's loader does); palette images with a
    transparency key go through RGBA first; premultiplied ``La``/``RGBa`` are
    un-premultiplied first; 16-bit, 32-bit integer and float images are scaled
    to 0..255 by :func:`_scale_to_uint8` instead of clipped (NaN/inf become 0).
    A mode PIL cannot convert raises :class:`RelreasonError`.
    """
    mode = image.mode
    if mode == "RGB":
        return image
    try:
        if mode.startswith("I;16") or mode in ("I", "F"):
            return Image.fromarray(_scale_to_uint8(np.asarray(image), mode)).convert("RGB")
        if mode in ("P", "PA") and "transparency" in image.info:
            image = image.convert("RGBA")
        elif mode == "La":  # PIL has no La -> L/RGB path
            image = image.convert("LA")
        elif mode == "RGBa":
            image = image.convert("RGBA")
        return image.convert("RGB")
    except ValueError as exc:
        msg = " ".join(str(exc).split())
        raise RelreasonError(
            f"image mode {mode!r} cannot be converted to RGB ({msg}); save the image as RGB or greyscale"
        ) from None


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _scan_images(root: Path) -> list[tuple[str, ...]]:
    """Relative path parts of every image file under ``root``, sorted; hidden entries skipped."""
    found: list[tuple[str, ...]] = []
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # symlink cycle
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not _is_hidden(d))
        rel = Path(dirpath).relative_to(root).parts
        for fname in filenames:
            if not _is_hidden(fname) and os.path.splitext(fname)[1].lower() in IMAGE_EXTENSIONS:
                found.append(rel + (fname,))
    found.sort()
    return found


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _skip_line(path: str, reason: str) -> bytes:
    """``b"<path>\\t<reason>\\n"``: the path as its file-system bytes, the reason as UTF-8.

    The reason holds no tab or newline (whitespace is collapsed); a newline or
    carriage return inside the path is written as ``\\n`` / ``\\r`` so that
    every record stays on one line (such names do not round-trip exactly).
    """
    raw = os.fsencode(path).replace(b"\n", b"\\n").replace(b"\r", b"\\r")
    return raw + b"\t" + _one_line(reason).encode("utf-8", "backslashreplace") + b"\n"


def read_skip_log(path: str | os.PathLike) -> dict[str, str]:
    """Read a skip log written by :class:`ImageFolderDataset` (``skip_log=``).

    Returns ``{image path: reason}`` with each path once (the first reason
    recorded for it wins; several DataLoader workers, or several epochs, may
    have logged the same file). A missing file means nothing was skipped: ``{}``.
    Lines without a tab (e.g. cut off by a crash) are ignored.
    """
    path = Path(path).expanduser()
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise RelreasonError(
            f"cannot read skip log {path} ({_one_line(exc)}); pass the file given as skip_log"
        ) from None
    out: dict[str, str] = {}
    for line in data.split(b"\n"):
        if b"\t" not in line:
            continue
        raw_path, raw_reason = line.rsplit(b"\t", 1)  # the reason never holds a tab
        if not raw_path:
            continue
        out.setdefault(os.fsdecode(raw_path), raw_reason.decode("utf-8", "replace").rstrip("\r"))
    return out


class _UnreadableImage(Exception):
    """Internal: an image file that cannot be opened or decoded (message = one-line reason)."""


_LOG_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)


class ImageFolderDataset(Dataset):
    """Every image file under ``root`` (recursive, sorted), opened lazily.

    If every image lies inside a top-level subfolder, those subfolder names are
    the classes (sorted; deeper folders belong to their top-level class) and
    ``labels`` holds class indices; otherwise the dataset is unlabelled.
    ``classes`` may be given to fix the class list (e.g. a test folder that must
    use the train folder's indices). Files are only read, never modified.

    Bad files do not stop training: when image ``i`` cannot be read or decoded
    (truncated, empty, not an image, a decompression bomb, ...), ``self[i]``
    returns the next readable image ``i+1, i+2, ...`` (wrapping around) *with
    that image's label*, so the substitution depends only on the files. The bad
    file is recorded in ``self.skipped`` (``{path: one-line reason}``, per
    process: DataLoader workers fill their own copies, and a file once found bad
    is not tried again in that process) and, when ``skip_log`` is given, one
    line ``"<path>\\t<reason>\\n"`` is appended to that file with a single
    ``os.write`` on an ``O_APPEND`` descriptor, so all worker processes can log
    to it safely; read it with :func:`read_skip_log`. If no image at all can be
    read, ``self[i]`` raises :class:`RelreasonError`. :meth:`load_image` does not
    substitute: it raises :class:`RelreasonError` for a bad file.

    PIL's ``ImageFile.LOAD_TRUNCATED_IMAGES`` is left off, so a truncated file
    raises (and is skipped) rather than being half decoded.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        classes: Sequence[str] | None = None,
        skip_log: str | os.PathLike | None = None,
    ) -> None:
        self.root = Path(root).expanduser()
        if not self.root.exists():
            raise RelreasonError(
                f"image folder {self.root} does not exist; pass an existing directory with --data-root"
            )
        if not self.root.is_dir():
            raise RelreasonError(
                f"image folder {self.root} is not a directory; pass the folder that holds the images"
            )
        rel = _scan_images(self.root)
        if not rel:
            raise RelreasonError(
                f"no image files ({' '.join(IMAGE_EXTENSIONS)}) found under {self.root}; "
                "put images there, optionally one subfolder per class"
            )
        self.paths: list[Path] = [self.root.joinpath(*parts) for parts in rel]
        labelled = all(len(parts) >= 2 for parts in rel)
        if labelled:
            present = sorted({parts[0] for parts in rel})
            if classes is None:
                self.classes: list[str] | None = present
            else:
                self.classes = list(classes)
                unknown = [c for c in present if c not in self.classes]
                if unknown:
                    raise RelreasonError(
                        f"image folder {self.root} has class folder(s) {', '.join(unknown)} not among the "
                        f"expected classes ({', '.join(self.classes)}); make the class folders match"
                    )
            self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
            self.labels: np.ndarray | None = np.array(
                [self.class_to_idx[parts[0]] for parts in rel], dtype=np.int64
            )
        else:
            self.classes = None
            self.class_to_idx = {}
            self.labels = None
        loose = [parts[0] for parts in rel if len(parts) < 2]
        #: Why the folder has no classes, in words (None when it has them): images outside class subfolders.
        lie = "image lies" if len(loose) == 1 else "images lie"
        self.why_unlabelled: str | None = None if labelled else (
            f"its {len(loose)} {lie} directly in {self.root}, not in class subfolders" if len(loose) == len(rel)
            else f"{len(loose)} of its {len(rel)} images {lie.split()[1]} directly in {self.root}, outside the class "
            f"subfolders (e.g. {loose[0]})"
        )
        self.skipped: dict[str, str] = {}
        #: Images of the folder left out of this dataset: the test share a --test-fraction holds out.
        self.held_out = 0
        self.skip_log: Path | None = None
        self._log_warned = False
        if skip_log is not None:
            self.log_skips_to(skip_log)

    def subset(self, indices: Sequence[int]) -> ImageFolderDataset:
        """The images at ``indices`` (in that order) as a folder dataset of their own, with the same classes; an
        unreadable one is replaced by the next readable image of the subset."""
        part = copy.copy(self)
        part.paths = [self.paths[int(i)] for i in indices]
        part.labels = None if self.labels is None else self.labels[np.asarray(indices, dtype=np.int64)]
        part.skipped = {}
        return part

    def log_skips_to(self, path: str | os.PathLike) -> None:
        """Append every skipped file to ``path`` from now on, starting with those skipped already (e.g. while
        the normalisation statistics were computed)."""
        self.skip_log = Path(path).expanduser()
        try:  # fail now, not hours into training; creates an empty log
            os.close(os.open(self.skip_log, _LOG_FLAGS, 0o644))
        except OSError as exc:
            raise RelreasonError(
                f"cannot open skip log {self.skip_log} for appending ({_one_line(exc)}); "
                "pass a writable file path in an existing directory"
            ) from None
        for skipped_path, reason in list(self.skipped.items()):
            self._record_skip(skipped_path, reason)

    def __len__(self) -> int:
        return len(self.paths)

    def _read(self, index: int) -> Image.Image:
        """Open and fully decode image ``index`` as RGB, or raise :class:`_UnreadableImage`."""
        path = self.paths[index]
        try:
            with Image.open(path) as img:
                img.load()  # decode now: truncated / corrupt data raises here
                if img.width < 1 or img.height < 1:
                    raise ValueError(f"image has size {img.width}x{img.height}")
                return pil_to_rgb(img)
        except Exception as exc:  # PIL raises many types on corrupt data (OSError, SyntaxError, struct.error, ...)
            try:
                empty = os.stat(path).st_size == 0
            except OSError:
                empty = False
            if empty:
                reason = "empty file (0 bytes)"
            elif isinstance(exc, UnidentifiedImageError):  # its message only repeats the path
                reason = "UnidentifiedImageError: not an image format PIL can identify"
            else:
                msg = _one_line(exc)
                reason = f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__
            raise _UnreadableImage(reason) from None

    def load_image(self, index: int) -> Image.Image:
        """Open image ``index`` and return it as an RGB PIL image (first frame).

        Raises :class:`RelreasonError` naming the file when it cannot be read
        (no substitution here; that is what ``self[index]`` does).
        """
        try:
            return self._read(index)
        except _UnreadableImage as exc:
            raise RelreasonError(
                f"cannot read image {self.paths[index]} ({exc}); remove or replace the file"
            ) from None

    def _record_skip(self, path: str, reason: str) -> None:
        self.skipped[path] = reason
        # The log itself says what is listed: a resumed run's earlier entries, and those of DataLoader workers
        # (forked copies of this dataset). Each process meets a bad file once (then it is in ``skipped``).
        if self.skip_log is None or path in read_skip_log(self.skip_log):
            return
        try:
            fd = os.open(self.skip_log, _LOG_FLAGS, 0o644)
            try:
                os.write(fd, _skip_line(path, reason))  # one write on O_APPEND: lines never interleave
            finally:
                os.close(fd)
        except OSError as exc:  # a full disk must not stop training; say so once per process
            if not self._log_warned:
                self._log_warned = True
                warnings.warn(
                    f"relreason: could not append to skip log {self.skip_log} ({_one_line(exc)}); "
                    "skipped images are still listed in dataset.skipped",
                    RuntimeWarning,
                    stacklevel=3,
                )

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        n = len(self.paths)
        index = int(index)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for {n} images")
        for step in range(n):
            j = (index + step) % n
            key = str(self.paths[j])
            if key in self.skipped:
                continue
            try:
                image = self._read(j)
            except _UnreadableImage as exc:
                self._record_skip(key, str(exc))
                continue
            label = -1 if self.labels is None else int(self.labels[j])
            return image, label
        example = str(self.paths[index])
        raise RelreasonError(
            f"no readable image under {self.root} (all {n} image files failed, e.g. {example}: "
            f"{self.skipped.get(example, 'unreadable')}); replace the broken files or point --data-root "
            "at a folder of valid images"
        )


# =========================================================================== normalisation


def compute_normalization(
    dataset: Dataset, max_images: int = 2000, seed: int = 0
) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """Per-channel RGB mean and std (0..1 scale) over a seeded sample of images.

    Up to ``max_images`` images are drawn without replacement with
    ``numpy.random.default_rng(seed)``; each is converted to RGB and used at its own
    size (statistics are pixel-weighted). A channel with zero variance gets std 1.
    """
    n = len(dataset)
    if n == 0:
        raise RelreasonError("cannot compute normalisation of an empty dataset; check the data root")
    if max_images < 1:
        raise RelreasonError(f"max_images must be at least 1, got {max_images}; pass a positive number")
    if n <= max_images:
        indices = np.arange(n)
    else:
        indices = np.sort(np.random.default_rng(seed).choice(n, size=max_images, replace=False))
    total = np.zeros(3, dtype=np.float64)
    total_sq = np.zeros(3, dtype=np.float64)
    count = 0
    for i in indices:
        image = dataset[int(i)][0]
        arr = np.asarray(pil_to_rgb(image), dtype=np.float64).reshape(-1, 3) / 255.0
        total += arr.sum(axis=0)
        total_sq += np.square(arr).sum(axis=0)
        count += arr.shape[0]
    mean = total / count
    var = np.maximum(total_sq / count - np.square(mean), 0.0)
    std = np.sqrt(var)
    std = np.where(std > 1e-8, std, 1.0)
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)  # type: ignore[return-value]


# =========================================================================== benchmark files


@dataclass(frozen=True)
class _Layout:
    """Where a benchmark's files live and which files each split needs."""

    subdirs: tuple[str, ...]  # tried below root, in order ("" = root itself)
    files: dict[str, tuple[str, ...]]  # split -> required file names
    expected: dict[str, str]  # split -> human description for error messages
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
        s: f"{sub}/{' and '.join(f + '[.gz]' for f in files)} or the same files directly in the root"
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
    "mnist": _Layout(("MNIST/raw", ""), _MNIST_FILES, _mnist_expected("MNIST/raw"), gz_ok=True),
    "fashion-mnist": _Layout(
        ("FashionMNIST/raw", ""), _MNIST_FILES, _mnist_expected("FashionMNIST/raw"), gz_ok=True
    ),
}
_LAYOUTS["cifar100-20"] = _LAYOUTS["cifar100"]


def _find_in(directory: Path, name: str, gz_ok: bool) -> Path | None:
    for candidate in (name, name + ".gz") if gz_ok else (name,):
        path = directory / candidate
        if path.is_file():
            return path
    return None


def _locate(key: str, root: Path, split: str) -> dict[str, Path] | None:
    """Paths of the files ``split`` needs, all from the first directory holding all of them."""
    layout = _LAYOUTS[key]
    dirs = [root / sub if sub else root for sub in layout.subdirs]
    dirs += [Path(d) for d in SYSTEM_DATASET_DIRS.get(key, ())]
    names = layout.files[split]
    for directory in dirs:
        found = {name: _find_in(directory, name, layout.gz_ok) for name in names}
        if all(p is not None for p in found.values()):
            return found  # type: ignore[return-value]
    return None


def _not_found(key: str, root: Path, split: str) -> RelreasonError:
    expected = _LAYOUTS[key].expected[split]
    fix = "pass --download to fetch it or --data-root to point at it"
    if key == "fashion-mnist":
        searched = ", ".join(SYSTEM_DATASET_DIRS.get(key, ())) or "no system directory"
        fix = (
            "pass --download to fetch it, --data-root to point at it, or run "
            f"'apt-get install dataset-fashion-mnist' (searched also {searched})"
        )
    return RelreasonError(
        f"dataset '{key}' (split '{split}') not found under {root} (expected {expected}); {fix}"
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
        msg = " ".join(str(exc).split()) or type(exc).__name__
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


def _read_stl10(files: dict[str, Path], split: str) -> ArrayImageDataset:
    classes = _stl_classes(next(iter(files.values())).parent)
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


def _read_mnist_family(files: dict[str, Path], split: str, classes: list[str]) -> ArrayImageDataset:
    img_path, lab_path = files.values()
    x = formats.read_idx(img_path, expected_ndim=3)
    y = formats.read_idx(lab_path, expected_ndim=1)
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


_READERS: dict[str, Callable[[dict[str, Path], str], Dataset]] = {
    "cifar10": _read_cifar10,
    "cifar100": lambda f, s: _read_cifar100(f, s, coarse=False),
    "cifar100-20": lambda f, s: _read_cifar100(f, s, coarse=True),
    "stl10": _read_stl10,
    "svhn": _read_svhn,
    "mnist": lambda f, s: _read_mnist_family(f, s, _DIGIT_CLASSES),
    "fashion-mnist": lambda f, s: _read_mnist_family(f, s, _FASHION_CLASSES),
}


def _held_out_count(test_fraction: float, class_size: int) -> int:
    """How many of a class's images a split holds out: the fraction of them, rounded half up."""
    return int(np.floor(test_fraction * class_size + 0.5))


def stratified_split(labels: np.ndarray, test_fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Stratified, seeded train/test index split (sorted indices): ``test_fraction`` of each class, rounded."""
    perm = np.random.default_rng(seed).permutation(labels.shape[0])
    test: list[np.ndarray] = []
    for c in np.unique(labels):
        members = perm[labels[perm] == c]
        test.append(members[: _held_out_count(test_fraction, members.shape[0])])
    test_idx = np.sort(np.concatenate(test))
    mask = np.ones(labels.shape[0], dtype=bool)
    mask[test_idx] = False
    return np.flatnonzero(mask), test_idx


def _load_digits(split: str) -> ArrayImageDataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.clip(np.rint(bunch.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    labels = np.asarray(bunch.target, dtype=np.int64)
    train_idx, test_idx = stratified_split(labels)
    idx = train_idx if split == "train" else test_idx
    return ArrayImageDataset(np.ascontiguousarray(images[idx]), labels[idx], list(_DIGIT_CLASSES))


#: Subfolders that hold a folder's held-out images, in the order they are looked for (ImageNet-style: val/).
TEST_DIR_NAMES = ("test", "val", "validation")


def test_dir_of(root: str | os.PathLike) -> Path | None:
    """``root/test`` (or ``root/val``, ``root/validation``) when ``root`` also holds ``train/``: the folder's own split; else None."""
    root = Path(root).expanduser()
    if not (root / "train").is_dir():
        return None
    return next((root / name for name in TEST_DIR_NAMES if (root / name).is_dir()), None)


def has_split_dirs(root: str | os.PathLike) -> bool:
    """Whether an image folder holds ``train/`` and ``test/``, ``val/`` or ``validation/`` (then pretraining reads ``train/``)."""
    return test_dir_of(root) is not None


def _load_folder(root: Path, split: str) -> ImageFolderDataset:
    test_dir = test_dir_of(root)
    if split == "train":
        return ImageFolderDataset(root / "train" if test_dir is not None else root)
    if test_dir is None:
        raise RelreasonError(
            f"image folder {root} has no train/ and test/ (or val/ or validation/) subfolders, so it has no 'test' split; "
            "split the images into train/ and test/, each with one subfolder per class (relreason evaluate can "
            "instead hold out a share of each class with --test-fraction)"
        )
    train = ImageFolderDataset(root / "train")
    return ImageFolderDataset(test_dir, classes=train.classes)


def _rank_in_class(paths: Sequence[str], seed: int) -> np.ndarray:
    """A seeded order of files that depends on each file's own name: adding or removing one moves no other."""
    keys = [hashlib.sha1(f"{seed}:{path}".encode()).hexdigest() for path in paths]
    return np.argsort(np.asarray(keys), kind="stable")


def _check_fraction_range(test_fraction: Any) -> None:
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)) or not 0 < test_fraction < 1:
        raise RelreasonError(f"--test-fraction must lie in (0, 1), got {test_fraction!r}; pass e.g. 0.2")


def check_test_fraction(name: str, test_fraction: float | None) -> None:
    """``--test-fraction`` needs a fraction in (0, 1) and an image folder (named datasets have a test split)."""
    if test_fraction is None:
        return
    _check_fraction_range(test_fraction)
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


def split_image_folder(
    root: str | os.PathLike, test_fraction: float, seed: int = 0
) -> tuple[ImageFolderDataset, ImageFolderDataset]:
    """A labelled folder without train/ and test/ as two disjoint parts: ``test_fraction`` of each class
    (rounded) held out for testing, the rest for training.

    Within a class the held-out files are those first in an order seeded by each file's path relative to
    ``root``, so a file keeps its side when others are added or removed (at most one file per changed class
    crosses, where the rounded count moves) and when the folder is moved.
    """
    _check_fraction_range(test_fraction)
    folder = ImageFolderDataset(root)
    if folder.labels is None:
        raise RelreasonError(
            f"image folder {folder.root} has no classes ({folder.why_unlabelled}); --test-fraction splits a folder "
            "with one subfolder per class"
        )
    relative = [path.relative_to(folder.root).as_posix() for path in folder.paths]
    test: list[int] = []
    for label, name in enumerate(folder.classes or []):
        members = np.flatnonzero(folder.labels == label)
        if len(members) == 0:
            continue
        held_out = _held_out_count(test_fraction, len(members))
        if held_out >= len(members):
            raise RelreasonError(
                f"--test-fraction {test_fraction:g} of class '{name}' ({len(members)} image(s)) leaves none of it to "
                "train on; choose a smaller fraction or add images to that class"
            )
        order = _rank_in_class([relative[i] for i in members], seed)
        test.extend(members[order[:held_out]].tolist())
    test_idx = np.sort(np.asarray(test, dtype=np.int64))
    train_idx = np.setdiff1d(np.arange(len(folder)), test_idx)
    if len(test_idx) == 0:
        raise RelreasonError(
            f"--test-fraction {test_fraction:g} of the {len(folder)} images of {folder.root} rounds to no test image "
            "in any class; choose a larger fraction"
        )
    train, test = folder.subset(train_idx), folder.subset(test_idx)
    train.held_out = len(test)
    return train, test


def load_dataset(
    name: str,
    root: str | os.PathLike | None,
    split: str = "train",
    download: bool = False,
) -> Dataset:
    """Load split ``split`` of dataset ``name`` (one of :data:`DATASET_NAMES`) from ``root``.

    Files are looked for in torchvision's layout under ``root`` (and in ``root``
    itself; for ``fashion-mnist`` also in :data:`SYSTEM_DATASET_DIRS`). If they are
    missing and ``download`` is true, torchvision fetches them into ``root`` first.
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
        return _load_digits(split)
    if root is None:
        raise RelreasonError(f"dataset '{key}' needs a data directory; pass --data-root")
    root = Path(root).expanduser()
    if key == "folder":
        return _load_folder(root, split)
    files = _locate(key, root, split)
    if files is None and download:
        _download(key, root, split)
        files = _locate(key, root, split)
    if files is None:
        raise _not_found(key, root, split)
    return _READERS[key](files, split)
