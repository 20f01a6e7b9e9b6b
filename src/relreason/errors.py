"""The one exception type users see: its message is a single line naming the problem and the fix."""


class RelreasonError(Exception):
    """Invalid input or missing resource; the CLI prints the message on one line and exits non-zero."""


def format_bytes(n: float) -> str:
    """A size for a message: ``512 B``, ``4.5 KB``, ``2.3 GB``."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
