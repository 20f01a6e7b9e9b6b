"""The epoch loop of ``relreason pretrain``: ``pretrain`` sets a run up (data, model, optimiser, resume) and
trains it epoch by epoch, logging and checkpointing on rank 0."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from relreason.atomic_files import atomic_write_json
from relreason.backbones import build_backbone
from relreason.backbones.feature_dim import check_takes_rgb_views
from relreason.checkpoint import first_difference, list_checkpoints, set_rng_state
from relreason.checks import with_home_expanded, with_plain_values
from relreason.data import ImageFolderDataset, MultiViewDataset, read_skip_log
from relreason.data.batch_views import DeviceMultiViewDataset
from relreason.data.decoded_folder import DecodedImageFolder
from relreason.data.sampler import EpochBatchSampler
from relreason.device import autocast_dtype, is_out_of_memory, precise_float, resolve_device
from relreason.distributed import DistributedContext, all_reduce_mean, barrier, init_distributed, shutdown_distributed
from relreason.errors import DISK_FULL_ERRNOS, RelreasonError, note, say, short_reason, warn
from relreason.losses import build_loss
from relreason.methods import (
    PretrainMethod,
    RelationalReasoning,
    SimCLR,
    Supervised,
    is_built_in,
    method_class,
    takes_num_classes,
)
from relreason.methods.online_probe import OnlineProbe
from relreason.run_files import CONFIG_NAME, CURVES_NAME, SKIPPED_IMAGES_NAME
from relreason.schedule import learning_rate_factor, set_learning_rate
from relreason.seeding import caller_rng_kept, seed_everything
from relreason.train.config import PretrainConfig, PretrainResult, unused_option_notes, views_used
from relreason.train.data import (
    build_pretrain_data,
    check_every_image_labelled,
    describe_folder,
    loader_batches,
    make_loader,
    no_labels_error,
    num_classes_of,
)
from relreason.train.metrics_log import (
    MetricsLog,
    format_metric,
    in_percent,
    plot_training_curves,
    progress_fields,
    step_record,
)
from relreason.train.position import TrainingPosition
from relreason.train.resume import (
    CheckpointSaver,
    changed_option_notes,
    check_resumable,
    keep_recorded_normalization,
    load_optimizer_state,
    newest_checkpoint_everywhere,
    without_probe,
)
from relreason.train.run_folder import (
    absolute_data_root,
    check_no_other_run,
    check_output_dir,
    export_backbone,
    lock_run_folder,
    prepare_output_dir,
    release_run_folders,
)
from relreason.train.step_module import PretrainModule
from relreason.train.stop import StopRequest

POSTFIX_SECONDS = 2.0  # how often the progress bar's running means are refreshed


def pretrain(config: PretrainConfig) -> PretrainResult:
    """Train ``config.backbone`` with ``config.method`` (relational reasoning by default) on ``config.dataset``;
    see ``PretrainConfig``.

    Under ``torchrun`` each process trains on its own share of every epoch (pairs are formed inside each
    rank's batch) and rank 0 alone writes files; otherwise this is a plain single-process loop. SIGTERM and
    the time limit end it with a checkpoint at the current step (``stopped_early``); so does Ctrl-C, which
    then raises KeyboardInterrupt (a second Ctrl-C raises it at once).
    """
    config = with_home_expanded(with_plain_values(config), "output_dir", "data_root")
    config.validate()
    # The time limit counts from here, setup included (decoding a large folder takes minutes): a limit
    # chosen to fit a scheduler's wall clock then holds.
    deadline = time.monotonic() + config.time_limit * 60 if config.time_limit else math.inf
    context, device = init_distributed(resolve_device(config.device))
    try:
        with caller_rng_kept():
            return _pretrain(config, context, device, deadline)
    except OSError as error:
        if error.errno not in DISK_FULL_ERRNOS:
            raise
        # Every run file is written whole or not at all: the newest checkpoint there is whole.
        kept = list_checkpoints(config.output_dir)
        progress = (f"its newest whole checkpoint, {kept[0].name}, is kept: free space there and rerun the command "
                    "to go on from it" if kept else "no checkpoint had been written yet: free space there (or choose "
                    "another --output-dir) and rerun the command")
        raise RelreasonError(f"cannot write in {config.output_dir} ({error.strerror}); {progress}") from None
    finally:
        release_run_folders()
        shutdown_distributed(context)


def _out_of_memory_message(error: RuntimeError, config: PretrainConfig, device: torch.device,
                           context: DistributedContext) -> str:
    """What to change when a step does not fit the memory, and what is kept."""
    where = "host" if device.type == "cpu" or "can't allocate memory" in str(error) else "GPU"
    each = " in each process" if context.enabled else ""
    step = f"{views_used(config)} views of each of {config.batch_size} images{each}"
    # The built-in baselines make their own number of views; relational reasoning's (and maybe one's own) follow K.
    lower = "--batch-size" if is_built_in(config.method) and config.method != "relational" else "--batch-size or -K"
    amp = ", or pass --amp bf16" if config.amp == "off" else ""
    try:
        kept = list_checkpoints(config.output_dir)
    except OSError:
        kept = []
    progress = (f"the newest checkpoint, {kept[0].name}, is kept (a resume keeps -K and --batch-size: a smaller "
                "step starts afresh in another --output-dir)" if kept else "no checkpoint had been written yet")
    return f"out of {where} memory for a training step of {step}; lower {lower}{amp}; {progress}"


def _pretrain(
    config: PretrainConfig, context: DistributedContext, device: torch.device, deadline: float
) -> PretrainResult:
    _say_option_notes(config, context, device)
    seed_everything(config.seed, device)
    method_type = method_class(config.method)
    check_output_dir(config)  # in one line before any data is read; the folder is made after the data checks
    lock_run_folder(Path(config.output_dir), context)  # an existing one, before its checkpoints are read
    if method_type is None:
        check_no_other_run(Path(config.output_dir))  # before anything in that folder is touched
    # The checkpoint to resume is read before the data, so that a resume its options refuse is refused before a
    # folder is decoded. 'random' keeps none.
    found = newest_checkpoint_everywhere(config, context) if method_type is not None else None

    def check_resume(geometry: dict[str, Any], statistics_by: Callable[[str], Any]) -> None:
        if found is not None:
            keep_recorded_normalization(found[1], config, geometry, context, statistics_by)
            check_resumable(found[1], config, geometry, found[0])

    dataset, geometry = build_pretrain_data(config, device, check_resume, context)
    _check_training_data(dataset, geometry, config, method_type, context)
    num_classes = num_classes_of(dataset)
    # A broken backbone factory fails here, before the output folder exists.
    method = build_model(config, geometry["image_size"], num_classes)
    run_dir = prepare_output_dir(config, context)
    if method is None:  # 'random': the lower bound is the initialisation itself
        backbone = build_backbone(config.backbone, image_size=geometry["image_size"], args=config.backbone_args)
        if context.is_main:
            export_backbone(run_dir, backbone, config, geometry, TrainingPosition())
            log("method 'random': exported the randomly initialised backbone without training", context)
        barrier(context)
        return PretrainResult(run_dir, 0, [], False, backbone, num_classes=num_classes)
    if isinstance(dataset.dataset, (ImageFolderDataset, DecodedImageFolder)):
        dataset.dataset.log_skips_to(run_dir / SKIPPED_IMAGES_NAME)  # unreadable files are listed, not fatal
    if method.needs_labels:
        method.check_label_values = False  # checked once above, so no step waits on the device to check them
    probe = OnlineProbe(method.feature_dim, num_classes) if config.online_probe and num_classes else None
    model = _step_module(method, probe, config, device, context)
    groups = [{"params": model.method.parameters(), "base_lr": config.lr}]
    if probe is not None:
        # The probe must keep up with features that move every step; on standardised features a 10x
        # larger step is safe, and it never touches the backbone.
        groups.append({"params": probe.parameters(), "lr": 10 * config.lr, "base_lr": 10 * config.lr, "weight_decay": 0.0})
    optimizer = make_optimizer(groups, config, device)
    amp_dtype = autocast_dtype(config.amp)
    scaler = torch.amp.GradScaler(device.type, enabled=config.amp == "fp16")
    metrics = MetricsLog(run_dir, config.tensorboard and context.is_main)
    position = TrainingPosition()
    if found is not None:
        position = _resume(found, model, optimizer, groups, scaler, config, geometry, device, context)
    if context.is_main:
        # config.json first: it marks the folder as a run's before any log is written (run_folder.foreign_run_files).
        _record_options(run_dir, config, geometry, position, context)
        # Records past the starting point (all of them on a fresh start) are of steps about to be redone.
        metrics.truncate_after(position.epochs_done)

    train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if context.enabled else model
    saver = CheckpointSaver(run_dir, config, geometry, model, optimizer, scaler, context, device,
                            resumed_from=found[0] if found is not None else None)
    stop = StopRequest.install()
    stopped_early = False
    try:
        while position.epoch < config.epochs and not stopped_early:
            _, stopped_early = train_one_epoch(
                train_model, optimizer, scaler, dataset, config, position, device, amp_dtype, deadline, stop, saver,
                context, metrics,
            )
        stopped_early = stopped_early and position.epoch < config.epochs
        stopped_by = (stop.signal_name or "time limit") if stopped_early else None
        overrun = _past_the_limit(config, deadline)  # before the export, whose time is not a step's
        # Still under the handlers: a SIGTERM now (the run's last second) lets the export and the plot finish.
        if context.is_main:
            export_backbone(run_dir, model.method.backbone, config, geometry, position, stopped_by)
            metrics.close()
            # A run stopped inside its first epoch has no epoch record yet: its --log-every points are drawn.
            plot_training_curves(metrics.read() or metrics.read_steps(), run_dir / CURVES_NAME)
            if stopped_early:
                _say_where_it_stopped(position, stop, overrun, context)
        barrier(context)  # every rank keeps the handlers until rank 0 is done: a SIGTERM then kills none of them
    finally:
        stop.uninstall()
    if stop.signal_name == "Ctrl-C" or stop.interrupted:
        # Ctrl-C still interrupts the caller (a loop over runs, compare), now with the run checkpointed; also when
        # it came during the last step, which ended the run anyway.
        raise KeyboardInterrupt
    history = metrics.read() if context.is_main else []
    return PretrainResult(run_dir, position.epoch, history, stopped_early, model.method,
                          stopped_early and stop.signalled, num_classes, mid_epoch=stopped_early and position.step > 0,
                          sigterm_received=stop.signalled or stop.requested)


def _say_option_notes(config: PretrainConfig, context: DistributedContext, device: torch.device) -> None:
    """Refuse --sync-batchnorm where it cannot work, and note the options that will do nothing or little."""
    if config.sync_batchnorm and context.enabled and device.type != "cuda":
        raise RelreasonError("--sync-batchnorm needs CUDA devices (PyTorch's SyncBatchNorm is GPU-only); drop it on CPU")
    if config.sync_batchnorm and not context.enabled:
        note("--sync-batchnorm does nothing in a single process (it shares BatchNorm statistics "
             "across torchrun's processes)", context.is_main)
    if config.amp == "fp16" and device.type == "cpu":
        note("--amp fp16 is slow on a CPU (and needs a loss scaler); --amp bf16 is the CPU's "
             "half precision", context.is_main)
    for unused in unused_option_notes(config):
        note(unused, context.is_main)


def _check_training_data(dataset: Any, geometry: dict[str, Any], config: PretrainConfig,
                         method_type: type[PretrainMethod] | None, context: DistributedContext) -> None:
    """Refuse data the method cannot train on (before the output folder exists), and describe an image folder."""
    if config.num_workers is not None and geometry["augment"] == "tensor" and method_type is not None:
        note(f"--num-workers {config.num_workers} does nothing on the batched path (its views are "
             "made on the device in this process); it serves --augment pil", context.is_main)
    if len(dataset) < 2 * context.world_size:
        raise RelreasonError(
            f"dataset '{config.dataset}' has {len(dataset)} image(s); each of the {context.world_size} process(es) "
            "needs at least 2 (an image cannot be its own negative)"
        )
    if method_type is not None and method_type.needs_labels:
        check_every_image_labelled(dataset, config.dataset, config.method)
    folder = getattr(dataset.dataset, "folder", dataset.dataset)
    if isinstance(folder, ImageFolderDataset):
        log(describe_folder(folder), context)
    if isinstance(dataset.dataset, DecodedImageFolder):
        log(dataset.dataset.describe(), context)


def _step_module(method: PretrainMethod, probe: OnlineProbe | None, config: PretrainConfig, device: torch.device,
                 context: DistributedContext) -> PretrainModule:
    """What a step runs: the method and its online probe, on the device, in the memory format and compiled as the
    options say."""
    model = PretrainModule(method, probe).to(device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if config.compile:
        # The backbone only: compiling the whole forward was faster at K=16 but slower at K=32 on the CPU (the
        # relation pairs' gradient becomes an atomic scatter-add, which is also not deterministic), while the
        # eager relation head is cheap. In place: the state_dict keys stay those of the plain backbone.
        # Static shapes: an epoch's short last batch then gets a graph of its own, instead of turning every
        # later step into a dynamic-shape graph.
        model.method.backbone.compile(dynamic=False)
    if config.sync_batchnorm and context.enabled:
        # In place: only BatchNorm modules are swapped for new ones, the PretrainModule itself is returned.
        model = cast(PretrainModule, nn.SyncBatchNorm.convert_sync_batchnorm(model))
    return model


def _resume(found: tuple[Path, dict[str, Any]], model: nn.Module, optimizer: torch.optim.Optimizer,
            groups: list[dict[str, Any]], scaler: torch.amp.GradScaler, config: PretrainConfig,
            geometry: dict[str, Any], device: torch.device, context: DistributedContext) -> TrainingPosition:
    """Load the checkpoint ``found`` into the model, optimiser, scaler and RNGs; the position it ends at."""
    path, checkpoint = found
    if model.probe is None:
        checkpoint = without_probe(checkpoint)
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError:
        difference = first_difference(model.state_dict(), checkpoint["model"])
        # The probe's output grows with the classes; the method's tensors change with its code or its backbone's.
        names = difference.split()  # the tensor's name leads, or follows "the checkpoint has"
        if any(name.startswith("probe.") for name in names):
            cause = "was a class folder added? Rerun with the original data"
        elif any(name.startswith("method.backbone.") for name in names):
            cause = "did the backbone's code change? Rerun with the backbone the run started with"
        else:
            cause = "did the method's code change? Rerun with the method the run started with"
        raise RelreasonError(
            f"cannot resume {path}: this run's model no longer fits it ({difference}); {cause} or choose another "
            "--output-dir"
        ) from None
    load_optimizer_state(optimizer, checkpoint["optimizer"], groups, config)
    if checkpoint["scaler"]:  # empty when saved without --amp fp16: a newly enabled scaler starts afresh
        scaler.load_state_dict(checkpoint["scaler"])
    set_rng_state(checkpoint["rng"], device)
    position = TrainingPosition(**checkpoint["position"])
    if context.is_main:
        if position.epoch >= config.epochs:
            log(f"{path} ends the run's {position.epoch} epoch(s): nothing to train (pass a larger --epochs to "
                "train on); exporting its backbone again", context)
        else:
            log(f"resuming {path}: epoch {position.epoch + 1}, step {position.step}", context)
            for changed in changed_option_notes(checkpoint, config, geometry):
                note(changed)
        saved_epochs = checkpoint.get("config", {}).get("epochs", config.epochs)
        if config.lr_schedule == "cosine" and saved_epochs != config.epochs:
            warn(f"--epochs changed from {saved_epochs} to {config.epochs}: the cosine schedule "
                 "now spans the new length, so the learning rate jumps to that curve")
    return position


def _record_options(run_dir: Path, config: PretrainConfig, geometry: dict[str, Any], position: TrainingPosition,
                    context: DistributedContext) -> None:
    """Write config.json: the options of the latest command that trained the run (a rerun that trains nothing
    keeps them), with the data's geometry and the number of processes (--batch-size is per process)."""
    if position.epoch < config.epochs or not (run_dir / CONFIG_NAME).exists():
        # Paths absolute: `pretrain --config RUN/config.json` then means the same run from any working folder.
        paths = {"data_root": absolute_data_root(config), "output_dir": str(run_dir.resolve())}
        recorded = {"geometry": geometry, "processes": context.world_size}  # run_files.RUN_RECORDS: not options
        atomic_write_json(run_dir / CONFIG_NAME, dataclasses.asdict(config) | paths | recorded)


def _say_where_it_stopped(position: TrainingPosition, stop: StopRequest, overrun: str,
                          context: DistributedContext) -> None:
    where = f"during epoch {position.epoch + 1} at step {position.step}" if position.step else \
        f"after epoch {position.epoch}"
    if stop.signal_name:
        log(f"stopped {where}; exported the current backbone and saved a checkpoint there: rerun the "
            "same command to continue", context)
    else:  # the time limit: what follows (a rerun, compare's next run) is the caller's to decide
        log(f"stopped {where} by the time limit{overrun}; exported the "
            "current backbone and saved a checkpoint there", context)


def _past_the_limit(config: PretrainConfig, deadline: float) -> str:
    """How far past ``--time-limit`` a run stopped, when that is worth saying: the limit is checked between
    steps, so a step of minutes (a large backbone on a CPU) overruns it."""
    past = time.monotonic() - deadline
    if config.time_limit is None or past < max(5.0, 0.1 * config.time_limit * 60):
        return ""
    return (f", {past / 60:.1f} min past its {config.time_limit:g} min (it is checked between steps, and a step "
            "takes long here)")


def build_model(config: PretrainConfig, image_size: int, num_classes: int | None = None) -> PretrainMethod | None:
    """The method ``config.method`` on a fresh ``config.backbone`` (None for ``random``, which trains nothing)."""
    backbone = build_backbone(config.backbone, image_size=image_size, args=config.backbone_args)
    check_takes_rgb_views(backbone, image_size, config.backbone)
    method = method_class(config.method)
    if method is None:
        return None
    feature_dim = getattr(backbone, "feature_dim", None)  # set by build_backbone
    if config.method == "relational":
        loss = build_loss(config.loss, config.focal_gamma, config.focal_alpha)
        return RelationalReasoning(backbone, feature_dim, config.aggregation, config.head_hidden, loss,
                                   image_size=image_size)
    if config.method == "simclr":
        return SimCLR(backbone, feature_dim, temperature=config.simclr_temperature)
    if method.needs_labels:
        if num_classes is None:
            raise no_labels_error(config.dataset, config.method)
        if config.method == "supervised":
            return Supervised(backbone, feature_dim, num_classes)
    if is_built_in(config.method):  # rotation
        return method(backbone, feature_dim)
    extra: dict[str, Any] = {"num_classes": num_classes} if takes_num_classes(method) else {}
    try:  # a user's own method: its constructor's error is its own, at its line
        return method(backbone, feature_dim, **extra)
    except RelreasonError:
        raise
    except Exception as error:
        raise RelreasonError(f"building method '{config.method}' failed ({short_reason(error)}); fix its "
                             "constructor") from error


def make_optimizer(groups: list[dict[str, Any]], config: PretrainConfig, device: torch.device) -> torch.optim.Adam:
    """Adam as in the paper. On CUDA the fused kernel: one launch for all parameters, and with --amp fp16 the
    GradScaler hands it the overflow flag on the device instead of reading it on the host every step. On the
    CPU PyTorch's default (the per-parameter loop), which the bit-exact resume tests were written against."""
    return torch.optim.Adam(groups, lr=config.lr, weight_decay=config.weight_decay, fused=device.type == "cuda")


def log(message: str, context: DistributedContext) -> None:
    if context.is_main:
        say(message)


def train_one_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    dataset: MultiViewDataset | DeviceMultiViewDataset,
    config: PretrainConfig,
    position: TrainingPosition,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    deadline: float,
    stop: StopRequest,
    saver: CheckpointSaver,
    context: DistributedContext,
    metrics: MetricsLog,
) -> tuple[dict[str, float] | None, bool]:
    """Train from ``position`` to the end of its epoch, advancing ``position`` in place.

    Returns the epoch's metrics (None when cut short) and whether a time limit or SIGTERM cut it short;
    either way a checkpoint at the current step has been written.
    """
    loader = make_loader(dataset, config, position, device, context)
    with loader_batches(loader) as batches:
        model.train()
        sampler = cast(EpochBatchSampler, loader.batch_sampler)  # make_loader's, for both kinds of loader
        steps_per_epoch = position.steps_per_epoch = sampler.steps_per_epoch
        _start_where_the_sampler_starts(position, sampler, len(dataset), saver, context)
        # Sums stay on the device: reading them every step would stall a GPU on each batch.
        names = list(position.totals)
        totals = torch.tensor(list(position.totals.values()), device=device, dtype=precise_float(device))
        started = time.perf_counter() - position.seconds
        bar = tqdm(batches, desc=f"epoch {position.epoch + 1}/{config.epochs}", initial=position.step,
                   total=steps_per_epoch, disable=None if config.progress and context.is_main else True, leave=False,
                   dynamic_ncols=True)
        shown_at = -math.inf  # the first step's means are shown at once

        def sync_position() -> None:
            """Copy the device sums' mean over the ranks into ``position`` (every rank calls it at the same step):
            the same on each, which is what a checkpoint keeps (each rank resumes from it, and the epoch's mean of
            (shared + own) is shared + the mean of its own), checked finite on every rank alike."""
            position.totals = dict(zip(names, all_reduce_mean(totals.clone(), context).tolist()))
            position.seconds = time.perf_counter() - started
            check_finite(position, config)

        for views, labels in bar:
            set_learning_rate(optimizer, learning_rate_factor(
                position.epoch * steps_per_epoch + position.step, config.epochs * steps_per_epoch,
                round(config.warmup_epochs * steps_per_epoch), config.lr_schedule))
            try:
                step_values = train_step(model, optimizer, scaler, views, labels, device, amp_dtype)
            except RuntimeError as error:
                if not is_out_of_memory(error):
                    raise
                raise RelreasonError(_out_of_memory_message(error, config, device, context)) from error
            if not names:
                names = list(step_values)
                totals = torch.zeros(len(names), device=device, dtype=precise_float(device))
            totals += torch.stack([step_values[name].float() for name in names]).to(totals.dtype)
            position.step += 1
            position.items = (position.items or 0) + config.batch_size * context.world_size  # set at the start
            position.views += len(views) * views[0].shape[0] * context.world_size
            # Reading the sums waits for the device: at most every POSTFIX_SECONDS, not every few (fast) steps.
            if (config.progress and context.is_main
                    and (time.perf_counter() - shown_at >= POSTFIX_SECONDS or position.step == steps_per_epoch)):
                means = dict(zip(names, (totals / position.step).tolist()))
                bar.set_postfix(progress_fields(means))
                shown_at = time.perf_counter()
            # Counted over the whole run, so epochs shorter than --log-every still get points; the epoch's last
            # step is recorded at its end (below).
            global_step = position.epoch * steps_per_epoch + position.step
            log_now = (config.log_every and global_step % config.log_every == 0 and position.step < steps_per_epoch)
            if log_now:
                # The means over all ranks, as a checkpoint keeps them (so a resumed epoch logs what the uninterrupted
                # one would); every rank takes part, so all of them find a non-finite loss alike and stop with it.
                sync_position()
                if context.is_main:
                    metrics.write_step(step_record(position))
            interrupted = stop.agreed(deadline, context)
            if position.step < steps_per_epoch and (interrupted or (
                    config.checkpoint_every and position.step % config.checkpoint_every == 0)):
                if not log_now:
                    sync_position()
                    if interrupted and config.log_every and context.is_main:
                        metrics.write_step(step_record(position))  # the curve's last point: where the run stopped
                saving = time.perf_counter()
                saver.save(position)
                started += time.perf_counter() - saving  # training time, as at an epoch's end: not the writing
            if interrupted and position.step < steps_per_epoch:
                bar.close()
                return None, True
        bar.close()
        sync_position()
        record = _epoch_record(position, optimizer, dataset, config, context)
        if context.is_main:
            if config.log_every:
                metrics.write_step(step_record(position))  # the curve's point at the epoch's end
            metrics.write(record)  # before the checkpoint that moves past it: a kill in between cannot lose it
        position.next_epoch()
        saver.save(position)
        return record, stop.agreed(deadline, context)


def _start_where_the_sampler_starts(position: TrainingPosition, sampler: EpochBatchSampler, dataset_size: int,
                                    saver: CheckpointSaver, context: DistributedContext) -> None:
    """Put ``position`` at the sampler's first step of the epoch: the checkpoint's own step, unless the run was
    resumed under another number of ranks, whose steps are of another size."""
    position.items = sampler.start_item
    if position.step == sampler.start_step:
        return
    # Count the images already used in this run's steps, so that the schedule, the progress and the running means
    # go on from the same fraction of the epoch.
    log(f"resumed under {context.world_size} process(es), a different number from the checkpoint's: the epoch goes "
        f"on with its {dataset_size - sampler.start_item} unused image(s), as step {sampler.start_step} of "
        f"{sampler.steps_per_epoch}", context)
    scale = sampler.start_step / position.step if position.step else 0.0
    position.totals = {name: value * scale for name, value in position.totals.items()}
    if sampler.start_step < position.step:
        saver.steps_renumbered(position.epoch, sampler.start_step)
    position.step = sampler.start_step


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
               views: list[torch.Tensor] | torch.Tensor, labels: torch.Tensor, device: torch.device,
               amp_dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """One optimiser step on a batch of views; the step's loss and metrics, as 0-d tensors still on the device."""
    if isinstance(views, torch.Tensor):  # (K, B, C, H, W), made on the device
        views = views.to(device, non_blocking=True)
    else:
        views = [v.to(device, non_blocking=True) for v in views]
    labels = labels.to(device, non_blocking=True)
    with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        total_loss, out = model(views, labels)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(total_loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return {"loss": out.loss.detach(), **out.metrics}


def _epoch_record(position: TrainingPosition, optimizer: torch.optim.Optimizer,
                  dataset: MultiViewDataset | DeviceMultiViewDataset, config: PretrainConfig,
                  context: DistributedContext) -> dict[str, Any]:
    """The epoch's line of metrics.jsonl (its means, speed, learning rate and unreadable images so far), said on
    rank 0."""
    means = position.means()
    record = {
        "epoch": position.epoch + 1,
        **in_percent(means),
        "seconds": position.seconds,
        "views_per_second": position.views / position.seconds if position.seconds > 0 else 0.0,
        "lr": optimizer.param_groups[0]["lr"],
    }
    images: Any = dataset.dataset  # an image folder, whose skip log and skips said so far are attributes of its own
    skip_log = getattr(images, "skip_log", None)
    if skip_log is not None:
        record["skipped_images"] = len(read_skip_log(skip_log))
        if record["skipped_images"] > getattr(images, "skips_reported", 0):  # said again only if more
            images.skips_reported = record["skipped_images"]
            log(f"skipped {record['skipped_images']} unreadable image(s) so far, each replaced by the next "
                f"readable one; their paths are in {skip_log}", context)
    shown = "  ".join(f"{name} {format_metric(name, value)}" for name, value in means.items())
    log(f"epoch {position.epoch + 1}/{config.epochs}  {shown}  {position.seconds:.1f}s  "
        f"{record['views_per_second']:.0f} views/s", context)
    return record


def non_finite_loss(position: TrainingPosition, config: PretrainConfig) -> RelreasonError | None:
    """The error to stop with when the running loss is no longer finite, else None."""
    loss = position.totals.get("loss", 0.0)
    if math.isfinite(loss):
        return None
    kept = (f"the last good checkpoint is kept in {config.output_dir}" if list_checkpoints(Path(config.output_dir))
            else "no checkpoint had been written yet")
    own = "" if is_built_in(config.method) else f", or check method {config.method}'s forward"
    return RelreasonError(
        f"the loss became {loss / max(position.step, 1)} in epoch {position.epoch + 1}; lower --lr or turn off "
        f"--amp fp16{own} ({kept})"
    )


def check_finite(position: TrainingPosition, config: PretrainConfig) -> None:
    """Stop before a checkpoint could store weights a non-finite loss has already spoilt."""
    failure = non_finite_loss(position, config)
    if failure is not None:
        raise failure
