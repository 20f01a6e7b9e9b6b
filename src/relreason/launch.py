"""How this process was launched, read from the environment torchrun sets."""

from __future__ import annotations

import os


def launched_by_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def is_first_process() -> bool:
    """True in a plain process and in rank 0 under torchrun: the one process that speaks for the run, so a message
    every rank would print is printed once."""
    return os.environ.get("RANK", "0") == "0"
