"""Predict each pipeline order's time per batch on a link: an event simulation of the U's lowered action lists.

    python -m experiments.sim_orders                                 # MobileNetV2 128 px, batch 16, 10 Mbit/s
    python -m experiments.sim_orders --rate 100mbit --chunks 1 4 8
    python -m experiments.sim_orders --delay 25ms --up-mb 0.52 --down-mb 0.33 --server-s 0.55 --warmup 2 3 4
    python -m experiments.sim_orders --server-s 0.77 --client-s 0.20 --up-mb 0.4 --down-mb 0.4 --rate 1gbit

Each rank runs its actions as ``USchedule`` lowers them (torch's ``_add_send_recv``, then the receives moved
ahead): a computation waits for the tensor it needs; a transfer starts once its send is posted and the receiver's
notice has reached the sender (gloo's rendezvous), and the notices share each direction's queue with the data, so a
notice posted behind a large send waits for it. Each direction carries one transfer at a time at ``--rate``, and
everything arrives ``--delay`` after it leaves. The computations of a batch are split evenly over micro-batches
(forward 1/3, backward 2/3; ``zb`` halves a backward into its input and weight gradients).

Printed per order and chunk count: the predicted time per batch, each direction's busy share, and the ratio to
``experiments.bench_link``'s bound (the busiest stage plus the fill and drain plus four one-way delays). The
defaults are bench_link's MobileNetV2 runs at 10 Mbit/s (8.39 MB of up activations and 1.31 MB of down activations
per batch, the server's 0.91 s and the client's 0.04 s of computation per batch, 9.57 Mbit/s probed); the README
compares the simulation with those runs. It leaves out TCP (slow start after idle, the window) and the machine's
load.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
from dataclasses import dataclass

from torch.distributed.pipelining.schedules import _Action, _add_send_recv
from torch.distributed.pipelining.schedules import _ComputationType as C

from experiments.bench_link import WIRE_PER_PAYLOAD, batch_bound
from splitlit.link.units import parse_delay, parse_rate
from splitlit.schedule import ORDERS, _receives_ahead, u_order

__all__ = ["Cost", "lower", "main", "simulate"]

_RANK = {0: 0, 1: 1, 2: 0}  # stage -> rank: the client holds the head and the tail
_COMPUTE = (C.FORWARD, C.FULL_BACKWARD, C.BACKWARD_INPUT, C.BACKWARD_WEIGHT)


@dataclass
class Cost:
    """Per batch: the client's and the server's computation (s), the up and down activations' bytes (each
    activation's gradient crosses back at its size), the rate of each direction (bit/s) and the one-way delay."""

    client_s: float
    server_s: float
    up_bytes: float
    down_bytes: float
    up_bps: float
    down_bps: float
    delay_s: float = 0.0

    def seconds(self, action: _Action, n: int) -> float:
        """Computation seconds of one action for ``n`` micro-batches (head and tail share the client's time
        as 1:3, about MobileNetV2's and a transformer's first layers against their classifier)."""
        share = {0: 0.25 * self.client_s, 1: self.server_s, 2: 0.75 * self.client_s}[action.stage_index] / n
        return share * {C.FORWARD: 1 / 3, C.FULL_BACKWARD: 2 / 3, C.BACKWARD_INPUT: 1 / 3,
                        C.BACKWARD_WEIGHT: 1 / 3}[action.computation_type]

    def bound(self, n: int) -> float:
        """``experiments.bench_link``'s bound: the busiest stage, the fill and drain, four one-way delays (the rates
        here are of payload, so the wire's overhead is taken out again)."""
        per = self.up_bytes + self.down_bytes
        return batch_bound(client_s=self.client_s, server_s=self.server_s, up_bytes=per, down_bytes=per,
                           up_bps=self.up_bps * WIRE_PER_PAYLOAD, down_bps=self.down_bps * WIRE_PER_PAYLOAD,
                           delay_s=self.delay_s, chunks=n)


def lower(order: str, n: int, warmup: int = 2) -> dict[int, list[_Action]]:
    """The actions each rank runs for ``order`` and ``n`` micro-batches, sends and receives included."""
    lowered = _add_send_recv(u_order(order, n, warmup), stage_to_rank=_RANK.__getitem__, num_stages=3)
    return {rank: _receives_ahead(actions) for rank, actions in lowered.items()}


def _key(action: _Action) -> tuple[int, str, int]:
    """(sending stage, "F" or "B", micro-batch) of a send or a receive."""
    kind, s, mb = action.computation_type, action.stage_index, action.microbatch_index
    return {C.SEND_F: (s, "F", mb), C.SEND_B: (s, "B", mb), C.RECV_F: (s - 1, "F", mb),
            C.RECV_B: (s + 1, "B", mb)}[kind]


def _needs(action: _Action) -> tuple[int, str, int] | None:
    """The transfer a computation waits for, if its input crosses the link."""
    kind, s, mb = action.computation_type, action.stage_index, action.microbatch_index
    if kind == C.FORWARD and s > 0 and _RANK[s - 1] != _RANK[s]:
        return s - 1, "F", mb
    if kind in (C.FULL_BACKWARD, C.BACKWARD_INPUT) and s < 2 and _RANK[s + 1] != _RANK[s]:
        return s + 1, "B", mb
    return None


def simulate(actions: dict[int, list[_Action]], cost: Cost, n: int) -> dict[str, float]:
    """Run the ranks' ``actions`` against ``cost``: the batch's time and each direction's busy seconds."""
    events: list = []
    order = itertools.count()

    def at(time: float, *event) -> None:
        heapq.heappush(events, (time, next(order), event))

    position = {0: 0, 1: 0}
    waiting: dict = {}  # transfer -> the rank blocked on it
    queue: dict[int, list] = {0: [], 1: []}  # per sending rank (0: up, 1: down): [("notice"|"data", key, bytes)]
    idle = {0: True, 1: True}
    posted, noticed, arrived = set(), set(), set()
    busy = {0: 0.0, 1: 0.0}
    rate = {0: cost.up_bps / 8, 1: cost.down_bps / 8}

    def transmit(now: float, direction: int) -> None:
        if not queue[direction]:
            idle[direction] = True
            return
        idle[direction] = False
        what, key, nbytes = queue[direction].pop(0)
        seconds = nbytes / rate[direction]
        busy[direction] += seconds
        at(now + seconds, "sent", direction)
        at(now + seconds + cost.delay_s, "arrived", what, key)

    def enqueue(now: float, direction: int, item: tuple) -> None:
        queue[direction].append(item)
        if idle[direction]:
            transmit(now, direction)

    def data(key: tuple) -> tuple:
        # the head's activation and the server's gradient of it are an up activation's size; the rest a down's
        return "data", key, (cost.up_bytes if key[:2] in ((0, "F"), (1, "B")) else cost.down_bytes) / n

    def run(now: float, rank: int) -> None:
        while position[rank] < len(actions[rank]):
            action = actions[rank][position[rank]]
            kind = action.computation_type
            if kind in (C.SEND_F, C.SEND_B):
                posted.add(_key(action))
                if _key(action) in noticed:
                    enqueue(now, rank, data(_key(action)))
            elif kind in (C.RECV_F, C.RECV_B):
                enqueue(now, rank, ("notice", _key(action), 0.0))
            else:
                need = _needs(action)
                if need is not None and need not in arrived:
                    waiting[need] = rank
                    return
                position[rank] += 1
                at(now + cost.seconds(action, n), "free", rank)
                return
            position[rank] += 1

    at(0.0, "free", 0)
    at(0.0, "free", 1)
    end = 0.0
    while events:
        now, _, event = heapq.heappop(events)
        end = max(end, now)
        if event[0] == "free":
            run(now, event[1])
        elif event[0] == "sent":
            transmit(now, event[1])
        else:
            _, what, key = event
            if what == "notice":
                noticed.add(key)
                if key in posted:
                    enqueue(now, _RANK[key[0]], data(key))
            else:
                arrived.add(key)
                if key in waiting:
                    run(now, waiting.pop(key))
    stuck = {rank: actions[rank][position[rank]] for rank in position if position[rank] < len(actions[rank])}
    if stuck:
        raise RuntimeError(f"the order deadlocks: ranks wait at {stuck}")
    return {"time_s": end, "up_busy_s": busy[0], "down_busy_s": busy[1]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.sim_orders", description=__doc__.split("\n\n")[0])
    parser.add_argument("--orders", nargs="+", default=list(ORDERS), choices=list(ORDERS))
    parser.add_argument("--chunks", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--rate", default="9.57mbit", help="each direction's rate, e.g. 10mbit (default: probed 10)")
    parser.add_argument("--delay", default="0ms", help="one-way delay, e.g. 25ms")
    parser.add_argument("--warmup", type=int, nargs="+", default=[2],
                        help="1f1b's and zb's warm-up (SplitPipelineStrategy(warmup=...)); several: a row each")
    parser.add_argument("--client-s", type=float, default=0.039, help="client computation per batch (s)")
    parser.add_argument("--server-s", type=float, default=0.9075, help="server computation per batch (s)")
    parser.add_argument("--up-mb", type=float, default=8.389, help="up activations per batch (MB, 1e6 bytes)")
    parser.add_argument("--down-mb", type=float, default=1.311, help="down activations per batch (MB)")
    args = parser.parse_args(argv)
    rate = parse_rate(args.rate)
    cost = Cost(client_s=args.client_s, server_s=args.server_s, up_bytes=args.up_mb * 1e6,
                down_bytes=args.down_mb * 1e6, up_bps=rate, down_bps=rate, delay_s=parse_delay(args.delay))
    print(f"{args.rate}, {args.delay} one way; per batch: client {cost.client_s:.3f} s, server {cost.server_s:.3f} s, "
          f"{args.up_mb + args.down_mb:.2f} MB each way")
    print("| order | warm-up | chunks | time per batch (s) | up busy | down busy | bound (s) | time / bound |")
    print("|---|---|---|---|---|---|---|---|")
    for order in args.orders:
        for warmup in args.warmup if order != "gpipe" else ["-"]:
            for n in args.chunks:
                result = simulate(lower(order, n, 2 if warmup == "-" else warmup), cost, n)
                t = result["time_s"]
                print(f"| {order} | {warmup} | {n} | {t:.3f} | {result['up_busy_s'] / t:.0%} "
                      f"| {result['down_busy_s'] / t:.0%} | {cost.bound(n):.3f} | {t / cost.bound(n):.3f} |")


if __name__ == "__main__":
    main()
