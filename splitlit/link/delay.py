"""One direction of the delay line: a bottleneck at a rate with a byte-limited queue, then a one-way delay.

    queue = DelayQueue(rate_bps=10_000_000, delay_s=0.025, limit_bytes=62_500)
    queue.push(packet, now)                   # False: lost, or dropped at the tail of a full queue
    queue.push(gso, now, size=45_260, segments=31)   # a TCP super-packet: 31 segments on the wire
    for packet in queue.pop_due(now): ...     # the packets whose time has come, in arrival order
    queue.next_due()                          # when to look again (None: empty)

The clock is the caller's (``now``, seconds), so the model is tested with a fake clock and driven by
:mod:`splitlit.link.delayline` with ``time.monotonic()``.

Note: the model, step by step, for a packet of ``n`` bytes arriving at ``t``
    1. loss: dropped with probability ``loss`` (independent per packet, as netem's ``loss random``);
    2. the queue: the bytes still waiting for (or in) serialisation at ``t`` plus ``n`` must fit ``limit_bytes``,
       or the packet is dropped (tail drop, as a router's FIFO). Packets already serialised and only
       "in flight" do not count: the limit is the bottleneck's buffer, not netem's whole-qdisc limit;
    3. serialisation: it starts when the line is free (``max(t, end of the previous packet)``) and takes
       ``(n + overhead) * 8 / rate`` seconds; ``overhead`` is the 14-byte Ethernet header a TUN packet lacks,
       so the rate means what ``tc tbf`` on a veth means (95.7 Mbit/s of TCP payload at 100 Mbit/s). A GSO
       super-packet (one read of up to 64 KB that the wire carries as ``segments`` packets, each with its own
       IP and TCP headers) is ``size`` bytes on the wire (its payload plus every segment's headers) and takes
       ``(size + segments * overhead) * 8 / rate``: the time of its segments back to back. It is queued, lost and
       delivered whole, after its last segment's time; so the delay line makes super-packets only without loss
       (:mod:`splitlit.link.delayline`), and the kernel keeps them to about 1 ms of the sender's rate;
    4. delay: it arrives ``delay_s`` after its last bit left, plus jitter drawn uniformly in
       ``[-jitter_s, +jitter_s]`` (netem's default distribution); jitter never exceeds the delay;
    5. order: a packet never arrives before the one ahead of it in this direction (TCP must not see
       reordering): its arrival is raised to its predecessor's. As with netem's ``rate``, closely spaced packets
       therefore see a correlated delay (a burst drawn late holds back the packets behind it); packets spaced
       further apart than twice the jitter see the whole uniform spread.

Since arrival times never decrease, the packets in flight form a FIFO (a deque): the heap a reordering line
needs is not needed here.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field

__all__ = ["DelayQueue", "QueueStats"]


@dataclass
class QueueStats:
    """What one direction did: packets (reads: a GSO super-packet is one) and bytes accepted, their segments on the
    wire, lost (random loss), dropped (full queue), delivered (packets)."""

    packets: int = 0
    segments: int = 0
    bytes: int = 0
    lost: int = 0
    dropped: int = 0
    delivered: int = 0
    max_backlog_bytes: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class DelayQueue:
    """One direction: rate, queue limit (bytes, tail drop), one-way delay, jitter and random loss.

    Args:
        rate_bps: the bottleneck's rate, bits per second.
        delay_s: one-way delay added after serialisation.
        jitter_s: half-width of the uniform spread around ``delay_s`` (0 <= jitter_s <= delay_s).
        loss: probability that a packet is lost, in [0, 1).
        limit_bytes: the bottleneck's buffer: bytes waiting for (or in) serialisation.
        overhead: bytes of framing counted per packet at the rate (Ethernet's header: 14).
        rng: the source of loss and jitter (seed it for a repeatable run).
    """

    rate_bps: float
    delay_s: float = 0.0
    jitter_s: float = 0.0
    loss: float = 0.0
    limit_bytes: int = 1 << 20
    overhead: int = 14
    rng: random.Random = field(default_factory=random.Random)
    stats: QueueStats = field(default_factory=QueueStats)

    def __post_init__(self) -> None:
        assert self.rate_bps > 0 and 0 <= self.jitter_s <= self.delay_s and 0 <= self.loss < 1, self
        self._line_free = float("-inf")  # when the last accepted packet's last bit leaves
        self._last_arrival = float("-inf")
        self._serialising: deque[tuple[float, int]] = deque()  # (end of serialisation, bytes): the buffer
        self._backlog = 0
        self._in_flight: deque[tuple[float, bytes]] = deque()  # (arrival, packet), arrival non-decreasing

    def backlog(self, now: float) -> int:
        """Bytes in the buffer at ``now``: accepted and not yet fully serialised."""
        serialising = self._serialising
        while serialising and serialising[0][0] <= now:
            self._backlog -= serialising.popleft()[1]
        return self._backlog

    def push(self, packet: bytes, now: float, *, size: int | None = None, segments: int = 1) -> bool:
        """Offer a packet that arrived at ``now``; False if it was lost or the queue was full.

        ``size``: its bytes on the wire (default ``len(packet)``); ``segments``: the packets it is on the wire, each
        paying ``overhead`` (a GSO super-packet's segments; see the module's note)."""
        size = len(packet) if size is None else size
        if self.loss and self.rng.random() < self.loss:
            self.stats.lost += 1
            return False
        backlog = self.backlog(now)
        if backlog + size > self.limit_bytes:
            self.stats.dropped += 1
            return False
        sent = max(now, self._line_free) + (size + segments * self.overhead) * 8 / self.rate_bps
        self._line_free = sent
        self._serialising.append((sent, size))
        self._backlog = backlog + size
        arrival = sent + self.delay_s
        if self.jitter_s:
            arrival += self.rng.uniform(-self.jitter_s, self.jitter_s)
        arrival = max(arrival, self._last_arrival)  # never overtake the packet ahead
        self._last_arrival = arrival
        self._in_flight.append((arrival, packet))
        self.stats.packets += 1
        self.stats.segments += segments
        self.stats.bytes += size
        self.stats.max_backlog_bytes = max(self.stats.max_backlog_bytes, self._backlog)
        return True

    def next_due(self) -> float | None:
        """When the next packet arrives at the far end; None when nothing is in flight."""
        return self._in_flight[0][0] if self._in_flight else None

    def pop_due(self, now: float) -> list[bytes]:
        """The packets that have arrived by ``now``, in order."""
        out = []
        in_flight = self._in_flight
        while in_flight and in_flight[0][0] <= now:
            out.append(in_flight.popleft()[1])
        self.stats.delivered += len(out)
        return out

    def __len__(self) -> int:
        return len(self._in_flight)
