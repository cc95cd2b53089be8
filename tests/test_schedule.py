"""``splitlit.schedule``: the U orders (gpipe, 1f1b, zb), their memory, and receives posted before sends."""

from __future__ import annotations

import pytest
from torch.distributed.pipelining.schedules import _add_send_recv
from torch.distributed.pipelining.schedules import _ComputationType as C

from splitlit.schedule import _receives_first, u_order


@pytest.mark.parametrize("order", ["gpipe", "1f1b", "zb", None])
@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_orders_run_every_microbatch_once_per_stage(order, n):
    """Per stage and micro-batch: one forward, then (training) one backward or an input then a weight gradient."""
    actions = u_order(order, n)
    assert {a.stage_index for a in actions[0]} == {0, 2} and {a.stage_index for a in actions[1]} == {1}
    for stage in range(3):
        rank = 1 if stage == 1 else 0
        for mb in range(n):
            kinds = [a.computation_type.name for a in actions[rank]
                     if (a.stage_index, a.microbatch_index) == (stage, mb)]
            assert kinds in (["FORWARD"], ["FORWARD", "FULL_BACKWARD"],
                             ["FORWARD", "BACKWARD_INPUT", "BACKWARD_WEIGHT"])
            assert (len(kinds) > 1) == (order is not None)


def test_zb_splits_the_backward_where_a_gradient_crosses_the_link():
    """Under zb the server and the tail send their input gradient before computing their weight gradient; the head
    (nothing to send) keeps one backward."""
    actions = u_order("zb", 4)
    kinds = lambda rank, stage: {a.computation_type.name for a in actions[rank] if a.stage_index == stage}  # noqa: E731
    assert kinds(1, 1) == kinds(0, 2) == {"FORWARD", "BACKWARD_INPUT", "BACKWARD_WEIGHT"}
    assert kinds(0, 0) == {"FORWARD", "FULL_BACKWARD"}


def _peak_live(order: str, n: int, stage: int) -> int:
    """Micro-batches whose activations ``stage`` holds at once: a forward, until its whole or weight backward."""
    live = peak = 0
    for a in u_order(order, n)[1 if stage == 1 else 0]:
        if a.stage_index == stage:
            kind = a.computation_type.name
            live += {"FORWARD": 1, "FULL_BACKWARD": -1, "BACKWARD_WEIGHT": -1}.get(kind, 0)
            peak = max(peak, live)
    return peak


def test_1f1b_bounds_microbatches_in_flight():
    """Under 1f1b the client holds at most three head activations whatever the chunk count; gpipe holds all."""
    assert [_peak_live("1f1b", n, 0) for n in (1, 2, 4, 8, 16)] == [1, 2, 3, 3, 3]
    assert _peak_live("gpipe", 8, 0) == 8


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_zb_holds_as_many_microbatches_as_1f1b(stage):
    """zb's activation memory is 1F1B's: per stage the same number of live micro-batches, whatever the chunk count."""
    counts = [_peak_live("zb", n, stage) for n in (1, 2, 4, 8, 16)]
    assert counts == [_peak_live("1f1b", n, stage) for n in (1, 2, 4, 8, 16)]
    assert counts[2:] == [{0: 3, 1: 2, 2: 1}[stage]] * 3


@pytest.mark.parametrize("order", ["1f1b", "gpipe", None])
def test_receives_are_posted_before_the_sends_they_would_queue_behind(order):
    """No receive follows a send directly, and the receives and the sends each keep their order (gloo matches so)."""
    lowered = _add_send_recv(u_order(order, 4), stage_to_rank={0: 0, 1: 1, 2: 0}.__getitem__, num_stages=3)
    for actions in lowered.values():
        moved = _receives_first(actions)
        kinds = [a.computation_type for a in moved]
        assert sorted(map(str, moved)) == sorted(map(str, actions))
        for comm in ((C.RECV_F, C.RECV_B), (C.SEND_F, C.SEND_B)):
            kept = [a for a in moved if a.computation_type in comm]
            assert kept == [a for a in actions if a.computation_type in comm]
        assert not any(k in (C.RECV_F, C.RECV_B) and p in (C.SEND_F, C.SEND_B) for p, k in zip(kinds, kinds[1:]))
