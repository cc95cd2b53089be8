"""What crossed the link, and when: every tensor a stage hands to the transport and every stage computation.

The counts come from the P2P ops themselves (the payload torch.distributed sends or receives), so they are the
bytes that cross the link, not an estimate from shapes. A :class:`~splitlit.stage.MeteredStage` records into a
:class:`LinkMeter`; :mod:`splitlit.traffic` sums the records up::

    meter = LinkMeter()
    stage = MeteredStage(module, stage_index=0, num_stages=3, device=device, meter=meter)
    ...  # run a schedule
    meter.bytes(cut="up", kind="activation", role="sent")

Note: completion times. Importing this module wraps torch's ``schedules._batch_p2p`` and
``schedules._wait_batch_p2p`` once per process, so that a watcher thread can stamp when each recorded transfer
completes (see :class:`_Watcher`).
"""

from __future__ import annotations

import queue
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field

import torch.distributed as dist
from torch.distributed.pipelining import schedules as _schedules

from splitlit.checks import check_count

__all__ = ["Compute", "LinkMeter", "Transfer"]


@dataclass(frozen=True)
class Transfer:
    """One tensor handed to the transport.

    ``cut`` is "up" (client -> server activations, server -> client gradients) or "down";
    ``kind`` is "activation" or "gradient"; ``role`` is "sent" or "received" from this rank's side.
    """

    cut: str
    kind: str
    role: str
    microbatch: int
    nbytes: int
    shape: tuple[int, ...]
    dtype: str
    posted: float  # time.perf_counter() when the op was handed to the transport
    done: list = field(default_factory=list, compare=False)  # [perf_counter() when the op completed]

    @property
    def seconds(self) -> float | None:
        """Posting to completion. For a send this includes any wait for the receiver to post its receive."""
        return self.done[0] - self.posted if self.done else None


@dataclass(frozen=True)
class Compute:
    """One stage computation: ``what`` is "forward", "backward" (whole, or only the input gradient when the order
    splits it, as ``"zb"`` does) or "backward_weight"."""

    what: str
    stage: int
    microbatch: int
    start: float
    end: float


@dataclass
class LinkMeter:
    """Transfers and stage computations recorded on this rank since the last :meth:`reset`.

    Memory stays bounded when nothing resets it (a run without the measuring callbacks): ``transfers`` and
    ``computes`` keep the newest ``max_records`` records each (a callback that resets every batch never
    reaches that), while :meth:`bytes` and :meth:`compute_seconds` come from running totals that count every
    record since the last reset, dropped or not (record computations with :meth:`add_compute`; appending to
    ``computes`` directly skips the totals). ``timed`` watches each transfer to its completion (see
    :class:`_Watcher`: one waiting thread per peer and direction, not one per transfer).
    """

    enabled: bool = True
    timed: bool = True
    max_records: int = 10_000
    transfers: deque[Transfer] = field(init=False, repr=False)
    computes: deque[Compute] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        check_count("LinkMeter", "max_records", self.max_records, fix="keep at least 1 record.")
        self.transfers, self.computes = deque(maxlen=self.max_records), deque(maxlen=self.max_records)
        self._bytes: Counter[tuple[str, str, str]] = Counter()
        self._compute_s = 0.0
        self._recorded = [0, 0]  # transfers, computes: what was recorded, including what the windows dropped

    def record(self, ops: list[dist.P2POp], *, cut: str, kind: str, role: str, microbatch: int) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        for op in ops:
            t = op.tensor
            transfer = Transfer(cut, kind, role, microbatch, t.numel() * t.element_size(),
                                tuple(t.shape), str(t.dtype).removeprefix("torch."), now)
            self.transfers.append(transfer)
            self._bytes[cut, kind, role] += transfer.nbytes
            self._recorded[0] += 1
            if self.timed:
                _WATCHED[id(op)] = transfer

    def add_compute(self, compute: Compute) -> None:
        if not self.enabled:
            return
        self.computes.append(compute)
        self._compute_s += compute.end - compute.start
        self._recorded[1] += 1

    def compute_seconds(self) -> float:
        """This rank's stage computations since the last reset (every one, also those the window dropped)."""
        return self._compute_s

    def bytes(self, *, cut: str | None = None, kind: str | None = None, role: str | None = None) -> int:
        """Bytes handed to the transport since the last reset (every transfer, also those the window dropped)."""
        return sum(n for (c, k, r), n in self._bytes.items()
                   if (cut is None or c == cut) and (kind is None or k == kind) and (role is None or r == role))

    @property
    def dropped(self) -> int:
        """Records recorded since the last reset that the windows no longer hold (0 unless over ``max_records``)."""
        return self._recorded[0] - len(self.transfers) + self._recorded[1] - len(self.computes)

    def reset(self) -> tuple[list[Transfer], list[Compute]]:
        """Hand over (and forget) what was recorded since the last reset."""
        transfers, computes = list(self.transfers), list(self.computes)
        self.transfers.clear()
        self.computes.clear()
        self._bytes.clear()
        self._compute_s = 0.0
        self._recorded = [0, 0]
        return transfers, computes


class _Watcher:
    """Stamps the completion of watched transfers: one thread per peer and direction, for the whole process.

    The pipeline runtime posts the stage's ops through ``schedules._batch_p2p`` and waits on the returned works
    much later (a send only at the end of the step). A gloo work only learns that it is complete inside
    ``wait()`` (``is_completed()`` stays False until then) and cannot be waited on twice, so the watcher
    becomes the only waiter of each watched work and the runtime's own wait (``schedules._wait_batch_p2p``)
    waits for the watcher instead. Waiting in posting order loses nothing: to one peer, sends complete in the
    order they were posted and so do receives (gloo matches them in order on one stream per pair of ranks).
    """

    _queues: dict[tuple[str, int], queue.SimpleQueue] = {}
    _lock = threading.Lock()

    @classmethod
    def watch(cls, work: dist.Work, transfer: Transfer, peer: int) -> _Pending:
        pending = _Pending(work, transfer)
        key = (transfer.role, peer)
        with cls._lock:
            q = cls._queues.get(key)
            if q is None:
                q = cls._queues[key] = queue.SimpleQueue()
                threading.Thread(target=cls._run, args=(q,), name=f"splitlit-link-watcher-{key[0]}-{peer}",
                                 daemon=True).start()
        q.put(pending)
        return pending

    @staticmethod
    def _run(q: queue.SimpleQueue) -> None:
        while True:
            pending = q.get()
            try:
                pending.work.wait()
                pending.transfer.done.append(time.perf_counter())
            except BaseException as err:  # noqa: BLE001 - handed to the runtime's wait
                pending.error = err
            finally:
                pending.finished.set()
                pending.work = None  # the watcher holds no buffer once the transfer is over


class _Pending:
    __slots__ = ("work", "transfer", "finished", "error")

    def __init__(self, work: dist.Work, transfer: Transfer) -> None:
        self.work, self.transfer = work, transfer
        self.finished = threading.Event()
        self.error: BaseException | None = None


_WATCHED: dict[int, Transfer] = {}  # id(op) -> its record, from MeteredStage's get_*_ops to the runtime's post
_WAITERS: dict[int, _Pending] = {}  # id(work) -> what the watcher will report, until the runtime waits on it
_batch_p2p = _schedules._batch_p2p
_wait_batch_p2p = _schedules._wait_batch_p2p


def _watched_batch_p2p(p2p_ops: list[dist.P2POp], desc: str | None = None) -> list[dist.Work]:
    works = _batch_p2p(p2p_ops, desc)
    if _WATCHED:
        transfers = [_WATCHED.pop(id(op), None) for op in p2p_ops]
        _WATCHED.clear()  # a stage's ops are posted as soon as they are made: anything left is stale
        if len(works) == len(p2p_ops):  # one work per op (gloo); else the runtime waits itself, untimed
            for op, work, transfer in zip(p2p_ops, works, transfers):
                if transfer is not None:
                    _WAITERS[id(work)] = _Watcher.watch(work, transfer, peer=op.peer)
    return works


def _watched_wait_batch_p2p(works: list[dist.Work]) -> None:
    for work in works:
        pending = _WAITERS.pop(id(work), None)
        if pending is None:
            work.wait()
            continue
        pending.finished.wait()
        if pending.error is not None:
            raise pending.error


if getattr(_schedules._batch_p2p, "__name__", "") != "_watched_batch_p2p":
    _schedules._batch_p2p = _watched_batch_p2p
    _schedules._wait_batch_p2p = _watched_wait_batch_p2p
