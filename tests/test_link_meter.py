"""Fast tests of the LinkMeter: bounded memory without any callback, and completion times without a thread per op."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest
import torch

import splitlit.meter as meter_module
from splitlit.meter import Compute, LinkMeter


def _op(numel: int, peer: int = 1) -> SimpleNamespace:
    return SimpleNamespace(tensor=torch.zeros(numel), peer=peer)


def test_meter_keeps_a_window_of_records_and_exact_totals():
    """Past max_records the oldest records go, but bytes() and compute_seconds() still count every one."""
    meter = LinkMeter(timed=False, max_records=10)
    for mb in range(25):
        meter.record([_op(4)], cut="up", kind="activation", role="sent", microbatch=mb)
        meter.add_compute(Compute("forward", 0, mb, 0.0, 0.5))
    assert len(meter.transfers) == len(meter.computes) == 10
    assert [t.microbatch for t in meter.transfers] == list(range(15, 25))  # the newest
    assert meter.bytes(cut="up") == 25 * 16 and meter.bytes(role="received") == 0
    assert meter.compute_seconds() == pytest.approx(12.5)
    assert meter.dropped == 30
    transfers, computes = meter.reset()
    assert len(transfers) == len(computes) == 10
    assert meter.bytes() == 0 and meter.compute_seconds() == 0.0 and meter.dropped == 0


def test_meter_refuses_an_empty_window():
    """max_records below 1 is refused with the value named."""
    with pytest.raises(ValueError, match=r"LinkMeter\(max_records=0\)"):
        LinkMeter(max_records=0)


class _Work:
    """A gloo-like work: completes after ``delay`` seconds, only ever learns it inside wait(), waited on once."""

    def __init__(self, delay: float, error: Exception | None = None) -> None:
        self.ready, self.error, self.waits = time.perf_counter() + delay, error, 0

    def wait(self) -> bool:
        self.waits += 1
        assert self.waits == 1, "waited on twice"
        time.sleep(max(0.0, self.ready - time.perf_counter()))
        if self.error is not None:
            raise self.error
        return True


def test_transfers_are_timed_by_one_watcher_per_direction(monkeypatch):
    """Sixty posted ops start at most two watcher threads (sends, receives); each gets its completion time,
    and the runtime's wait returns once the watcher has seen the op complete."""
    works: list[_Work] = []

    def post(ops, desc=None):
        works.extend(_Work(0.002 * len(works)) for _ in ops)
        return works[-len(ops):]

    monkeypatch.setattr(meter_module, "_batch_p2p", post)
    meter = LinkMeter()
    threads_before = threading.active_count()
    posted = []
    for mb in range(30):
        for role in ("sent", "received"):
            ops = [_op(8)]
            meter.record(ops, cut="up", kind="activation", role=role, microbatch=mb)
            posted.append(meter_module._watched_batch_p2p(ops))
    assert threading.active_count() - threads_before <= 2
    for batch in posted:
        meter_module._watched_wait_batch_p2p(batch)
    assert all(w.waits == 1 for w in works)
    assert all(t.done and t.seconds >= 0 for t in meter.transfers)
    assert not meter_module._WAITERS and not meter_module._WATCHED  # nothing kept once waited on


def test_a_failed_transfer_raises_in_the_runtimes_wait(monkeypatch):
    """An error inside the watcher's wait reaches the pipeline runtime, which turns it into PeerLostError."""
    monkeypatch.setattr(meter_module, "_batch_p2p", lambda ops, desc=None: [_Work(0.0, RuntimeError("gloo: peer"))])
    meter = LinkMeter()
    ops = [_op(8)]
    meter.record(ops, cut="down", kind="gradient", role="received", microbatch=0)
    works = meter_module._watched_batch_p2p(ops)
    with pytest.raises(RuntimeError, match="gloo: peer"):
        meter_module._watched_wait_batch_p2p(works)
    assert meter.transfers[0].seconds is None
