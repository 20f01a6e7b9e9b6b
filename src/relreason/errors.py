"""The one exception type users see: its message is a single line naming the problem and the fix."""


class RelreasonError(Exception):
    """Invalid input or missing resource; the CLI prints the message on one line and exits non-zero."""
