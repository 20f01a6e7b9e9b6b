"""``relreason compare``: methods x seeds on one dataset and backbone, evaluated alike, in one table.

Each run is an ordinary ``pretrain`` run folder followed by ``evaluate``, so a comparison that dies
resumes where it stopped (finished runs are not trained again; evaluations reuse cached features).
"""

from __future__ import annotations

import dataclasses
import io
import json
import statistics
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from relreason.atomic_files import atomic_write_bytes, atomic_write_json
from relreason.checks import check_folder_given, with_home_expanded, with_plain_values
from relreason.device import resolve_device
from relreason.distributed import refuse_several_processes
from relreason.errors import DISK_FULL_ERRNOS, RelreasonError, disk_full, option_flag, option_value, say
from relreason.figures import off_screen_figure, save_png
from relreason.methods import check_method_name
from relreason.run_files import BACKBONE_META_NAME, BACKBONE_NAME, CONFIG_NAME, FEATURES_DIR_NAME, STEPS_NAME
from relreason.seeding import check_seed

if TYPE_CHECKING:  # the trainer and the data are imported when a run starts, not with the CLI
    from relreason.data.datasets import LoadedDataset
    from relreason.train import PretrainConfig

# Protocols with one headline number per run (few-label results are per fraction: use `evaluate` for them).
COMPARABLE_PROTOCOLS = ("linear", "linear_converged", "knn", "finetune", "retrieval")


@dataclass
class CompareConfig:
    """Every option of ``relreason compare``; the CLI and YAML configs fill it by field name."""

    dataset: str = "digits"
    data_root: str = "data"
    download: bool = False
    backbone: str = "conv4"
    backbone_args: dict[str, Any] = field(default_factory=dict)  # as pretrain's --backbone-args
    methods: tuple[str, ...] = ("relational", "simclr", "supervised", "random")
    seeds: tuple[int, ...] = (1, 2, 3)
    epochs: int = 20
    time_limit: float | None = None  # minutes of training per run: the same wall-clock budget for every method
    num_views: int = 4
    batch_size: int = 64
    image_size: int | None = None
    augment: str = "auto"  # as pretrain's --augment
    min_crop_scale: float = 0.08  # as pretrain's: every method's views
    jitter_strength: float = 1.0  # as pretrain's: every method's views
    test_fraction: float | None = None  # as pretrain's and evaluate's --test-fraction
    protocols: tuple[str, ...] = ("linear", "linear_converged", "knn")
    linear_epochs: int = 100
    knn_k: int = 200
    embedding_points: int = 2000
    log_every: int = 50  # steps between points of the training curves
    device: str = "auto"
    output_dir: str = "runs/compare"
    progress: bool = True

    def validate(self, on_this_machine: bool = True) -> None:
        """Every option, the runs' pretraining and evaluation options included, before the first run starts.

        ``on_this_machine=False`` leaves out whether ``--device`` is there (``--print-config``)."""
        from relreason.evaluate import EvaluateConfig

        check_folder_given(self.output_dir)
        for method in self.methods:
            check_method_name(method)
        if not self.methods or not self.seeds:
            raise RelreasonError("give at least one --methods name and one --seeds value")
        if len(set(self.seeds)) != len(self.seeds):
            raise RelreasonError(f"--seeds must be distinct, got {list(self.seeds)}")
        if len(set(self.methods)) != len(self.methods):
            raise RelreasonError(f"--methods must be distinct, got {list(self.methods)}; each is run with every seed")
        if len(set(self.protocols)) != len(self.protocols):
            raise RelreasonError(f"--protocols must be distinct, got {list(self.protocols)}; each is a column of the "
                                 "table")
        for seed in self.seeds:
            check_seed(seed, "--seeds")
        unknown = [p for p in self.protocols if p not in COMPARABLE_PROTOCOLS]
        if unknown:
            raise RelreasonError(f"compare cannot tabulate protocol(s) {', '.join(unknown)}; "
                                 f"choose from {', '.join(COMPARABLE_PROTOCOLS)}")
        if self.embedding_points < 10:
            raise RelreasonError(f"--embedding-points must be >= 10, got {self.embedding_points}")
        for method in self.methods:
            pretrain_config_for(self, method, self.seeds[0]).validate(on_this_machine)
        for seed in self.seeds:  # the evaluation options too (named by their flags), and every seed's range
            EvaluateConfig(protocols=tuple(self.protocols), linear_epochs=self.linear_epochs, knn_k=self.knn_k,
                           seed=seed, device=self.device).validate(on_this_machine)


def run_dir_of(config: CompareConfig, method: str, seed: int) -> Path:
    """A run's folder: the method's name (a user's method by its module and class, 'pkg.mod.Class') and the seed."""
    return Path(config.output_dir) / f"{method.replace(':', '.')}-seed{seed}"


def pretrain_config_for(config: CompareConfig, method: str, seed: int) -> PretrainConfig:
    from relreason.train import PretrainConfig

    # -K is relational's alone here: the other methods keep their own number of views (and say nothing of -K).
    num_views = config.num_views if method == "relational" else PretrainConfig.num_views
    return PretrainConfig(
        method=method, dataset=config.dataset, data_root=config.data_root, download=config.download,
        backbone=config.backbone, backbone_args=config.backbone_args, image_size=config.image_size, num_views=num_views,
        batch_size=config.batch_size, epochs=config.epochs, seed=seed, device=config.device, augment=config.augment,
        time_limit=config.time_limit, output_dir=str(run_dir_of(config, method, seed)), progress=config.progress,
        log_every=config.log_every, test_fraction=config.test_fraction, min_crop_scale=config.min_crop_scale,
        jitter_strength=config.jitter_strength,
    )


# What makes a run this comparison's run; --epochs may grow (pretrain resumes and trains on). The time
# limit is checked against the comparison's own record: a resumed run's config.json holds what was left of it.
_RUN_DEFINING = ("method", "dataset", "data_root", "backbone", "backbone_args", "image_size", "num_views",
                 "batch_size", "seed", "augment", "test_fraction", "min_crop_scale", "jitter_strength")
BUDGET_NAME = "budget.json"


def _backbone_named(config: CompareConfig) -> str:
    """The backbone with its arguments as the command line gives them: ``resnet18 (small_stem=false)``."""
    arguments = ", ".join(f"{key}={json.dumps(value)}" for key, value in config.backbone_args.items())
    return f"{config.backbone} ({arguments})" if arguments else config.backbone


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, NotADirectoryError):  # no run yet (the output folder's own checks come later)
        return None
    except (OSError, ValueError) as error:
        raise RelreasonError(f"{path} cannot be read ({error}); delete that run folder to train it again") from None


def check_existing_runs(config: CompareConfig) -> None:
    """Refuse, before anything trains, run folders that another comparison's options made."""
    from relreason.backbones.registry import build_difference
    from relreason.checkpoint import checkpoint_position, holds_a_run, list_checkpoints
    from relreason.data import dataset_info, same_dataset
    from relreason.train import PretrainConfig
    from relreason.train.run_folder import check_writable_folder

    check_writable_folder(Path(config.output_dir))
    if holds_a_run(config.output_dir):
        raise RelreasonError(f"--output-dir {config.output_dir} is a pretrain run's folder, whose training_curves.png "
                             "the comparison's would replace; choose another --output-dir")
    budget = _read_json(Path(config.output_dir) / BUDGET_NAME)
    if isinstance(budget, dict) and budget.get("time_limit") != config.time_limit:
        def said(minutes: float | None) -> str:
            return "no --time-limit" if minutes is None else f"--time-limit {minutes:g}"

        raise RelreasonError(
            f"{config.output_dir} holds runs trained with {said(budget.get('time_limit'))} (now "
            f"{said(config.time_limit)}); rerun with the original budget or choose another --output-dir"
        )
    defaults = PretrainConfig()
    for method in config.methods:
        for seed in config.seeds:
            run_dir = run_dir_of(config, method, seed)
            recorded = _read_json(run_dir / CONFIG_NAME)  # random runs have none: they are made again anyway
            keys = _RUN_DEFINING if method == "relational" else [k for k in _RUN_DEFINING if k != "num_views"]
            if not isinstance(recorded, dict):
                continue
            wanted = dataclasses.asdict(pretrain_config_for(config, method, seed))
            # The size a run trained at, not the option: none (the dataset's own) and that size are the same run.
            trained_size = (recorded.get("geometry") or {}).get("image_size")
            if trained_size is not None and trained_size == (wanted["image_size"]
                                                             or dataset_info(config.dataset).image_size):
                wanted["image_size"] = recorded.get("image_size")
            # An option a run folder does not record is older than the option: the run had its default.
            recorded = {key: recorded.get(key, getattr(defaults, key)) for key in keys}
            meta = _read_json(run_dir / BACKBONE_META_NAME)
            saved_defaults = meta.get("backbone_defaults") if isinstance(meta, dict) else None
            if (saved_defaults is not None and recorded.get("backbone") == wanted["backbone"]
                    and not build_difference(wanted["backbone"], recorded["backbone_args"], saved_defaults,
                                             wanted["backbone_args"])[0]):
                recorded["backbone_args"] = wanted["backbone_args"]  # a default given as an argument: the same network
            differ = [f"{option_flag(key)}: run {option_value(recorded[key])} vs now {option_value(wanted[key])}"
                      for key in keys if recorded[key] != wanted[key]
                      and not (key == "dataset" and same_dataset(recorded.get(key), wanted[key]))
                      and not (key == "data_root" and _same_data_root(recorded[key], wanted[key], config.dataset))]
            if differ:
                raise RelreasonError(
                    f"{run_dir} was trained with other options ({', '.join(differ)}); rerun with the original "
                    "options or choose another --output-dir"
                )
            # A larger --epochs trains the runs on; a smaller one would average longer runs with shorter ones. Its
            # newest checkpoint says how far a run got, also one killed before it exported (no backbone.json).
            exported = meta.get("epochs", 0) if isinstance(meta, dict) else 0
            newest = list_checkpoints(run_dir)[:1]
            epochs, steps = max([(exported if isinstance(exported, int) else 0, 0),
                                 *(position for path in newest if (position := checkpoint_position(path)))])
            if (epochs, steps) > (config.epochs, 0):
                trained = f"{epochs} epoch(s)" + (f" and {steps} step(s) of the next" if steps else "")
                raise RelreasonError(
                    f"{run_dir} has trained {trained}, more than --epochs {config.epochs}, and runs of different "
                    f"lengths would be averaged together; pass --epochs {epochs + (steps > 0)} or more, or choose "
                    "another --output-dir"
                )


def _same_data_root(recorded: Any, wanted: str, dataset: str) -> bool:
    """The same folder however it is spelled (relative, absolute, with ~, with a trailing /); any for digits,
    which reads no files."""
    from relreason.data import dataset_info
    from relreason.evaluate.data import same_path

    if dataset_info(dataset).name == "digits":
        return True
    return isinstance(recorded, str) and same_path(recorded, wanted)


def budget_spent(run_dir: Path, epochs: int) -> bool:
    """Whether the run in ``run_dir`` trained ``epochs`` epochs or used up its time limit (rerunning would train more)."""
    meta = _read_json(run_dir / BACKBONE_META_NAME)
    if not isinstance(meta, dict):
        return False
    if meta.get("method") == "random":
        return False  # made again each time (no training, same seed, same weights): never stale
    return (bool(meta.get("finished")) and meta.get("epochs", 0) >= epochs) or meta.get("stopped_by") == "time limit"


def remaining_minutes(run_dir: Path, time_limit: float | None) -> float | None:
    """What is left of a run's time budget: a run stopped (SIGTERM, SIGKILL) and resumed gets the rest, not
    a new budget."""
    if time_limit is None:
        return None
    from relreason.checkpoint import load_newest_checkpoint

    found = load_newest_checkpoint(run_dir)
    if found is None:
        return time_limit
    from relreason.train.position import TrainingPosition

    trained = TrainingPosition(**found[1].get("position", {})).train_seconds / 60
    return max(time_limit - trained, 1e-9)  # spent: one step, which exports the backbone and marks the budget spent


def headline(result: dict[str, Any]) -> float | None:
    """The one number a protocol is ranked by: its test accuracy, else its mAP."""
    for key in ("test_accuracy", "mAP"):
        if isinstance(result.get(key), (int, float)):
            return float(result[key])
    return None


def summarise(values: list[float]) -> dict[str, float]:
    """Mean, sample standard deviation (0 for one value) and count of one metric over seeds."""
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": mean, "std": std, "n": len(values)}


def run_compare(config: CompareConfig) -> dict[str, Any]:
    """Train and evaluate every method x seed; write compare.json, compare.md and the plots; return the summary."""
    try:
        return _run_compare(config)
    except OSError as error:
        if error.errno not in DISK_FULL_ERRNOS:
            raise
        raise disk_full(error, "finished runs and cached features are kept") from None


def _run_compare(config: CompareConfig) -> dict[str, Any]:
    from relreason.data import dataset_info, held_out_split
    from relreason.evaluate import EvaluateConfig, check_several_classes, labelled_split, run_evaluation
    from relreason.train import pretrain
    from relreason.train.metrics_log import read_json_lines

    refuse_several_processes("compare")
    config = with_home_expanded(with_plain_values(config), "output_dir", "data_root")
    config.validate()
    check_existing_runs(config)
    info = dataset_info(config.dataset)
    train_split: LoadedDataset
    if config.test_fraction is not None:  # evaluation will need both splits, labelled, of several classes
        train_split = held_out_split(config.dataset, config.data_root, config.test_fraction)[0]
    else:
        train_split = labelled_split(config.dataset, config.data_root, info.train_split, config.download)
        labelled_split(config.dataset, config.data_root, info.test_split, config.download)
    check_several_classes(train_split, config.dataset)
    output = Path(config.output_dir)
    runs: list[dict[str, Any]] = []
    for method in config.methods:
        for seed in config.seeds:
            run_dir = run_dir_of(config, method, seed)
            if not budget_spent(run_dir, config.epochs):
                say(f"== {method}, seed {seed} ==")
                run_config = pretrain_config_for(config, method, seed)
                run_config.time_limit = remaining_minutes(run_dir, config.time_limit)
                if method != "random":  # the budget binds the folder once a run trains under it
                    atomic_write_json(output / BUDGET_NAME, {"time_limit": config.time_limit})
                result = pretrain(run_config)
                if result.sigterm_received:
                    # A scheduler's notice ends the whole comparison (the next run would be killed anyway), also when
                    # it came in the last step of a run that then finished.
                    return {"preempted": f"{method}, seed {seed}"}
            else:
                say(f"== {method}, seed {seed}: trained in an earlier run ==")
            # Features are cached beside each run's weights, but the probes run again: say so, as they take a while.
            say(f"evaluating {method}, seed {seed}: {', '.join(config.protocols)}")
            meta = _read_json(run_dir / BACKBONE_META_NAME)
            evaluation = run_evaluation(EvaluateConfig(
                run_dir=str(run_dir), protocols=tuple(config.protocols), linear_epochs=config.linear_epochs,
                knn_k=config.knn_k, random_baseline=False, seed=seed, device=config.device,
                data_root=config.data_root, download=config.download, test_fraction=config.test_fraction,
                time_limit_ends_the_run=True, progress=config.progress,
            ))
            runs.append({
                "method": method, "seed": seed, "run_dir": str(run_dir), "epochs": meta["epochs_done"],
                "train_seconds": meta["train_seconds"], "steps": read_json_lines(run_dir / STEPS_NAME),
                "results": evaluation["results"]["pretrained"],
            })
    summary = summarise_runs(runs, config)
    atomic_write_json(output / "compare.json", {"config": dataclasses.asdict(config), **summary, "runs": runs})
    atomic_write_bytes(output / "compare.md", format_markdown(summary, config).encode())
    plot_curves(runs, output / "training_curves.png")
    say("drawing the t-SNE map of each method's test features")
    plot_embeddings(config, output / "embedding_map.png")
    return summary


def summarise_runs(runs: list[dict[str, Any]], config: CompareConfig) -> dict[str, Any]:
    table: dict[str, dict[str, Any]] = {}
    for method in config.methods:
        mine = [r for r in runs if r["method"] == method]
        row: dict[str, Any] = {
            "epochs": summarise([r["epochs"] for r in mine]),
            "train_minutes": summarise([r["train_seconds"] / 60 for r in mine]),
        }
        for protocol in config.protocols:
            values = [headline(r["results"].get(protocol, {})) for r in mine]
            found = [v for v in values if v is not None]
            if len(found) == len(values):
                row[protocol] = summarise(found)
        table[method] = row
    return {"table": table}


def _mean_and_spread(stats: dict[str, float]) -> str:
    return f"{stats['mean']:.2f} ± {stats['std']:.2f}" if stats["n"] > 1 else f"{stats['mean']:.2f}"


def format_markdown(summary: dict[str, Any], config: CompareConfig) -> str:
    """compare.md: the budget, then one row per method of mean ± std over seeds for each protocol."""
    from relreason.data import dataset_info

    budget = (f"{config.time_limit:g} min per run" if config.time_limit
              else f"{config.epochs} epoch{'s' if config.epochs != 1 else ''} per run")
    # The settings that change what a column means: a 5-epoch "linear" is not the paper's 100-epoch probe.
    settings = []
    if "linear" in config.protocols:
        paper = "the paper's" if config.linear_epochs == 100 else "the paper's is 100"
        settings.append(f"`linear` trained {config.linear_epochs} epochs ({paper})")
    if "knn" in config.protocols:
        settings.append(f"`knn` with k={config.knn_k}")
    dataset = config.dataset
    if dataset_info(config.dataset).name == "folder":
        dataset = f"{dataset} {config.data_root}"
    lines = [
        f"# {dataset}, {_backbone_named(config)}: {len(config.seeds)} seed(s) ({', '.join(map(str, config.seeds))}), "
        f"{budget}",
        "",
        "Test accuracy (%; retrieval: mAP in %) as mean ± std over seeds." if len(config.seeds) > 1 else
        "Test accuracy (%; retrieval: mAP in %) of one seed: no spread to show.",
        *([f"Evaluation: {'; '.join(settings)}."] if settings else []),
        "",
        "| method | epochs | train min | " + " | ".join(config.protocols) + " |",
        "|---|---:|---:|" + "---:|" * len(config.protocols),
    ]
    for method, row in summary["table"].items():
        cells = [_mean_and_spread(row[p]) if p in row else "-" for p in config.protocols]
        lines.append(
            f"| {method} | {row['epochs']['mean']:.1f} | {row['train_minutes']['mean']:.1f} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines) + "\n"


def plot_curves(runs: list[dict[str, Any]], path: Path) -> None:
    """Per run, against minutes of training: the loss and the online probe's accuracy (epoch running means)."""
    figure = off_screen_figure(figsize=(10, 3.6))
    left, right = figure.subplots(1, 2)
    colours = {m: f"C{i}" for i, m in enumerate(dict.fromkeys(r["method"] for r in runs))}
    for run in runs:
        steps = run["steps"]
        label = run["method"] if run["seed"] == runs[0]["seed"] else None  # one legend entry per method
        for axis, key in ((left, "loss"), (right, "probe_accuracy")):
            points = [(s["minutes"], s[key]) for s in steps if key in s]
            if points:  # a run of a step or two would be an invisible line: its points are marked
                axis.plot(*zip(*points), color=colours[run["method"]], alpha=0.8, linewidth=1, label=label,
                          marker="o" if len(points) < 3 else None, markersize=3)
    left.set(xlabel="training minutes", ylabel="loss (epoch running mean)",
             title="training loss (each method its own objective)")
    if not any(y <= 0 for line in left.lines for y in line.get_ydata()):  # a loss of one's own may reach 0 or below
        left.set_yscale("log")
    right.set(xlabel="training minutes", ylabel="accuracy (%)", title="online linear probe (epoch running mean)")
    for axis in (left, right):
        if axis.lines:
            axis.legend(fontsize="small")
    figure.tight_layout()
    save_png(figure, path, dpi=110)


#: Up to this many classes the t-SNE map has a colour of its own for each, named in a legend.
LEGEND_CLASSES = 20


def plot_embeddings(config: CompareConfig, path: Path) -> None:
    """A t-SNE map of test-set features per method (its first seed), coloured by class: with a legend of the class
    names for up to ``LEGEND_CLASSES`` classes, a colour scale of class numbers above that."""
    from matplotlib.lines import Line2D
    from sklearn.manifold import TSNE

    from relreason.data.image_folder import read_threads
    from relreason.evaluate import extract_features
    from relreason.evaluate.data import without_unreadable

    columns = len(config.methods)
    width = 3.4 * columns + 1.6  # inches: a map per method, and a column for the legend on the right
    figure = off_screen_figure(figsize=(width, 3.6))
    axes = figure.subplots(1, columns, squeeze=False)
    scatter, classes = None, None
    for axis, method in zip(axes[0], config.methods):
        run_dir = run_dir_of(config, method, config.seeds[0])
        backbone, dataset, transform, cache = _test_features_source(run_dir, config)
        # Evaluate's own cache of these test features, named by the weights and the data: read, not extracted
        # again; a run trained on (more epochs, the rest of its budget) or a random backbone remade for other
        # data gets a new map.
        extracted = extract_features(backbone, dataset, transform, device=resolve_device(config.device),
                                     cache_path=cache, threads=read_threads(dataset), progress=config.progress)
        _, (features, labels) = without_unreadable(dataset, "test", cache, extracted, say=False)  # as evaluate did
        chosen = np.random.default_rng(0).permutation(len(labels))[: config.embedding_points]
        points = TSNE(n_components=2, init="pca", perplexity=min(30.0, (len(chosen) - 1) / 3),
                      random_state=0).fit_transform(features[chosen].numpy())
        classes = getattr(dataset, "classes", None) or [str(c) for c in range(int(labels.max()) + 1)]
        count = len(classes)
        cmap = "tab10" if count <= 10 else "tab20" if count <= LEGEND_CLASSES else "turbo"
        scatter = axis.scatter(points[:, 0], points[:, 1], c=labels[chosen].numpy(), cmap=cmap, vmin=-0.5,
                               vmax=count - 0.5, s=3)
        axis.set_title(method)
        axis.set_xticks([])
        axis.set_yticks([])
    # Wrapped to the figure's width: one method's map is a narrow figure.
    title = (f"t-SNE of {config.dataset} test features ({_backbone_named(config)}), coloured by class; "
             f"{'the first seed' if len(config.seeds) > 1 else 'seed'} {config.seeds[0]}'s runs")
    figure.suptitle(textwrap.fill(title, width=int(9 * 3.4 * columns)))
    figure.tight_layout(rect=(0, 0, 1 - 1.6 / width, 1))
    if scatter is not None and classes is not None and len(classes) <= LEGEND_CLASSES:
        handles = [Line2D([], [], linestyle="", marker="o", markersize=4, color=scatter.cmap(scatter.norm(number)))
                   for number in range(len(classes))]
        figure.legend(handles, [str(name) for name in classes], loc="center right", fontsize="x-small",
                      frameon=False)
    elif scatter is not None:
        figure.colorbar(scatter, cax=figure.add_axes((1 - 1.1 / width, 0.15, 0.15 / width, 0.7)), label="class number")
    save_png(figure, path, dpi=110)


def _test_features_source(run_dir: Path, config: CompareConfig) -> tuple[torch.nn.Module, Any, Any, Path]:
    from relreason.backbones import build_backbone
    from relreason.data import dataset_info, eval_transform, held_out_split, load_dataset
    from relreason.data.image_folder import decoded_for
    from relreason.evaluate.data import data_tag_of, feature_cache_path, weights_digest
    from relreason.evaluate.weights import build_as_trained

    meta = json.loads((run_dir / BACKBONE_META_NAME).read_text())
    build_as_trained(meta, speaks=False)  # the network evaluate scored (which said so)
    backbone = build_backbone(meta["backbone"], image_size=meta["image_size"], args=meta.get("backbone_args"))
    weights = (run_dir / BACKBONE_NAME).read_bytes()
    backbone.load_state_dict(torch.load(io.BytesIO(weights), map_location="cpu", weights_only=True))
    # Named as evaluate names it (run_evaluation: the run's recorded dataset, its normalisation, and the files of
    # both splits), so that the map reads the test features the evaluation cached.
    name = meta["dataset"]
    info = dataset_info(name)
    splits: tuple[LoadedDataset, ...]
    if config.test_fraction is not None:
        splits = held_out_split(name, config.data_root, config.test_fraction)
    else:
        splits = tuple(load_dataset(name, config.data_root, split, download=config.download)
                       for split in (info.train_split, info.test_split))
    test = decoded_for(splits[-1], meta["image_size"])
    digest = weights_digest(weights)
    tag = data_tag_of(name, config.data_root, meta["mean"], meta["std"], splits)
    cache = feature_cache_path(run_dir / FEATURES_DIR_NAME, meta["backbone"], digest, name, "test", meta["image_size"], tag,
                               meta.get("backbone_args"))
    return backbone, test, eval_transform(meta["image_size"], meta["mean"], meta["std"]), cache


__all__ = ["COMPARABLE_PROTOCOLS", "CompareConfig", "format_markdown", "run_compare", "summarise"]
