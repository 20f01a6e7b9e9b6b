"""A backbone's output width, read from the module or found with one dummy forward pass."""

from __future__ import annotations

import torch
from torch import nn

from relreason.errors import RelreasonError, short_reason


def _channel_guesses(backbone: nn.Module) -> list[int]:
    """Input channels to try: those of the first convolution defined (usually the stem, but definition order
    is not call order), then 3 (RGB)."""
    first = next((m.in_channels for m in backbone.modules() if isinstance(m, nn.modules.conv._ConvNd)), 3)
    # A lazy convolution says 0 until its first input, which it would then take as its channels for good.
    return [3] if first in (0, 3) else [first, 3]


@torch.no_grad()
def infer_feature_dim(backbone: nn.Module, image_size: int = 32, in_channels: int | None = None) -> int:
    """Output width of ``backbone`` on a dummy batch of two ``image_size`` images.

    The batch takes the dtype and device of the backbone's first parameter and, unless ``in_channels`` is
    given, the input channels of its first defined convolution, else 3. It runs in eval mode, so no BatchNorm
    statistic moves; every submodule's own train/eval flag is put back afterwards (a user's frozen BatchNorm
    stays frozen).
    """
    tensor: torch.Tensor | None = next(backbone.parameters(), None)
    if tensor is None:
        tensor = next(backbone.buffers(), None)
    device = tensor.device if tensor is not None else torch.device("cpu")
    dtype = tensor.dtype if tensor is not None and tensor.is_floating_point() else torch.float32
    guesses = _channel_guesses(backbone) if in_channels is None else [in_channels]
    modes = [(module, module.training) for module in backbone.modules()]
    backbone.eval()
    try:
        for attempt, channels in enumerate(guesses):
            try:
                output = backbone(torch.zeros(2, channels, image_size, image_size, device=device, dtype=dtype))
                break
            except Exception as error:  # a user's module: any failure means the dummy batch did not suit it
                if attempt + 1 < len(guesses):
                    continue
                raise RelreasonError(
                    f"could not find the backbone's feature width from a dummy batch of shape "
                    f"(2, {channels}, {image_size}, {image_size}) ({short_reason(error)}); give the backbone a "
                    "feature_dim attribute (or pass feature_dim=), or the image size it takes (--image-size, "
                    "image_size=)"
                ) from error
    finally:
        for module, training in modes:
            module.training = training
    if not isinstance(output, torch.Tensor) or output.dim() != 2:
        shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise RelreasonError(
            f"the backbone returns {shape}; it must return a (batch, features) tensor: "
            "end it with global pooling and flatten"
        )
    return int(output.shape[1])


def check_takes_rgb_views(backbone: nn.Module, image_size: int, name: str) -> None:
    """Refuse, in one line and before any work, a backbone that cannot take what the trainer and the evaluation
    feed it: RGB views, (batch, 3, image_size, image_size). A one-channel backbone otherwise fails at its first
    step with PyTorch's own message."""
    try:
        infer_feature_dim(backbone, image_size, in_channels=3)
    except RelreasonError as error:
        if error.__cause__ is None:  # it ran, but its output is not (batch, features): that message says so
            raise
        raise RelreasonError(
            f"backbone '{name}' cannot take the views relreason makes, RGB images of {image_size} px "
            f"({short_reason(error.__cause__)}); build it for 3 input channels (grey images are given as RGB) and --image-size {image_size}"
        ) from None
