"""``splitlit.schedule``: the U orders (gpipe, 1f1b, zb), their memory, and receives posted before sends."""

from __future__ import annotations

import pytest
from torch.distributed.pipelining.schedules import _add_send_recv
from torch.distributed.pipelining.schedules import _ComputationType as C

from splitlit.schedule import RECEIVES_AHEAD, _receives_ahead, u_order


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
    """Under 1f1b the client holds at most four head activations whatever the chunk count; gpipe holds all."""
    assert [_peak_live("1f1b", n, 0) for n in (1, 2, 4, 8, 16)] == [1, 2, 4, 4, 4]
    assert _peak_live("gpipe", 8, 0) == 8


@pytest.mark.parametrize("order", ["1f1b", "zb"])
@pytest.mark.parametrize("warmup", [1, 3, 4])
def test_a_deeper_warmup_holds_warmup_plus_two_head_activations(order, warmup):
    """``warmup`` micro-batches go forward before the first backward: the head holds warmup + 2 (its backward runs
    a micro-batch late), the server warmup, the tail one; every micro-batch still runs once per stage."""
    n = 8
    actions = u_order(order, n, warmup)
    assert [a.microbatch_index for a in actions[1][:warmup]] == list(range(warmup))
    assert {a.computation_type for a in actions[1][:warmup]} == {C.FORWARD}
    peaks = []
    for stage in range(3):
        live = peak = 0
        for a in actions[1 if stage == 1 else 0]:
            if a.stage_index == stage:
                live += {"FORWARD": 1, "FULL_BACKWARD": -1, "BACKWARD_WEIGHT": -1}.get(a.computation_type.name, 0)
                peak = max(peak, live)
        peaks.append(peak)
    assert peaks == [min(warmup + 2, n), warmup, 1]
    assert sorted(map(str, actions[0])) == sorted(map(str, u_order(order, n)[0]))


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_zb_holds_as_many_microbatches_as_1f1b(stage):
    """zb's activation memory is 1F1B's: per stage the same number of live micro-batches, whatever the chunk count."""
    counts = [_peak_live("zb", n, stage) for n in (1, 2, 4, 8, 16)]
    assert counts == [_peak_live("1f1b", n, stage) for n in (1, 2, 4, 8, 16)]
    assert counts[2:] == [{0: 4, 1: 2, 2: 1}[stage]] * 3


@pytest.mark.parametrize("order", ["gpipe", "1f1b", "zb", None])
@pytest.mark.parametrize("n", [1, 4, 8])
def test_receives_are_posted_ahead_of_the_sends_and_computations_before_them(order, n):
    """Every receive comes before the sends before it and up to RECEIVES_AHEAD computations before the one that
    needs it; the receives and the sends each keep their order (gloo matches so); a gradient's receive never comes
    before its stage's forward of that micro-batch."""
    lowered = _add_send_recv(u_order(order, n), stage_to_rank={0: 0, 1: 1, 2: 0}.__getitem__, num_stages=3)
    for actions in lowered.values():
        moved = _receives_ahead(actions)
        assert sorted(map(str, moved)) == sorted(map(str, actions))
        for comm in ((C.RECV_F, C.RECV_B), (C.SEND_F, C.SEND_B)):
            kept = [a for a in moved if a.computation_type in comm]
            assert kept == [a for a in actions if a.computation_type in comm]
        computations = [a for a in actions if a.computation_type in _COMPUTE]
        assert [a for a in moved if a.computation_type in _COMPUTE] == computations
        for a in (a for a in actions if a.computation_type in (C.RECV_F, C.RECV_B)):
            i, ahead = moved.index(a), _computations_ahead(moved, a)
            before = moved[:i]
            # RECEIVES_AHEAD computations further ahead than torch put it, unless the start of the step, an earlier
            # receive or the stage's own forward of that micro-batch stops it
            stopped = not before or before[-1].computation_type in (C.RECV_F, C.RECV_B) or (
                before[-1].stage_index, before[-1].microbatch_index) == (a.stage_index, a.microbatch_index)
            assert ahead == _computations_ahead(actions, a) + RECEIVES_AHEAD or stopped
            assert not before or before[-1].computation_type not in (C.SEND_F, C.SEND_B)
            if a.computation_type == C.RECV_B:
                assert any(b.computation_type == C.FORWARD and (b.stage_index, b.microbatch_index)
                           == (a.stage_index, a.microbatch_index) for b in before)


def _computations_ahead(actions: list, receive) -> int:
    """Computations between ``receive`` and the one that needs what it receives."""
    i = actions.index(receive)
    needs = (C.FORWARD,) if receive.computation_type == C.RECV_F else (C.FULL_BACKWARD, C.BACKWARD_INPUT)
    mine = (receive.stage_index, receive.microbatch_index)
    j = next(j for j in range(i + 1, len(actions)) if actions[j].computation_type in needs
             and (actions[j].stage_index, actions[j].microbatch_index) == mine)
    return sum(b.computation_type in _COMPUTE for b in actions[i + 1:j])


_COMPUTE = (C.FORWARD, C.FULL_BACKWARD, C.BACKWARD_INPUT, C.BACKWARD_WEIGHT)
