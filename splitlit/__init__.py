"""splitlit: split learning with Lightning — a U-shaped model pipelined between a client and a server.

The names below load on first use (PEP 562), so ``python -m splitlit.link``, which needs neither torch nor
Lightning, starts in a fraction of a second instead of importing them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_WHERE = {
    "Split": "splitlit.split",
    "SplitError": "splitlit.split",
    "SplitPipelineStrategy": "splitlit.strategy",
    "PeerLostError": "splitlit.pipeline",
}

# The names users import. The rest lives in its module: splitlit.codecs (PowerIteration, ConvInsert),
# splitlit.wire (wire codecs), splitlit.meter / splitlit.traffic (link records and sums), splitlit.pipeline.
__all__ = ["PeerLostError", "Split", "SplitError", "SplitPipelineStrategy"]

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs
    from splitlit.pipeline import PeerLostError
    from splitlit.split import Split, SplitError
    from splitlit.strategy import SplitPipelineStrategy


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'splitlit' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
