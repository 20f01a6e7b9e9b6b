"""Figures written as PNG files atomically: a kill leaves the previous file (or none), never half of one."""

from __future__ import annotations

import io
import os
import sys
from pathlib import Path
from typing import Any

from relreason.atomic_files import atomic_write_bytes


def save_png(figure: Any, path: str | os.PathLike, dpi: int = 100) -> Path:
    """Write a matplotlib ``figure`` to ``path``, and close it when pyplot made it (pyplot keeps its figures alive
    until closed; a plain ``Figure`` goes with its last reference)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is not None:
        pyplot.close(figure)
    path = Path(path)
    atomic_write_bytes(path, buffer.getvalue())
    return path
