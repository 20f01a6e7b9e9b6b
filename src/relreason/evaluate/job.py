"""``relreason evaluate``: a pretrained backbone against a random one, on a labelled dataset."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from relreason.backbones import build_backbone
from relreason.backbones.feature_dim import check_takes_rgb_views
from relreason.backbones.registry import check_backbone
from relreason.checkpoint import is_checkpoint_path
from relreason.checks import with_home_expanded, with_plain_values
from relreason.data import (
    SYSTEM_DATASET_DIRS,
    DatasetInfo,
    compute_normalization,
    dataset_info,
    eval_transform,
    held_out_split,
    same_dataset,
)
from relreason.data.datasets import LoadedDataset
from relreason.data.image_folder import decoded_for, read_threads
from relreason.data.splits import image_folders_read
from relreason.device import is_out_of_memory, resolve_device, use_device
from relreason.distributed import refuse_several_processes
from relreason.errors import DISK_FULL_ERRNOS, RelreasonError, disk_full, note, option_flag, warn
from relreason.evaluate.config import EvaluateConfig
from relreason.evaluate.data import (
    check_several_classes,
    count_images_inside,
    data_tag_of,
    decoded_once,
    feature_cache_path,
    labelled_split,
    pretraining_folder,
    same_path,
    state_digest,
    weights_digest,
    without_unreadable,
)
from relreason.evaluate.report import check_output_path, check_output_spares, write_results_json
from relreason.evaluate.weights import load_backbone_source, load_matching_state
from relreason.protocols import (
    check_label_fractions,
    few_label_indices,
    fine_tune,
    finetune_transform,
    fraction_key,
    plot_retrieval,
)
from relreason.protocols.features import extract_features
from relreason.protocols.finetune import FINETUNE_BATCH_SIZE, FINETUNE_LR_DECAY, finetune_milestones
from relreason.protocols.frozen import ALL_PROTOCOLS, DEFAULT_LABEL_FRACTIONS, choose_protocols, evaluate_features
from relreason.run_files import FEATURES_DIR_NAME
from relreason.seeding import caller_rng_kept, seed_torch
from relreason.user_code import UserCodeNotFound

# Options that serve one protocol alone: set without it, they are said to do nothing.
_PROTOCOL_OPTIONS = {
    "few_label": ("label_fractions",),
    "finetune": ("finetune_epochs", "finetune_backbone_lr", "finetune_head_lr"),
}


def _plain(value: Any) -> Any:
    return tuple(float(v) for v in value) if isinstance(value, (list, tuple)) else value


@dataclass
class _EvaluationData:
    """The labelled images an evaluation runs on, and how they stand to the images the backbone was pretrained on."""

    name: str  # the dataset's name, as given
    info: DatasetInfo
    data_root: str
    read: list[Path]  # the image folders read (an image folder's train/ and test/, or the root)
    train_set: Any
    test_set: Any
    image_size: int
    mean: Sequence[float]
    std: Sequence[float]
    own_data: bool  # the dataset the backbone was pretrained on (perhaps another folder of it: other_folder)
    other_folder: bool  # another image folder than the run's own: another domain, normalised on its own
    test_fraction: float | None  # None: the dataset's own test split
    seen: bool | None  # whether the test images were seen in pretraining (None: perhaps)


def run_evaluation(config: EvaluateConfig) -> dict[str, Any]:
    """Evaluate the weights (and a random backbone) with the chosen protocols, write JSON; return the payload.

    Features are extracted once per backbone and split (cached beside the weights) for the
    feature protocols; ``finetune`` trains a copy of each backbone on the images.  The
    evaluation dataset may differ from the one pretrained on (cross-domain: another dataset, or another image folder
    than the run's); its images are then normalised with its own statistics.  With ``retrieval`` a PNG of retrievals per
    backbone is written beside the JSON (``<output stem>-retrieval-<label>.png``).
    """
    try:
        with caller_rng_kept():
            return _run_evaluation(config)
    except OSError as error:
        if error.errno not in DISK_FULL_ERRNOS:
            raise
        raise disk_full(error, "the features already cached are read, not extracted again") from None
    except RuntimeError as error:
        if not is_out_of_memory(error):
            raise
        finetune = "finetune" in choose_protocols(config.protocols, ALL_PROTOCOLS)
        steps = f", fine-tuning's steps {FINETUNE_BATCH_SIZE}" if finetune else ""
        drop = ", or leave finetune out of --protocols" if finetune else ""
        raise RelreasonError(f"out of memory evaluating (features are extracted in batches of {config.batch_size} "
                             f"images{steps}); lower `relreason evaluate`'s --batch-size{drop}") from error


def _run_evaluation(config: EvaluateConfig) -> dict[str, Any]:
    refuse_several_processes("evaluate")
    config = with_home_expanded(with_plain_values(config), "run_dir", "weights", "data_root", "output")
    config.validate()  # every option, named by its flag, before anything is read or written
    if config.weights and config.run_dir != EvaluateConfig.run_dir:
        note(f"--weights {config.weights} is evaluated; --run-dir {config.run_dir} is not read "
             "(the results go beside the weights, or to --output)")
    protocols = choose_protocols(config.protocols, ALL_PROTOCOLS)
    _note_options_of_other_protocols(config, protocols)
    fractions = check_label_fractions(config.label_fractions) if "few_label" in protocols else ()
    device = resolve_device(config.device)
    use_device(device)
    weights, meta, state = load_backbone_source(config)
    try:
        check_backbone(meta["backbone"], meta.get("backbone_args"))  # before any data is read
    except UserCodeNotFound as error:
        where = meta.get("backbone_code")
        if not where:
            raise
        raise RelreasonError(f"{error} (the run imported it from {where}: run evaluate there, or add that folder to "
                             "PYTHONPATH)") from None
    # A training checkpoint's results go beside it under their own name, not over the exported backbone's.
    default = f"evaluation-{weights.stem}.json" if is_checkpoint_path(weights) else "evaluation.json"
    output = Path(config.output) if config.output else weights.parent / default
    check_output_spares(output, weights)
    _say_if_partial(meta, weights, config)
    data = _evaluation_data(config, meta, output)
    image_size, train_set, test_set = data.image_size, data.train_set, data.test_set
    transform = eval_transform(image_size, data.mean, data.std)
    cache_dir = _feature_cache_dir(weights, output, data)
    digest = weights_digest(weights.read_bytes())
    data_tag = data_tag_of(data.name, data.data_root, data.mean, data.std, (train_set, test_set))
    backbones: dict[str, dict[str, torch.Tensor] | None] = {"pretrained": state}  # None: a random one
    if config.random_baseline:
        backbones["random"] = None
    feature_protocols = [p for p in protocols if p != "finetune"]
    num_classes = int(max(train_set.labels.max(), test_set.labels.max())) + 1

    results: dict[str, Any] = {}
    plots: dict[str, str] = {}
    left_out = {"train": 0, "test": 0}  # unreadable images
    in_memory: dict[str, tuple[Any, Any]] = {}  # fine-tuning's splits (a folder decoded once), by the split read
    if not feature_protocols:  # fine-tuning alone extracts no features: the splits are read once to find them
        splits = {"train": train_set, "test": test_set}
        for split, dataset in splits.items():
            splits[split], _ = without_unreadable(dataset, split, None)
            left_out[split] += len(dataset) - len(splits[split])
        train_set, test_set = splits["train"], splits["test"]
        check_several_classes(train_set, data.name, left_out["train"])
    for label, weights_state in backbones.items():
        seed_torch(config.seed, device)
        backbone = build_backbone(meta["backbone"], image_size=image_size, args=meta.get("backbone_args"))
        check_takes_rgb_views(backbone, image_size, meta["backbone"])
        if weights_state is None:  # its caches named by the initialisation, which the factory's code decides
            key = f"random-seed{config.seed}-{state_digest(backbone)}"
        else:
            key = digest
            recorded = not config.backbone and config.backbone_args is None  # as the weights' metadata says
            load_matching_state(backbone, weights_state, weights, meta["backbone"], recorded)
            if not (config.image_size or meta.get("image_size")):
                note(f"evaluating at {image_size} px, the dataset's own size (no backbone.json says "
                     "what the weights were trained at); pass --image-size if it was another")
        row: dict[str, Any] = {}
        if feature_protocols:
            features: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
            splits = {"train": train_set, "test": test_set}
            for split, dataset in splits.items():
                cache = feature_cache_path(cache_dir, meta["backbone"], key, data.name, split, image_size, data_tag,
                                           meta.get("backbone_args"))
                extracted = extract_features(backbone, dataset, transform, batch_size=config.batch_size, device=device,
                                             cache_path=cache, threads=read_threads(dataset),
                                             progress=config.progress)
                splits[split], features[split] = without_unreadable(dataset, split, cache, extracted)
                left_out[split] += len(dataset) - len(splits[split])
            train_set, test_set = splits["train"], splits["test"]  # what follows sees only the images read
            check_several_classes(train_set, data.name, left_out["train"])  # leaving images out may leave one
            row = evaluate_features(
                *features["train"], *features["test"], protocols=feature_protocols,
                linear_epochs=config.linear_epochs, knn_k=config.knn_k, seed=config.seed, device=device,
                label_fractions=fractions or DEFAULT_LABEL_FRACTIONS,
            )
            if "retrieval" in protocols and config.retrieval_plot:
                plot = output.with_name(f"{output.stem}-retrieval-{label}.png")
                plots[label] = str(plot_retrieval(test_set, *features["test"], plot, seed=config.seed))
        if "finetune" in protocols:
            for split, dataset in (("train", train_set), ("test", test_set)):  # once for every backbone
                if split not in in_memory or in_memory[split][0] is not dataset:
                    in_memory[split] = (dataset, decoded_once(dataset, image_size, split, config.progress))
            tune = {
                "train_set": in_memory["train"][1], "test_set": in_memory["test"][1],
                "train_transform": finetune_transform(image_size, data.mean, data.std),
                "test_transform": transform, "num_classes": num_classes, "epochs": config.finetune_epochs,
                "backbone_lr": float(config.finetune_backbone_lr), "head_lr": float(config.finetune_head_lr),
                "seed": config.seed, "device": device, "progress": config.progress,
            }
            row["finetune"] = fine_tune(backbone, **tune)
            for fraction in fractions:
                indices = few_label_indices(train_set.labels, fraction, config.seed)
                row["few_label"][fraction_key(fraction)]["finetune"] = fine_tune(backbone, **tune, label_indices=indices)
        unmatched = row.get("retrieval", {}).get("queries_without_match", 0)
        if unmatched and label == "pretrained":
            warn(f"{unmatched} of the {len(test_set)} test images have no other image of their "
                 "class to find: retrieval's mAP leaves them out and its precision counts them as misses (with none "
                 "to find at all, both read 0); give the test set at least 2 images of every class")
        results[label] = {p: row[p] for p in ALL_PROTOCOLS if p in row}

    payload = {
        "weights": str(weights),
        "backbone": meta["backbone"],
        "backbone_args": meta.get("backbone_args", {}),
        "pretrained_on": meta.get("dataset"),
        "dataset": data.name,
        # Where the images were, for an image folder (a cross-domain evaluation may be on another one).
        "pretrained_data_root": meta.get("data_root") if data.info.name == "folder" and data.own_data else None,
        "data_root": str(Path(data.data_root).expanduser().resolve()) if data.info.name == "folder" else None,
        "cross_domain": (not data.own_data or data.other_folder) if meta.get("dataset") else None,  # None: not known
        "image_size": image_size,
        "normalization": {"mean": [float(m) for m in data.mean], "std": [float(v) for v in data.std]},
        "pretraining": {key: meta[key] for key in ("finished", "epochs_done", "stopped_by") if key in meta},
        "train_size": len(train_set),
        "test_size": len(test_set),
        "unreadable_images_left_out": left_out,
        "test_fraction": data.test_fraction,  # None: the dataset's own test split
        "test_images_seen_in_pretraining": data.seen,
        "protocols": protocols,
        "settings": _settings(config, protocols, fractions),
        "results": results,
    }
    if plots:
        payload["retrieval_plots"] = plots
    write_results_json(output, payload)
    return payload | {"output": str(output)}


def _note_options_of_other_protocols(config: EvaluateConfig, protocols: list[str]) -> None:
    """Options that serve one protocol alone, set without it, are said to do nothing."""
    for protocol, fields in _PROTOCOL_OPTIONS.items():
        changed = [field for field in fields
                   if _plain(getattr(config, field)) != _plain(getattr(EvaluateConfig, field))]
        if changed and protocol not in protocols:
            flags = " and ".join(option_flag(field) for field in changed)
            note(f"{flags} set{'s' if len(changed) == 1 else ''} the {protocol} protocol, which "
                 f"--protocols does not include ({', '.join(protocols)}); add {protocol} to use it")


def _say_if_partial(meta: dict[str, Any], weights: Path, config: EvaluateConfig) -> None:
    """Say so when the weights are from a run that a time limit or a signal stopped (a partial run)."""
    planned_end = config.time_limit_ends_the_run and meta.get("stopped_by") == "time limit"
    if meta.get("finished") is not False or planned_end:
        return
    done = f"after {meta.get('epochs_done', 0):.2f} epoch(s)"
    if meta.get("stopped_by") == "time limit":  # the user's own budget (the 10-minute configs): a fact, no fault
        note(f"{weights} is from a run stopped by its time limit {done}; the same pretrain "
             "command trains on from there")
    else:
        warn(f"{weights} is from a run stopped by {meta.get('stopped_by') or 'an interruption'} "
             f"{done}; rerun its pretrain command to finish it")


def _evaluation_data(config: EvaluateConfig, meta: dict[str, Any], output: Path) -> _EvaluationData:
    """The labelled splits to evaluate on, found where the run was pretrained unless told otherwise, checked, and
    with the normalisation to use; refuses an ``output`` inside the image folder evaluated."""
    name = config.dataset or meta.get("dataset")
    if not name:
        raise RelreasonError("no dataset known for these weights; pass --eval-dataset NAME")
    info = dataset_info(name)
    image_size = config.image_size or meta.get("image_size") or info.image_size
    own_data = same_dataset(name, meta.get("dataset"))  # names as typed: fashion_mnist is fashion-mnist
    data_root, recorded = _data_root(config, meta, name, info, own_data)
    # The results (a retrieval PNG among them) must not join the images evaluated, now or next time.
    read = image_folders_read(data_root) if info.name == "folder" else []
    holder = next((folder for folder in read if output.resolve().is_relative_to(folder.resolve())), None)
    if holder is not None:
        where = f"--output {output} lies" if config.output else f"the results would go beside the weights, {output},"
        raise RelreasonError(f"{where} inside the image folder {holder}: they would be added to your images (and read "
                             "as images next time); pass an --output outside it")
    check_output_path(output)
    # The run's own held-out share when it was pretrained on part of this very folder (and none was asked for).
    # Also the run's own images named otherwise: its root's train/ given for a root that holds train/ and test/.
    same_folder = own_data and (not config.data_root or (recorded is not None and (
        same_path(config.data_root, recorded) or (info.name == "folder" and Path(config.data_root).expanduser().resolve()
                                                  == pretraining_folder(recorded).resolve()))))
    gone = bool(recorded and not Path(recorded).expanduser().exists())
    if info.name == "folder" and own_data and not same_folder and gone:
        # The run's folder is gone: the one given is taken for it, moved, as pretrain takes a moved folder on resuming.
        same_folder = True
        note(f"the run's folder {recorded} is not there; taking {data_root} for it, moved (its "
             "held-out share and the statistics the backbone was trained with)")
    pretrained_share = meta.get("test_fraction") if same_folder else None
    test_fraction = config.test_fraction if config.test_fraction is not None else pretrained_share
    seen: bool | None = bool(same_folder and info.name == "folder" and config.test_fraction is not None
                             and (pretrained_share is None or config.test_fraction > pretrained_share))
    train_set: LoadedDataset
    test_set: LoadedDataset
    if test_fraction is not None:
        train_set, test_set = held_out_split(name, data_root, test_fraction)
        if seen:
            own = "it held none out" if pretrained_share is None else f"it held out {pretrained_share:g}"
            warn(f"the test images that --test-fraction {config.test_fraction:g} holds out of "
                 f"{data_root} were {'all' if pretrained_share is None else 'partly'} seen in pretraining ({own}); "
                 f"pretrain with --test-fraction {config.test_fraction:g} for a test set it never saw")
    else:
        train_set = labelled_split(name, data_root, info.train_split, config.download)
        test_set = labelled_split(name, data_root, info.test_split, config.download)
    check_several_classes(train_set, name)
    # Every protocol sees an image at image_size from its short side: a folder's JPEGs need decoding no larger.
    train_set, test_set = decoded_for(train_set, image_size), decoded_for(test_set, image_size)
    # Another image folder than the run's own: another domain, as another dataset is (its own statistics). Not the
    # root whose train/ the run was pretrained on: its training images are the run's own.
    other_folder = bool(info.name == "folder" and own_data and not same_folder and recorded
                        and pretraining_folder(recorded).resolve() != pretraining_folder(data_root).resolve())
    if other_folder and recorded:
        # Another folder than the run's own, which may still hold (or lie inside) the one it was pretrained on.
        pretrained_on = pretraining_folder(recorded)
        inside = count_images_inside(test_set, pretrained_on)
        if inside:
            seen = True if meta.get("test_fraction") is None else None  # None: perhaps, its own share held out
            warn(f"{inside} of the {len(test_set)} test images lie in {pretrained_on}, "
                 f"which the backbone was pretrained on{'' if seen else ' (less its held-out share)'}; evaluate on "
                 "images outside it for a test set it never saw")
    if own_data and "mean" in meta and not other_folder:
        mean, std = meta["mean"], meta["std"]  # exactly what the backbone was trained on
    elif info.mean is not None:
        mean, std = info.mean, info.std
    else:
        mean, std = compute_normalization(train_set)
    return _EvaluationData(name, info, data_root, read, train_set, test_set, image_size, mean, std, own_data,
                          other_folder, test_fraction, seen)


def _data_root(config: EvaluateConfig, meta: dict[str, Any], name: str, info: DatasetInfo, own_data: bool
               ) -> tuple[str, str | None]:
    """Where to read the data (``--data-root``, else the pretraining run's own when the data is the run's, so its
    "evaluate with" line just works, else ./data), and the run's own root as recorded (None when not the run's
    data, or when a named dataset's recorded root is gone: a run folder copied from another machine)."""
    recorded = meta.get("data_root") if own_data else None
    # (A folder must be found where it was; digits reads no files; ./data itself needs no note.)
    if (recorded and info.name not in ("folder", "digits") and not Path(recorded).exists() and not config.data_root
            and not same_path(recorded, "data")):
        system = "".join(f" and {folder}" for folder in SYSTEM_DATASET_DIRS.get(info.name, ()))
        note(f"the run's data root {recorded} does not exist here; looking for {name} in "
             f"./data{system} (pass --data-root to say where it is)")
        recorded = None
    return config.data_root or recorded or "data", recorded


def _feature_cache_dir(weights: Path, output: Path, data: _EvaluationData) -> Path:
    """Beside the weights, unless that folder is read-only (a shared or downloaded backbone) or lies in the image
    folder evaluated (the user's files, only ever read): then beside the output."""
    folders: list[str | Path] = [data.data_root, *data.read] if data.info.name == "folder" else []
    in_images = any(weights.parent.resolve().is_relative_to(Path(folder).resolve()) for folder in folders)
    beside_weights = os.access(weights.parent, os.W_OK) and not in_images
    return (weights.parent if beside_weights else output.parent) / FEATURES_DIR_NAME


def _settings(config: EvaluateConfig, protocols: list[str], fractions: Sequence[float]) -> dict[str, Any]:
    """The protocols' settings, as the results JSON records them."""
    settings: dict[str, Any] = {"linear_epochs": config.linear_epochs, "knn_k": config.knn_k, "seed": config.seed}
    if fractions:
        settings["label_fractions"] = list(fractions)
    if "finetune" in protocols:
        epochs = config.finetune_epochs
        settings["finetune"] = {
            "epochs": epochs, "backbone_lr": float(config.finetune_backbone_lr),
            "head_lr": float(config.finetune_head_lr), "batch_size": FINETUNE_BATCH_SIZE,
            "lr_decay_epochs": finetune_milestones(epochs), "lr_decay": FINETUNE_LR_DECAY,
        }
    return settings
