"""``relreason`` command line: ``pretrain``, ``evaluate``, ``compare`` and ``list``; every option also from a
YAML config."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import errno
import importlib
import os
import re
import select
import shlex
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from typing import Any, NoReturn

from relreason.config_files import as_yaml_value, backbone_args_from, config_as_yaml, load_config_file
from relreason.errors import RelreasonError, one_line, say
from relreason.launch import is_first_process
from relreason.run_files import BACKBONE_NAME


class OneLineErrorParser(argparse.ArgumentParser):
    """Usage mistakes print one line naming the problem and pointing at --help, like every other error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"relreason: error: {message}; see `{self.prog} --help`\n")


DEVICE_HELP = "auto (cuda when a GPU is visible, else cpu), cpu, cuda, cuda:N or mps [auto]"


def _image_size_help() -> str:
    """The training size when --image-size is not given: 32 px for most datasets (MNIST's 28 and the digits' 8
    are upsampled to it, as in the paper's setting), each exception named."""
    from relreason.data import DATASET_NAMES, dataset_info

    sizes = {name: dataset_info(name).image_size for name in DATASET_NAMES}
    usual = max(set(sizes.values()), key=list(sizes.values()).count)
    others = "".join(f"; {size} for {name}" for name, size in sizes.items() if size != usual)
    return f"side of the square views in pixels [{usual}{others}]"


class _NoneGiven:
    """What ``--time-limit none`` gives: the option's "not set", which overrides a config file's value (argparse's
    own None means "not given on the command line")."""

    def __repr__(self) -> str:
        return "none"


NONE_GIVEN = _NoneGiven()


class _OrNone:
    """An argparse ``type`` reading ``kind``, or ``none`` for an optional option's "not set"."""

    def __init__(self, kind: type) -> None:
        self.kind = kind  # what a config file's value is checked as
        self.__name__ = kind.__name__  # argparse names it in "invalid float value: 'x'"

    def __call__(self, text: str) -> Any:
        return NONE_GIVEN if text.strip().lower() in ("none", "null") else self.kind(text)



def _bool_flag(parser: argparse._ActionsContainer, name: str, help: str) -> None:
    parser.add_argument(f"--{name}", action=argparse.BooleanOptionalAction, default=None, help=help)


def add_pretrain_options(parser: argparse.ArgumentParser) -> None:
    from relreason.losses import LOSSES
    from relreason.methods import METHOD_NAMES
    from relreason.pairing import AGGREGATIONS
    from relreason.schedule import LR_SCHEDULES
    from relreason.train import AMP_MODES, AUGMENT_MODES, PretrainConfig

    d = PretrainConfig()
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", help=f"dataset name (see `relreason list`) [{d.dataset}]")
    data.add_argument("--data-root", help="where datasets live; for 'folder', the image folder itself (its train/ "
                      "subfolder when it holds train/ and test/); fashion-mnist is also looked for where Debian's "
                      f"dataset-fashion-mnist puts it [{d.data_root}]")
    _bool_flag(data, "download", "download the dataset with torchvision if missing [off]")
    data.add_argument("--image-size", type=_OrNone(int), help=_image_size_help())
    data.add_argument("--min-crop-scale", type=float,
                      help="smallest random crop as a fraction of the image area; larger keeps more of each "
                      f"image in every view, which can suit small images [{d.min_crop_scale}, the paper's]")
    data.add_argument("--jitter-strength", type=float,
                      help="colour jitter as a multiple of the paper's (brightness, contrast and saturation 0.8, "
                      f"hue 0.2), 0 to 2.5; 0: none [{d.jitter_strength}]")
    data.add_argument("--augment", choices=AUGMENT_MODES,
                      help="tensor: all views of a step made in a few batched operations on the device, from the "
                      "dataset kept there as uint8 (an image folder is decoded once, each image resized and "
                      "centre-cropped to --image-size); pil: torchvision's per-image transforms in a DataLoader, "
                      f"crops taken from the original files; auto: tensor for in-memory datasets, pil for image folders [{d.augment}]")
    data.add_argument("--test-fraction", type=_OrNone(float),
                      help="an image folder with class subfolders but no train/ and test/: pretrain on all but this "
                      "share of each class, which evaluate then holds out as the test set [off: every image]")
    data.add_argument("--num-workers", type=_OrNone(int), help="DataLoader worker processes of --augment pil [0 on CPU, up to 8 on CUDA]")
    method = parser.add_argument_group("method")
    method.add_argument("--method", metavar="METHOD",
                        help=f"{', '.join(METHOD_NAMES)} (relational reasoning, or a baseline), or "
                        f"'package.module:Class' for a PretrainMethod subclass of your own [{d.method}]")
    method.add_argument("--backbone", help=f"registered backbone or 'package.module:factory' [{d.backbone}]")
    method.add_argument("--backbone-args", nargs="*", metavar="KEY=VALUE",
                        help="keyword arguments of the backbone's factory, values read as YAML (false, 64, 0.5, text): width=2 doubles conv4's channels (128-d), small_stem=false gives a torchvision ResNet its own 7x7 stride-2 stem and max-pool (for images of 128 px and more), or your factory's own; given alone: none [none]")
    method.add_argument("-K", "--num-views", type=int, dest="num_views", help=f"augmented views per image, K [{d.num_views}]")
    method.add_argument("--aggregation", choices=AGGREGATIONS, help=f"how a pair is joined [{d.aggregation}]")
    method.add_argument("--head-hidden", type=int, help=f"hidden width of the relation head [{d.head_hidden}]")
    method.add_argument("--loss", choices=LOSSES, help=f"relation loss [{d.loss}]")
    method.add_argument("--focal-gamma", type=float, help=f"focal loss gamma [{d.focal_gamma}]")
    method.add_argument("--focal-alpha", type=float, help=f"focal loss alpha, weight of positives [{d.focal_alpha}]")
    method.add_argument("--simclr-temperature", type=float, help=f"NT-Xent temperature of --method simclr [{d.simclr_temperature}]")
    _bool_flag(method, "online-probe", "train a linear classifier on detached features when the data has labels [on]")
    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--epochs", type=int, help=f"passes over the data [{d.epochs}]")
    optim.add_argument("--batch-size", type=int, help=f"images per batch and process (under torchrun each process takes its own), B [{d.batch_size}]")
    optim.add_argument("--lr", type=float, help=f"Adam learning rate [{d.lr}]")
    optim.add_argument("--lr-schedule", choices=LR_SCHEDULES,
                       help=f"constant (the paper's) or cosine: decay towards 0 at the last of --epochs [{d.lr_schedule}]")
    optim.add_argument("--warmup-epochs", type=float,
                       help=f"epochs of linear learning-rate warm-up at the start (fractions allowed) [{d.warmup_epochs}]")
    optim.add_argument("--weight-decay", type=float, help=f"Adam weight decay [{d.weight_decay}]")
    optim.add_argument("--seed", type=int, help=f"random seed [{d.seed}]")
    optim.add_argument("--device", help=DEVICE_HELP)
    optim.add_argument("--amp", choices=AMP_MODES, help=f"mixed precision: bf16 or fp16 autocast [{d.amp}]")
    _bool_flag(optim, "channels-last", "keep the backbone in channels_last memory format (faster convolutions) [off]")
    _bool_flag(optim, "compile", "torch.compile the backbone and the batched colour jitter (slow first steps, faster after) [off]")
    optim.add_argument("--time-limit", type=_OrNone(float), help="stop this many minutes after the start (data loading included), checkpoint and export the backbone [none]")
    run = parser.add_argument_group("run")
    run.add_argument("--output-dir", help=f"folder for checkpoints, metrics and the exported backbone [{d.output_dir}]")
    _bool_flag(run, "resume", "continue from the newest valid checkpoint in --output-dir, if any [on]")
    run.add_argument("--checkpoint-every", type=int, help="also checkpoint every N steps within an epoch [0: epoch ends only]")
    run.add_argument("--keep-checkpoints", type=int, help=f"how many of the newest checkpoints to keep [{d.keep_checkpoints}]")
    _bool_flag(run, "sync-batchnorm", "under torchrun on GPUs, BatchNorm statistics over all ranks' batches [off]")
    _bool_flag(run, "progress", "show a progress bar when standard error is a terminal [on]")
    run.add_argument("--log-every", type=int, help="steps between running-mean records in steps.jsonl, which also "
                     f"gets one at each epoch's end; 0: none [{d.log_every}]")
    _bool_flag(run, "tensorboard", "also log to TensorBoard when it is installed [on]")


def add_evaluate_options(parser: argparse.ArgumentParser) -> None:
    from relreason.evaluate import ALL_PROTOCOLS, EvaluateConfig

    d = EvaluateConfig()
    parser.add_argument("--run-dir", help=f"a pretraining output folder (holds backbone.pt and backbone.json) [{d.run_dir}]")
    parser.add_argument("--weights", help="a backbone state_dict (or a whole model's, or a pretrain checkpoint) "
                        "to evaluate instead of --run-dir's")
    parser.add_argument("--backbone", help="backbone name: needed when --weights has no backbone.json beside it, "
                        "else it overrides backbone.json's")
    parser.add_argument("--backbone-args", nargs="*", metavar="KEY=VALUE",
                        help="keyword arguments of the backbone's factory, values read as YAML; given alone: none "
                        "[backbone.json's, unless --backbone names another backbone]")
    parser.add_argument("--eval-dataset", "--dataset", dest="dataset",
                        help="labelled dataset to evaluate on; another than the one pretrained on gives a "
                        "cross-domain evaluation, normalised with the evaluation dataset's own statistics "
                        "[the one pretrained on]")
    parser.add_argument("--data-root", help="where datasets live [the pretraining run's own when evaluating on its "
                        "dataset, else data]")
    _bool_flag(parser, "download", "download the dataset with torchvision if missing [off]")
    parser.add_argument("--test-fraction", type=_OrNone(float),
                        help="for an image folder with class subfolders but no train/ and test/: hold out this share "
                        "of each class as the test set, chosen by each file's own path (a file keeps its side as "
                        "others come and go) [the share the run was pretrained without, on its own folder; else off]")
    parser.add_argument("--image-size", type=_OrNone(int), help="image side in pixels [the one pretrained at]")
    parser.add_argument("--protocols", nargs="+", choices=ALL_PROTOCOLS,
                        help="linear, linear_converged, knn: frozen features; finetune: the backbone trained too; "
                        "retrieval: precision@k and mAP on the test set; few_label: the linear probe(s), and "
                        f"finetune if chosen, on --label-fractions of the training labels [{' '.join(d.protocols)}]")
    parser.add_argument("--linear-epochs", type=int, help=f"epochs of the paper's linear probe [{d.linear_epochs}]")
    parser.add_argument("--knn-k", type=int, help=f"neighbours for k-NN [{d.knn_k}]")
    parser.add_argument("--label-fractions", nargs="+", type=float,
                        help="few_label: fractions of the training labels, class-balanced "
                        f"[{' '.join(f'{f:g}' for f in d.label_fractions)}]")
    parser.add_argument("--finetune-epochs", type=int,
                        help=f"finetune: epochs; both learning rates x0.1 at 50%% and 75%% [{d.finetune_epochs}]")
    parser.add_argument("--finetune-backbone-lr", type=float,
                        help=f"finetune: Adam learning rate of the backbone [{d.finetune_backbone_lr:g}]")
    parser.add_argument("--finetune-head-lr", type=float,
                        help=f"finetune: Adam learning rate of the linear head [{d.finetune_head_lr:g}]")
    _bool_flag(parser, "retrieval-plot", "retrieval: also draw a PNG of queries and their nearest test images [on]")
    _bool_flag(parser, "random-baseline", "also evaluate a randomly initialised backbone (lower bound) [on]")
    parser.add_argument("--batch-size", type=int, help=f"feature extraction batch size [{d.batch_size}]")
    parser.add_argument("--seed", type=int, help=f"seed of the probe and of the random backbone [{d.seed}]")
    parser.add_argument("--device", help=DEVICE_HELP)
    parser.add_argument("--output", help="results JSON path [evaluation.json beside the weights; "
                        "evaluation-<name>.json for a training checkpoint]")
    _bool_flag(parser, "progress", "show progress bars when standard error is a terminal [on]")


def add_compare_options(parser: argparse.ArgumentParser) -> None:
    from relreason.compare import COMPARABLE_PROTOCOLS, CompareConfig
    from relreason.methods import METHOD_NAMES
    from relreason.train import AUGMENT_MODES

    d = CompareConfig()
    parser.add_argument("--dataset", help=f"dataset to pretrain and evaluate on [{d.dataset}]")
    parser.add_argument("--data-root", help=f"where datasets live [{d.data_root}]")
    _bool_flag(parser, "download", "download the dataset with torchvision if missing [off]")
    parser.add_argument("--backbone", help=f"backbone for every method [{d.backbone}]")
    parser.add_argument("--backbone-args", nargs="*", metavar="KEY=VALUE",
                        help="keyword arguments of the backbone's factory, as for pretrain [none]")
    parser.add_argument("--methods", nargs="+", metavar="METHOD",
                        help=f"methods to pretrain, each with every seed: {', '.join(METHOD_NAMES)} or "
                        f"'package.module:Class' [{' '.join(d.methods)}]")
    parser.add_argument("--seeds", nargs="+", type=int, help=f"one run per seed and method [{' '.join(map(str, d.seeds))}]")
    parser.add_argument("--epochs", type=int, help=f"epochs per run (an upper bound with --time-limit) [{d.epochs}]")
    parser.add_argument("--time-limit", type=_OrNone(float),
                        help="minutes per run, its setup included: the same budget for every method (a rerun gives an "
                        "unfinished run what is left of its budget) [none]")
    parser.add_argument("-K", "--num-views", type=int, dest="num_views", help=f"views per image for relational [{d.num_views}]")
    parser.add_argument("--batch-size", type=int, help=f"images per batch [{d.batch_size}]")
    parser.add_argument("--image-size", type=_OrNone(int), help=_image_size_help())
    parser.add_argument("--augment", choices=AUGMENT_MODES,
                        help=f"how views are made, as for pretrain [{d.augment}]")
    parser.add_argument("--min-crop-scale", type=float,
                        help=f"smallest random crop of every method's views, as for pretrain [{d.min_crop_scale}]")
    parser.add_argument("--jitter-strength", type=float,
                        help=f"colour jitter of every method's views, as for pretrain [{d.jitter_strength}]")
    parser.add_argument("--test-fraction", type=_OrNone(float),
                        help="an image folder with class subfolders but no train/ and test/: every run pretrains on "
                        "all but this share of each class, which the evaluations hold out [off]")
    parser.add_argument("--protocols", nargs="+", choices=COMPARABLE_PROTOCOLS,
                        help=f"evaluation protocols, one table column each [{' '.join(d.protocols)}]")
    parser.add_argument("--linear-epochs", type=int, help=f"epochs of the paper's linear probe [{d.linear_epochs}]")
    parser.add_argument("--knn-k", type=int, help=f"neighbours for k-NN [{d.knn_k}]")
    parser.add_argument("--embedding-points", type=int, help=f"test images in the t-SNE map [{d.embedding_points}]")
    parser.add_argument("--log-every", type=int,
                        help=f"steps between points of the training curves (plus one at each epoch's end) [{d.log_every}]")
    parser.add_argument("--device", help=DEVICE_HELP)
    parser.add_argument("--output-dir", help=f"one run folder per method and seed, the tables and plots [{d.output_dir}]")
    _bool_flag(parser, "progress", "show progress bars when standard error is a terminal [on]")


class _OneConfig(argparse.Action):
    """--config given once: a second would silently replace the first file's options."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        if getattr(namespace, self.dest, None) is not None:
            parser.error(f"--config is given twice ({getattr(namespace, self.dest)} and {values}); one file is read: "
                         "join their options in one file, or give the second file's options as flags")
        setattr(namespace, self.dest, values)


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    shipped = ", or a shipped config's name (`relreason list`)" if parser.prog == "relreason pretrain" else ""
    parser.add_argument("--config", action=_OneConfig, help=f"YAML file of options{shipped}")
    parser.add_argument("--print-config", action="store_true",
                        help="print every option as a YAML config (yours, the config's and the defaults) and exit")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="relreason",
        description="Self-supervised relational reasoning: pretrain a backbone on unlabelled images, then evaluate it.",
    )
    from relreason import __version__

    parser.add_argument("--version", action="version", version=f"relreason {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # Subcommands take no abbreviations (--epoch for --epochs), as config files take none: one spelling each.
    pretrain = commands.add_parser(
        "pretrain",
        allow_abbrev=False,
        help="train a backbone with relational reasoning (or a baseline: --method)",
        description="Train a backbone with self-supervised relational reasoning. Every option may also be set "
        "in a YAML file given with --config (keys as option names, dashes or underscores); flags override it, and `none` clears an optional one (--time-limit none).",
    )
    _add_config_options(pretrain)
    add_pretrain_options(pretrain)
    evaluate = commands.add_parser(
        "evaluate",
        allow_abbrev=False,
        help="linear probe and k-NN on frozen features, against a random backbone",
        description="Judge a pretrained backbone on a labelled dataset (its own or another: --eval-dataset): "
        "linear probe (the paper's 100-epoch protocol and a standardised probe trained to convergence), "
        "weighted k-NN, fine-tuning, few-label probes and image retrieval, on features extracted once and "
        "cached; a randomly initialised backbone gives the lower bound.",
    )
    _add_config_options(evaluate)
    add_evaluate_options(evaluate)
    compare = commands.add_parser(
        "compare",
        allow_abbrev=False,
        help="methods x seeds on one dataset, evaluated alike: a Markdown/JSON table and plots",
        description="Pretrain each method with each seed (same backbone, data path and budget), evaluate each "
        "with the chosen protocols, and write compare.md and compare.json (mean ± std over seeds), "
        "training_curves.png and embedding_map.png (t-SNE of test features) under --output-dir. "
        "Rerunning resumes: finished runs are not trained again.",
    )
    _add_config_options(compare)
    add_compare_options(compare)
    commands.add_parser("list", help="list the datasets, backbones, methods and shipped configs known by name",
                        description="List the datasets, backbones, methods and shipped configs known by name.")
    return parser


def parse_options(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    """Parse ``argv`` with the YAML config's values as defaults, so explicit flags win."""
    args = _parse_all(parser, argv)
    if getattr(args, "config", None):
        subparser = _subparser(parser, args.command)
        from_file = load_config_file(args.config, subparser)
        typed = args  # the flags alone: what they set, the file does not
        subparser.set_defaults(**from_file)
        args = _parse_all(parser, argv)
        args.set_by_config_file = {dest for dest, value in from_file.items()
                                   if value is not None and getattr(typed, dest, None) is None}
    return args


def _naming_the_config_file(error: RelreasonError, parser: argparse.ArgumentParser,
                            args: argparse.Namespace | None) -> str:
    """The error's message, with the config file named when an option it names was set there (not typed on the
    command line): `--lr must be > 0` is found in the file, not among the flags."""
    message = str(error)
    if args is None or not getattr(args, "set_by_config_file", None):
        return message
    actions = _subparser(parser, args.command)._option_string_actions
    for flag in re.finditer(r"(?<![\w-])(--[a-z][a-z-]*|-K)\b", message):
        action = actions.get(flag.group(1))
        if action is not None and action.dest in args.set_by_config_file:
            return f"{message} ({flag.group(1)} is set in config file {args.config})"
    return message


def _parse_all(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    """``parser.parse_args``, but an unknown option is refused by its subcommand, which points at its own --help
    and at the option nearest in spelling."""
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        subparser = _subparser(parser, args.command)
        subparser.error(f"unrecognized arguments: {' '.join(unknown)}{_unknown_option_hint(parser, args.command, unknown)}")
    return args


#: Options of other tools (or of another relreason command) that mean one of ours.
_SYNONYMS = {"--run-dir": "--output-dir", "--out-dir": "--output-dir", "--outdir": "--output-dir", "--gpu": "--device",
             "--gpus": "--device", "--data-dir": "--data-root", "--views": "--num-views", "--workers": "--num-workers"}


def _unknown_option_hint(parser: argparse.ArgumentParser, command: str, unknown: Sequence[str]) -> str:
    """`` (did you mean --epochs?)`` for the first unknown option near one of this command's in spelling or
    meaning, or the command that has it (compare trains with pretrain's own value of an option it lacks)."""
    names = [name for action in _subparser(parser, command)._actions for name in action.option_strings]
    for option in (item.split("=")[0] for item in unknown if item.startswith("--")):
        meant = _SYNONYMS.get(option, option)
        if meant != option and meant in names:
            return f" (did you mean {meant}?)"
        near = difflib.get_close_matches(option, names, n=1, cutoff=0.85)  # a slip of the keyboard: --seed
        if near:
            return f" (did you mean {near[0]}?)"
        for other in ("pretrain", "evaluate", "compare"):
            if other != command and meant in _subparser(parser, other)._option_string_actions:
                runs = "; compare trains every method with pretrain's default for it" if (
                    command == "compare" and other == "pretrain") else ""
                return f" ({meant} is an option of `relreason {other}`{runs})"
        near = difflib.get_close_matches(option, names, n=1, cutoff=0.7)  # below 0.7: --lr -> --help
        if near:
            return f" (did you mean {near[0]}?)"
    return ""


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[name]
    raise KeyError(name)


def _config_from(args: argparse.Namespace, config_class: type) -> Any:
    fields = {f.name: f for f in dataclasses.fields(config_class)}
    values = {k: None if v is NONE_GIVEN else v for k, v in vars(args).items() if k in fields and v is not None}
    if "backbone_args" in values:
        values["backbone_args"] = backbone_args_from(values["backbone_args"])
    try:
        return config_class(**values)
    except TypeError as error:
        raise RelreasonError(f"bad option value ({error})") from None


def run_pretrain(args: argparse.Namespace) -> int:
    from relreason.data import dataset_info, has_split_dirs
    from relreason.train import PretrainConfig, pretrain

    config = _config_from(args, PretrainConfig)
    result = pretrain(config)
    reports = is_first_process()  # under torchrun, process 0 alone speaks for the run
    if result.preempted:
        if reports:
            part = " and part of the next" if result.mid_epoch else ""
            print(f"stopped by SIGTERM after {result.epochs_done} epoch(s){part}, with a checkpoint there; rerun the "
                  "same command to continue")
        return 143  # 128 + SIGTERM: the run is not finished
    partial = ((" and part of the next" if result.mid_epoch else "")
               + " (time limit: the same command trains on from there)" if result.stopped_early else "")
    evaluate = f"relreason evaluate --run-dir {shlex.quote(str(result.run_dir))}"  # to paste into a shell: last
    remark = ""
    if dataset_info(config.dataset).name == "folder" and config.test_fraction is None and (
            not has_split_dirs(config.data_root or ".") or result.num_classes is None):
        # Evaluation needs labelled train and test images of several classes, which a pretraining folder need not
        # hold. A labelled folder's classes can be split, unless the labels were trained on.
        if config.method != "supervised" and result.num_classes is not None:
            evaluate += " --test-fraction 0.2"
            remark = " (its held-out images were seen, unlabelled, in pretraining)"
        else:
            evaluate += " --data-root DIR"
            remark = " (DIR: train/ and test/, each with one subfolder per class)"
    if reports:
        print(
            f"done: {result.epochs_done} epoch(s){partial}; backbone exported to {result.run_dir / BACKBONE_NAME}; "
            f"evaluate with{remark}: {evaluate}"
        )
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    from relreason.evaluate import EvaluateConfig, format_table, run_evaluation

    config = _config_from(args, EvaluateConfig)
    results = run_evaluation(config)
    if results["pretrained_on"] and results["cross_domain"]:
        then, now = results["pretrained_on"], results["dataset"]
        if results["pretrained_data_root"]:  # two image folders: named by where they are
            then, now = f"{then} {results['pretrained_data_root']}", f"{now} {results['data_root']}"
        print(f"cross-domain: pretrained on {then}, evaluated on {now}")
    print(format_table(results["results"]))
    for label, plot in results.get("retrieval_plots", {}).items():
        print(f"retrieval plot ({label}) written to {plot}")
    print(f"results written to {results['output']}")
    return 0


def run_compare_command(args: argparse.Namespace) -> int:
    from relreason.compare import CompareConfig, format_markdown, run_compare

    config = _config_from(args, CompareConfig)
    summary = run_compare(config)
    if "preempted" in summary:
        print(f"stopped by SIGTERM during the run {summary['preempted']}, with a checkpoint there; rerun the same "
              "command to continue")
        return 143  # 128 + SIGTERM, as pretrain: the comparison is not finished
    print(format_markdown(summary, config))
    print(f"tables and plots written to {config.output_dir}")
    return 0


def run_list(_: argparse.Namespace) -> int:
    from relreason.backbones import backbone_names
    from relreason.backbones.registry import backbone_arguments
    from relreason.bundled_configs import bundled_config_names, bundled_config_summary
    from relreason.data import DATASET_NAMES
    from relreason.methods import METHOD_NAMES

    print("datasets:  " + ", ".join(DATASET_NAMES))
    print("backbones: " + ", ".join(backbone_names()) + ", or package.module:factory")
    takes: dict[str, list[str]] = {}
    for name in backbone_names():
        arguments = backbone_arguments(name)
        if arguments:
            said = ", ".join(f"{key} (default {as_yaml_value(default)})" for key, default in arguments.items())
            takes.setdefault(said, []).append(name)
    for said, names in takes.items():
        print(f"  --backbone-args for {', '.join(names)}: {said}")
    print("methods:   " + ", ".join(METHOD_NAMES) + ", or package.module:Class")
    print("pretrain configs (`relreason pretrain --config NAME`, from any folder):")
    names = bundled_config_names()
    width = max(map(len, names))
    for name in names:
        print(f"  {name:<{width}}  {bundled_config_summary(name)}")
    return 0


# Each command's options class, imported when asked for so that `relreason --help` and `list` stay quick.
_CONFIG_CLASSES = {"pretrain": ("relreason.train", "PretrainConfig"), "evaluate": ("relreason.evaluate", "EvaluateConfig"),
                   "compare": ("relreason.compare", "CompareConfig")}


def config_class(command: str) -> type:
    """The dataclass holding ``command``'s options (``pretrain``, ``evaluate`` or ``compare``)."""
    module, name = _CONFIG_CLASSES[command]
    return getattr(importlib.import_module(module), name)


def main(argv: Sequence[str] | None = None) -> int:
    code = 0
    try:
        code = _run_command(argv)
        if sys.stdout is not None:  # None when started with standard output closed
            sys.stdout.flush()  # now, so that a reader that has gone is found here rather than at the interpreter's exit
        return code
    except BrokenPipeError:
        if not _stdout_reader_gone():
            raise
        # `relreason list | head`: the reader has what it wanted. No traceback; what is still buffered goes nowhere.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return code or 141  # a command's own failure stands; else 128 + SIGPIPE, as a shell reports `yes | head`


def _stdout_reader_gone() -> bool:
    """Whether standard output is a pipe whose reading end is closed (not any other broken pipe, such as a
    DataLoader worker's)."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        # Linux says POLLERR for a pipe without a reader, macOS and the BSDs POLLHUP.
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll (Windows), or stdout has no file descriptor
        return False


def _run_command(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    command, args = None, None
    try:
        try:
            args = parse_options(parser, argv)
        except SystemExit as done:  # --help, or a usage error already printed on one line
            return int(done.code or 0)
        command = args.command
        if getattr(args, "print_config", False):
            config = _config_from(args, config_class(command))
            config.validate(on_this_machine=False)  # a printed config runs, maybe on another machine (a GPU's)
            if is_first_process():  # under torchrun, one copy of the file
                print(config_as_yaml(config, _subparser(parser, command)), end="")
            return 0
        handler = {"pretrain": run_pretrain, "evaluate": run_evaluate, "compare": run_compare_command,
                   "list": run_list}[command]
        # Training checkpoints on SIGTERM itself (StopRequest); before and after it, and in the other commands, a
        # SIGTERM ends the command with one line instead of no word.
        with _sigterm_raises():
            return handler(args)
    except Terminated:
        if is_first_process():  # under torchrun every rank gets it: one says so
            say(f"relreason: stopped by SIGTERM{_AFTER_SIGTERM.get(command, '')}")
        return 143  # 128 + SIGTERM, as pretrain's
    except RelreasonError as error:
        say(f"relreason: error: {_naming_the_config_file(error, parser, args)}")
        return 2
    except (RuntimeError, OSError) as error:
        # A path whose symbolic links point back to themselves, met wherever a path is resolved.
        if not (isinstance(error, OSError) and error.errno == errno.ELOOP or str(error).startswith("Symlink loop")):
            raise
        say(f"relreason: error: {one_line(error)} (a symbolic link that leads back to itself); fix the link or give "
            "another path")
        return 2
    except KeyboardInterrupt:
        if is_first_process():  # under torchrun every rank is interrupted: one says so
            say(f"relreason: interrupted{_after_interrupt(command, args)}")
        return 130


class Terminated(BaseException):
    """SIGTERM reached a command outside pretrain's training loop (which checkpoints on it instead): said in one
    line, exit 143. A BaseException, as KeyboardInterrupt is, so that no ``except Exception`` on the way (an
    unreadable image, ...) takes it for a failure of its own."""


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """SIGTERM raises ``Terminated`` here instead of ending the process without a word (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminated(signum: int, frame: Any) -> NoReturn:
        raise Terminated

    previous = signal.signal(signal.SIGTERM, terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def _after_interrupt(command: str | None, args: argparse.Namespace | None) -> str:
    """What an interrupted command leaves behind, for the line that says it was interrupted."""
    if command == "pretrain":
        from relreason.checkpoint import list_checkpoints
        from relreason.train import PretrainConfig

        if not list_checkpoints(os.path.expanduser(getattr(args, "output_dir", None) or PretrainConfig.output_dir)):
            return " before the run's first checkpoint; the same command starts it again"
    return _AFTER_INTERRUPT.get(command, "")


_AFTER_SIGTERM: dict[str | None, str] = {  # by command (None: before one was read)
    "pretrain": " outside training; the same command resumes from the newest checkpoint (or starts the run, if it has "
                "none)",
    "evaluate": "; the features already extracted stay cached, so the same command goes on from them",
    "compare": "; finished runs and extracted features are kept, and the same command goes on from where it stopped",
}

_AFTER_INTERRUPT: dict[str | None, str] = {
    "pretrain": "; the checkpoints written so far are kept, and the same command (without --no-resume) resumes "
                "from the newest",
    "compare": "; finished runs are kept, and the same command goes on from where it stopped",
}


if __name__ == "__main__":
    sys.exit(main())
