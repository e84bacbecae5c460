"""One-line error text: user errors name the file and a few keys, never dump a traceback."""

from __future__ import annotations

from collections.abc import Iterable

SHOWN_KEYS = 3


def one_line(text: object, limit: int = 200) -> str:
    """First line of an exception message, shortened: user errors are one line."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    line = lines[0] if lines else type(text).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


def first_keys(keys: Iterable[str], n: int = SHOWN_KEYS) -> str:
    """The first `n` keys, and how many there are in all when some are left out."""
    keys = list(keys)
    shown = ", ".join(keys[:n])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > n else "")
