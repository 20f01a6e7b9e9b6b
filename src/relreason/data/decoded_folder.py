"""An image folder decoded once into memory at the training size, so its views can be made in batches.

The per-image path decodes every file again for every view it makes. For ``--augment tensor`` a folder is
read once instead: each image is resized (short side) and centre-cropped to the training size, exactly as
:func:`relreason.data.eval_transform` does before evaluation, and the folder becomes one uint8 array. The
random resized crops are then taken from that square rather than from the original file: the same views
for images already at the training size; for larger photos the edges outside the central square are never
seen, and small crops are upsampled from fewer pixels. ``--augment pil`` keeps cropping the original files.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from relreason.checks import check_positive_int
from relreason.data.array_dataset import ArrayImageDataset
from relreason.data.image_folder import ImageFolderDataset, decoded_for, read_in_threads, read_threads
from relreason.data.transforms import square_crop
from relreason.errors import RelreasonError, format_bytes
from relreason.memory import available_memory_bytes

__all__ = ["DecodedImageFolder", "decoding_too_large"]

#: The decoded images may take at most this share of the memory available when decoding starts.
MEMORY_SHARE = 0.5


def decoding_too_large(n: int, image_size: int, copies: int = 2, processes: int | None = None) -> str | None:
    """Why ``n`` images may not be decoded into memory at ``image_size`` ("needs X of memory, more than 50% of the
    Y available"), or None when they fit (or the memory available is unknown). By default two copies at the peak
    (the array, and the channels-first tensor the views are made from) in each of the processes torchrun started
    on this machine, all decoding at once."""
    if processes is None:
        processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    needed = copies * n * image_size * image_size * 3 * processes
    available = available_memory_bytes()
    if available is None or needed <= MEMORY_SHARE * available:
        return None
    each = f" ({processes} processes)" if processes > 1 else ""
    return (f"needs {format_bytes(needed)} of memory{each}, more than {MEMORY_SHARE:.0%} of the "
            f"{format_bytes(available)} available")


class DecodedImageFolder(ArrayImageDataset):
    """Every image of ``folder`` as one ``(N, S, S)`` (all grey) or ``(N, S, S, 3)`` uint8 array, S = ``image_size``.

    Image ``i`` is ``center_crop(resize(folder[i], S), S)``, a JPEG decoded no larger than that needs
    (:func:`relreason.data.image_folder.decoded_for`; a folder that sets its ``decode_side`` keeps it). For an
    unreadable file that is the next readable image with its label, as the folder itself substitutes, and the
    file is listed in the folder's skip log
    (:meth:`log_skips_to` passes through to the folder). Labels and classes are the folder's. Files are
    decoded by ``threads`` threads (PIL releases the interpreter lock while it decodes and resizes); the order
    and the result do not depend on their number. ``copies`` and ``processes`` say what the memory check counts
    (:func:`decoding_too_large`).
    """

    def __init__(
        self, folder: ImageFolderDataset, image_size: int, threads: int | None = None, progress: bool = False,
        copies: int = 2, processes: int | None = None,
    ) -> None:
        image_size = check_positive_int(image_size, "image size", example=32)
        n = len(folder)
        too_large = decoding_too_large(n, image_size, copies, processes)
        if too_large:
            raise RelreasonError(
                f"decoding the {n} images of {folder.root} at {image_size}x{image_size} {too_large}; use --augment pil "
                "(reads files as it goes) or a smaller --image-size"
            )
        start = time.perf_counter()
        images = np.empty((n, image_size, image_size, 3), dtype=np.uint8)
        labels = np.full(n, -1, dtype=np.int64)

        square = square_crop(image_size)
        # Either shares the folder's skipped files and skip log.
        reader = folder if folder.decode_side is not None else decoded_for(folder, image_size)

        def decode(index: int) -> None:
            image, labels[index] = reader[index]
            images[index] = np.asarray(square(image))

        workers = threads if threads is not None else read_threads(folder)
        # A bar, as a large folder takes minutes; a worker's exception is raised here.
        with tqdm(total=n, desc="decoding images", unit="image", disable=None if progress else True, leave=False,
                  dynamic_ncols=True) as bar:
            for done in read_in_threads(decode, n, workers):
                bar.update(done)
        grey = bool((images[..., 0] == images[..., 1]).all() and (images[..., 0] == images[..., 2]).all())
        if grey:  # a third of the memory, and the batched augmentation works on the one channel
            images = np.ascontiguousarray(images[..., 0])
        super().__init__(images, labels if folder.labels is not None else None, folder.classes)
        self.folder = folder
        self.decode_seconds = time.perf_counter() - start

    @property
    def root(self) -> Path:
        return self.folder.root

    @property
    def skipped(self) -> dict[str, str]:
        return self.folder.skipped

    @property
    def skip_log(self) -> Path | None:
        return self.folder.skip_log

    def log_skips_to(self, path: str | os.PathLike) -> None:
        self.folder.log_skips_to(path)

    def describe(self) -> str:
        """One line for the training log: what was decoded, at which size, how much memory, how long."""
        shape = "grey" if self.images.ndim == 3 else "RGB"
        return (f"decoded {len(self)} images of {self.root} into memory at {self.images.shape[1]}x{self.images.shape[2]} "
                f"{shape} ({format_bytes(self.images.nbytes)}) in {self.decode_seconds:.1f}s")
