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

__all__ = ["down_cut_module", "received_view", "server_decoded", "simulate_wire", "up_cut_module"]


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


def simulate_wire(split: Split, plan: WirePlan | dict | None) -> list:
    """Unsplit, apply the wire codecs as the transport would: hooks on the modules at the cuts (returns them).

    The receiver computes on the decoded tensor and the sender's backward uses the gradient the receiver sent
    (itself through the wire), so each activation goes through a straight-through round trip
    (``x + (decode(encode(x)) - x).detach()``) and each gradient through a plain one. The simulation mode of
    :class:`callbacks.LeakageMonitor` and ``experiments.bench_leakage`` use it to study a wire codec in one process.
    """
    plan = WirePlan.parse(plan)

    def straight_through(values: Any, cut: str) -> Any:
        out = tuple(t + (_round_trip(t.detach(), plan, cut, "activation") - t.detach())
                    if isinstance(t, Tensor) and t.is_floating_point() else t for t in as_tuple(values))
        return out if isinstance(values, tuple) else out[0]

    def grads_through(values: Any, cut: str) -> None:
        if torch.is_grad_enabled() and plan.get(cut, "gradient") is not None:
            for t in as_tuple(values):
                if isinstance(t, Tensor) and t.is_floating_point() and t.requires_grad:
                    t.register_hook(lambda g: _round_trip(g, plan, cut, "gradient"))

    def up_sent(module: Any, args: tuple, output: Any) -> Any:
        output = straight_through(output, "up") if plan.get("up", "activation") is not None else output
        grads_through(output, "up")  # the up cut's gradient comes back from the server through the wire
        return output

    def down_received(module: Any, args: tuple) -> Any:
        args = straight_through(args, "down") if plan.get("down", "activation") is not None else args
        grads_through(args, "down")  # the client's gradient goes back to the server through the wire
        return args

    return [up_cut_module(split).register_forward_hook(up_sent),
            down_cut_module(split).register_forward_pre_hook(down_received)]
