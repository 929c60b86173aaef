"""The one error type users see for bad input, always naming where the problem is."""

from __future__ import annotations

from pathlib import Path


class DataError(ValueError):
    """Bad input: a file, line or value that cannot be used as it is.

    The message reads ``file:line: what is wrong (what was expected)`` so it can be
    pasted into an editor's "go to" box.
    """

    def __init__(self, message: str, path: str | Path | None = None, line: int | None = None) -> None:
        self.path = None if path is None else str(path)
        self.line = line
        where = ""
        if self.path is not None:
            where = self.path if line is None else f"{self.path}:{line}"
            where += ": "
        super().__init__(where + message)


def first_line(err: BaseException) -> str:
    """The first line of an exception's message, or its type when the message is empty (``EOFError()``)."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0]
