"""Image transforms: the relational-reasoning augmentation and the evaluation transform."""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from relreason.checks import check_positive_int
from relreason.data.array_dataset import pil_to_rgb
from relreason.errors import RelreasonError

__all__ = ["relational_augmentation", "eval_transform", "ToRGB"]


class ToRGB:
    """A PIL image in any mode (grey, palette, RGBA, CMYK, 16-bit, ...) as RGB, as the datasets read them
    (:func:`relreason.data.pil_to_rgb`): the jitter and Normalize steps expect three channels. A uint8 array
    ``(H, W)`` or ``(H, W, C)``, or a uint8 tensor ``(C, H, W)`` or ``(H, W)`` (one image of a torchvision dataset's
    ``data``), is taken as that image; anything else is refused in one line."""

    def __call__(self, image: Any) -> Image.Image:
        if isinstance(image, Image.Image):
            return pil_to_rgb(image)
        given = image
        if isinstance(image, np.ndarray) and image.dtype == np.uint16 and image.ndim == 2:  # 16-bit grey, as PIL's I;16
            return pil_to_rgb(Image.fromarray(image))
        if isinstance(image, torch.Tensor) and image.dtype == torch.uint8 and image.dim() in (2, 3):
            image = image.numpy(force=True)
            image = image if image.ndim == 2 else image.transpose(1, 2, 0)  # channels first, as tensors hold them
        if isinstance(image, np.ndarray) and image.dtype == np.uint8 and (
                image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (1, 3, 4))):
            return pil_to_rgb(Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[2] == 1 else image))
        kind = (f"a {given.dtype} {type(given).__name__} shaped {tuple(given.shape)}"
                if isinstance(given, (np.ndarray, torch.Tensor)) else type(given).__name__)
        raise RelreasonError(
            f"the per-image transforms take one image (a PIL image, a uint8 (H, W[, C]) array or a uint8 (C, H, W) "
            f"tensor), got {kind}; convert it so, or make views of a batch of uint8 tensors with "
            "BatchRelationalAugmentation"
        )

    def __repr__(self) -> str:
        return "ToRGB()"


def check_normalization(image_size: int, mean: Sequence[float] | None, std: Sequence[float] | None
                        ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)`` as three floats each, or a one-line error for a bad image size, mean or std."""
    check_positive_int(image_size, "image size", example=32)
    if mean is None or std is None:
        raise RelreasonError(
            "normalisation mean/std are missing; compute them with compute_normalization(dataset) or pass them explicitly"
        )
    mean_t, std_t = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    if len(mean_t) != 3 or len(std_t) != 3:
        raise RelreasonError(
            f"mean and std need 3 values (R, G, B), got {len(mean_t)} and {len(std_t)}; repeat a grey value 3 times"
        )
    if not all(math.isfinite(s) and s > 0 for s in std_t) or not all(math.isfinite(m) for m in mean_t):
        raise RelreasonError(f"std must be positive and finite and mean finite, got mean {mean_t} std {std_t}; fix the normalisation values")
    # Views are normalised on the 0-1 scale of ToTensor and of the batched path; values on the 0-255 scale would
    # squash every view to a near-constant image without any error.
    if not all(0 <= m <= 1 for m in mean_t) or not all(s <= 1 for s in std_t):
        raise RelreasonError(f"mean and std are taken on pixel values in [0, 1], got mean {mean_t} std {std_t}; "
                             "values on the 0-255 scale must be divided by 255")
    return mean_t, std_t


def check_crop_scale(min_scale: float) -> tuple[float, float]:
    """The crop-area range ``(min_scale, 1)`` of the random resized crop, or a one-line error."""
    if isinstance(min_scale, bool) or not isinstance(min_scale, (int, float)) or not 0 < min_scale <= 1:
        raise RelreasonError(
            f"the smallest crop (--min-crop-scale) must be a fraction of the image area in (0, 1], got {min_scale!r}; "
            "pass e.g. 0.08 (the paper's)"
        )
    return float(min_scale), 1.0


# The paper's augmentation, in one place for both paths (relational_augmentation here, AugmentationRecipe for the
# batched views), so that they cannot drift apart.
#: The smallest random crop, as a fraction of the image's area (--min-crop-scale's default).
MIN_CROP_SCALE = 0.08
#: Aspect-ratio range of the random resized crop (width / height).
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
#: ColorJitter's (brightness, contrast, saturation, hue) at --jitter-strength 1.
JITTER = (0.8, 0.8, 0.8, 0.2)
#: Probabilities of the horizontal flip, of the colour jitter and of greyscale.
FLIP_P, JITTER_P, GRAYSCALE_P = 0.5, 0.8, 0.2


def smallest_crop_side(min_scale: float) -> float:
    """The shortest side a random resized crop of at least ``min_scale`` of the area can have, as a fraction of the
    image's short side (a crop of the smallest area at the most elongated ratio)."""
    return math.sqrt(check_crop_scale(min_scale)[0] * CROP_RATIO[0])


#: Largest --jitter-strength: the hue shift, 0.2 x strength, may not pass half the colour circle.
MAX_JITTER_STRENGTH = 2.5


def jitter_amounts(strength: float = 1.0) -> tuple[float, float, float, float]:
    """ColorJitter's (brightness, contrast, saturation, hue) at ``strength`` times the paper's (0.8, 0.8, 0.8, 0.2),
    or a one-line error for a strength outside [0, 2.5]."""
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 <= strength <= MAX_JITTER_STRENGTH:
        raise RelreasonError(
            f"the colour jitter strength (--jitter-strength) must lie in [0, {MAX_JITTER_STRENGTH}], got {strength!r}; "
            "pass 1 for the paper's jitter or 0 for none"
        )
    strength = float(strength)
    brightness, contrast, saturation, hue = (amount * strength for amount in JITTER)
    return brightness, contrast, saturation, hue


def relational_augmentation(
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    min_crop_scale: float = MIN_CROP_SCALE,
    jitter_strength: float = 1.0,
) -> T.Compose:
    """The augmentation of Patacchiola & Storkey (2020), in the paper's order.

    Random resized crop (scale 0.08..1, ratio 3/4..4/3, bilinear), horizontal flip,
    colour jitter (0.8, 0.8, 0.8, 0.2) with probability 0.8, greyscale with
    probability 0.2, then ToTensor and Normalize. Input: a PIL image (or a uint8 image array), made RGB first
    (``ToRGB``).
    ``min_crop_scale`` replaces the 0.08: the smallest crop, as a fraction of the image's area;
    ``jitter_strength`` scales the four jitter amounts (0: no jitter).
    """
    mean_t, std_t = check_normalization(image_size, mean, std)
    return T.Compose(
        [
            ToRGB(),
            T.RandomResizedCrop(
                image_size,
                scale=check_crop_scale(min_crop_scale),
                ratio=CROP_RATIO,
                interpolation=InterpolationMode.BILINEAR,
            ),
            T.RandomHorizontalFlip(p=FLIP_P),
            T.RandomApply([T.ColorJitter(*jitter_amounts(jitter_strength))], p=JITTER_P),
            T.RandomGrayscale(p=GRAYSCALE_P),
            T.ToTensor(),
            T.Normalize(mean_t, std_t),
        ]
    )


def square_crop(image_size: int) -> T.Compose:
    """Resize the short side to ``image_size`` and centre-crop a square: how evaluation sees an image (and
    how an image folder is decoded for the batched augmentation)."""
    return T.Compose([T.Resize(image_size, interpolation=InterpolationMode.BILINEAR), T.CenterCrop(image_size)])


def eval_transform(image_size: int, mean: Sequence[float], std: Sequence[float]) -> T.Compose:
    """Deterministic transform: RGB, resize the short side, centre-crop, ToTensor, Normalize."""
    mean_t, std_t = check_normalization(image_size, mean, std)
    return T.Compose([ToRGB(), *square_crop(image_size).transforms, T.ToTensor(), T.Normalize(mean_t, std_t)])
