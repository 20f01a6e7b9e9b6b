"""Backbones: Conv-4, the paper's CIFAR ResNets, torchvision ResNets with a small-image stem, a registry."""

from relreason.backbones.cifar_resnet import CifarResNet, resnet8, resnet32, resnet56
from relreason.backbones.conv4 import Conv4
from relreason.backbones.registry import BACKBONES, backbone_names, build_backbone, register_backbone
from relreason.backbones.torchvision_resnet import load_into_torchvision, torchvision_resnet

__all__ = [
    "BACKBONES",
    "CifarResNet",
    "Conv4",
    "backbone_names",
    "build_backbone",
    "load_into_torchvision",
    "register_backbone",
    "resnet8",
    "resnet32",
    "resnet56",
    "torchvision_resnet",
]
