import pytest
import torch
import torchvision
from torch import nn

from relreason.backbones import Conv4, backbone_names, build_backbone, load_into_torchvision
from relreason.errors import RelreasonError


def user_net():
    return nn.Sequential(nn.Conv2d(3, 7, 3), nn.AdaptiveMaxPool2d(1), nn.Flatten())


def user_net_with_width(width):
    net = user_net()
    net.feature_dim = width
    return net


def count(module):
    return sum(p.numel() for p in module.parameters())


def test_conv4_matches_reference_size_and_init():
    model = Conv4()
    # conv weights 3*8*9 + 8*16*9 + 16*32*9 + 32*64*9, BatchNorm weight+bias for 8+16+32+64 channels
    assert count(model) == 24408 + 240
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 64)
    assert all(m.bias is None for m in model.modules() if isinstance(m, nn.Conv2d))
    conv = model.layer4[0]
    expected_std = (2.0 / (3 * 3 * 64)) ** 0.5
    assert conv.weight.std().item() == pytest.approx(expected_std, rel=0.05)
    assert torch.equal(model.layer1[1].weight, torch.ones(8))
    assert "layer1.0.weight" in model.state_dict() and "layer4.1.running_var" in model.state_dict()


@pytest.mark.parametrize("name,blocks", [("resnet8", 1), ("resnet32", 5), ("resnet56", 9)])
def test_cifar_resnets_depth_and_width(name, blocks):
    model = build_backbone(name)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(convs) == 1 + 3 * blocks * 2  # stem + two convs per block; depth = this + 1 (the head)
    assert model.feature_dim == 64


@pytest.mark.parametrize(
    "name,size", [("conv4", 32)] + [(n, s) for n in ("resnet8", "resnet32", "resnet56", "resnet18") for s in (32, 64, 96)]
)
def test_backbones_forward(name, size):
    model = build_backbone(name).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, model.feature_dim)


@pytest.mark.parametrize("name,width", [("resnet34", 512), ("resnet50", 2048)])
def test_large_resnets_forward_32(name, width):
    model = build_backbone(name).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, width)


@pytest.mark.parametrize("small_stem", [True, False])
def test_torchvision_resnet_state_dict_loads_into_torchvision(small_stem):
    model = build_backbone("resnet18", small_stem=small_stem).eval()
    loaded = load_into_torchvision(model.state_dict(), "resnet18", small_stem=small_stem).eval()
    assert isinstance(loaded, torchvision.models.ResNet)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


@pytest.mark.parametrize("small_stem", [True, False])
def test_one_channel_weights_load_into_torchvision(small_stem):
    model = build_backbone("resnet18", small_stem=small_stem, in_channels=1).eval()
    loaded = load_into_torchvision(model.state_dict(), "resnet18", small_stem=small_stem).eval()
    x = torch.randn(2, 1, 40, 40)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_registry_user_factory_and_errors():
    assert {"conv4", "resnet8", "resnet32", "resnet56", "resnet18", "resnet34", "resnet50"} <= set(backbone_names())
    user = build_backbone("test_backbones:user_net", image_size=16)
    assert user.feature_dim == 7  # inferred by a dummy forward pass
    import numpy as np

    declared = build_backbone("test_backbones:user_net_with_width", width=np.int64(7))
    assert declared.feature_dim == 7 and type(declared.feature_dim) is int  # backbone.json takes it as it is
    with pytest.raises(RelreasonError, match="feature_dim of backbone 'test_backbones:user_net_with_width' must be a"):
        build_backbone("test_backbones:user_net_with_width", width=0)
    with pytest.raises(RelreasonError, match="must return"):
        build_backbone("torch.nn:Identity")
    with pytest.raises(RelreasonError, match="unknown backbone"):
        build_backbone("vgg99")
    with pytest.raises(RelreasonError, match="cannot load backbone factory"):
        build_backbone("no_such_module:make")


def test_user_factory_found_in_the_working_folder_as_under_the_installed_command(tmp_path, monkeypatch):
    # The installed `relreason` script does not search the working folder (`python -m relreason` does).
    (tmp_path / "my_folder_net.py").write_text(
        "import torch.nn as nn\n"
        "def make(in_channels=3):\n"
        "    return nn.Sequential(nn.Conv2d(in_channels, 5, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.path", [p for p in __import__("sys").path if p not in ("", str(tmp_path))])
    assert build_backbone("my_folder_net:make", image_size=16).feature_dim == 5
    with pytest.raises(RelreasonError, match="importable from the working folder or PYTHONPATH"):
        build_backbone("my_folder_net_missing:make")


def test_load_into_torchvision_refuses_what_does_not_fit_in_one_line():
    conv4 = Conv4().state_dict()
    with pytest.raises(RelreasonError, match=r"not a torchvision ResNet's \(no 4-d conv1.weight\)"):
        load_into_torchvision(conv4, "resnet18")
    with pytest.raises(RelreasonError, match=r"'resnet32' is not one of torchvision's ResNets here"):
        load_into_torchvision(build_backbone("resnet18").state_dict(), "resnet32")
    with pytest.raises(RelreasonError, match=r"do not fit torchvision's resnet34 \(\d+ missing, 0 unexpected"):
        load_into_torchvision(build_backbone("resnet18").state_dict(), "resnet34")
