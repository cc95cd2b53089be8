"""Pipeline orders for the U placement: stage 0 (client head), 1 (server), 2 (client tail).

The client holds the first and the last stage, so the stock schedules do not fit: the V schedules want an
even number of stages per rank and the looped ones assume stage ``i`` lives on rank ``i % world``. The
runtime of ``torch.distributed.pipelining`` takes any compute order, lowers it to send/recv actions and
runs it; this module only writes the orders:

* ``"gpipe"`` (fill-drain): every forward, then every backward.
* ``"1f1b"``: after two micro-batches fill the pipe, the client alternates a tail forward+backward with
  the next head forward, so at most three micro-batches' activations are held whatever the chunk count
  (gpipe holds all of them), with the same overlap.
* ``"zb"`` (zero bubble): the backward of the server and of the client's tail is split into the input
  gradient (``BACKWARD_INPUT``, what crosses the link) and the weight gradient (``BACKWARD_WEIGHT``, which
  stays), so each gradient is sent as soon as it exists and the weight gradients are computed while it
  travels (see :func:`u_order`), with 1f1b's memory.
* forward-only, for validation, test and predict.

Usage::

    schedule = USchedule(local_stages, n_microbatches=4, loss_fn=loss_fn, order="1f1b")
    schedule.step(x, target=y, losses=losses)  # client;  schedule.step() on the server
"""

from __future__ import annotations

from collections.abc import Callable

from torch.distributed.pipelining.schedules import (
    _Action,
    _ComputationType,
    _PipelineScheduleRuntime,
    _add_send_recv,
)

from splitlit.split import BODY, CLIENT_RANK, HEAD, SERVER_RANK, TAIL

__all__ = ["ORDERS", "USchedule", "u_order"]

F = _ComputationType.FORWARD
B = _ComputationType.FULL_BACKWARD
I = _ComputationType.BACKWARD_INPUT  # noqa: E741 - torch's own letter for it
W = _ComputationType.BACKWARD_WEIGHT
ORDERS = ("gpipe", "1f1b", "zb")


def u_order(order: str | None, n: int) -> dict[int, list[_Action]]:
    """Compute-only actions per rank for ``n`` micro-batches; ``order=None`` is forward-only.

    ``"zb"`` follows Qi et al., "Zero Bubble Pipeline Parallelism" (ICLR 2024): a backward is two
    computations, the input gradient I (on the critical path: the previous stage waits for it) and the weight
    gradient W (needed only by the optimiser step), and W is moved to where the rank would otherwise wait.
    It is 1f1b with the backward of the server and of the tail split; per micro-batch ``k`` after the warm-up::

        client: F2(k) I2(k) -> down gradient   F0(k+2) -> up activation   W2(k)   B0(k)
        server: I1(k) -> up gradient   W1(k)   F1(k+2) -> down activation

    The client's W2 runs while its down gradient crosses to the server and the up gradient comes back (1f1b
    waits there for the server's whole backward); the server's W1 runs while the client computes the tail of
    the next micro-batch, whose down gradient it needs next. Their ZB-H1 is the same change to 1F1B on a
    chain of stages; their ZBV places two stages per rank in a V (rank 0 holds the first and the last), and
    ours is that V with three stages on two ranks: the client's head and tail, the server's body. Unlike ZBV,
    the head's backward stays whole (B0): the head sends no input gradient, so nothing waits for it, and torch
    computes a first stage's W as a whole backward anyway.

    Memory is 1f1b's, in micro-batches whose activations a stage holds (a forward not yet freed by its B or
    W): head 3, server 2, tail 1, whatever ``n`` (gpipe: ``n`` everywhere). ZB-H1 keeps 1F1B's memory too;
    ZB-H2 buys the last bubbles with a longer warm-up (more memory), which a link-bound U does not need.
    """
    fwd = lambda stage, mb: _Action(stage, F, mb)  # noqa: E731
    bwd = lambda stage, mb: _Action(stage, B, mb)  # noqa: E731
    if order is None:
        # Interleave so the tail of micro-batch i runs while the server works on i + 1.
        client = [fwd(HEAD, 0)]
        for mb in range(n):
            if mb + 1 < n:
                client.append(fwd(HEAD, mb + 1))
            client.append(fwd(TAIL, mb))
        return {CLIENT_RANK: client, SERVER_RANK: [fwd(BODY, mb) for mb in range(n)]}
    if order == "gpipe":
        client = ([fwd(HEAD, mb) for mb in range(n)] + [fwd(TAIL, mb) for mb in range(n)]
                  + [bwd(TAIL, mb) for mb in range(n)] + [bwd(HEAD, mb) for mb in range(n)])
        server = [fwd(BODY, mb) for mb in range(n)] + [bwd(BODY, mb) for mb in range(n)]
        return {CLIENT_RANK: client, SERVER_RANK: server}
    if order == "1f1b":
        warmup = min(2, n)
        client = [fwd(HEAD, mb) for mb in range(warmup)]
        server = [fwd(BODY, mb) for mb in range(warmup)]
        for mb in range(n):
            client += [fwd(TAIL, mb), bwd(TAIL, mb)]
            if mb + warmup < n:
                client.append(fwd(HEAD, mb + warmup))
            client.append(bwd(HEAD, mb))
            server.append(bwd(BODY, mb))
            if mb + warmup < n:
                server.append(fwd(BODY, mb + warmup))
        return {CLIENT_RANK: client, SERVER_RANK: server}
    if order == "zb":
        warmup = min(2, n)
        client = [fwd(HEAD, mb) for mb in range(warmup)]
        server = [fwd(BODY, mb) for mb in range(warmup)]
        for mb in range(n):
            client += [fwd(TAIL, mb), _Action(TAIL, I, mb)]
            if mb + warmup < n:
                client.append(fwd(HEAD, mb + warmup))
            client += [_Action(TAIL, W, mb), bwd(HEAD, mb)]
            server += [_Action(BODY, I, mb), _Action(BODY, W, mb)]
            if mb + warmup < n:
                server.append(fwd(BODY, mb + warmup))
        return {CLIENT_RANK: client, SERVER_RANK: server}
    raise ValueError(f"Unknown pipeline order {order!r}; choose one of {ORDERS}.")


def _receives_first(actions: list) -> list:
    """Each receive moves before the send just before it; the order of the receives (and of the sends) is kept.

    gloo starts a send only once the peer has posted the matching receive, and the peer's notice that it has
    travels on the same TCP connection as the peer's own outgoing data: posted after a large send, it waits behind
    it, and the two directions of the link take turns instead of overlapping (on a 10 Mbit/s link, 4 chunks took
    17.2 s per batch instead of 12.9 s).
    """
    actions = list(actions)
    recv, send = (_ComputationType.RECV_F, _ComputationType.RECV_B), (_ComputationType.SEND_F, _ComputationType.SEND_B)
    for i in range(1, len(actions)):
        here, before = actions[i], actions[i - 1]
        if here is not None and before is not None and here.computation_type in recv \
                and before.computation_type in send:
            actions[i - 1], actions[i] = here, before
    return actions


class USchedule(_PipelineScheduleRuntime):
    """The runtime of ``torch.distributed.pipelining`` driven by a U-placement order.

    ``stages`` are this rank's stages: ``[stage 0, stage 2]`` on the client, ``[stage 1]`` on the server.
    Without ``loss_fn`` the schedule is forward-only.
    """

    def __init__(self, stages: list, n_microbatches: int, *, loss_fn: Callable | None = None,
                 order: str = "1f1b") -> None:
        super().__init__(stages=stages, n_microbatches=n_microbatches, loss_fn=loss_fn)
        self.inferring_shapes = False
        self.order = order if loss_fn is not None else None
        self.pipeline_order = u_order(self.order, n_microbatches)
        actions = {rank: list(acts) for rank, acts in self.pipeline_order.items()}
        if self.order is not None:
            self._prepare_schedule_with_comms(actions)
            self.pipeline_order_with_comms = {r: _receives_first(a) for r, a in self.pipeline_order_with_comms.items()}
            return
        # torch's validator insists on a backward per forward, so lower a forward-only order here.
        self.stage_index_to_group_rank = {HEAD: CLIENT_RANK, BODY: SERVER_RANK, TAIL: CLIENT_RANK}
        for stage in self._stages:
            stage.stage_index_to_group_rank = self.stage_index_to_group_rank
        self.pipeline_order_with_comms = {r: _receives_first(a) for r, a in _add_send_recv(
            actions, stage_to_rank=self.stage_index_to_group_rank.__getitem__, num_stages=3
        ).items()}

    def _initialize_stages(self, *args, **kwargs) -> None:
        # Shape inference runs the stages and the loss on placeholder tensors; the loss function can tell.
        self.inferring_shapes = True
        try:
            super()._initialize_stages(*args, **kwargs)
        finally:
            self.inferring_shapes = False
