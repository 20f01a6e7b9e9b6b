"""Config files: options from a YAML mapping (a file or a shipped config's name), checked as strictly as the same
options on the command line, and every option written back as YAML (``--print-config``)."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import re
import shlex
from typing import Any, NoReturn

import yaml

from relreason.errors import RelreasonError, note
from relreason.launch import is_first_process, launched_by_torchrun
from relreason.run_files import RUN_RECORDS


def load_config_file(path: str, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """Options from a YAML mapping, keyed by option dest; unknown keys are refused, not ignored.

    ``path`` is a file's path or the name of a config shipped with relreason (``relreason list``)."""
    from relreason.bundled_configs import is_bundled, resolve_config

    resolved = resolve_config(path)
    path = str(resolved)
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
        loaded = yaml.load(text, Loader=_ExponentFloatLoader) or {}
    except OSError as error:
        raise RelreasonError(f"cannot read config file {path} ({error.strerror}); check the --config path") from None
    except UnicodeDecodeError as error:  # an image, a checkpoint, ...: not text at all
        raise RelreasonError(
            f"config file {path} is not a text YAML file (byte {error.start} is not UTF-8); check the --config path"
        ) from None
    except _DuplicateKey as error:
        raise RelreasonError(f"'{error.key}' is given twice in config file {path} (line {error.line}); keep "
                             "one") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        lines = text.splitlines()
        line = lines[mark.line] if mark is not None and mark.line < len(lines) else ""
        tab = "; YAML takes no tab between a key and its value or in an indentation: use spaces" if "\t" in line else ""
        raise RelreasonError(f"config file {path} is not valid YAML{where} ({str(error).splitlines()[0]}){tab}") from None
    if not isinstance(loaded, dict):
        raise RelreasonError(f"config file {path} must be a mapping of option: value")
    actions = {action.dest: action for action in parser._actions
               if action.dest not in ("help", "config", "print_config")}
    options: dict[str, Any] = {}
    dests = {key: _config_dest(key) for key in loaded}
    # A file of pretrain's options alone (a shipped config, a run's config.json, a --print-config output) given to
    # another command: say so, rather than "unknown option" for the first of them. Not for a key with a near name
    # here ('seed' for compare's 'seeds'): that is this command's file with a typo.
    foreign = [key for key, dest in dests.items() if dest not in actions and dest not in RUN_RECORDS
               and not difflib.get_close_matches(dest, list(actions), n=1)]
    if parser.prog != "relreason pretrain" and (is_bundled(resolved) or (
            foreign and set(dests.values()) <= _pretrain_dests() | set(RUN_RECORDS))):
        key = foreign[0] if foreign else next(
            (k for k, d in dests.items() if d not in actions and d not in RUN_RECORDS), None)
        if key is not None:  # (a shipped config whose every option this command has too is taken as it is)
            name = resolved.stem if is_bundled(resolved) else path
            raise RelreasonError(f"{name} is a config for `relreason pretrain` (it sets '{key}', which "
                                 f"`{parser.prog}` has not); run `relreason pretrain --config {shlex.quote(name)}`")
    # Each value as written (YAML's base reading, every scalar as text): a text option takes `amp: off` or
    # `data-root: 2024` as the command line would, not as YAML 1.1's false or 2024.
    written = yaml.load(text, Loader=yaml.BaseLoader) if isinstance(loaded, dict) else None
    written = written if isinstance(written, dict) else {}  # by key: a merge (<<:) orders the two readings unlike
    for key, value in loaded.items():
        dest = dests[key]
        if dest in RUN_RECORDS and parser.prog == "relreason pretrain":  # a run's config.json records them beside
            if dest == "processes":  # the options: that file works as pretrain's config
                _note_other_process_count(path, value, loaded.get("batch_size", loaded.get("batch-size")))
            continue
        if dest not in actions:
            near = difflib.get_close_matches(dest, list(actions), n=1)
            hint = f" (did you mean '{near[0].replace('_', '-')}'?)" if near else ""
            raise RelreasonError(f"unknown option '{key}' in config file {path}{hint}; see `{parser.prog} --help` for "
                                 "the valid names")
        value = _config_value(actions[dest], key, value, path, written.get(key) if isinstance(key, str) else None)
        if dest in options and options[dest] != value:  # num_views: 4 and num-views: 8: which one was meant?
            raise RelreasonError(f"option '{key}' is given twice in config file {path}, under two spellings, with "
                                 f"different values ({options[dest]!r} and {value!r}); keep one")
        options[dest] = value
    return options


def _note_other_process_count(path: str, recorded: Any, batch_size: Any) -> None:
    """Say so when a run's config.json is rerun under another number of processes: --batch-size is per process,
    so the images per step (and the step count per epoch) change with it."""
    now = int(os.environ["WORLD_SIZE"]) if launched_by_torchrun() else 1
    if not isinstance(recorded, int) or recorded == now or not is_first_process():
        return
    batch = f" of {batch_size}" if isinstance(batch_size, int) else ""
    note(f"{path} was trained by {recorded} process(es) and this run has {now}; --batch-size "
         f"is per process, so a step now takes {now} batch(es){batch} instead of {recorded} (launch with `torchrun "
         f"--nproc-per-node {recorded}`, or scale --batch-size, to keep the images per step)")


def _config_dest(key: Any) -> str:
    """A config file's key as the option's dest (dashes or underscores; -K's short names)."""
    dest = str(key).replace("-", "_")
    return {"k": "num_views", "K": "num_views", "eval_dataset": "dataset"}.get(dest, dest)


def _pretrain_dests() -> set[str]:
    from relreason.train import PretrainConfig

    return {field.name for field in dataclasses.fields(PretrainConfig)}


def _config_value(action: argparse.Action, key: str, value: Any, path: str, written: Any = None) -> Any:
    """A YAML value checked as strictly as the same value typed on the command line; ``written``: the same value
    as text, as the file spells it, which a text option takes instead of YAML's reading of it."""
    def refuse(expected: str, item: Any = None) -> NoReturn:
        got = f"{item!r} in {value!r}" if isinstance(value, list) and item is not None else repr(value)
        raise RelreasonError(f"option '{key}' in config file {path} must be {expected}, got {got}")

    if value is None or (hasattr(action.type, "kind") and isinstance(value, str) and value.strip().lower() == "none"):
        return None  # null, or `none` as on the command line (--time-limit none): not set
    if action.dest == "backbone_args":  # a mapping (as --print-config writes it) or KEY=VALUE strings
        try:
            return backbone_args_from(value)
        except RelreasonError:
            refuse("a mapping of argument names to values, such as {small_stem: false}")
    if isinstance(action, argparse.BooleanOptionalAction):
        if not isinstance(value, bool):
            refuse("true or false")
        return value
    kind = getattr(action.type, "kind", action.type)  # int for --image-size's reader of an int or `none`
    values = value if action.nargs == "+" and isinstance(value, list) else [value]
    texts = written if action.nargs == "+" and isinstance(written, list) else [written]
    if len(texts) != len(values):
        texts = [None] * len(values)
    checked = []
    for item, text in zip(values, texts):
        if kind is None and not isinstance(item, (str, list, dict)) and isinstance(text, str):
            item = text  # `amp: off`, `data-root: 2024`, `output-dir: 1e3`: the words typed, as on the command line
            value = value if isinstance(value, list) else text  # and named so in an error
        if kind is int and (isinstance(item, bool) or not isinstance(item, int)):
            refuse("an integer")
        if kind is float and isinstance(item, str):
            # YAML 1.1 reads 1e-3 (no dot) as a string; take it as the command line would: float('1e-3').
            try:
                item = float(item)
            except ValueError:
                refuse("a number")
        if kind is float and (isinstance(item, bool) or not isinstance(item, (int, float))):
            refuse("a number")
        if kind is None and not isinstance(item, str):
            refuse("a string")
        if action.choices is not None and item not in action.choices:
            refuse(f"one of {', '.join(map(str, action.choices))}", item)
        checked.append(float(item) if kind is float else item)
    return checked if action.nargs == "+" else checked[0]


_EXPONENT_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


class _DuplicateKey(yaml.YAMLError):
    """A mapping that gives one key twice: YAML forbids it, and PyYAML would keep the last value in silence."""

    def __init__(self, key: Any, line: int) -> None:
        super().__init__(f"key {key!r} given twice")
        self.key, self.line = key, line


class _ExponentFloatLoader(yaml.SafeLoader):
    """YAML whose unquoted ``1e-3`` is a float wherever it stands, as on the command line (YAML 1.1 wants a dot:
    ``1.0e-3``), and whose mappings give each key once; quoted text stays text."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` then a key of its own: an override
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                if key in seen:
                    raise _DuplicateKey(key, key_node.start_mark.line + 1)
                seen.add(key)
            except TypeError:  # an unhashable key, which the base class refuses in its own words
                pass
        return super().construct_mapping(node, deep)


class _ExponentFloatDumper(yaml.SafeDumper):
    """Writes text such as ``1e-3`` quoted, so that :class:`_ExponentFloatLoader` reads it back as text."""


for _yaml_class in (_ExponentFloatLoader, _ExponentFloatDumper):
    _yaml_class.add_implicit_resolver(
        "tag:yaml.org,2002:float", _EXPONENT_FLOAT, list("-+0123456789.")
    )


def backbone_args_from(value: Any) -> dict[str, Any]:
    """``--backbone-args`` as keyword arguments: ``KEY=VALUE`` strings, each value read as YAML (``false``, ``64``,
    ``0.5``, ``1e-3``, ``[1, 2]``, text), or a config file's mapping; none at all for an empty list."""
    from relreason.backbones.registry import check_backbone_args

    if isinstance(value, dict):  # a config file's mapping, read with its types
        return check_backbone_args(value)
    args: dict[str, Any] = {}
    for item in value if isinstance(value, list) else [value]:
        key, sign, text = str(item).partition("=")
        if not (sign and key.isidentifier()):
            raise RelreasonError(f"--backbone-args takes KEY=VALUE pairs such as small_stem=false, got {item!r}")
        if key in args:
            raise RelreasonError(f"--backbone-args gives {key} twice; keep one")
        try:
            args[key] = yaml.load(text, Loader=_ExponentFloatLoader) if text else ""
        except _DuplicateKey as error:
            raise RelreasonError(f"--backbone-args {key}={text} gives {error.key!r} twice; keep one") from None
        except yaml.YAMLError:
            args[key] = text  # not YAML: the text as it is
    return args


def config_as_yaml(config: Any, parser: argparse.ArgumentParser) -> str:
    """Every option of ``config`` as a YAML config that ``--config`` reads back to the same options.

    Defaults are written too, so the file keeps its meaning if a later version changes one; an option left to be
    chosen at run time (``--image-size``: the dataset's own, ...) is written as ``null``, which means the same."""
    option_names = {action.dest: name[2:] for action in parser._actions
                    for name in reversed(action.option_strings) if name.startswith("--")}  # the first long name
    options = {}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if field.name in option_names:
            options[option_names[field.name]] = list(value) if isinstance(value, tuple) else value
    header = f"# {parser.prog} options; run them with `{parser.prog} --config THIS_FILE`\n"
    return header + yaml.dump(options, Dumper=_ExponentFloatDumper, sort_keys=False, allow_unicode=True)


def as_yaml_value(value: Any) -> str:
    """A value as a config file or ``--backbone-args`` writes it (``true``, ``3``); its repr if YAML has none."""
    try:
        return yaml.dump(value, Dumper=_ExponentFloatDumper).splitlines()[0]
    except yaml.YAMLError:
        return repr(value)
