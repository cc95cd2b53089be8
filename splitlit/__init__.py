"""splitlit: split learning with Lightning — a U-shaped model pipelined between a client and a server."""

from splitlit.codecs import Codec, ConvInsert, PowerIteration, make_codec
from splitlit.pipeline import PeerLostError, SplitPipeline
from splitlit.split import Split, SplitError
from splitlit.stage import LinkMeter, MeteredStage, Transfer
from splitlit.strategy import SplitPipelineStrategy

__all__ = [
    "Codec",
    "ConvInsert",
    "LinkMeter",
    "MeteredStage",
    "PeerLostError",
    "PowerIteration",
    "Split",
    "SplitError",
    "SplitPipeline",
    "SplitPipelineStrategy",
    "Transfer",
    "make_codec",
]
