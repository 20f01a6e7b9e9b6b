"""The run folder: its preparation, its lock, and the exported backbone with its metadata (the files' names are
in ``relreason.run_files``)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from torch import nn

from relreason.atomic_files import atomic_torch_save, atomic_write_json, remove_stale_temporaries
from relreason.backbones.registry import factory_defaults
from relreason.checkpoint import list_checkpoints
from relreason.distributed import DistributedContext, broadcast_object
from relreason.errors import RelreasonError
from relreason.run_files import (
    BACKBONE_META_NAME,
    BACKBONE_NAME,
    CONFIG_NAME,
    CURVES_NAME,
    METRICS_NAME,
    RUN_FILE_NAMES,
    SKIPPED_IMAGES_NAME,
    STEPS_NAME,
)
from relreason.train.config import PretrainConfig, views_used
from relreason.train.position import TrainingPosition
from relreason.user_code import code_folder


def check_output_dir(config: PretrainConfig) -> None:
    """Refuse an ``--output-dir`` that cannot be written, or that ``--no-resume`` forbids, before any data is read
    (scanning or decoding a large folder takes minutes); nothing is created. ``prepare_output_dir`` makes it."""
    run_dir = Path(config.output_dir)
    check_writable_folder(run_dir)
    try:
        checkpoints = list_checkpoints(run_dir)
    except OSError as error:
        raise RelreasonError(f"output folder {run_dir} cannot be read ({error.strerror or type(error).__name__}); "
                             "choose another --output-dir") from None
    if checkpoints and not config.resume:
        raise RelreasonError(
            f"{run_dir} already holds training checkpoints and --no-resume was given; "
            "drop --no-resume to continue them or choose another --output-dir"
        )
    foreign = [] if checkpoints else foreign_run_files(run_dir)
    if foreign:
        raise RelreasonError(f"{run_dir} holds {', '.join(foreign)}, which no relreason run wrote there and a run would "
                             "replace; choose another --output-dir (a folder of its own for each run)")
    if not checkpoints and config.method != "random" and (run_dir / BACKBONE_META_NAME).exists():
        # Its checkpoints deleted (to save space, say): training there afresh would replace the trained backbone.
        raise RelreasonError(f"{run_dir} holds an exported backbone ({BACKBONE_NAME}, {BACKBONE_META_NAME}) but no "
                             "checkpoint to go on from; choose another --output-dir (or move those files away to "
                             "train there afresh)")


def foreign_run_files(run_dir: Path) -> list[str]:
    """The files of ``run_dir`` named as a run's files when no run wrote them: a folder with neither checkpoints nor a
    run's config.json or backbone.json (``--output-dir .`` in a project of one's own, say)."""
    # Not the skip log: a run may write it (while reading its images) before its config.json.
    names = [name for name in RUN_FILE_NAMES if name != SKIPPED_IMAGES_NAME and (run_dir / name).exists()]
    # backbone.pt alone: an export killed between its two files (--method random writes no config.json).
    if names in ([], [BACKBONE_NAME]) or any(_is_run_record(run_dir / name) for name in (CONFIG_NAME, BACKBONE_META_NAME)):
        return []
    return names


def _is_run_record(path: Path) -> bool:
    """Whether ``path`` is a config.json or backbone.json a run wrote: JSON naming the run's method (the earliest
    versions named only its backbone and dataset)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and ("method" in record or {"backbone", "dataset"} <= record.keys())


def check_writable_folder(folder: Path) -> None:
    """Refuse, in one line, an ``--output-dir`` that cannot be made or written (nothing is created)."""
    try:
        existing = folder
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        reason = "Not a directory" if not existing.is_dir() else None
        if reason is None and not os.access(existing, os.W_OK | os.X_OK):
            reason = "Read-only file system" if _read_only_mount(existing) else "Permission denied"
    except OSError as error:  # a folder on the way that cannot be searched
        reason = error.strerror or type(error).__name__
    if reason:
        raise RelreasonError(f"output folder {folder} is not writable ({reason}); choose another --output-dir")


def _read_only_mount(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):  # no statvfs (Windows)
        return False


def prepare_output_dir(config: PretrainConfig, context: DistributedContext = DistributedContext()) -> Path:
    """Make the run folder (locked, writable, cleared of what killed writes left) and return it."""
    run_dir = Path(config.output_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{context.rank}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise RelreasonError(f"output folder {run_dir} is not writable ({error.strerror}); choose another --output-dir") from None
    lock_run_folder(run_dir, context)  # before the cleanup: another run's temporaries are not stale
    if context.is_main:  # left by a run killed while writing them
        for name in ("checkpoint-e*-s*.pt", BACKBONE_NAME, BACKBONE_META_NAME, CONFIG_NAME, METRICS_NAME, STEPS_NAME,
                     CURVES_NAME):
            remove_stale_temporaries(run_dir, name)
    check_output_dir(config)
    return run_dir


#: Run folders this process holds locked (path -> descriptor of the folder), until release_run_folders.
_LOCKED: dict[str, int] = {}


def lock_run_folder(run_dir: Path, context: DistributedContext = DistributedContext()) -> None:
    """Refuse a run folder that another process trains in (a requeued job beside the one still checkpointing):
    two runs would interleave their logs and delete each other's temporary files. Rank 0 takes the kernel's flock
    on the folder itself (no file is created; it dies with the process however it ends) and every rank gets its
    refusal. Where the file system has no flock (some network mounts) the folder is not locked."""
    refusal = _lock(run_dir) if context.is_main else None
    refusal = broadcast_object(refusal, context)
    if refusal is not None:
        raise RelreasonError(refusal)


def _lock(run_dir: Path) -> str | None:
    try:
        import fcntl
    except ImportError:  # not a POSIX system: no lock
        return None
    key = str(run_dir.resolve())
    if key in _LOCKED or not run_dir.is_dir():
        return None
    descriptor = os.open(run_dir, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(descriptor)
        return (f"run folder {run_dir} is in use by another relreason process that is training in it; wait for it "
                "to end (or stop it), or choose another --output-dir")
    except OSError:
        os.close(descriptor)
        return None
    _LOCKED[key] = descriptor
    return None


def release_run_folders() -> None:
    """Release every run folder this process locked; in a forked worker, drop its copies of the parent's lock
    descriptors, so that the lock ends with the parent."""
    while _LOCKED:
        os.close(_LOCKED.popitem()[1])


def check_no_other_run(run_dir: Path) -> None:
    """``--method random`` writes its backbone without checkpoints: refuse a folder that holds another run's."""
    if list_checkpoints(run_dir):
        raise RelreasonError(f"{run_dir} holds training checkpoints; choose another --output-dir for the random backbone")
    try:
        other = json.loads((run_dir / BACKBONE_META_NAME).read_text()).get("method")
    except (OSError, ValueError, AttributeError):
        return  # no backbone (or none relreason can read) to overwrite
    if other != "random":
        raise RelreasonError(
            f"{run_dir} holds the backbone of a '{other}' run; choose another --output-dir for the random backbone"
        )


def absolute_data_root(config: PretrainConfig) -> str | None:
    """The data root as an absolute path: `evaluate` finds the data from any working folder."""
    return str(Path(config.data_root).expanduser().resolve()) if config.data_root else None


def export_backbone(
    run_dir: Path,
    backbone: nn.Module,
    config: PretrainConfig,
    geometry: dict,
    position: TrainingPosition,
    stopped_by: str | None = None,
) -> None:
    """The trained backbone alone, as a plain state_dict, plus what is needed to rebuild and feed it."""
    # Contiguous: a --channels-last run's tensors would otherwise keep their strides into the file.
    state = {k: v.detach().cpu().contiguous() for k, v in backbone.state_dict().items()}
    # The earlier description goes first: a kill between the two writes leaves new weights without one, not
    # beside one of other weights (a rerun writes both again).
    (run_dir / BACKBONE_META_NAME).unlink(missing_ok=True)
    atomic_torch_save(state, run_dir / BACKBONE_NAME)
    meta = {
        "backbone": config.backbone,
        "backbone_args": config.backbone_args,
        "backbone_code": code_folder(config.backbone),  # a factory of one's own: where it was imported from
        "backbone_defaults": factory_defaults(config.backbone, config.backbone_args),  # what args= left to it
        "method": config.method,
        "feature_dim": int(getattr(backbone, "feature_dim", 0)),
        "dataset": config.dataset,
        "data_root": absolute_data_root(config),
        "epochs": position.epoch,
        "epochs_done": position.epochs_done,
        "train_seconds": position.train_seconds,
        "finished": position.epoch >= config.epochs or config.method == "random",
        "stopped_by": stopped_by,
        "num_views": views_used(config),  # per image, as the method took them (SimCLR: 2 whatever -K says)
        "seed": config.seed,
        "test_fraction": config.test_fraction,  # evaluate holds the same share out by default
        **geometry,
    }
    atomic_write_json(run_dir / BACKBONE_META_NAME, meta)
