"""The first line of an error's text: what every one-line message of the job quotes of an exception."""

from __future__ import annotations


def first_line(exc: BaseException, limit: int | None = None) -> str:
    """The first non-empty line of `str(exc)`, stripped (the exception's type name when it has no text), cut
    to `limit` characters when one is given."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    line = lines[0] if lines else type(exc).__name__
    return line if limit is None else line[:limit]
