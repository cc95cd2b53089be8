"""The one error type of :mod:`splitlit.link`."""

from __future__ import annotations

__all__ = ["LinkError"]


class LinkError(RuntimeError):
    """The link cannot be set up: missing privileges or tools, a bad setting, a qdisc the kernel lacks."""
