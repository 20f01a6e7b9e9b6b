"""Conv-4: the reference's four-block CNN (8-16-32-64 channels, 64-d features), optionally wider."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from relreason.checks import check_positive_int

#: The paper's channels per block; ``width`` multiplies them.
CHANNELS = (8, 16, 32, 64)


def _conv_block(in_channels: int, out_channels: int, pool: nn.Module) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
        pool,
    )


def init_conv_bn(module: nn.Module) -> None:
    """The reference's initialisation: He-normal over fan-out for convs, BatchNorm at (1, 0)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class Conv4(nn.Module):
    """Four conv-BN-ReLU-pool blocks; the last pools globally. Module names match the reference notebook's
    (``layer1.0.weight``, ...; the paper's repository names them ``layer1.conv``, ``layer1.bn``).

    ``width`` multiplies every block's channels: 1 is the paper's network (8-16-32-64, 64-d features), 2 gives
    16-32-64-128 and 128-d features, 4 gives 32-64-128-256 and 256-d.
    """

    def __init__(self, in_channels: int = 3, width: int = 1) -> None:
        super().__init__()
        width = check_positive_int(width, "conv4's width (--backbone-args width=N)", example=2)
        in_channels = check_positive_int(in_channels, "in_channels", example=3)
        channels = [c * width for c in CHANNELS]
        self.feature_dim = channels[-1]
        self.layer1 = _conv_block(in_channels, channels[0], nn.AvgPool2d(kernel_size=2, stride=2))
        self.layer2 = _conv_block(channels[0], channels[1], nn.AvgPool2d(kernel_size=2, stride=2))
        self.layer3 = _conv_block(channels[1], channels[2], nn.AvgPool2d(kernel_size=2, stride=2))
        self.layer4 = _conv_block(channels[2], channels[3], nn.AdaptiveAvgPool2d(1))
        self.flatten = nn.Flatten()
        init_conv_bn(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.flatten(self.layer4(self.layer3(self.layer2(self.layer1(x)))))

    @staticmethod
    def args_of_state(state: Mapping[str, Any]) -> dict[str, Any] | None:
        """The ``--backbone-args`` a Conv-4 state dict was built with (``backbone_args_of``), else None."""
        width = conv4_width_of(state)
        return {"width": width} if width else None


def conv4_width_of(state: Mapping[str, Any]) -> int | None:
    """The ``width`` a Conv-4 state dict was built with (read from its first block's channels), else None."""
    first = state.get("layer1.0.weight")
    if not isinstance(first, torch.Tensor) or first.dim() != 4 or "layer4.0.weight" not in state:
        return None
    if first.shape[0] % CHANNELS[0]:
        return None
    return first.shape[0] // CHANNELS[0]
