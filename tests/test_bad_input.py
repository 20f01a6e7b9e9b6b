"""Every bad input a user may give: a one-line error naming the problem and the fix, exit 2, nothing written.

docs/bad-input.md shows the message for each of these cases.
"""

import gzip
import struct

import pytest
import torch

from relreason.cli import main

# (case, argv after the subcommand, a fragment of the message). {tmp} is a fresh temporary folder.
PRETRAIN_CASES = [
    ("K below 2", ["-K", "1"], "-K/--num-views must be >= 2 for relational reasoning"),
    ("batch below 2", ["--batch-size", "1"], "--batch-size must be >= 2 (each image needs another one as its negative)"),
    ("negative batch", ["--batch-size", "-5"], "--batch-size must be >= 2"),
    ("empty output folder", ["--output-dir", ""], "--output-dir is empty"),
    ("negative epochs", ["--epochs", "-3"], "--epochs must be >= 1"),
    ("zero learning rate", ["--lr", "0"], "--lr must be a finite number > 0"),
    ("infinite learning rate", ["--lr", "inf"], "--lr must be a finite number > 0, got inf"),
    ("held-out share of a named dataset", ["--test-fraction", "0.2"],
     "--test-fraction splits an image folder, and dataset 'digits' comes with its own test split"),
    ("unknown learning-rate schedule", ["--lr-schedule", "step"], "invalid choice: 'step'"),
    ("warm-up as long as the run", ["--epochs", "5", "--warmup-epochs", "5"], "--warmup-epochs must lie in [0, --epochs)"),
    ("not a number", ["--epochs", "ten"], "invalid int value: 'ten'"),
    ("unknown dataset", ["--dataset", "imagenet-99"], "unknown dataset"),
    ("unknown backbone", ["--backbone", "vgg99"], "unknown backbone 'vgg99'"),
    ("backbone factory not importable", ["--backbone", "no_such_module:make"], "cannot load backbone factory"),
    ("backbone arguments not KEY=VALUE", ["--backbone-args", "wide"],
     "--backbone-args takes KEY=VALUE pairs such as small_stem=false, got 'wide'"),
    ("backbone argument the factory does not take", ["--backbone-args", "depth=3"],
     "backbone 'conv4' cannot be built with depth=3"),
    ("backbone argument of the wrong type", ["--backbone", "resnet18", "--backbone-args", "small_stem=maybe"],
     "backbone 'resnet18' takes small_stem as bool, got 'maybe'"),
    ("backbone factory returning no module", ["--backbone", "builtins:dict"],
     "backbone factory 'builtins:dict' returned dict, not a torch.nn.Module; make it return the backbone module"),
    ("unknown method", ["--method", "simclear"], "unknown method 'simclear'; choose one of relational, simclr"),
    ("method class not importable", ["--method", "no_such_module:Method"], "cannot load method class"),
    ("method class that is no PretrainMethod", ["--method", "builtins:dict"],
     "method 'builtins:dict' is class dict, not a subclass of relreason.methods.PretrainMethod"),
    ("unknown loss", ["--loss", "hinge"], "invalid choice: 'hinge'"),
    ("unknown aggregation", ["--aggregation", "product"], "invalid choice: 'product'"),
    ("unknown AMP mode", ["--amp", "fp8"], "invalid choice: 'fp8'"),
    ("unknown augmentation path", ["--augment", "gpu"], "invalid choice: 'gpu'"),
    ("focal alpha out of range", ["--loss", "focal", "--focal-alpha", "2"], "--focal-alpha must lie in [0, 1]"),
    ("focal alpha out of range without the focal loss", ["--focal-alpha", "2"], "--focal-alpha must lie in [0, 1], got 2.0"),
    ("unknown device", ["--device", "tpu"], "unknown --device 'tpu'"),
    ("image size too small", ["--image-size", "4"], "--image-size must be >= 8"),
    ("crop scale out of range", ["--min-crop-scale", "1.5"], "--min-crop-scale) must be a fraction"),
    ("jitter strength out of range", ["--jitter-strength", "3"], "(--jitter-strength) must lie in [0, 2.5]"),
    ("negative checkpoint interval", ["--checkpoint-every", "-1"], "--checkpoint-every must be >= 0"),
    ("keep no checkpoints", ["--keep-checkpoints", "0"], "--keep-checkpoints must be >= 1"),
    ("zero time limit", ["--time-limit", "0"], "--time-limit must be > 0"),
    ("unwritable output folder", ["--output-dir", "{tmp}/a-file/run"], "is not writable"),
    ("missing dataset", ["--dataset", "cifar10", "--data-root", "{tmp}/empty"], "--download"),
    ("missing image folder", ["--dataset", "folder", "--data-root", "{tmp}/nowhere"], "does not exist"),
    ("image folder without images", ["--dataset", "folder", "--data-root", "{tmp}/no-images"], "no image files"),
    ("missing config file", ["--config", "{tmp}/missing.yaml"], "missing.yaml not found; give the path of a YAML file"),
    ("unknown key in config", ["--config", "{tmp}/unknown-key.yaml"],
     "unknown option 'epochz' in config file {tmp}/unknown-key.yaml (did you mean 'epochs'?); see `relreason pretrain --help`"),
    ("an option twice in config", ["--config", "{tmp}/twice.yaml"], "option 'num-views' is given twice in config file"),
    ("a key twice in config", ["--config", "{tmp}/same-key-twice.yaml"],
     "'epochs' is given twice in config file {tmp}/same-key-twice.yaml (line 3); keep one"),
    ("a bad value from a config file", ["--config", "{tmp}/negative-lr.yaml"],
     "--lr must be a finite number > 0, got -1.0; pass e.g. 0.001 (--lr is set in config file {tmp}/negative-lr.yaml)"),
    ("wrong type in config", ["--config", "{tmp}/wrong-type.yaml"], "must be an integer, got [1, 2]"),
    ("config is not YAML", ["--config", "{tmp}/broken.yaml"], "is not valid YAML at line 2 (while parsing a flow sequence)"),
    ("a tab in a config file", ["--config", "{tmp}/tab.yaml"],
     "tab.yaml is not valid YAML at line 1 (while scanning for the next token); YAML takes no tab between a key and its "
     "value or in an indentation: use spaces"),
    ("a symbolic link loop as the data root", ["--dataset", "folder", "--data-root", "{tmp}/loop1"],
     "loop1' (a symbolic link that leads back to itself); fix the link or give another path"),
    ("--config given twice", ["--config", "{tmp}/pretrain.yaml", "--config", "{tmp}/negative-lr.yaml"],
     "--config is given twice ({tmp}/pretrain.yaml and {tmp}/negative-lr.yaml); one file is read: join their options "
     "in one file, or give the second file's options as flags"),
    ("--no-resume over checkpoints", ["--no-resume", "--output-dir", "{tmp}/has-checkpoint"], "drop --no-resume"),
    ("a folder of one's own files named as a run's", ["--output-dir", "{tmp}/project"],
     "project holds config.json, which no relreason run wrote there and a run would replace; choose another "
     "--output-dir (a folder of its own for each run)"),
    ("a finished run's folder whose checkpoints were deleted", ["--output-dir", "{tmp}/finished-no-checkpoints"],
     "finished-no-checkpoints holds an exported backbone (backbone.pt, backbone.json) but no checkpoint to go on "
     "from; choose another --output-dir (or move those files away to train there afresh)"),
    ("an abbreviated option", ["--epoch", "1"],
     "unrecognized arguments: --epoch 1 (did you mean --epochs?); see `relreason pretrain --help`"),
    ("output folder inside the image folder", ["--dataset", "folder", "--data-root", "{tmp}/no-images",
                                               "--output-dir", "{tmp}/no-images/runs/x"], "lies inside --data-root"),
    ("negative weight decay", ["--weight-decay", "-1"], "--weight-decay must be a finite number >= 0, got -1.0"),
    ("weight decay not a number", ["--weight-decay", "nan"], "--weight-decay must be a finite number >= 0, got nan"),
    ("relation head without hidden units", ["--head-hidden", "0"], "--head-hidden must be >= 1, got 0"),
    ("negative relation head width", ["--head-hidden", "-5"], "--head-hidden must be >= 1, got -5"),
    ("backbone factory is a module", ["--backbone", "os:path"],
     "backbone factory 'os:path' is a module, not a function or class returning an nn.Module"),
    ("seed beyond int64", ["--seed", "100000000000000000000000"], "--seed must be an integer in [0, 2**63 - 1]"),
    ("negative seed", ["--seed", "-1"], "--seed must be an integer in [0, 2**63 - 1], got -1"),
    ("meta device", ["--device", "meta"], "unknown --device 'meta'; use auto, cpu, cuda, cuda:N or mps"),
    ("device not a name", ["--device", "nonsense"], "unknown --device 'nonsense'"),
    ("config is not a text file", ["--config", "{tmp}/photo.jpg"], "is not a text YAML file"),
    ("a word for a number in config", ["--config", "{tmp}/not-a-number.yaml"], "must be a number, got 'fast'"),
    ("focal gamma not a number", ["--loss", "focal", "--focal-gamma", "nan"],
     "--focal-gamma must be a finite number >= 0, got nan"),
    ("focal alpha not a number", ["--loss", "focal", "--focal-alpha", "nan"], "--focal-alpha must lie in [0, 1], got nan"),
    ("corrupt gzip dataset file", ["--dataset", "mnist", "--data-root", "{tmp}/corrupt-mnist"],
     "(corrupt gzip data: Error -3 while decompressing data"),
    ("another dataset's files under MNIST's name", ["--dataset", "mnist", "--data-root", "{tmp}/kmnist"],
     "{tmp}/kmnist/train-labels-idx1-ubyte.gz holds labels that are not MNIST's but another dataset's (KMNIST's?)"),
    ("held-out share of a one-class folder", ["--dataset", "folder", "--data-root", "{tmp}/one-class",
                                              "--test-fraction", "0.2"],
     "image folder {tmp}/one-class holds one class ('photos'); --test-fraction holds out a share of each class"),
]
if not torch.cuda.is_available():
    PRETRAIN_CASES.append(("CUDA asked, none present", ["--device", "cuda"], "no CUDA GPU is visible"))
elif torch.cuda.device_count() < 99:
    PRETRAIN_CASES.append(("CUDA GPU index beyond those visible", ["--device", "cuda:99"], "CUDA GPU(s) are visible"))
if not torch.backends.mps.is_available():
    PRETRAIN_CASES.append(("MPS asked, none present", ["--device", "mps"], "MPS (Apple GPU) is not available here"))

BARE_DIGITS = ["--weights", "{tmp}/bare/weights.pt", "--backbone", "conv4", "--dataset", "digits"]
EVALUATE_CASES = [
    ("no pretrained run", ["--run-dir", "{tmp}/nothing"], "no backbone weights"),
    ("weights that do not exist", ["--weights", "{tmp}/missing.pt"],
     "--weights {tmp}/missing.pt is not a file; pass the path of a backbone.pt"),
    ("weights without metadata", ["--weights", "{tmp}/bare/weights.pt"], "pass --backbone NAME"),
    ("weights of another backbone", ["--weights", "{tmp}/bare/weights.pt", "--backbone", "resnet8",
                                     "--dataset", "digits"], "does not fit backbone 'resnet8'"),
    ("unknown protocol", ["--run-dir", "{tmp}", "--protocols", "svm"], "invalid choice: 'svm'"),
    ("unlabelled images", ["--weights", "{tmp}/bare/weights.pt", "--backbone", "conv4", "--dataset", "folder",
                           "--data-root", "{tmp}/unlabelled"],
     "has no labels (its 1 image lies directly in {tmp}/unlabelled/train, not in class subfolders); evaluation "
     "needs labelled images: for a folder, pass --data-root DIR holding train/ and test/"),
    # Options refused by name before the weights are read or a feature is extracted.
    ("image size too small", [*BARE_DIGITS, "--image-size", "2"], "--image-size must be >= 8, got 2"),
    ("no neighbours for k-NN", [*BARE_DIGITS, "--knn-k", "0"], "--knn-k must be a positive integer, got 0"),
    ("negative linear-probe epochs", [*BARE_DIGITS, "--linear-epochs", "-1"],
     "--linear-epochs must be a positive integer, got -1"),
    ("zero batch size", [*BARE_DIGITS, "--batch-size", "0"], "--batch-size must be a positive integer, got 0"),
    ("held-out share out of range", [*BARE_DIGITS, "--test-fraction", "1.5"],
     "--test-fraction must lie in (0, 1), got 1.5; pass e.g. 0.2"),
    ("seed beyond int64", [*BARE_DIGITS, "--seed", "100000000000000000000000"],
     "--seed must be an integer in [0, 2**63 - 1]"),
    ("meta device", [*BARE_DIGITS, "--device", "meta"], "unknown --device 'meta'"),
    ("results under a file", [*BARE_DIGITS, "--output", "{tmp}/a-file/results.json"],
     "cannot create the folder of --output {tmp}/a-file/results.json ({tmp}/a-file is a file, not a folder)"),
    ("a shipped pretrain config", ["--config", "digits_conv4"],
     "digits_conv4 is a config for `relreason pretrain` (it sets 'num-views', which `relreason evaluate` has not)"),
    ("results inside the image folder", ["--weights", "{tmp}/bare/weights.pt", "--backbone", "conv4", "--dataset",
                                         "folder", "--data-root", "{tmp}/unlabelled", "--output",
                                         "{tmp}/unlabelled/train/new/results.json"],
     "--output {tmp}/unlabelled/train/new/results.json lies inside the image folder {tmp}/unlabelled/train: they "
     "would be added to your images"),
]

# `compare` checks its evaluation options before the first training run.
COMPARE_CASES = [
    ("empty output folder", ["--output-dir", ""], "--output-dir is empty"),
    ("an option only pretrain has", ["--lr", "0.1"],
     "unrecognized arguments: --lr 0.1 (--lr is an option of `relreason pretrain`; compare trains every method with "
     "pretrain's default for it); see `relreason compare --help`"),
    ("no neighbours for k-NN", ["--knn-k", "0"], "--knn-k must be a positive integer, got 0"),
    ("negative linear-probe epochs", ["--linear-epochs", "-1"], "--linear-epochs must be a positive integer, got -1"),
    ("a seed beyond int64", ["--seeds", "1", "100000000000000000000000"], "--seeds must be an integer in [0, 2**63 - 1]"),
    ("a method twice", ["--methods", "random", "random"], "--methods must be distinct, got ['random', 'random']"),
    ("a protocol twice", ["--protocols", "knn", "knn"],
     "--protocols must be distinct, got ['knn', 'knn']; each is a column of the table"),
    ("a shipped pretrain config", ["--config", "fashion_mnist_conv4"],
     "run `relreason pretrain --config fashion_mnist_conv4`"),
    ("a pretrain config of one's own", ["--config", "{tmp}/pretrain.yaml"],
     "{tmp}/pretrain.yaml is a config for `relreason pretrain` (it sets 'lr', which `relreason compare` has not)"),
    ("a typo in a compare config", ["--config", "{tmp}/compare-typo.yaml"],
     "unknown option 'seed' in config file {tmp}/compare-typo.yaml (did you mean 'seeds'?)"),
]


@pytest.fixture
def workspace(tmp_path):
    from PIL import Image

    from relreason.backbones import Conv4

    (tmp_path / "a-file").write_text("user data")
    (tmp_path / "empty").mkdir()
    (tmp_path / "no-images").mkdir()
    (tmp_path / "no-images" / "notes.txt").write_text("not an image")
    (tmp_path / "unknown-key.yaml").write_text("epochz: 3\n")
    (tmp_path / "twice.yaml").write_text("num_views: 4\nnum-views: 8\n")
    (tmp_path / "same-key-twice.yaml").write_text("epochs: 2\nlr: 0.001\nepochs: 3\n")
    (tmp_path / "negative-lr.yaml").write_text("lr: -1\n")
    (tmp_path / "wrong-type.yaml").write_text("epochs: [1, 2]\n")
    (tmp_path / "broken.yaml").write_text("epochs: [1, 2\n")
    (tmp_path / "tab.yaml").write_text("epochs:\t1\n")
    (tmp_path / "pretrain.yaml").write_text("dataset: digits\nmethod: simclr\nlr: 0.001\n")  # --print-config's kind
    (tmp_path / "compare-typo.yaml").write_text("dataset: digits\nepochs: 3\nseed: 1\n")
    (tmp_path / "not-a-number.yaml").write_text("lr: fast\n")  # while lr: 1e-3 is read as the number
    (tmp_path / "has-checkpoint").mkdir()
    (tmp_path / "has-checkpoint" / "checkpoint-e0001-s0000000.pt").write_bytes(b"earlier work")
    (tmp_path / "loop1").symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(tmp_path / "loop1")
    (tmp_path / "project").mkdir()
    (tmp_path / "project" / "config.json").write_text('{"learning_rate": 3}')
    (tmp_path / "finished-no-checkpoints").mkdir()
    (tmp_path / "finished-no-checkpoints" / "backbone.json").write_text('{"method": "relational", "finished": true}')
    torch.save(Conv4().state_dict(), tmp_path / "finished-no-checkpoints" / "backbone.pt")
    (tmp_path / "bare").mkdir()
    torch.save(Conv4().state_dict(), tmp_path / "bare" / "weights.pt")
    for split in ("train", "test"):
        (tmp_path / "unlabelled" / split).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "unlabelled" / split / "x.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "photo.jpg")
    (tmp_path / "one-class" / "photos").mkdir(parents=True)
    for name in ("a.png", "b.png", "c.png"):
        Image.new("RGB", (8, 8)).save(tmp_path / "one-class" / "photos" / name)
    (tmp_path / "corrupt-mnist").mkdir()
    images = bytes([0, 0, 0x08, 3]) + struct.pack(">III", 4, 28, 28) + bytes(4 * 28 * 28)
    corrupt = bytearray(gzip.compress(images, mtime=0))
    corrupt[10] ^= 0xFF  # the first byte of the deflate stream (gzip.compress writes a 10-byte header)
    (tmp_path / "corrupt-mnist" / "train-images-idx3-ubyte.gz").write_bytes(bytes(corrupt))
    labels = bytes([0, 0, 0x08, 1]) + struct.pack(">I", 4) + bytes(4)
    (tmp_path / "corrupt-mnist" / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(labels, mtime=0))
    (tmp_path / "kmnist").mkdir()  # as many of every class, as in Fashion-MNIST's and KMNIST's training labels
    labels = bytes([0, 0, 0x08, 1]) + struct.pack(">I", 60_000) + bytes(range(10)) * 6_000
    (tmp_path / "kmnist" / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(labels, mtime=0))
    (tmp_path / "kmnist" / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(images, mtime=0))
    return tmp_path


def assert_refused(workspace, capsys, command, argv, fragment):
    """The command exits 2 with one line holding ``fragment`` and writes nothing (no folder, no file)."""
    argv = [a.replace("{tmp}", str(workspace)) for a in argv]
    if command in ("pretrain", "compare") and "--output-dir" not in argv:
        argv += ["--output-dir", str(workspace / "run")]
    before = sorted(p.relative_to(workspace) for p in workspace.rglob("*"))
    code = main([command, *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("relreason: error:") and "\n" not in err, err
    assert fragment.replace("{tmp}", str(workspace)) in err, err
    assert sorted(p.relative_to(workspace) for p in workspace.rglob("*")) == before, "a refused run must write nothing"


@pytest.mark.parametrize("case,argv,fragment", PRETRAIN_CASES, ids=[c[0] for c in PRETRAIN_CASES])
def test_pretrain_bad_input(workspace, capsys, case, argv, fragment):
    assert_refused(workspace, capsys, "pretrain", argv, fragment)
    assert (workspace / "a-file").read_text() == "user data"
    assert (workspace / "has-checkpoint" / "checkpoint-e0001-s0000000.pt").read_bytes() == b"earlier work"


@pytest.mark.parametrize("case,argv,fragment", EVALUATE_CASES, ids=[c[0] for c in EVALUATE_CASES])
def test_evaluate_bad_input(workspace, capsys, case, argv, fragment):
    assert_refused(workspace, capsys, "evaluate", argv, fragment)


@pytest.mark.parametrize("case,argv,fragment", COMPARE_CASES, ids=[c[0] for c in COMPARE_CASES])
def test_compare_bad_input(workspace, capsys, case, argv, fragment):
    assert_refused(workspace, capsys, "compare", argv, fragment)


@pytest.mark.parametrize("argv, fragment", [
    (["--output-dir", "{tmp}/a-file/run"], "output folder {tmp}/a-file/run is not writable (Not a directory)"),
    (["--output-dir", "{tmp}/has-checkpoint", "--no-resume"], "drop --no-resume"),
])
def test_output_folder_is_refused_before_the_images_are_read(workspace, capsys, monkeypatch, argv, fragment):
    def read_images(*args, **kwargs):
        raise AssertionError("the images were read before the output folder was checked")

    monkeypatch.setattr("relreason.train.loop.build_pretrain_data", read_images)
    argv = ["--dataset", "folder", "--data-root", "{tmp}/one-class", *argv]
    assert_refused(workspace, capsys, "pretrain", argv, fragment)


def test_an_output_folder_under_one_that_cannot_be_searched_is_one_line(workspace, capsys, monkeypatch):
    from pathlib import Path

    real_exists = Path.exists

    def exists(path, *args, **kwargs):  # what a folder without search permission does for a non-root user
        if "locked" in str(path):
            raise PermissionError(13, "Permission denied", str(path))
        return real_exists(path, *args, **kwargs)

    monkeypatch.setattr(Path, "exists", exists)
    assert_refused(workspace, capsys, "pretrain", ["--output-dir", "{tmp}/locked/inner/run"],
                   "output folder {tmp}/locked/inner/run is not writable (Permission denied)")
