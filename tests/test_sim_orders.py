"""``experiments.sim_orders``: the simulated U orders, and why the head's backward runs late and receives go ahead."""

from __future__ import annotations

import pytest
from torch.distributed.pipelining.schedules import _add_send_recv
from torch.distributed.pipelining.schedules import _ComputationType as C

from experiments.sim_orders import Cost, lower, main, simulate
from splitlit.schedule import _receives_ahead, u_order

# bench_link's MobileNetV2 at 128 px, batch 16, on the 10 Mbit/s link (9.57 Mbit/s of payload probed)
LINK = Cost(client_s=0.039, server_s=0.9075, up_bytes=8.389e6, down_bytes=1.311e6, up_bps=9.57e6, down_bps=9.57e6)


def _head_backward_in_turn(actions: dict) -> dict:
    """The textbook 1F1B on the client: the head's backward of k right after the head's forward of k + 2."""
    client = [a for a in actions[0] if not (a.stage_index == 0 and a.computation_type == C.FULL_BACKWARD)]
    out = []
    for a in client:
        out.append(a)
        if a.stage_index == 2 and a.computation_type in (C.FULL_BACKWARD, C.BACKWARD_WEIGHT):
            mb = a.microbatch_index
            nxt = [b for b in client
                   if (b.stage_index, b.microbatch_index, b.computation_type) == (0, mb + 2, C.FORWARD)]
            if not nxt:
                out.append(next(b for b in actions[0] if (b.stage_index, b.microbatch_index) == (0, mb)
                                and b.computation_type == C.FULL_BACKWARD))
    for a in list(out):
        if a.stage_index == 0 and a.computation_type == C.FORWARD and a.microbatch_index >= 2:
            b0 = next(b for b in actions[0] if (b.stage_index, b.microbatch_index) == (0, a.microbatch_index - 2)
                      and b.computation_type == C.FULL_BACKWARD)
            out.insert(out.index(a) + 1, b0)
    return {0: out, 1: actions[1]}


def _lowered(actions: dict, ahead: int) -> dict:
    lowered = _add_send_recv(actions, stage_to_rank={0: 0, 1: 1, 2: 0}.__getitem__, num_stages=3)
    return {rank: _receives_ahead(acts, ahead) for rank, acts in lowered.items()}


def test_textbook_1f1b_helper_moves_only_the_head_backward():
    actions = u_order("1f1b", 8)
    moved = _head_backward_in_turn(actions)
    assert sorted(map(str, moved[0])) == sorted(map(str, actions[0])) and moved[0] != actions[0]
    client = [str(a) for a in moved[0]]
    assert client[:9] == ["0F0", "0F1", "2F0", "2B0", "0F2", "0B0", "2F1", "2B1", "0F3"]


@pytest.mark.parametrize("order", ["1f1b", "zb"])
def test_on_a_slow_link_the_orders_keep_both_directions_busy(order):
    """10 Mbit/s, chunks 8 (link-bound): the shipped orders within 1.07x of bench_link's bound; each of the two
    changes alone leaves a gap: the head's backward in its turn, or receives posted only before the sends."""
    n = 8
    bound = LINK.bound(n)
    shipped = simulate(lower(order, n), LINK, n)["time_s"]
    assert shipped <= 1.07 * bound
    in_turn = simulate(_lowered(_head_backward_in_turn(u_order(order, n)), 4), LINK, n)["time_s"]
    not_ahead = simulate(_lowered(u_order(order, n), 0), LINK, n)["time_s"]
    assert in_turn > 1.04 * shipped and not_ahead > 1.04 * shipped
    assert simulate(_lowered(_head_backward_in_turn(u_order(order, n)), 0), LINK, n)["time_s"] > 1.08 * bound


def test_without_a_link_one_microbatch_takes_every_computation_in_turn():
    free = Cost(client_s=0.2, server_s=0.77, up_bytes=1e6, down_bytes=1e6, up_bps=1e18, down_bps=1e18)
    assert simulate(lower("1f1b", 1), free, 1)["time_s"] == pytest.approx(0.97)
    result = simulate(lower("gpipe", 4), free, 4)
    assert 0.77 < result["time_s"] < 0.97 and result["up_busy_s"] == pytest.approx((1e6 + 1e6) * 8 / 1e18, abs=1e-13)


def test_each_direction_is_busy_for_its_bytes_at_the_rate():
    result = simulate(lower("zb", 4), LINK, 4)
    per_direction = (LINK.up_bytes + LINK.down_bytes) * 8 / LINK.up_bps
    assert result["up_busy_s"] == pytest.approx(per_direction) and result["down_busy_s"] == pytest.approx(per_direction)
    assert result["time_s"] > per_direction


def test_a_delay_is_paid_on_every_crossing_at_one_chunk():
    far = Cost(**{**LINK.__dict__, "delay_s": 0.025})
    near, slow = simulate(lower("1f1b", 1), LINK, 1)["time_s"], simulate(lower("1f1b", 1), far, 1)["time_s"]
    # four transfers of data, each after its receiver's notice crossed the other way: 8 one-way delays at most
    assert 4 * 0.025 <= slow - near <= 8 * 0.025 + 1e-9


def test_main_prints_every_order_and_chunk_count(capsys):
    main(["--chunks", "1", "8", "--rate", "10mbit"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| order")]
    assert [tuple(r.split(" | ")[:3]) for r in rows] == [("| gpipe", "-", "1"), ("| gpipe", "-", "8"),
                                                         ("| 1f1b", "2", "1"), ("| 1f1b", "2", "8"),
                                                         ("| zb", "2", "1"), ("| zb", "2", "8")]


def test_on_a_far_link_a_deeper_warmup_keeps_the_link_busy():
    """10 Mbit/s, 25 ms one way, conv insert's bytes, chunks 8: the round trip of a micro-batch (four crossings)
    outlasts what a warm-up of 2 sends; 3 brings the order within 1.08x of the bound, 2 stays above 1.10x."""
    far = Cost(client_s=0.065, server_s=0.55, up_bytes=0.524e6, down_bytes=0.328e6, up_bps=9.57e6, down_bps=9.57e6,
               delay_s=0.025)
    ratio = {w: simulate(lower("1f1b", 8, w), far, 8)["time_s"] / far.bound(8) for w in (2, 3)}
    assert ratio[2] > 1.10 and ratio[3] < 1.08
