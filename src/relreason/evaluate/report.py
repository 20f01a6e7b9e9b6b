"""The results of an evaluation: Markdown tables and the JSON file."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from relreason.atomic_files import atomic_write_bytes, plain_json
from relreason.checkpoint import holds_a_run, is_checkpoint_path
from relreason.errors import RelreasonError
from relreason.protocols import fraction_name
from relreason.protocols.frozen import ALL_PROTOCOLS, LINEAR_PROTOCOLS
from relreason.run_files import RUN_FILE_NAMES

#: Columns of the main table: (protocol, result key, header), in order.
_TABLE_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("linear", "test_accuracy", "linear"),
    ("linear_converged", "test_accuracy", "linear_converged"),
    ("knn", "test_accuracy", "knn"),
    ("finetune", "test_accuracy", "finetune"),
    ("retrieval", "mAP", "retrieval mAP"),
    ("retrieval", "precision@1", "retrieval P@1"),
)


def _cell(result: Any, key: str) -> str:
    value = result.get(key) if isinstance(result, Mapping) else None
    return "-" if value is None else f"{float(value):.2f}"


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    """A fixed-width Markdown table: first column left-aligned, the others right-aligned."""
    widths = [max(len(line[i]) for line in [header, *rows]) for i in range(len(header))]

    def render(cells: list[str]) -> str:
        padded = [cells[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(cells[1:], widths[1:])]
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join(["-" * (widths[0] + 2)] + ["-" * (w + 1) + ":" for w in widths[1:]]) + "|"
    return "\n".join([render(header), rule, *(render(r) for r in rows)])


def _fraction_label(key: str, entry: Mapping[str, Any]) -> str:
    """The fraction asked for, and how many labels it came to (at least one per class, so a small fraction of a
    small set may use many more than it says)."""
    try:
        name = fraction_name(entry.get("fraction", key))
    except (TypeError, ValueError):
        name = str(key)
    size = entry.get("train_size")
    return f"{name} ({size:,})" if isinstance(size, int) else name


def format_table(results: Mapping[str, Mapping[str, Any]]) -> str:
    """Render ``{label: evaluate_features(...)}`` (plus ``"finetune"``) as Markdown tables (%).

    The main table has one row per label and one column per headline number present in any
    row: the test accuracy of ``linear``, ``linear_converged``, ``knn`` and ``finetune``, then
    ``retrieval mAP`` and ``retrieval P@1``, then the test accuracy of any other protocol
    (sorted).  When some row has ``"few_label"`` results, a second table follows after a blank
    line: one row per (label, label fraction), one column per probe (test accuracy).  A value
    missing from a row shows ``-``.
    """
    present = {p for row in results.values() for p in row}
    columns = [c for c in _TABLE_COLUMNS if c[0] in present]
    columns += [(p, "test_accuracy", p) for p in sorted(present - set(ALL_PROTOCOLS))]
    few = [(label, row["few_label"]) for label, row in results.items() if isinstance(row.get("few_label"), Mapping)]

    tables = []
    if columns or not few:
        rows = [
            [str(label), *(_cell(row.get(protocol), key) for protocol, key, _ in columns)]
            for label, row in results.items()
        ]
        tables.append(_markdown(["backbone", *(header for _, _, header in columns)], rows))
    if few:
        entries = [(label, key, entry) for label, by_fraction in few for key, entry in by_fraction.items()
                   if isinstance(entry, Mapping)]
        probes = [p for p in (*LINEAR_PROTOCOLS, "finetune") if any(p in entry for _, _, entry in entries)]
        rows = [
            [str(label), _fraction_label(key, entry), *(_cell(entry.get(p), "test_accuracy") for p in probes)]
            for label, key, entry in entries
        ]
        tables.append(_markdown(["backbone", "labels", *probes], rows))
    return "\n\n".join(tables)


def write_results_json(path: str | Path, payload: Mapping[str, Any]) -> Path:
    """Write ``payload`` as indented JSON to ``path`` atomically; return the path.

    Paths, devices, tensors and numpy values are converted to plain JSON types.
    """
    try:
        text = json.dumps(payload, indent=2, default=plain_json) + "\n"
    except (TypeError, ValueError) as exc:
        raise RelreasonError(
            f"results are not JSON serialisable ({exc}); pass plain numbers, strings, lists and dicts"
        ) from exc
    path = Path(path)
    atomic_write_bytes(path, text.encode())
    return path


def check_output_spares(output: Path, weights: Path) -> None:
    """Refuse a results path that is the weights evaluated, or an existing file of a run folder (its backbone,
    checkpoints, options, logs): the results would replace it."""
    if output.resolve() == weights.resolve():
        what = "the weights evaluated"
    elif output.is_file() and (output.name in RUN_FILE_NAMES or is_checkpoint_path(output)) and holds_a_run(output.parent):
        what = f"the run's {output.name}"
    else:
        return
    raise RelreasonError(f"--output {output} would replace {what}; give the results a file of their own, e.g. "
                         f"{output.with_name('evaluation.json')}")


def check_output_path(output: Path) -> None:
    """Refuse, before any feature is extracted, a results path that could not be written at the end."""
    if output.is_dir():
        raise RelreasonError(f"--output {output} is a folder; give a file path such as {output / 'evaluation.json'}")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        in_the_way = next((folder for folder in output.parents if folder.is_file()), None)
        reason = f"{in_the_way} is a file, not a folder" if in_the_way is not None else error.strerror
        raise RelreasonError(f"cannot create the folder of --output {output} ({reason}); choose another "
                             "--output") from None
    if not os.access(output.parent, os.W_OK):
        raise RelreasonError(f"{output.parent} is not writable; pass --output with a writable path")
