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


@pytest.mark.parametrize("width", [2, 4])
def test_wider_conv4_multiplies_every_block(width):
    model = build_backbone("conv4", args={"width": width})
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [8 * width, 16 * width, 32 * width, 64 * width]
    assert [c.in_channels for c in convs] == [3, 8 * width, 16 * width, 32 * width]
    assert model.feature_dim == 64 * width
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 64 * width)
    # the reference's He-normal over fan-out, at the wider fan-out
    assert model.layer4[0].weight.std().item() == pytest.approx((2.0 / (9 * 64 * width)) ** 0.5, rel=0.05)


def test_conv4_width_one_is_the_paper_network():
    torch.manual_seed(0)
    default = Conv4().state_dict()
    torch.manual_seed(0)
    explicit = Conv4(width=1).state_dict()
    assert default.keys() == explicit.keys() and all(torch.equal(default[k], explicit[k]) for k in default)


@pytest.mark.parametrize("width", [0, -1])
def test_conv4_width_must_be_a_positive_integer(width):
    from relreason.backbones.registry import check_backbone

    for check in (lambda: build_backbone("conv4", args={"width": width}),
                  lambda: check_backbone("conv4", {"width": width})):
        with pytest.raises(RelreasonError, match=r"^conv4's width \(--backbone-args width=N\) must be a positive "
                                                 rf"integer, got {width}; pass e.g. 2$"):
            check()  # also the check before any work (--print-config), which builds it on the meta device


def test_the_check_before_any_work_calls_no_factory_of_the_users(monkeypatch):
    """relreason's own backbones are built on the meta device to check their arguments; a user's registered factory
    may compute with real numbers (a drop-path schedule's .item()), so it is only checked against its signature."""
    from relreason.backbones import registry

    calls = []

    def droppy(rate: float = 0.1):
        calls.append(rate)
        [step.item() for step in torch.linspace(0, rate, 4)]  # fails on the meta device
        return Conv4()

    monkeypatch.setitem(registry.BACKBONES, "droppy", droppy)
    registry.check_backbone("droppy", {"rate": 0.2})
    assert calls == []
    assert build_backbone("droppy", args={"rate": 0.2}).feature_dim == 64 and calls == [0.2]
    with pytest.raises(RelreasonError, match="takes rate as float"):
        registry.check_backbone("droppy", {"rate": "high"})


@pytest.mark.parametrize("width", [1.5, "2", True])
def test_conv4_width_of_another_type_is_refused(width):
    with pytest.raises(RelreasonError, match=r"^backbone 'conv4' takes width as int, got .*; pass e.g. "
                                             r"--backbone-args width=3$"):
        build_backbone("conv4", args={"width": width})
    with pytest.raises(RelreasonError, match=r"^conv4's width .* must be a positive integer"):
        Conv4(width=width)  # called directly, without the registry's check


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


def test_evaluate_elsewhere_says_where_the_run_found_its_own_factory(tmp_path, monkeypatch, capsys):
    import json
    import sys

    from relreason.cli import main
    from relreason.user_code import code_folder

    project = tmp_path / "project"
    (project / "nets").mkdir(parents=True)
    (project / "nets" / "__init__.py").write_text("")
    (project / "nets" / "small.py").write_text(
        "import torch.nn as nn\n"
        "def make():\n"
        "    return nn.Sequential(nn.Conv2d(3, 5, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())\n"
    )
    monkeypatch.setattr(sys, "path", [str(project), *sys.path])
    run = tmp_path / "run"
    assert main(["pretrain", "--dataset", "digits", "--backbone", "nets.small:make", "--image-size", "16", "-K", "2",
                 "--epochs", "1", "--device", "cpu", "--no-progress", "--output-dir", str(run)]) == 0
    assert code_folder("nets.small:make") == str(project) and code_folder("conv4") is None
    assert json.loads((run / "backbone.json").read_text())["backbone_code"] == str(project)
    # Evaluated from where the module is not importable (another folder, another shell): the error says where it was.
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(project)])
    for name in ("nets", "nets.small"):
        monkeypatch.delitem(sys.modules, name)
    capsys.readouterr()
    assert main(["evaluate", "--run-dir", str(run), "--protocols", "knn", "--device", "cpu"]) == 2
    assert capsys.readouterr().err.strip().endswith(
        f"importable from the working folder or PYTHONPATH (the run imported it from {project}: run evaluate there, "
        "or add that folder to PYTHONPATH)")


def test_load_into_torchvision_refuses_what_does_not_fit_in_one_line():
    conv4 = Conv4().state_dict()
    with pytest.raises(RelreasonError, match=r"not a torchvision ResNet's \(no 4-d conv1.weight\)"):
        load_into_torchvision(conv4, "resnet18")
    with pytest.raises(RelreasonError, match=r"'resnet32' is not one of torchvision's ResNets here"):
        load_into_torchvision(build_backbone("resnet18").state_dict(), "resnet32")
    with pytest.raises(RelreasonError, match=r"do not fit torchvision's resnet34 \(\d+ missing, 0 unexpected"):
        load_into_torchvision(build_backbone("resnet18").state_dict(), "resnet34")


def test_a_factory_whose_architecture_changed_gets_its_own_random_baseline(tmp_path, monkeypatch):
    """The random backbone's cached features are named by its initialisation, not by the factory's name alone."""
    from relreason.cli import main

    (tmp_path / "evolving_net.py").write_text(
        "import os\nimport torch.nn as nn\n"
        "def make():\n"
        "    width = int(os.environ['NET_WIDTH'])\n"
        "    return nn.Sequential(nn.Conv2d(3, width, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    shared = tmp_path / "shared"
    shared.mkdir()
    dims = {}
    for width in (16, 8):
        monkeypatch.setenv("NET_WIDTH", str(width))
        torch.save(build_backbone("evolving_net:make").state_dict(), shared / f"w{width}.pt")
        output = tmp_path / f"eval{width}.json"
        argv = ["evaluate", "--weights", str(shared / f"w{width}.pt"), "--backbone", "evolving_net:make", "--dataset",
                "digits", "--image-size", "16", "--protocols", "knn", "--device", "cpu", "--output", str(output)]
        assert main(argv) == 0
        random_test = [p for p in (shared / "features").glob("*random*-test-*.pt")]
        dims[width] = {torch.load(p, weights_only=True)["features"].shape[1] for p in random_test}
    assert dims == {16: {16}, 8: {16, 8}}  # the second evaluation extracted its own random features
    # Resuming a run after the factory's architecture changed names the tensor and the likely cause.
    run = ["pretrain", "--dataset", "digits", "--backbone", "evolving_net:make", "--image-size", "16", "-K", "2",
           "--device", "cpu", "--no-progress", "--output-dir", str(tmp_path / "run")]
    monkeypatch.setenv("NET_WIDTH", "16")
    assert main([*run, "--epochs", "1"]) == 0
    monkeypatch.setenv("NET_WIDTH", "8")
    with pytest.raises(RelreasonError, match=r"no longer fits it \(method\.backbone\.0\.weight is \(16, 3, 3, 3\) in "
                                             r"the checkpoint, \(8, 3, 3, 3\) now\); did the backbone's code change\?"):
        from relreason.train import PretrainConfig, pretrain

        pretrain(PretrainConfig(dataset="digits", backbone="evolving_net:make", image_size=16, num_views=2, epochs=2,
                                device="cpu", progress=False, tensorboard=False, output_dir=str(tmp_path / "run")))


def test_user_factories_that_do_not_fit_are_one_line_naming_the_cause(tmp_path, monkeypatch, capsys):
    from relreason.cli import main

    (tmp_path / "user_nets.py").write_text(
        "import torch.nn as nn\n"
        "def lazy():\n"
        "    return nn.Sequential(nn.LazyConv2d(6, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())\n"
        "def grey():\n"
        "    return nn.Sequential(nn.Conv2d(1, 6, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())\n"
        "def needs_width(width):\n"
        "    return nn.Sequential(nn.Conv2d(3, width, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())\n"
    )
    (tmp_path / "typo_net.py").write_text("import torch\n\nX = torch.nn.Conv3x3\n")
    (tmp_path / "needs_missing.py").write_text("import a_package_nobody_installed\n")
    (tmp_path / "bad_syntax.py").write_text("def f(:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    # A lazy first layer is not taken to want 0 channels (which it would then keep for good).
    lazy = build_backbone("user_nets:lazy", image_size=16)
    assert lazy.feature_dim == 6 and lazy[0].weight.shape[1] == 3
    with pytest.raises(RelreasonError, match=r"needs_width' cannot be built with no arguments \(missing a required "
                                             r"argument: 'width'; it takes: width\); give --backbone-args"):
        build_backbone("user_nets:needs_width")
    for spec, message in [
        ("typo_net:make", rf"failed at {tmp_path / 'typo_net.py'}, line 3: AttributeError: .*Conv3x3'; fix that module"),
        ("needs_missing:make", r"needs_missing.py, line 1: ModuleNotFoundError: No module named 'a_package_nobody"),
        ("bad_syntax:make", rf"failed at {tmp_path / 'bad_syntax.py'}, line 1: SyntaxError: invalid syntax"),
        ("user_nets:missing", r"module 'user_nets' \(.*user_nets.py\) has no 'missing'"),
    ]:
        with pytest.raises(RelreasonError, match=message):
            build_backbone(spec)
    # Views are RGB: a one-channel backbone is refused before the run folder is made.
    output = tmp_path / "run"
    argv = ["pretrain", "--dataset", "digits", "--backbone", "user_nets:grey", "--image-size", "16", "--epochs", "1",
            "--device", "cpu", "--no-progress", "--output-dir", str(output)]
    assert main(argv) == 2
    assert not output.exists()
    error = capsys.readouterr().err.strip()
    assert error.startswith("relreason: error: backbone 'user_nets:grey' cannot take the views relreason makes, RGB")
    assert error.endswith("build it for 3 input channels (grey images are given as RGB) and --image-size 16")
    assert "\n" not in error


def test_backbone_args_reach_the_factory_and_are_checked_against_its_signature():
    standard = build_backbone("resnet18", small_stem=False)
    assert standard.conv1.kernel_size == (7, 7) and isinstance(standard.maxpool, nn.MaxPool2d)
    assert build_backbone("resnet18").conv1.kernel_size == (3, 3)
    with pytest.raises(RelreasonError, match=r"^backbone 'resnet18' takes small_stem as bool, got 'maybe'; pass e.g. "
                                             r"--backbone-args small_stem=false$"):
        build_backbone("resnet18", small_stem="maybe")
    with pytest.raises(RelreasonError, match=r"^backbone 'conv4' cannot be built with depth=3 \(got an unexpected "
                                             r"keyword argument 'depth'; it takes: in_channels, width\).*"
                                             r"build_backbone's args=\)"):
        build_backbone("conv4", depth=3)
    # the fix the message names works: args= (not backbone_args=, which is the factory's unknown argument)
    assert build_backbone("resnet18", args={"small_stem": False}).conv1.kernel_size == (7, 7)
    with pytest.raises(RelreasonError, match=r"cannot be built with backbone_args="):
        build_backbone("resnet18", backbone_args={"small_stem": False})
    from relreason.backbones.registry import check_backbone

    check_backbone("resnet50", {"small_stem": False})
    with pytest.raises(RelreasonError, match="backbone arguments must map argument names to values"):
        check_backbone("resnet50", ["small_stem=false"])


def test_backbone_args_from_the_command_line_and_config_files(tmp_path, capsys):
    import json

    from relreason.cli import build_parser, main, parse_options
    from relreason.config_files import backbone_args_from, config_as_yaml
    from relreason.train import PretrainConfig

    assert backbone_args_from(["small_stem=false", "width=8", "scale=1e-3", "name=wide", "sizes=[1, 2]"]) == {
        "small_stem": False, "width": 8, "scale": 1e-3, "name": "wide", "sizes": [1, 2]}
    # An unquoted 1e-3 is a number wherever it stands (YAML 1.1 would read text); quoted text stays text.
    given = ["rates=[1e-3, '1e-3', 2, 1.5e+2]", "nested={a: [1E5, +2e-1]}", "text='1e-3'", "name=1e-3x"]
    expected = {"rates": [1e-3, "1e-3", 2, 150.0], "nested": {"a": [1e5, 0.2]}, "text": "1e-3", "name": "1e-3x"}
    assert backbone_args_from(given) == expected
    assert backbone_args_from({"scale": "1e-3", "rate": 1e-3}) == {"scale": "1e-3", "rate": 1e-3}  # typed already
    # ... and so in a config file, and after a round trip through --print-config's YAML or a run's config.json.
    parser = build_parser()
    written = tmp_path / "written.yaml"
    written.write_text("backbone-args: {rates: [1e-3, '1e-3'], scale: 2E-4, text: \"5e1\"}\n")
    assert parse_options(parser, ["pretrain", "--config", str(written)]).backbone_args == {
        "rates": [1e-3, "1e-3"], "scale": 2e-4, "text": "5e1"}
    pretrain_parser = next(a for a in parser._actions if a.dest == "command").choices["pretrain"]
    printed, recorded = tmp_path / "printed.yaml", tmp_path / "config.json"
    printed.write_text(config_as_yaml(PretrainConfig(backbone_args=expected), pretrain_parser))
    recorded.write_text(json.dumps({"backbone_args": expected, "lr": 1e-5}))
    for config in (printed, recorded):
        args = parse_options(parser, ["pretrain", "--config", str(config)])
        assert backbone_args_from(args.backbone_args) == expected, config
    assert args.lr == 1e-5
    assert backbone_args_from([]) == {}  # --backbone-args alone: none
    with pytest.raises(RelreasonError, match="--backbone-args gives width twice; keep one"):
        backbone_args_from(["width=8", "width=9"])
    with pytest.raises(RelreasonError, match=r"--backbone-args takes KEY=VALUE pairs such as small_stem=false, got "
                                             r"'wide'"):
        backbone_args_from(["wide"])
    mapping, listed = tmp_path / "mapping.yaml", tmp_path / "listed.yaml"
    mapping.write_text("backbone: resnet18\nbackbone-args: {small_stem: false}\n")
    listed.write_text("backbone: resnet18\nbackbone_args: [small_stem=false]\n")
    for config in (mapping, listed):
        args = parse_options(build_parser(), ["pretrain", "--config", str(config)])
        assert backbone_args_from(args.backbone_args) == {"small_stem": False}
    (tmp_path / "bad.yaml").write_text("backbone-args: 3\n")
    assert main(["pretrain", "--config", str(tmp_path / "bad.yaml")]) == 2
    assert "option 'backbone-args' in config file" in capsys.readouterr().err


def test_a_factory_with_arguments_trains_evaluates_resumes_and_compares(tmp_path, monkeypatch, capsys):
    import json

    from relreason.cli import main

    (tmp_path / "sized_net.py").write_text(
        "import torch.nn as nn\n"
        "def make(width: int, pool: str = 'avg', image_size: int = 32):\n"
        "    pooling = nn.AdaptiveAvgPool2d(1) if pool == 'avg' else nn.AdaptiveMaxPool2d(1)\n"
        "    return nn.Sequential(nn.Conv2d(3, width, 3), pooling, nn.Flatten())\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    run = tmp_path / "run"
    common = ["--dataset", "digits", "--backbone", "sized_net:make", "--image-size", "16", "--device", "cpu",
              "--no-progress"]
    argv = ["pretrain", *common, "-K", "2", "--epochs", "1", "--output-dir", str(run)]
    assert main([*argv, "--backbone-args", "width=5"]) == 0
    meta = json.loads((run / "backbone.json").read_text())
    assert (meta["backbone_args"], meta["feature_dim"]) == ({"width": 5}, 5)
    # evaluate rebuilds the backbone from backbone.json, arguments included, for the pretrained and random rows.
    assert main(["evaluate", "--run-dir", str(run), "--protocols", "knn", "--device", "cpu"]) == 0
    assert json.loads((run / "evaluation.json").read_text())["backbone_args"] == {"width": 5}
    assert {torch.load(p, weights_only=True)["features"].shape[1] for p in (run / "features").glob("*.pt")} == {5}
    # An argument that changes the features but no weight (the pooling) gets features of its own, not the cache's;
    # arguments named like build_backbone's own parameters reach the factory too.
    assert main(["evaluate", "--run-dir", str(run), "--protocols", "knn", "--device", "cpu", "--output",
                 str(tmp_path / "max.json"), "--backbone-args", "width=5", "pool=max", "image_size=16"]) == 0
    assert len(list((run / "features").glob("*.pt"))) == 8
    bare = tmp_path / "bare"  # weights without backbone.json: the arguments come from the command line
    bare.mkdir()
    (bare / "weights.pt").write_bytes((run / "backbone.pt").read_bytes())
    assert main(["evaluate", "--weights", str(bare / "weights.pt"), "--backbone", "sized_net:make", "--backbone-args",
                 "width=5", "--dataset", "digits", "--image-size", "16", "--protocols", "knn", "--device", "cpu",
                 "--no-random-baseline"]) == 0
    capsys.readouterr()
    # Another --backbone leaves the recorded arguments behind (they were this factory's): the weights do not fit.
    assert main(["evaluate", "--run-dir", str(run), "--backbone", "conv4", "--protocols", "knn", "--device", "cpu"]) == 2
    assert "does not fit backbone 'conv4'" in capsys.readouterr().err
    assert main([*argv[:-4], "--epochs", "2", "--output-dir", str(run), "--backbone-args", "width=6"]) == 2
    assert "options differ (--backbone-args: checkpoint {'width': 5} vs now {'width': 6})" in capsys.readouterr().err
    compare = tmp_path / "compare"
    assert main(["compare", *common, "--methods", "random", "--seeds", "1", "--protocols", "knn",
                 "--embedding-points", "60", "--backbone-args", "width=4", "--output-dir", str(compare)]) == 0
    assert json.loads((compare / "random-seed1" / "backbone.json").read_text())["backbone_args"] == {"width": 4}
    assert "# digits, sized_net:make (width=4):" in (compare / "compare.md").read_text()


def test_backbone_args_built_in_python_compare_equal_to_their_record(tmp_path, monkeypatch):
    """NumPy numbers and tuples in backbone_args become what config.json reads back as, so a rerun of the same
    comparison does not refuse its own runs."""
    import json

    import numpy as np

    from relreason.compare import CompareConfig, run_compare

    (tmp_path / "listed_net.py").write_text(
        "import torch.nn as nn\n"
        "def make(widths=(4,)):\n"
        "    return nn.Sequential(nn.Conv2d(3, widths[-1], 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    config = CompareConfig(dataset="digits", image_size=16, num_views=2, backbone="listed_net:make",
                           backbone_args={"widths": (np.int64(3),)}, methods=("relational",), seeds=(1,), epochs=1,
                           protocols=("knn",), embedding_points=60, device="cpu", progress=False,
                           output_dir=str(tmp_path / "compare"))
    run_compare(config)
    recorded = json.loads((tmp_path / "compare" / "relational-seed1" / "config.json").read_text())
    assert recorded["backbone_args"] == {"widths": [3]}
    run_compare(config)  # the same comparison again: its runs are its own


def test_wide_conv4_weights_into_a_default_conv4_name_their_width(tmp_path):
    from relreason.backbones.conv4 import conv4_width_of
    from relreason.evaluate.weights import load_matching_state

    wide = Conv4(width=2).state_dict()
    assert (conv4_width_of(wide), conv4_width_of(Conv4().state_dict())) == (2, 1)
    assert conv4_width_of(build_backbone("resnet8").state_dict()) is None
    with pytest.raises(RelreasonError, match=r"does not fit backbone 'conv4' \(0 missing, 0 unexpected, 20 mis-shaped "
                                             r"tensors\); .*: these are conv4's weights at --backbone-args width=2$"):
        load_matching_state(Conv4(), wide, tmp_path / "backbone.pt", "conv4")
    with pytest.raises(RelreasonError, match=r"it was trained with$"):  # no hint for another backbone's weights
        load_matching_state(Conv4(), build_backbone("resnet8").state_dict(), tmp_path / "backbone.pt", "conv4")
    narrow = Conv4(width=2)
    load_matching_state(narrow, wide, tmp_path / "backbone.pt", "conv4")  # the right width loads
    assert torch.equal(narrow.layer4[0].weight, wide["layer4.0.weight"])
    with pytest.raises(RelreasonError, match=r"though that is the backbone and arguments its metadata records: did "
                                             r"the backbone's code change since it was trained\?"):
        load_matching_state(Conv4(), wide, tmp_path / "backbone.pt", "conv4", recorded=True)


def test_a_whole_models_state_dict_evaluates_its_backbone(tmp_path, capsys):
    from relreason import RelationalReasoning
    from relreason.cli import main
    from relreason.evaluate.weights import load_matching_state

    torch.manual_seed(0)
    model = RelationalReasoning(Conv4())
    whole = model.state_dict()
    assert any(key.startswith("relation_head.") for key in whole)  # the head's tensors beside the backbone's
    ddp = {f"module.{key}": value for key, value in whole.items()}  # a DistributedDataParallel's
    for state, prefix in [(whole, "backbone."), (ddp, "module.backbone.")]:
        fresh = Conv4()
        load_matching_state(fresh, state, tmp_path / "w.pt", "conv4")
        assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.backbone.state_dict().values()))
        assert f"evaluating its backbone, the tensors under '{prefix}'" in capsys.readouterr().err
    torch.save(whole, tmp_path / "w.pt")
    assert main(["evaluate", "--weights", str(tmp_path / "w.pt"), "--backbone", "conv4", "--dataset", "digits",
                 "--protocols", "knn", "--device", "cpu", "--no-random-baseline"]) == 0
    momentum = {**{f"encoder_q.{k}": v for k, v in model.backbone.state_dict().items()},
                **{f"encoder_k.{k}": v for k, v in model.backbone.state_dict().items()}}  # MoCo's two encoders
    with pytest.raises(RelreasonError, match=r"hold 2 backbones that fit \(under 'encoder_k\.', 'encoder_q\.'\); "
                                             "save the one to evaluate alone"):
        load_matching_state(Conv4(), momentum, tmp_path / "w.pt", "conv4")
    with pytest.raises(RelreasonError, match="does not fit backbone 'conv4'"):  # the head alone: no backbone in it
        load_matching_state(Conv4(), {k: v for k, v in whole.items() if k.startswith("relation_head.")},
                            tmp_path / "w.pt", "conv4")


def pooled_net(tmp_path, monkeypatch, name):
    """A backbone factory of one's own, ``name:make``, and the function that rewrites its ``pool`` default as its
    author would (the module is imported afresh after each rewrite)."""
    import importlib
    import sys

    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    monkeypatch.syspath_prepend(str(tmp_path))

    def write_net(pool_default):
        (tmp_path / f"{name}.py").write_text(
            "import torch.nn as nn\n"
            f"def make(width: int = 4, pool: str = {pool_default!r}):\n"
            "    pooling = nn.AdaptiveAvgPool2d(1) if pool == 'avg' else nn.AdaptiveMaxPool2d(1)\n"
            "    return nn.Sequential(nn.Conv2d(3, width, 3), pooling, nn.Flatten())\n"
        )
        monkeypatch.delitem(sys.modules, name, raising=False)
        importlib.invalidate_caches()

    return write_net


def test_a_factory_default_changed_after_training_is_told_on_resume_and_evaluate(tmp_path, monkeypatch, capsys):
    """A default that changes the network but no weight's shape (here the pooling) would otherwise resume or be
    evaluated as another network in silence: the run records its factory's defaults."""
    import json

    from relreason.cli import main

    write_net = pooled_net(tmp_path, monkeypatch, "pooled_net")
    write_net("avg")
    run = tmp_path / "run"
    argv = ["pretrain", "--dataset", "digits", "--backbone", "pooled_net:make", "--image-size", "16", "-K", "2",
            "--device", "cpu", "--no-progress", "--no-tensorboard", "--output-dir", str(run)]
    assert main([*argv, "--epochs", "1", "--checkpoint-every", "5"]) == 0
    assert json.loads((run / "backbone.json").read_text())["backbone_defaults"] == {"width": 4, "pool": "avg"}

    write_net("maximum")  # the author changes the default
    capsys.readouterr()
    assert main([*argv, "--epochs", "2"]) == 2
    assert capsys.readouterr().err.strip().endswith(
        "backbone 'pooled_net:make' has other defaults than when the run started (pool avg then, maximum now); pass "
        "--backbone-args pool=avg to go on as it started, or choose another --output-dir for a new run")
    # The default it had, given as an argument, is the same network: the run goes on.
    assert main([*argv, "--epochs", "2", "--backbone-args", "pool=avg"]) == 0
    assert "resuming" in capsys.readouterr().err

    # evaluate builds the network the weights were trained as, and says why.
    assert main(["evaluate", "--run-dir", str(run), "--protocols", "knn", "--device", "cpu",
                 "--no-random-baseline"]) == 0
    assert json.loads((run / "evaluation.json").read_text())["backbone_args"] == {"pool": "avg"}
    write_net("avg")
    # The default back as it was: the run goes on with no arguments (the argument it recorded is that default).
    assert main([*argv, "--epochs", "2"]) == 0
    assert "other defaults" not in capsys.readouterr().err


def test_the_arguments_to_go_on_as_trained_are_one_shell_word_each_read_back_as_they_were():
    import shlex

    from relreason.backbones.registry import describe_changed_defaults, same_value
    from relreason.config_files import backbone_args_from

    changed = {"pool": ("max pool", "avg"), "flag": ("yes", "no"), "clip": (float("nan"), 1.0), "depth": (None, 3)}
    what, words = describe_changed_defaults({"channels": [16, 32], "extra": {"a": 1}}, changed)
    assert "pool max pool then, avg now" in what
    given = backbone_args_from(shlex.split(words))
    assert given.keys() == {"channels", "extra", "pool", "flag", "clip", "depth"}
    expected = {"channels": [16, 32], "extra": {"a": 1}, "pool": "max pool", "flag": "yes", "clip": float("nan"),
                "depth": None}
    assert all(same_value(given[k], v) if not isinstance(v, (list, dict)) else given[k] == v
               for k, v in expected.items())
    assert same_value(float("nan"), float("nan")) and not same_value(True, 1) and not same_value(1, 1.0)


def test_compare_goes_on_when_a_changed_default_is_given_as_the_argument_it_was(tmp_path, monkeypatch, capsys):

    from relreason.cli import main

    write_net = pooled_net(tmp_path, monkeypatch, "pooled_net3")
    write_net("avg")
    compare = ["compare", "--dataset", "digits", "--backbone", "pooled_net3:make", "--image-size", "16", "--device",
               "cpu", "--no-progress", "--methods", "relational", "--seeds", "1", "--protocols", "knn",
               "--embedding-points", "60", "--output-dir", str(tmp_path / "compare")]
    assert main([*compare, "--epochs", "1"]) == 0
    write_net("maximum")
    capsys.readouterr()
    assert main([*compare, "--epochs", "2"]) == 2
    assert "pass --backbone-args pool=avg to go on as it started" in capsys.readouterr().err
    assert main([*compare, "--epochs", "2", "--backbone-args", "pool=avg"]) == 0


def test_evaluate_builds_a_network_whose_default_changed_as_it_was_trained(tmp_path, monkeypatch, capsys):
    import json

    from relreason.cli import main

    write_net = pooled_net(tmp_path, monkeypatch, "pooled_net2")
    write_net("avg")
    run = tmp_path / "run"
    assert main(["pretrain", "--dataset", "digits", "--backbone", "pooled_net2:make", "--image-size", "16", "-K", "2",
                 "--epochs", "1", "--device", "cpu", "--no-progress", "--no-tensorboard", "--output-dir",
                 str(run)]) == 0
    evaluate = ["evaluate", "--run-dir", str(run), "--protocols", "knn", "--device", "cpu", "--no-random-baseline"]
    assert main(evaluate) == 0
    as_trained = json.loads((run / "evaluation.json").read_text())
    write_net("max")
    capsys.readouterr()
    assert main([*evaluate, "--output", str(tmp_path / "later.json")]) == 0
    assert ("backbone 'pooled_net2:make' has other defaults than when these weights were trained (pool avg then, max "
            "now); evaluating the network as trained, built with --backbone-args pool=avg") in capsys.readouterr().err
    later = json.loads((tmp_path / "later.json").read_text())
    assert later["results"] == as_trained["results"]
    # Asked for explicitly, the other network is evaluated, without the note.
    assert main([*evaluate, "--output", str(tmp_path / "max.json"), "--backbone-args", "pool=max"]) == 0
    assert "other defaults" not in capsys.readouterr().err


def test_a_backbone_too_large_for_memory_is_one_line(monkeypatch):
    from relreason.backbones import registry

    def too_large(width: int = 1) -> nn.Module:
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:121] data. DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 1048576000000 bytes. Error code 12 (Cannot allocate memory)")

    monkeypatch.setitem(registry.BACKBONES, "huge", too_large)
    with pytest.raises(RelreasonError) as error:
        build_backbone("huge", args={"width": 1000})
    assert str(error.value) == ("out of memory building backbone 'huge' with width=1000; choose a smaller one "
                                "(--backbone-args) or free memory")
    monkeypatch.setitem(registry.BACKBONES, "broken", lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):  # a factory's own bug keeps its traceback
        build_backbone("broken")
