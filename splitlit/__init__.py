"""splitlit: split learning with Lightning — a U-shaped model pipelined between a client and a server.

The names below load on first use (PEP 562), so ``python -m splitlit.link``, which needs neither torch nor
Lightning, starts in a fraction of a second instead of importing them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_WHERE = {
    "Codec": "splitlit.codecs",
    "ConvInsert": "splitlit.codecs",
    "PowerIteration": "splitlit.codecs",
    "make_codec": "splitlit.codecs",
    "PeerLostError": "splitlit.pipeline",
    "SplitPipeline": "splitlit.pipeline",
    "Split": "splitlit.split",
    "SplitError": "splitlit.split",
    "LinkMeter": "splitlit.meter",
    "MeteredStage": "splitlit.stage",
    "Transfer": "splitlit.meter",
    "SplitPipelineStrategy": "splitlit.strategy",
}

__all__ = ["Codec", "ConvInsert", "LinkMeter", "MeteredStage", "PeerLostError", "PowerIteration", "Split", "SplitError",
           "SplitPipeline", "SplitPipelineStrategy", "Transfer", "make_codec"]

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs
    from splitlit.codecs import Codec, ConvInsert, PowerIteration, make_codec
    from splitlit.pipeline import PeerLostError, SplitPipeline
    from splitlit.split import Split, SplitError
    from splitlit.meter import LinkMeter, Transfer
    from splitlit.stage import MeteredStage
    from splitlit.strategy import SplitPipelineStrategy


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'splitlit' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
