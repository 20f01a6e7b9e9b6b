"""A backbone's output width, read from the module or found with one dummy forward pass."""

from __future__ import annotations

import torch
from torch import nn

from relreason.errors import RelreasonError, short_reason


def _channel_guesses(backbone: nn.Module) -> list[int]:
    """Input channels to try: those of the first convolution defined (usually the stem, but definition order
    is not call order), then 3 (RGB)."""
    first = next((m.in_channels for m in backbone.modules() if isinstance(m, nn.modules.conv._ConvNd)), 3)
    return [first] if first == 3 else [first, 3]


@torch.no_grad()
def infer_feature_dim(backbone: nn.Module, image_size: int = 32, in_channels: int | None = None) -> int:
    """Output width of ``backbone`` on a dummy batch of two ``image_size`` images.

    The batch takes the dtype and device of the backbone's first parameter and, unless ``in_channels`` is
    given, the input channels of its first defined convolution, else 3. It runs in eval mode, so no BatchNorm
    statistic moves; every submodule's own train/eval flag is put back afterwards (a user's frozen BatchNorm
    stays frozen).
    """
    tensor = next(backbone.parameters(), None)
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
                    f"(2, {channels}, {image_size}, {image_size}) ({short_reason(error)}); pass feature_dim= "
                    "(or give the backbone a feature_dim attribute), or image_size= the size it takes"
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
