"""Images held in memory as one uint8 array, served as PIL images like every dataset here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from relreason.errors import RelreasonError, one_line


def _check_labels(labels: object, n: int) -> np.ndarray | None:
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

    #: The files the images were read from (a named dataset's, set by its loader): what a feature cache is of.
    source_files: tuple[Path, ...] = ()

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
        msg = one_line(exc)
        raise RelreasonError(
            f"image mode {mode!r} cannot be converted to RGB ({msg}); save the image as RGB or greyscale"
        ) from None
