"""A folder of image files, read lazily, with its classes from its subfolders and its unreadable files logged."""

from __future__ import annotations

import copy
import hashlib
import math
import numbers
import os
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence, TypeVar

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset

from relreason.data.array_dataset import pil_to_rgb
from relreason.errors import RelreasonError, one_line, short_reason

if TYPE_CHECKING:
    from typing_extensions import Self

DatasetT = TypeVar("DatasetT")

IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm",
)

#: Photo formats a folder may hold that relreason leaves out, counted so that pretraining can say so: HEIC and
#: camera RAW (which PIL does not read) and image files under other names than those above.
OTHER_IMAGE_EXTENSIONS: frozenset[str] = frozenset(Image.registered_extensions()) - {
    *IMAGE_EXTENSIONS, ".pdf", ".ps", ".eps", ".h5", ".hdf", ".grib", ".bufr", ".mpg", ".mpeg",  # not photos
} | {".heic", ".heif", ".jxl", ".dng", ".cr2", ".cr3", ".nef", ".arw", ".raf", ".orf", ".rw2", ".raw"}


_EXIF_ORIENTATION = 0x0112


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _scan_images(root: Path) -> tuple[list[tuple[str, ...]], dict[str, int]]:
    """Relative path parts of every image file under ``root``, sorted, hidden entries skipped; and how many files
    of other image formats were left out, by extension."""
    found: list[tuple[str, ...]] = []
    left_out: dict[str, int] = {}
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
            if _is_hidden(fname):
                continue
            extension = os.path.splitext(fname)[1].lower()
            if extension in IMAGE_EXTENSIONS:
                found.append(rel + (fname,))
            elif extension in OTHER_IMAGE_EXTENSIONS:
                left_out[extension] = left_out.get(extension, 0) + 1
    found.sort()
    return found, dict(sorted(left_out.items()))


def describe_left_out(left_out: dict[str, int]) -> str:
    """``{".heic": 4, ".jfif": 1}`` as "5 files of other formats (4 .heic, 1 .jfif)"."""
    total = sum(left_out.values())
    kinds = ", ".join(f"{count} {extension}" for extension, count in left_out.items())
    return f"{total} file{'s' if total != 1 else ''} of other formats ({kinds})"


def _skip_line(path: str, reason: str) -> bytes:
    """``b"<path>\\t<reason>\\n"``: the path as its file-system bytes, the reason as UTF-8.

    The reason holds no tab or newline (whitespace is collapsed); a newline or
    carriage return inside the path is written as ``\\n`` / ``\\r`` so that
    every record stays on one line (such names do not round-trip exactly).
    """
    raw = os.fsencode(path).replace(b"\n", b"\\n").replace(b"\r", b"\\r")
    return raw + b"\t" + one_line(reason).encode("utf-8", "backslashreplace") + b"\n"


def read_skip_log(path: str | os.PathLike) -> dict[str, str]:
    """Read a skip log written by :class:`ImageFolderDataset` (``skip_log=``).

    Returns ``{image path inside the folder: reason}`` with each path once (the first reason
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
            f"cannot read skip log {path} ({one_line(exc)}); pass the file given as skip_log"
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


#: A JPEG is decoded at 1/2, 1/4 or 1/8 of its size (PIL's draft: several times faster for camera photos) when its short
#: side keeps at least this many times the pixels its use needs; the antialiased resize that follows then gives the
#: full decode's pixels to within about one grey level on average.
DRAFT_MARGIN = 4


def decoded_for(dataset: DatasetT, image_size: int, smallest_crop: float = 1.0) -> DatasetT:
    """``dataset`` for use at ``image_size`` px from crops whose side is at least ``smallest_crop`` of an image's
    short side: an :class:`ImageFolderDataset` (a copy) then decodes its JPEGs only as large as that needs
    (:data:`DRAFT_MARGIN`); any other dataset is returned as it is."""
    if not isinstance(dataset, ImageFolderDataset):
        return dataset
    return dataset.decoded_at_least(math.ceil(DRAFT_MARGIN * image_size / smallest_crop))


def read_threads(dataset: Any) -> int:
    """Threads worth reading ``dataset`` with: for an image folder up to 8 (PIL decodes and resizes without the
    interpreter lock), else 1."""
    return min(8, os.cpu_count() or 1) if isinstance(dataset, ImageFolderDataset) else 1


def read_in_threads(read: Callable[[int], Any], n: int, threads: int, chunk: int = 64) -> Iterator[int]:
    """Call ``read(i)`` for every ``i < n`` on ``threads`` threads, at most ``chunk`` indices a task (few tasks, and
    no result kept), yielding each chunk's count in order as it is done; a call's error is raised here."""
    chunk = max(1, min(chunk, math.ceil(n / (4 * max(1, threads)))))  # a small folder still feeds every thread

    def read_chunk(start: int) -> int:
        end = min(start + chunk, n)
        for index in range(start, end):
            read(index)
        return end - start

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        yield from pool.map(read_chunk, range(0, n, chunk))


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
    line ``"<path inside root>\\t<reason>\\n"`` is appended to that file with a single
    ``os.write`` on an ``O_APPEND`` descriptor, so all worker processes can log
    to it safely; read it with :func:`read_skip_log`. If no image at all can be
    read, ``self[i]`` raises :class:`RelreasonError`. :meth:`load_image` does not
    substitute: it raises :class:`RelreasonError` for a bad file.

    PIL's ``ImageFile.LOAD_TRUNCATED_IMAGES`` is left off, so a truncated file
    raises (and is skipped) rather than being half decoded. JPEGs are decoded at
    full size unless :meth:`decoded_at_least` (a copy that shares ``skipped`` and
    the skip log) asks for less.
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
        rel, left_out = _scan_images(self.root)
        #: Files of image formats relreason does not read (HEIC, RAW, .jfif, ...), by extension: left out.
        self.left_out: dict[str, int] = left_out
        if not rel:
            others = f" (it holds {describe_left_out(left_out)}: convert them to JPEG or PNG)" if left_out else ""
            raise RelreasonError(
                f"no image files ({' '.join(IMAGE_EXTENSIONS)}) found under {self.root}{others}; "
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
        #: JPEGs are decoded at reduced scale while their short side keeps at least this many pixels (None: full size).
        self.decode_side: int | None = None
        #: Photos are turned as their EXIF orientation says (a phone's portrait photo is stored sideways).
        self.upright = True
        self._log_warned = False
        if skip_log is not None:
            self.log_skips_to(skip_log)

    def subset(self, indices: Sequence[int] | np.ndarray) -> ImageFolderDataset:
        """The images at ``indices`` (in that order) as a folder dataset of their own, with the same classes; an
        unreadable one is replaced by the next readable image of the subset."""
        part = copy.copy(self)
        part.paths = [self.paths[int(i)] for i in indices]
        part.labels = None if self.labels is None else self.labels[np.asarray(indices, dtype=np.int64)]
        part.skipped = {}
        return part

    def decoded_at_least(self, side: int | None) -> Self:
        """This dataset (a copy sharing its skipped files and skip log) whose JPEGs are decoded at the largest
        reduction, 1/2, 1/4 or 1/8, that keeps both sides at least ``side`` pixels; None decodes at full size."""
        if side is not None and (isinstance(side, bool) or not isinstance(side, numbers.Integral) or side < 1):
            raise RelreasonError(f"decode side must be a positive whole number of pixels or None, got {side!r}")
        copied = copy.copy(self)
        copied.decode_side = None if side is None else int(side)
        return copied

    def read_as_stored(self) -> Self:
        """This dataset (a copy sharing its skipped files and skip log) reading photos as stored, their EXIF
        orientation not applied: as versions before it did, for the statistics of runs they started."""
        copied = copy.copy(self)
        copied.upright = False
        return copied

    def log_skips_to(self, path: str | os.PathLike) -> None:
        """Append every skipped file to ``path`` from now on, starting with those skipped already (e.g. while
        the normalisation statistics were computed)."""
        self.skip_log = Path(path).expanduser()
        try:  # fail now, not hours into training; creates an empty log
            os.close(os.open(self.skip_log, _LOG_FLAGS, 0o644))
        except OSError as exc:
            raise RelreasonError(
                f"cannot open skip log {self.skip_log} for appending ({one_line(exc)}); "
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
                if self.decode_side is not None:
                    img.draft(None, (self.decode_side, self.decode_side))  # JPEG only; other formats ignore it
                img.load()  # decode now: truncated / corrupt data raises here
                if img.width < 1 or img.height < 1:
                    raise ValueError(f"image has size {img.width}x{img.height}")
                if self.upright and img.getexif().get(_EXIF_ORIENTATION, 1) != 1:
                    return pil_to_rgb(ImageOps.exif_transpose(img))
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
                reason = short_reason(exc, limit=None)
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

    def seeded_order(self, seed: int) -> list[int]:
        """All indices, ordered by a seeded hash of each file's path inside the root: an order that adding or
        removing a file, or moving the folder, does not change for the others."""

        def rank(index: int) -> bytes:
            return hashlib.blake2b(f"{seed}/{self._name_in_root(self.paths[index])}".encode("utf-8", "surrogateescape"),
                                  digest_size=16).digest()

        return sorted(range(len(self.paths)), key=rank)

    def _name_in_root(self, path: str | os.PathLike) -> str:
        """``path`` inside the root (as given, or as it stands when it lies elsewhere), whatever spells the root."""
        try:
            return Path(path).relative_to(self.root).as_posix()
        except ValueError:
            return str(path)

    def read_or_skip(self, index: int) -> Image.Image | None:
        """Image ``index`` as RGB, or None when it cannot be read (recorded as skipped, like ``self[index]`` does,
        which returns the next readable image instead)."""
        key = str(self.paths[index])
        if key in self.skipped:
            return None
        try:
            return self._read(index)
        except _UnreadableImage as exc:
            self._record_skip(key, str(exc))
            return None

    def _record_skip(self, path: str, reason: str) -> None:
        self.skipped[path] = reason
        # Logged by its path inside the root: a resume that spells the root otherwise (relative to another
        # working folder, absolute, or after the folder moved) finds the same file already listed.
        logged = self._name_in_root(path)
        # The log itself says what is listed: a resumed run's earlier entries, and those of DataLoader workers
        # (forked copies of this dataset). Each process meets a bad file once (then it is in ``skipped``), unless two
        # of its reading threads meet it at once: a line may then repeat, and read_skip_log keeps one per file.
        if self.skip_log is None or logged in read_skip_log(self.skip_log):
            return
        try:
            fd = os.open(self.skip_log, _LOG_FLAGS, 0o644)
            try:
                os.write(fd, _skip_line(logged, reason))  # one write on O_APPEND: lines never interleave
            finally:
                os.close(fd)
        except OSError as exc:  # a full disk must not stop training; say so once per process
            if not self._log_warned:
                self._log_warned = True
                warnings.warn(
                    f"relreason: could not append to skip log {self.skip_log} ({one_line(exc)}); "
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
            image = self.read_or_skip(j)
            if image is None:
                continue
            label = -1 if self.labels is None else int(self.labels[j])
            return image, label
        example = str(self.paths[index])
        raise RelreasonError(
            f"no readable image under {self.root} (all {n} image files failed, e.g. {example}: "
            f"{self.skipped.get(example, 'unreadable')}); replace the broken files or point --data-root "
            "at a folder of valid images"
        )
