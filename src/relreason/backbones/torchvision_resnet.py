"""torchvision's ResNet-18/34/50 as feature extractors, with a small-image stem for 32-96 px inputs.

The module *is* a ``torchvision.models.ResNet`` (stem swapped, ``fc`` an ``Identity``), so its
state_dict loads into torchvision's class after the same two changes (see ``load_into_torchvision``).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torchvision
from torch import nn

from relreason.checkpoint import state_mismatch
from relreason.errors import RelreasonError

_WIDTHS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048}


def small_image_stem(model: torchvision.models.ResNet, in_channels: int = 3) -> None:
    """3x3 stride-1 first conv and no max-pool: the 7x7/2 + pool stem would shrink 32 px to 8 px at once."""
    model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    model.maxpool = nn.Identity()


def torchvision_resnet(name: str, small_stem: bool = True, in_channels: int = 3) -> torchvision.models.ResNet:
    """A randomly initialised torchvision ResNet (``resnet18``, ``resnet34``, ``resnet50``) returning pooled features."""
    if name not in _WIDTHS:
        raise RelreasonError(f"'{name}' is not one of torchvision's ResNets here ({', '.join(_WIDTHS)}); relreason's "
                             "own backbones (conv4, resnet8/32/56) load with relreason.backbones.build_backbone")
    model = getattr(torchvision.models, name)(weights=None)
    if small_stem:
        small_image_stem(model, in_channels)
    elif in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    model.fc = nn.Identity()
    model.feature_dim = _WIDTHS[name]
    return model


def load_into_torchvision(state_dict: Mapping[str, torch.Tensor], name: str, small_stem: bool = True) -> torchvision.models.ResNet:
    """Load an exported backbone state_dict into a fresh ``torchvision.models.<name>()``.

    The model is torchvision's own class with the changes a user makes by hand (README): the stem (when small,
    and for the number of input channels the weights were trained on) and ``fc = Identity()``.
    """
    stem = state_dict.get("conv1.weight") if isinstance(state_dict, Mapping) else None
    if not isinstance(stem, torch.Tensor) or stem.dim() != 4:
        raise RelreasonError("these weights are not a torchvision ResNet's (no 4-d conv1.weight); load relreason's own "
                             "backbones with relreason.backbones.build_backbone(name).load_state_dict(weights)")
    model = torchvision_resnet(name, small_stem, in_channels=stem.shape[1])
    mismatch = state_mismatch(model.state_dict(), state_dict)
    if mismatch:
        raise RelreasonError(
            f"these weights do not fit torchvision's {name} ({mismatch}); pass the name of the ResNet they were "
            "trained as (backbone.json says), and small_stem=False only for weights trained with the 7x7 stem"
        )
    model.load_state_dict(state_dict)
    return model
