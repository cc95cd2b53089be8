"""Where the server's view comes from: the modules at the cuts, and what the server decodes from them.

    up = up_cut_module(split)        # its output is what the client sends over the up cut
    down = down_cut_module(split)    # the gradient w.r.t. its input is what the client sends back

These are the very modules the pipeline runs on the client (and the unsplit model runs in one process), so a hook
on them sees exactly the tensors handed to the transport, once per micro-batch, in micro-batch order.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from splitlit.split import Split, as_tuple
from splitlit.wire import WirePlan

__all__ = ["down_cut_module", "received_view", "server_decoded", "up_cut_module"]


def up_cut_module(split: Split) -> nn.Module:
    """The module whose output crosses the up cut: the up codec's encoder, or the head."""
    return split.up.encoder if split.up is not None else split.head


def down_cut_module(split: Split) -> nn.Module:
    """The module whose input gradient crosses the down cut back to the server: the down decoder, or the tail."""
    return split.down.decoder if split.down is not None else split.tail


def _round_trip(t: Tensor, plan: WirePlan, cut: str, kind: str) -> Tensor:
    codec = plan.get(cut, kind)
    if codec is None or not t.is_floating_point():
        return t
    return codec.decode(codec.encode(t), tuple(t.shape), t.dtype)


@torch.no_grad()
def received_view(sent: tuple[Tensor, ...], plan: WirePlan | None, *, cut: str = "up",
                  kind: str = "activation") -> tuple[Tensor, ...]:
    """What the server decodes from the tensors the client sent: each floating-point one through the wire codec
    of ``cut.kind`` (the transport encodes on the client and decodes on the server), the others as they are."""
    plan = plan or WirePlan()
    return tuple(_round_trip(t, plan, cut, kind) for t in sent)


@torch.no_grad()
def server_decoded(split: Split, received: tuple[Tensor, ...]) -> Tensor | None:
    """The up-cut activation as the server's body gets it: the up decoder applied to what it received.

    The server holds the decoder, so it sees this; on the client it can be recomputed only where the decoder's
    weights are real here (unsplit, or a decoder without weights such as power iteration's). None otherwise.
    """
    if split.up is None:
        return received[0]
    if any(p.is_meta for p in split.up.decoder.parameters()):
        return None
    out: Any = split.up.decoder(*received)
    return as_tuple(out)[0]
