"""The argument checks several classes share, with errors that name the class, the value and the fix."""

from __future__ import annotations

from typing import Any

__all__ = ["check_count"]


def check_count(owner: str, name: str, value: Any, *, at_least: int = 1, fix: str | None = None) -> int:
    """``value`` when it is an integer (not a bool) of at least ``at_least``, else a ``ValueError`` that reads
    ``"<owner>(<name>=<value>): <fix>"``; ``fix`` defaults to "<name> must be a positive integer." (or ">= 0").

        self.chunks = check_count("SplitPipelineStrategy", "chunks", chunks, fix="give 1, 4 or 8 micro-batches.")
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < at_least:
        if fix is None:
            fix = (f"{name} must be a positive integer." if at_least == 1
                   else f"{name} must be an integer >= {at_least}.")
        raise ValueError(f"{owner}({name}={value!r}): {fix}")
    return value
