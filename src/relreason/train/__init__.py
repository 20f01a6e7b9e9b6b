"""``relreason pretrain``: one readable loop over K-view batches, with metrics, checkpoints and resume.

The trainer is one user of the building blocks (pairing, head, losses, backbones, K-view data); nothing
in those blocks imports it. Its parts, each a small module:

* :mod:`~relreason.train.config` -- the options (``PretrainConfig``), checked in one line each;
* :mod:`~relreason.train.data` -- the pretraining images as K-view batches;
* :mod:`~relreason.train.loop` -- ``pretrain`` and the epoch loop;
* :mod:`~relreason.train.position` -- where a run stands (``TrainingPosition``);
* :mod:`~relreason.train.resume` -- checkpoints: saving, finding the newest, refusing a foreign resume;
* :mod:`~relreason.train.step_module` -- what a step runs: the method and its online probe (``PretrainModule``);
* :mod:`~relreason.train.stop` -- SIGTERM, Ctrl-C and the time limit, agreed across ranks; DataLoader workers that
  ignore them;
* :mod:`~relreason.train.metrics_log` -- metrics files, TensorBoard and the training-curve plot;
* :mod:`~relreason.train.run_folder` -- the run folder's files and the exported backbone.
"""

from relreason.device import AMP_MODES, autocast_dtype, resolve_device
from relreason.run_files import (
    BACKBONE_META_NAME,
    BACKBONE_NAME,
    CONFIG_NAME,
    METRICS_NAME,
    SKIPPED_IMAGES_NAME,
    STEPS_NAME,
)
from relreason.train.config import AUGMENT_MODES, PretrainConfig, PretrainResult, views_used
from relreason.train.data import (
    build_pretrain_data,
    check_every_image_labelled,
    describe_folder,
    loader_workers,
    make_loader,
    num_classes_of,
)
from relreason.train.loop import build_model, make_optimizer, pretrain, train_one_epoch, train_step
from relreason.train.metrics_log import MetricsLog, plot_training_curves
from relreason.train.position import TrainingPosition
from relreason.train.resume import CheckpointSaver, check_resumable, load_optimizer_state
from relreason.train.run_folder import export_backbone, prepare_output_dir
from relreason.train.stop import StopRequest

__all__ = [
    "AMP_MODES",
    "AUGMENT_MODES",
    "BACKBONE_META_NAME",
    "BACKBONE_NAME",
    "CONFIG_NAME",
    "METRICS_NAME",
    "SKIPPED_IMAGES_NAME",
    "STEPS_NAME",
    "CheckpointSaver",
    "MetricsLog",
    "PretrainConfig",
    "PretrainResult",
    "StopRequest",
    "TrainingPosition",
    "autocast_dtype",
    "build_model",
    "build_pretrain_data",
    "check_every_image_labelled",
    "check_resumable",
    "describe_folder",
    "export_backbone",
    "load_optimizer_state",
    "loader_workers",
    "make_loader",
    "make_optimizer",
    "num_classes_of",
    "plot_training_curves",
    "prepare_output_dir",
    "pretrain",
    "resolve_device",
    "train_one_epoch",
    "train_step",
    "views_used",
]
