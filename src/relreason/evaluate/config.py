"""The options of ``relreason evaluate``, checked in one line each."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from relreason.backbones.registry import check_backbone_args
from relreason.checks import check_positive_float, check_positive_int
from relreason.data.splits import check_fraction_range
from relreason.device import check_device_name, resolve_device
from relreason.errors import RelreasonError
from relreason.protocols import check_label_fractions
from relreason.protocols.frozen import ALL_PROTOCOLS, DEFAULT_LABEL_FRACTIONS, PROTOCOLS, choose_protocols
from relreason.seeding import check_seed


@dataclass
class EvaluateConfig:
    """Every option of ``relreason evaluate``; the CLI and YAML configs fill it by field name."""

    run_dir: str = "runs/relreason"
    weights: str | None = None
    backbone: str | None = None
    backbone_args: dict[str, Any] | None = None  # None: those backbone.json records
    dataset: str | None = None
    data_root: str | None = None  # None: the pretraining run's own when evaluating on its dataset, else "data"
    download: bool = False
    image_size: int | None = None
    protocols: tuple[str, ...] = PROTOCOLS
    linear_epochs: int = 100
    knn_k: int = 200
    label_fractions: tuple[float, ...] = DEFAULT_LABEL_FRACTIONS
    finetune_epochs: int = 20
    finetune_backbone_lr: float = 1e-4
    finetune_head_lr: float = 1e-3
    retrieval_plot: bool = True
    random_baseline: bool = True
    batch_size: int = 256
    seed: int = 0
    test_fraction: float | None = None  # a labelled folder without train/ and test/: the share held out to test
    device: str = "auto"
    output: str | None = None
    progress: bool = True  # progress bars while standard error is a terminal
    # Whether a run stopped by its time limit is said to be unfinished: not where that limit is the plan (compare).
    time_limit_ends_the_run: bool = False

    def validate(self, on_this_machine: bool = True) -> None:
        """Refuse bad options with one line each, naming the flag, before any weights or data are read.

        ``on_this_machine=False`` leaves out whether ``--device`` is there (``--print-config``)."""
        protocols = choose_protocols(self.protocols, ALL_PROTOCOLS)
        check_backbone_args(self.backbone_args)
        check_positive_int(self.linear_epochs, "--linear-epochs")
        check_positive_int(self.knn_k, "--knn-k")
        check_positive_int(self.batch_size, "--batch-size")
        if self.image_size is not None and self.image_size < 8:
            raise RelreasonError(f"--image-size must be >= 8, got {self.image_size}")
        check_seed(self.seed, "--seed")
        if self.test_fraction is not None:
            check_fraction_range(self.test_fraction)  # whether the dataset is a folder is known once the run is read
        if "few_label" in protocols:
            check_label_fractions(self.label_fractions)
        if "finetune" in protocols:
            check_positive_int(self.finetune_epochs, "--finetune-epochs")
            check_positive_float(self.finetune_backbone_lr, "--finetune-backbone-lr")
            check_positive_float(self.finetune_head_lr, "--finetune-head-lr")
        if on_this_machine:
            resolve_device(self.device)  # checks the name too
        else:
            check_device_name(self.device)
