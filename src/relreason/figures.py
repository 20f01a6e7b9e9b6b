"""Figures written as PNG files atomically: a kill leaves the previous file (or none), never half of one."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

from relreason.atomic_files import atomic_write_bytes


def off_screen_figure(**kwargs: Any) -> Any:
    """A matplotlib ``Figure`` drawn by Agg, outside pyplot: the process's backend (a notebook's inline one, say)
    is left as it is, and the figure goes with its last reference. ``kwargs`` go to ``Figure`` (``figsize``).
    Raises ImportError without matplotlib."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(**kwargs)
    FigureCanvasAgg(figure)
    return figure


def save_png(figure: Any, path: str | os.PathLike, dpi: int = 100) -> Path:
    """Write a matplotlib ``figure`` to ``path``."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    path = Path(path)
    atomic_write_bytes(path, buffer.getvalue())
    return path
