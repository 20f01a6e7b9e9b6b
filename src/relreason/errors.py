"""The exception users see (its message is a single line naming the problem and the fix), the notes and warnings
printed beside a run that goes on, and the helpers that keep such messages short."""

import errno
import re
import sys

_TERMINAL_CODES = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")

#: Write errors that no retry fixes and the user can: a full disk, a spent quota, a file system turned read-only.
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


class RelreasonError(Exception):
    """Invalid input or missing resource; the CLI prints the message on one line and exits non-zero."""


def say(message: str) -> None:
    """``message`` as a line on standard error, if it can be written there: a closed one, or a log file on a full
    disk, must not stop the work (a run's files keep what it says)."""
    try:  # one write: under torchrun every rank may say something, and two writes each would interleave
        sys.stderr.write(message + "\n")
        sys.stderr.flush()
    except (OSError, ValueError, AttributeError):  # ValueError: closed; AttributeError: sys.stderr is None
        pass


def note(message: str, speaks: bool = True) -> None:
    """Print ``relreason: note: MESSAGE`` on standard error: worth knowing, nothing is wrong. ``speaks``: whether
    this process speaks for the run (under torchrun, rank 0 alone, so that the note is printed once)."""
    if speaks:
        say(f"relreason: note: {message}")


def warn(message: str, speaks: bool = True) -> None:
    """Print ``relreason: warning: MESSAGE`` on standard error: likely not what was meant, but the work goes on."""
    if speaks:
        say(f"relreason: warning: {message}")


def disk_full(error: OSError, what_is_kept: str) -> RelreasonError:
    """The one line for a write that a full disk (or quota, or read-only file system) stopped; ``error`` must be
    one of ``DISK_FULL_ERRNOS``."""
    where = f"{error.filename}" if error.filename else "its files"
    return RelreasonError(f"cannot write {where} ({error.strerror}); free space there and rerun the same command: "
                          f"{what_is_kept}")


def one_line(text: object) -> str:
    """``text`` on one line: its runs of whitespace as single spaces, without terminal codes (torch's messages
    carry bold ones)."""
    return " ".join(_TERMINAL_CODES.sub("", str(text)).split())


def short_reason(error: BaseException, limit: int | None = 120) -> str:
    """An exception as a few words for a one-line message: its type and the start of its text (all of it when
    ``limit`` is None), on one line."""
    detail = one_line(error)
    if limit is not None and len(detail) > limit:
        detail = detail[:limit].rsplit(" ", 1)[0] + " ..."
    return f"{type(error).__name__}: {detail}" if detail else type(error).__name__


def option_value(value: object) -> str:
    """An option's value for a message: ``none`` for an option not given (not Python's None), else its repr."""
    return "none" if value is None else repr(value)


def option_flag(name: str) -> str:
    """An option's field name as the user types it: ``--batch-size`` for ``batch_size``, ``-K/--num-views``."""
    return "-K/--num-views" if name == "num_views" else "--" + name.replace("_", "-")


def format_bytes(n: float) -> str:
    """A size for a message: ``512 B``, ``4.5 KB``, ``2.3 GB``."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
