"""The paper's small ResNets for 32x32 images (He et al. 2016): 3 stages of 16-32-64 channels, 64-d."""

from __future__ import annotations

import torch
from torch import nn

from relreason.backbones.conv4 import init_conv_bn
from relreason.checks import check_positive_int
from relreason.errors import RelreasonError


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a shortcut (a 1x1 projection where the stride or the width changes)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_channels, out_channels, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            # Projection shortcut (1x1 conv + BN), as in the paper's code.
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + residual)


class CifarResNet(nn.Module):
    """3x3 stem, three stages of ``blocks_per_stage`` basic blocks (strides 1, 2, 2), global pooling."""

    def __init__(self, blocks_per_stage: int, channels: tuple[int, int, int] = (16, 32, 64), in_channels: int = 3
                 ) -> None:
        super().__init__()
        blocks_per_stage = check_positive_int(blocks_per_stage, "blocks_per_stage", example=5)
        in_channels = check_positive_int(in_channels, "in_channels", example=3)
        if len(channels) != 3:
            raise RelreasonError(f"channels must give the 3 stages' widths, got {tuple(channels)}; "
                                 "pass e.g. (16, 32, 64)")
        channels = (check_positive_int(channels[0], "each stage's channels", example=16),
                    check_positive_int(channels[1], "each stage's channels", example=16),
                    check_positive_int(channels[2], "each stage's channels", example=16))
        self.conv1 = _conv3x3(in_channels, channels[0])
        self.bn1 = nn.BatchNorm2d(channels[0])
        self.relu = nn.ReLU(inplace=True)
        stages = []
        previous = channels[0]
        for stage, width in enumerate(channels):
            blocks = [BasicBlock(previous, width, stride=1 if stage == 0 else 2)]
            blocks += [BasicBlock(width, width) for _ in range(blocks_per_stage - 1)]
            stages.append(nn.Sequential(*blocks))
            previous = width
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = channels[-1]
        init_conv_bn(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return torch.flatten(self.avgpool(x), 1)


def resnet8(in_channels: int = 3) -> CifarResNet:
    """The CIFAR ResNet-8 (He et al. 2016): 1 basic block(s) per stage, 64-d features."""
    return CifarResNet(1, in_channels=in_channels)


def resnet32(in_channels: int = 3) -> CifarResNet:
    """The CIFAR ResNet-32 (He et al. 2016): 5 basic block(s) per stage, 64-d features."""
    return CifarResNet(5, in_channels=in_channels)


def resnet56(in_channels: int = 3) -> CifarResNet:
    """The CIFAR ResNet-56 (He et al. 2016): 9 basic block(s) per stage, 64-d features."""
    return CifarResNet(9, in_channels=in_channels)
