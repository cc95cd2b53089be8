"""Pipeline orders for the U placement: stage 0 (client head), 1 (server), 2 (client tail).

The client holds the first and the last stage, so the stock schedules do not fit: the V schedules want an
even number of stages per rank and the looped ones assume stage ``i`` lives on rank ``i % world``. The
runtime of ``torch.distributed.pipelining`` takes any compute order, lowers it to send/recv actions and
runs it; this module only writes the orders:

* ``"gpipe"`` (fill-drain): every forward, then every backward.
* ``"1f1b"``: after two micro-batches fill the pipe, the client alternates a tail forward+backward with
  the next head forward, so at most four micro-batches' activations are held whatever the chunk count
  (gpipe holds all of them), with the same overlap. The head's backward runs one micro-batch late: it sends
  nothing, so nothing waits for it, while it waits for the gradient that crosses the link last; run in
  its turn, it would hold the tail's next gradient (which the server waits for) behind that one.
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


def u_order(order: str | None, n: int, warmup: int = 2) -> dict[int, list[_Action]]:
    """Compute-only actions per rank for ``n`` micro-batches; ``order=None`` is forward-only. ``warmup``: the
    micro-batches 1f1b and zb send forward before the first backward (at most ``n``).

    ``"zb"`` follows Qi et al., "Zero Bubble Pipeline Parallelism" (ICLR 2024): a backward is two
    computations, the input gradient I (on the critical path: the previous stage waits for it) and the weight
    gradient W (needed only by the optimiser step), and W is moved to where the rank would otherwise wait.
    It is 1f1b with the backward of the server and of the tail split; per micro-batch ``k`` after the warm-up::

        client: F2(k) I2(k) -> down gradient   F0(k+2) -> up activation   W2(k)   B0(k-1)
        server: I1(k) -> up gradient   W1(k)   F1(k+2) -> down activation

    The client's W2 runs while its down gradient crosses to the server and the up gradient comes back (1f1b
    waits there for the server's whole backward); the server's W1 runs while the client computes the tail of
    the next micro-batch, whose down gradient it needs next. Their ZB-H1 is the same change to 1F1B on a
    chain of stages; their ZBV places two stages per rank in a V (rank 0 holds the first and the last), and
    ours is that V with three stages on two ranks: the client's head and tail, the server's body. Unlike ZBV,
    the head's backward stays whole (B0): the head sends no input gradient, so nothing waits for it, and torch
    computes a first stage's W as a whole backward anyway. B0 is a weight gradient in all but name, so it is
    placed as one: a micro-batch late (in 1f1b too), where it waits for nothing. In its turn, B0(k) would
    wait for the up gradient of k, the last transfer of k's round trip, while the tail's next down gradient,
    which the server waits for, is held behind it: on a link-bound U each direction then stood idle, once per
    micro-batch, for a crossing of the small cut and the computations around it.

    Memory is 1f1b's, in micro-batches whose activations a stage holds (a forward not yet freed by its B or
    W): head ``warmup + 2``, server ``warmup``, tail 1, whatever ``n`` (gpipe: ``n`` everywhere). A deeper warm-up
    keeps a far link busy: the round trip of one micro-batch crosses it four times, and the warm-up is what the
    client sends while the first one is on its way. ZB-H1 keeps 1F1B's memory too; ZB-H2 buys the last bubbles
    with a longer warm-up (more memory), which ``warmup`` offers here for a link with a long round trip.
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
    if order in ("1f1b", "zb"):
        split = order == "zb"
        warmup = min(warmup, n)
        client = [fwd(HEAD, mb) for mb in range(warmup)]
        server = [fwd(BODY, mb) for mb in range(warmup)]
        for mb in range(n):
            client += [fwd(TAIL, mb), _Action(TAIL, I, mb) if split else bwd(TAIL, mb)]
            if mb + warmup < n:
                client.append(fwd(HEAD, mb + warmup))
            if split:
                client.append(_Action(TAIL, W, mb))
            if mb >= 1:  # the head's backward one micro-batch late (see above)
                client.append(bwd(HEAD, mb - 1))
            server += [_Action(BODY, I, mb), _Action(BODY, W, mb)] if split else [bwd(BODY, mb)]
            if mb + warmup < n:
                server.append(fwd(BODY, mb + warmup))
        client.append(bwd(HEAD, n - 1))
        return {CLIENT_RANK: client, SERVER_RANK: server}
    raise ValueError(f"Unknown pipeline order {order!r}; choose one of {ORDERS}.")


RECEIVES_AHEAD = 4  # computations a receive is posted before the one that needs it


def _receives_ahead(actions: list, computations: int = RECEIVES_AHEAD) -> list:
    """Each receive moves before the sends and up to ``computations`` computations before it; the order of the
    receives (and of the sends) is kept, and no receive of a gradient moves before its stage's forward.

    gloo starts a send only once the peer has posted the matching receive, and the peer's notice that it has
    travels on the same TCP connection as the peer's own outgoing data: posted after a large send, it waits behind
    it, and the two directions of the link take turns instead of overlapping (on a 10 Mbit/s link, 4 chunks took
    17.2 s per batch instead of 12.9 s). Posted in its turn, a receive also waits for the computations before it:
    the server asks for the next down gradient only after the forward before it, which waits for the large up
    activation. A few computations ahead is enough for the U's two-rank pipeline; the buffers of every
    micro-batch's receives exist from the first step, so posting early holds no more memory. gloo matches a
    peer's sends to this rank's receives in order, which is why no receive passes another.
    """
    recv = (_ComputationType.RECV_F, _ComputationType.RECV_B)
    compute = (F, B, I, W)
    moved: list = []
    for action in actions:
        at = len(moved)
        if action is not None and action.computation_type in recv:
            passed = 0
            while at > 0:
                before = moved[at - 1]
                if before is None or before.computation_type in recv:
                    break
                if before.computation_type in compute:
                    same = (before.stage_index, before.microbatch_index) == (action.stage_index,
                                                                              action.microbatch_index)
                    if passed == computations or same:
                        break
                    passed += 1
                at -= 1
        moved.insert(at, action)
    return moved


class USchedule(_PipelineScheduleRuntime):
    """The runtime of ``torch.distributed.pipelining`` driven by a U-placement order.

    ``stages`` are this rank's stages: ``[stage 0, stage 2]`` on the client, ``[stage 1]`` on the server.
    Without ``loss_fn`` the schedule is forward-only.
    """

    def __init__(self, stages: list, n_microbatches: int, *, loss_fn: Callable | None = None,
                 order: str = "1f1b", warmup: int = 2) -> None:
        super().__init__(stages=stages, n_microbatches=n_microbatches, loss_fn=loss_fn)
        self.inferring_shapes = False
        self.order = order if loss_fn is not None else None
        self.pipeline_order = u_order(self.order, n_microbatches, warmup)
        actions = {rank: list(acts) for rank, acts in self.pipeline_order.items()}
        if self.order is not None:
            self._prepare_schedule_with_comms(actions)
            self.pipeline_order_with_comms = {r: _receives_ahead(a) for r, a in self.pipeline_order_with_comms.items()}
            return
        # torch's validator insists on a backward per forward, so lower a forward-only order here.
        self.stage_index_to_group_rank = {HEAD: CLIENT_RANK, BODY: SERVER_RANK, TAIL: CLIENT_RANK}
        for stage in self._stages:
            stage.stage_index_to_group_rank = self.stage_index_to_group_rank
        self.pipeline_order_with_comms = {r: _receives_ahead(a) for r, a in _add_send_recv(
            actions, stage_to_rank=self.stage_index_to_group_rank.__getitem__, num_stages=3
        ).items()}

    def _initialize_stages(self, *args, **kwargs) -> None:
        # Shape inference runs the stages and the loss on placeholder tensors; the loss function can tell.
        self.inferring_shapes = True
        try:
            super()._initialize_stages(*args, **kwargs)
        finally:
            self.inferring_shapes = False
