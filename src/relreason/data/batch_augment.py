"""The paper's augmentation applied to a whole batch of views at once, on the device that holds the images.

Every view draws its own random parameters (crop box, flip, jitter factors and order, greyscale), as the
per-image torchvision pipeline does, but the work is a handful of batched tensor operations:

* random resized crop + horizontal flip + resize: one pair of batched matrix products with per-view
  bilinear interpolation matrices built like PIL's resampler (a triangle filter widened when shrinking,
  so downscaling is antialiased as it is with PIL images); for small images every possible line matrix is
  precomputed once, so a batch's matrices are one table lookup;
* colour jitter: brightness, contrast, saturation and hue as torchvision's tensor functions define them,
  in a random order per view, applied with probability ``jitter_p``;
* greyscale with probability ``grayscale_p`` (ITU-R 601-2 luma, as torchvision and PIL), then normalisation.

Differences from the PIL pipeline: intermediate results stay in float instead of being rounded to uint8
after every operation, contrast uses the exact mean of the greyscale image (PIL rounds it to an integer),
and hue is shifted in float HSV as torchvision's tensor ``adjust_hue`` does, where PIL goes through 8-bit
HSV (the same shift, but up to ~17 grey levels apart on some pixels; under one level on average).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch

from relreason.checks import check_positive_int
from relreason.data.transforms import (
    CROP_RATIO,
    FLIP_P,
    GRAYSCALE_P,
    JITTER,
    JITTER_P,
    MIN_CROP_SCALE,
    check_crop_scale,
    check_normalization,
    jitter_amounts,
)
from relreason.errors import RelreasonError

__all__ = [
    "AugmentationRecipe",
    "BatchRelationalAugmentation",
    "ViewParameters",
    "adjust_brightness",
    "adjust_contrast",
    "adjust_hue",
    "adjust_saturation",
    "color_jitter",
    "resized_crop",
    "sample_crop_boxes",
    "sample_view_parameters",
]

_LUMA = (0.299, 0.587, 0.114)


@dataclass(frozen=True)
class AugmentationRecipe:
    """The knobs of the relational-reasoning augmentation; the defaults are the paper's."""

    scale: tuple[float, float] = (MIN_CROP_SCALE, 1.0)
    ratio: tuple[float, float] = CROP_RATIO
    flip_p: float = FLIP_P
    brightness: float = JITTER[0]
    contrast: float = JITTER[1]
    saturation: float = JITTER[2]
    hue: float = JITTER[3]
    jitter_p: float = JITTER_P
    grayscale_p: float = GRAYSCALE_P

    def __post_init__(self) -> None:
        # The ranges torchvision's RandomResizedCrop and ColorJitter accept, so a recipe means the same on both paths.
        low, high = _pair(self.scale, "scale")
        if not 0 < low <= high <= 1:
            raise RelreasonError(f"the crop scale must satisfy 0 < low <= high <= 1, got {self.scale}; "
                                 "e.g. (0.08, 1.0)")
        low, high = _pair(self.ratio, "ratio")
        if not 0 < low <= high:
            raise RelreasonError(f"the crop aspect ratio must satisfy 0 < low <= high, got {self.ratio}; "
                                 "e.g. (0.75, 1.33)")
        for name in ("flip_p", "jitter_p", "grayscale_p"):
            if not _is_real(getattr(self, name)) or not 0 <= getattr(self, name) <= 1:
                raise RelreasonError(f"{name} is a probability and must lie in [0, 1], got {getattr(self, name)!r}")
        for name in ("brightness", "contrast", "saturation"):
            if not _is_real(getattr(self, name)) or not 0 <= getattr(self, name) < math.inf:
                raise RelreasonError(f"{name} must be a finite number >= 0, got {getattr(self, name)!r}")
        if not _is_real(self.hue) or not 0 <= self.hue <= 0.5:
            raise RelreasonError(f"hue must lie in [0, 0.5] (half the colour circle), got {self.hue!r}")

    @classmethod
    def from_options(cls, min_crop_scale: float = MIN_CROP_SCALE, jitter_strength: float = 1.0) -> AugmentationRecipe:
        """The paper's recipe with ``--min-crop-scale`` and ``--jitter-strength`` applied (one-line errors for values
        out of range), as :func:`relreason.data.relational_augmentation` takes them."""
        brightness, contrast, saturation, hue = jitter_amounts(jitter_strength)
        return cls(scale=check_crop_scale(min_crop_scale), brightness=brightness, contrast=contrast,
                   saturation=saturation, hue=hue)


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def _pair(value: object, name: str) -> tuple[float, float]:
    if not isinstance(value, (tuple, list)) or len(value) != 2 or not all(_is_real(v) for v in value):
        raise RelreasonError(f"the crop {name} must be two numbers (low, high), got {value!r}")
    return value[0], value[1]


@dataclass
class ViewParameters:
    """The random choices of N views. ``boxes`` rows are ``(top, left, height, width)`` in source pixels;
    ``factors`` columns are brightness, contrast, saturation, hue; ``order[v]`` is the permutation in which
    view ``v`` applies those four operations."""

    boxes: torch.Tensor  # (N, 4) int64
    flip: torch.Tensor  # (N,) bool
    jitter: torch.Tensor  # (N,) bool
    factors: torch.Tensor  # (N, 4) float32
    order: torch.Tensor  # (N, 4) int64
    grayscale: torch.Tensor  # (N,) bool


def _uniform(shape: Sequence[int], low: float, high: float, generator: torch.Generator | None,
             device: torch.device | str | None) -> torch.Tensor:
    return torch.rand(shape, generator=generator, device=device) * (high - low) + low


def sample_crop_boxes(
    num: int,
    height: int,
    width: int,
    scale: tuple[float, float] = (MIN_CROP_SCALE, 1.0),
    ratio: tuple[float, float] = CROP_RATIO,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    tries: int = 10,
) -> torch.Tensor:
    """``num`` crop boxes ``(top, left, height, width)`` drawn as ``RandomResizedCrop.get_params`` draws one.

    Each view gets ``tries`` candidate (area, log-aspect) draws and keeps the first that fits in the image;
    a view with none falls back to the central crop with the aspect ratio clamped into ``ratio``.
    """
    area = height * width
    target_area = area * _uniform((num, tries), scale[0], scale[1], generator, device)
    log_ratio = _uniform((num, tries), math.log(ratio[0]), math.log(ratio[1]), generator, device)
    aspect = torch.exp(log_ratio)
    crop_w = torch.round(torch.sqrt(target_area * aspect))
    crop_h = torch.round(torch.sqrt(target_area / aspect))
    fits = (crop_w > 0) & (crop_w <= width) & (crop_h > 0) & (crop_h <= height)
    first = fits.int().argmax(dim=1, keepdim=True)  # first fitting try (0 when none fits)
    any_fit = fits.any(dim=1)
    crop_w = crop_w.gather(1, first).squeeze(1)
    crop_h = crop_h.gather(1, first).squeeze(1)

    in_ratio = width / height
    if in_ratio < min(ratio):
        fallback_w, fallback_h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        fallback_w, fallback_h = int(round(height * max(ratio))), height
    else:
        fallback_w, fallback_h = width, height
    crop_w = torch.where(any_fit, crop_w, torch.full_like(crop_w, fallback_w))
    crop_h = torch.where(any_fit, crop_h, torch.full_like(crop_h, fallback_h))
    position = torch.rand((num, 2), generator=generator, device=device)
    top = torch.floor(position[:, 0] * (height - crop_h + 1))
    left = torch.floor(position[:, 1] * (width - crop_w + 1))
    top = torch.where(any_fit, top, torch.div(height - crop_h, 2, rounding_mode="floor"))
    left = torch.where(any_fit, left, torch.div(width - crop_w, 2, rounding_mode="floor"))
    return torch.stack([top, left, crop_h, crop_w], dim=1).long()


@lru_cache(maxsize=256)
def _constant(values: tuple[float, ...], device: torch.device | str | None) -> torch.Tensor:
    # Made once per device: copying host values to an accelerator every step would wait for it every step.
    return torch.tensor(values, device=device)


def sample_view_parameters(
    num: int,
    height: int,
    width: int,
    recipe: AugmentationRecipe = AugmentationRecipe(),
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> ViewParameters:
    """Every random choice of ``num`` views of ``height`` x ``width`` images, drawn independently per view."""
    boxes = sample_crop_boxes(num, height, width, recipe.scale, recipe.ratio, generator, device)
    coins = torch.rand((num, 3), generator=generator, device=device)
    low = [max(0.0, 1.0 - recipe.brightness), max(0.0, 1.0 - recipe.contrast), max(0.0, 1.0 - recipe.saturation),
           -recipe.hue]
    high = [1.0 + recipe.brightness, 1.0 + recipe.contrast, 1.0 + recipe.saturation, recipe.hue]
    low_t, high_t = _constant(tuple(low), device), _constant(tuple(high), device)
    factors = torch.rand((num, 4), generator=generator, device=device) * (high_t - low_t) + low_t
    # argsort of i.i.d. uniforms: a uniformly random permutation per view, as torch.randperm(4) per image.
    order = torch.rand((num, 4), generator=generator, device=device).argsort(dim=1)
    return ViewParameters(
        boxes=boxes,
        flip=coins[:, 0] < recipe.flip_p,
        jitter=coins[:, 1] < recipe.jitter_p,
        factors=factors,
        order=order,
        grayscale=coins[:, 2] < recipe.grayscale_p,
    )


def _interpolation_matrices(
    start: torch.Tensor, length: torch.Tensor, in_size: int, out_size: int, flip: torch.Tensor | None = None
) -> torch.Tensor:
    """``(N, out_size, in_size)`` matrices mapping a source line to the resized crop ``[start, start+length)``.

    PIL's bilinear resampling: output pixel ``o`` is centred at ``start + (o + 0.5) * length / out_size``
    and averages the crop's pixels under a triangle filter whose width grows with the shrink factor.
    """
    dtype = torch.float32
    start = start.to(dtype)[:, None, None]
    length = length.to(dtype)[:, None, None]
    out = torch.arange(out_size, device=start.device, dtype=dtype)[None, :, None]
    source = torch.arange(in_size, device=start.device, dtype=dtype)[None, None, :]
    step = length / out_size
    support = torch.clamp(step, min=1.0)
    centre = start + (out + 0.5) * step
    weights = torch.clamp(1.0 - torch.abs((source + 0.5 - centre) / support), min=0.0)
    weights = weights * ((source >= start) & (source < start + length))
    weights = weights / weights.sum(dim=2, keepdim=True)
    if flip is not None:
        weights = torch.where(flip[:, None, None], weights.flip(1), weights)
    return weights


# Tables of every (start, length) line matrix stay below this many floats (28 -> 32 px: 0.7M; 32 -> 32: 1.1M).
_TABLE_LIMIT = 4_000_000


@lru_cache(maxsize=16)
def _interpolation_table(in_size: int, out_size: int, device: torch.device) -> torch.Tensor:
    """``(2, in_size, in_size + 1, out_size, in_size)``: the matrix of every crop line ``[start, start+length)``,
    plain and mirrored, so a batch's matrices are one lookup instead of a dozen passes over ``(N, S, H)``."""
    start, length = torch.meshgrid(torch.arange(in_size), torch.arange(in_size + 1), indexing="ij")
    valid = (length >= 1) & (start + length <= in_size)
    start, length = start.flatten().clamp(max=in_size - 1), length.flatten().clamp(min=1)
    plain = _interpolation_matrices(start, length.clamp(max=in_size - start), in_size, out_size)
    plain = plain * valid.flatten()[:, None, None]
    table = torch.stack([plain, plain.flip(1)]).view(2, in_size, in_size + 1, out_size, in_size)
    return table.to(device)


def _line_matrices(
    start: torch.Tensor, length: torch.Tensor, in_size: int, out_size: int, flip: torch.Tensor | None = None
) -> torch.Tensor:
    """``_interpolation_matrices``, looked up in a table when one is small enough."""
    if 2 * in_size * (in_size + 1) * out_size * in_size > _TABLE_LIMIT or torch.compiler.is_compiling():
        return _interpolation_matrices(start, length, in_size, out_size, flip)
    table = _interpolation_table(in_size, out_size, start.device)
    mirrored = flip.long() if flip is not None else torch.zeros_like(start)
    return table[mirrored, start, length]


def resized_crop(images: torch.Tensor, boxes: torch.Tensor, size: int, flip: torch.Tensor | None = None) -> torch.Tensor:
    """Crop each image ``(N, C, H, W)`` (float) to its box, mirror it where ``flip``, resize to ``size`` x ``size``."""
    _, _, height, width = images.shape
    num, channels = images.shape[:2]
    rows = _line_matrices(boxes[:, 0], boxes[:, 2], height, size)  # (N, S, H)
    cols = _line_matrices(boxes[:, 1], boxes[:, 3], width, size, flip)  # (N, S, W)
    # Columns first, as one batched product over (C * H) rows per view, then rows per channel.
    narrow = torch.bmm(images.to(rows.dtype).reshape(num, channels * height, width), cols.transpose(1, 2))
    return rows[:, None] @ narrow.view(num, channels, height, size)


def _grey(images: torch.Tensor) -> torch.Tensor:
    if images.shape[1] == 1:
        return images
    r, g, b = images.unbind(dim=1)
    return (_LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b).unsqueeze(1)


def _blend(images: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    factor = factor.to(images.dtype)[:, None, None, None]
    return (factor * images + (1.0 - factor) * other).clamp_(0.0, 1.0)


def adjust_brightness(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] scaled by a per-image factor, as ``torchvision.transforms.functional.adjust_brightness``."""
    return (images * factor.to(images.dtype)[:, None, None, None]).clamp_(0.0, 1.0)


def adjust_contrast(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with each image's mean grey level, as ``torchvision.transforms.functional.adjust_contrast``."""
    return _blend(images, _grey(images).mean(dim=(1, 2, 3), keepdim=True), factor)


def adjust_saturation(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with each image's greyscale version, as ``torchvision.transforms.functional.adjust_saturation``."""
    return _blend(images, _grey(images), factor)


def adjust_hue(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Rotate hue by ``factor`` turns (in [-0.5, 0.5]) through HSV, as ``torchvision``'s tensor ``adjust_hue``."""
    r, g, b = images.unbind(dim=1)
    value = images.amax(dim=1)
    chroma = value - images.amin(dim=1)
    # Hue in sixths of a turn, as torchvision's _rgb2hsv, with one division: (g - b) / C when R is the
    # maximum, 2 + (b - r) / C when G is, 4 + (r - g) / C otherwise. Grey pixels (C = 0) get hue 0.
    numerator = torch.where(value == r, g - b, torch.where(value == g, (b - r) + 2.0 * chroma, (r - g) + 4.0 * chroma))
    hue = numerator / torch.where(chroma == 0, torch.ones_like(chroma), chroma)
    hue = hue + 6.0 * factor.to(images.dtype)[:, None, None]
    # HSV -> RGB without branches: channel c is V - C clamp(min(k, 4 - k), 0, 1) with k = (n_c + hue) mod 6,
    # n = 5, 3, 1 for R, G, B (V S = C); the same values as the sector table of torchvision's _hsv2rgb.
    offsets = torch.arange(5.0, 0.0, -2.0, device=images.device, dtype=images.dtype)[None, :, None, None]  # 5, 3, 1
    k = torch.remainder(offsets + hue[:, None], 6.0)
    ramp = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
    return value[:, None] - chroma[:, None] * ramp


_JITTER_OPERATIONS: tuple[Callable[[torch.Tensor, torch.Tensor], torch.Tensor], ...] = (
    adjust_brightness,
    adjust_contrast,
    adjust_saturation,
    adjust_hue,
)


def _lists_selected(device: torch.device) -> bool:
    """Whether to operate on the selected views only (CPU) or on all and keep the selected (accelerators)."""
    return device.type == "cpu"


def _apply_where(images: torch.Tensor, selected: torch.Tensor,
                 operation: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], factor: torch.Tensor) -> torch.Tensor:
    if _lists_selected(images.device):
        # On the CPU, work on the selected views only (finding them costs nothing there).
        index = selected.nonzero().squeeze(1)
        if index.numel() == 0:
            return images
        return images.index_copy(0, index, operation(images.index_select(0, index), factor.index_select(0, index)))
    # On an accelerator, listing the selected views would wait for the device; compute all and select.
    return torch.where(selected[:, None, None, None], operation(images, factor), images)


def color_jitter(
    images: torch.Tensor,
    jitter: torch.Tensor,
    factors: torch.Tensor,
    order: torch.Tensor,
    operations: Sequence[Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None] = _JITTER_OPERATIONS,
) -> torch.Tensor:
    """``ColorJitter`` per view: the four operations in each view's own ``order``, only where ``jitter``.

    ``operations`` are brightness, contrast, saturation and hue (compiled versions may be passed); one given
    as ``None`` is skipped, for operations that leave these images unchanged (saturation and hue on grey)."""
    for slot in range(order.shape[1]):
        for index, operation in enumerate(operations):
            if operation is None:
                continue
            selected = jitter & (order[:, slot] == index)
            images = _apply_where(images, selected, operation, factors[:, index])
    return images


def check_image_batch(images: torch.Tensor) -> None:
    """A one-line error unless ``images`` is a uint8 batch ``(B, 1 or 3, H, W)``: float images would be divided
    by 255 again and come out near-constant, and other layouts fail deep inside."""
    if not isinstance(images, torch.Tensor):
        raise RelreasonError(f"images must be a uint8 tensor of shape (B, 1 or 3, H, W), got {type(images).__name__}")
    if images.dtype != torch.uint8:
        raise RelreasonError(
            f"images must be uint8 (0-255), got {images.dtype}; convert float images in [0, 1] with "
            "(images * 255).round().to(torch.uint8)"
        )
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        if images.dim() == 4 and images.shape[-1] in (1, 3):
            fix = "move channels first with images.permute(0, 3, 1, 2)"
        elif images.dim() == 4 and images.shape[-1] == 4:
            fix = "drop the alpha channel and move channels first with images[..., :3].permute(0, 3, 1, 2)"
        elif images.dim() == 4 and images.shape[1] == 4:
            fix = "drop the alpha channel of RGBA images with images[:, :3]"
        elif images.dim() == 3:
            fix = ("give one image a batch axis with images.unsqueeze(0), grey images a channel axis with "
                   "images.unsqueeze(1)")
        else:
            fix = "pass a batch of RGB or grey images, channels first"
        raise RelreasonError(f"images must have shape (B, 1 or 3, H, W), got {tuple(images.shape)}; {fix}")


class BatchRelationalAugmentation:
    """``augment(images, num_views, generator)``: K augmented views of each uint8 image, made in one batch.

    Args:
        image_size: side of the square views.
        mean, std: per-channel normalisation (3 values each).
        recipe: the random augmentation's parameters; the paper's by default.
        compile: ``torch.compile`` the colour operations (each fuses into one loop: hue ~8x faster on CPU)
            at the price of a one-off compilation (~1 minute on 2 cores). Same values.

    ``images`` is ``(B, 3, H, W)`` uint8 on any device; the result is ``(K, B, 3, S, S)`` float32 on the same
    device, view-major as the relational-reasoning model expects. Grey images may come as ``(B, 1, H, W)``:
    their views are made on the one channel and spread to three at the end. Saturation, hue and greyscale
    leave a grey image unchanged, so they are skipped (their random parameters are still drawn, so the views
    equal those of the same images given as three equal channels, up to float rounding) and the rest costs a
    third: what ``DeviceMultiViewDataset`` does for grey datasets such as Fashion-MNIST.
    """

    def __init__(
        self,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        recipe: AugmentationRecipe = AugmentationRecipe(),
        compile: bool = False,
    ) -> None:
        mean_t, std_t = check_normalization(image_size, mean, std)
        # dynamic: the number of selected views changes every step.
        self.operations = tuple(torch.compile(op, dynamic=True) for op in _JITTER_OPERATIONS) if compile \
            else _JITTER_OPERATIONS
        self.image_size = int(image_size)
        # (v - mean) / std is v * scale + shift: one multiply-add pass per step.
        self._scale = tuple(1.0 / s for s in std_t)
        self._shift = tuple(-m / s for m, s in zip(mean_t, std_t))
        self.recipe = recipe

    def sample_parameters(
        self,
        num: int,
        height: int,
        width: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> ViewParameters:
        """Random parameters of ``num`` views of ``height`` x ``width`` images under this recipe, as
        :meth:`apply` takes them."""
        return sample_view_parameters(num, height, width, self.recipe, generator, device)

    def apply(self, images: torch.Tensor, params: ViewParameters, normalize: bool = True) -> torch.Tensor:
        """Views ``(N, 3, S, S)`` of ``images`` (``(N, 3, H, W)`` or grey ``(N, 1, H, W)`` uint8, one row per
        view) with ``params``. Unnormalised views of grey images are one channel seen three times (an
        ``expand``): ``.clone()`` them before writing in place."""
        check_image_batch(images)
        grey = images.shape[1] == 1
        source = images.float().div_(255.0)
        views = resized_crop(source, params.boxes, self.image_size, params.flip).clamp_(0.0, 1.0)
        operations = (*self.operations[:2], None, None) if grey else self.operations
        views = color_jitter(views, params.jitter, params.factors, params.order, operations)
        if not grey:
            views = torch.where(params.grayscale[:, None, None, None], _grey(views).expand_as(views), views)
        if normalize:
            scale = _constant(self._scale, views.device).view(1, 3, 1, 1)
            shift = _constant(self._shift, views.device).view(1, 3, 1, 1)
            return torch.addcmul(shift, views, scale)  # grey views broadcast to three channels here
        return views.expand(-1, 3, -1, -1) if grey else views

    def __call__(self, images: torch.Tensor, num_views: int, generator: torch.Generator | None = None) -> torch.Tensor:
        check_image_batch(images)
        num_views = check_positive_int(num_views, "num_views", example=4)
        batch, _, height, width = images.shape
        params = self.sample_parameters(num_views * batch, height, width, generator, images.device)
        # View-major rows: row k * B + b is view k of image b.
        views = self.apply(images.repeat(num_views, 1, 1, 1), params)
        return views.view(num_views, batch, 3, self.image_size, self.image_size)
