"""Measuring the link as the ranks will see it: the TCP throughput of each direction, the round trip, datagrams.

Both namespaces share this machine's clock, so a datagram stamped by its sender and by the receiving kernel
(``SO_TIMESTAMPNS``: the time it arrived, however late this process reads it) gives the one-way delay of its
direction, without any clock synchronisation.
"""

from __future__ import annotations

import contextlib
import socket
import statistics
import struct
import threading
import time
from typing import TYPE_CHECKING

from splitlit.checks import check_count
from splitlit.link.errors import LinkError
from splitlit.link.netns import in_netns

if TYPE_CHECKING:
    from splitlit.link.shaped import ShapedLink

__all__ = ["datagrams", "measure", "ping", "probe_rates", "stream_rate"]

_STAMP = struct.Struct("!Id")  # sequence number, send time (time.time)
_SO_TIMESTAMPNS = 35  # Linux's SO_TIMESTAMPNS (= SCM_TIMESTAMPNS); not in Python's socket module
_TIMESPEC = struct.Struct("@ll")


def _stamped_socket(addr: str) -> socket.socket:
    """A UDP socket bound to ``addr`` whose datagrams carry the kernel's arrival time."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
    sock.bind((addr, 0))
    return sock


def _receive(sock: socket.socket, size: int) -> tuple[bytes, float, tuple[str, int]]:
    """(datagram, the kernel's arrival time as ``time.time()``, sender)."""
    data, ancillary, _, peer = sock.recvmsg(size, socket.CMSG_SPACE(_TIMESPEC.size))
    arrived = time.time()
    for level, kind, value in ancillary:
        if level == socket.SOL_SOCKET and kind == _SO_TIMESTAMPNS:
            sec, nsec = _TIMESPEC.unpack(value[:_TIMESPEC.size])
            arrived = sec + nsec * 1e-9
    return data, arrived, peer


def measure(link: ShapedLink, seconds: float = 1.0, tries: int = 3, pings: int = 20) -> dict[str, float]:
    """The link's probe: :func:`ping`'s round trips (first, on the idle link; ``pings`` 0 skips them), then
    :func:`probe_rates`'s TCP rate of each direction."""
    measured = ping(link, pings) if pings else {}
    return {**probe_rates(link, seconds, tries), **measured}


def probe_rates(link: ShapedLink, seconds: float = 1.0, tries: int = 3) -> dict[str, float]:
    """Measure the throughput of one TCP stream each way, about ``seconds`` each at the nominal rate.

    A short stream can lose a large part of its time to one stall (a retransmission timeout after a drop at
    the shaper's queue, the host scheduling something else), which says nothing about the link's rate. So a
    direction whose stream delivers under 90% of the nominal rate is measured again, up to ``tries``
    streams, and the best is kept (a stall only ever lowers the rate; the shaper caps it). Each direction is
    measured at its own nominal rate (``--up`` / ``--down``).
    """
    check_count("probe", "tries", tries, fix="give at least 1 try.")
    rates: dict[str, float] = {}
    for direction, (sender, receiver) in (("up", ("client", "server")), ("down", ("server", "client"))):
        nominal = link.spec.rate(direction)
        nbytes = max(16 * 1024, int(nominal / 8 * seconds))
        best = 0.0
        for _ in range(tries):
            best = max(best, stream_rate(link, sender, receiver, nbytes, seconds))
            if best >= 0.9 * nominal / 1e6:
                break
        rates[f"{direction}_mbit"] = round(best, 2)
        rates[f"{direction}_bytes"] = nbytes
    return rates


def stream_rate(link: ShapedLink, sender: str, receiver: str, nbytes: int, seconds: float) -> float:
    """Mbit/s of payload one TCP stream of ``nbytes`` delivers from ``sender`` to ``receiver``.

    Timed after TCP's slow start (~8 round trips of data; none on a link without delay), from a short read (this
    thread was waiting for data, so its clock is not behind the stream: a late read would shorten the time and
    inflate the rate) to the last byte; on a link with delay, as the median rate of 8 windows of that span (see
    :func:`_median_rate`).
    """
    limit = 10 + 20 * seconds + 40 * link.spec.delay_s
    # Bytes of TCP's slow start, left out of the timing: ~8 round trips at the rate (10 segments doubling per
    # round trip fill 100 Mbit/s x 50 ms in ~5, then recover from the overshoot), at most half the stream.
    round_trip = 2 * (link.spec.delay_s + link.spec.jitter_s)
    slow_start = min(nbytes // 2, int(link.spec.rate("up" if sender == "client" else "down") / 8 * 8 * round_trip))
    with contextlib.ExitStack() as sockets:
        with in_netns(link.netns[receiver]):
            server = sockets.enter_context(socket.create_server((link.spec.addr(receiver), 0)))
        with in_netns(link.netns[sender]):
            client = sockets.enter_context(socket.create_connection(
                (link.spec.addr(receiver), server.getsockname()[1]), timeout=limit))
        server.settimeout(limit)
        conn, _ = server.accept()
        errors: list[BaseException] = []

        def send() -> None:
            block = b"\0" * 65536
            try:
                left = nbytes
                while left > 0:
                    client.sendall(block[:min(left, len(block))])
                    left -= min(left, len(block))
            except OSError as err:
                errors.append(err)

        thread = threading.Thread(target=send, daemon=True)
        thread.start()
        with conn:
            conn.settimeout(limit)
            buf = bytearray(1 << 18)
            got, timely = 0, []  # (bytes so far, time) at short reads: this thread was waiting, not behind
            while got < nbytes and not errors:
                n = conn.recv_into(buf)
                if n == 0:
                    break
                got += n
                if got > slow_start and n < len(buf) // 4:
                    timely.append((got, time.perf_counter()))
            timely.append((got, time.perf_counter()))  # the end: a late read here only lowers the rate
        thread.join(limit)
    if errors or got < nbytes:
        raise LinkError(f"the bandwidth probe {sender} -> {receiver} got {got} of {nbytes} bytes "
                        f"({errors[0] if errors else 'connection closed'}).")
    # Without delay, one window (tbf's bucket lets a short window run over the rate after a pause of the
    # sender); with delay, 8, whose median discounts loss repairs (the delay line has no bucket).
    windows = 8 if slow_start else 1
    return _median_rate(timely, max(1, (timely[-1][0] - timely[0][0]) // windows)) * 8 / 1e6


def _median_rate(timely: list[tuple[int, float]], window: int) -> float:
    """Bytes per second: the median over consecutive windows of at least ``window`` bytes between timely reads.

    One window can be too fast (it received at once what TCP held back while repairing a loss, data that
    arrived in the window before) and the one before it too slow; the median keeps neither."""
    rates, (b0, t0) = [], timely[0] if timely else (0, 0.0)
    for b, t in timely[1:]:
        if b - b0 >= window and t > t0:
            rates.append((b - b0) / (t - t0))
            b0, t0 = b, t
    return statistics.median(rates) if rates else 0.0


def ping(link: ShapedLink, count: int = 20, interval: float = 0.005) -> dict[str, float]:
    """Round trips of small UDP datagrams, client -> server -> client, one every ``interval`` seconds.

    Returns the medians of the round trip and of each direction's one-way delay (ms), and how many of ``count``
    did not come back. A datagram is waited for up to 1 s plus 8 one-way delays.
    """
    wait = 1.0 + 8 * (link.spec.delay_s + link.spec.jitter_s)
    with contextlib.ExitStack() as stack:
        with in_netns(link.netns["server"]):
            echo = stack.enter_context(_stamped_socket(link.spec.server_addr))
        with in_netns(link.netns["client"]):
            client = stack.enter_context(_stamped_socket(link.spec.client_addr))
        echo.settimeout(wait)
        up: list[float] = []

        def serve() -> None:
            with contextlib.suppress(OSError):
                for _ in range(count):
                    data, arrived, peer = _receive(echo, 64)
                    up.append(arrived - _STAMP.unpack(data[:_STAMP.size])[1])
                    echo.sendto(data[:_STAMP.size] + struct.pack("!d", time.time()), peer)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        target = (link.spec.server_addr, echo.getsockname()[1])
        for seq in range(count):
            client.sendto(_STAMP.pack(seq, time.time()), target)
            time.sleep(interval)
        rtt, down = [], []
        client.settimeout(wait)
        with contextlib.suppress(OSError):
            while len(rtt) < count:
                data, arrived, _ = _receive(client, 64)
                rtt.append(arrived - _STAMP.unpack(data[:_STAMP.size])[1])
                down.append(arrived - struct.unpack("!d", data[_STAMP.size:_STAMP.size + 8])[0])
        thread.join(wait)
    if not rtt:
        raise LinkError(f"the round-trip probe got none of {count} datagrams back in {wait:g} s: the link "
                        f"carries nothing (is --loss near 100%?).")
    ms = lambda values: round(statistics.median(values) * 1e3, 3)  # noqa: E731
    return {"rtt_ms": ms(rtt), "up_delay_ms": ms(up), "down_delay_ms": ms(down), "pings": count,
            "pings_lost": count - len(rtt)}


def datagrams(link: ShapedLink, sender: str, receiver: str, count: int, *, interval: float = 0.0,
              size: int = 64) -> list[tuple[int, float]]:
    """Send ``count`` numbered datagrams one way; returns (sequence number, one-way delay in s) in arrival order.

    What a direction does to packets: which were lost, whether any overtook another, the spread of delays.
    """
    wait = 1.0 + 4 * (link.spec.delay_s + link.spec.jitter_s)
    with contextlib.ExitStack() as stack:
        with in_netns(link.netns[receiver]):
            sink = stack.enter_context(_stamped_socket(link.spec.addr(receiver)))
        with in_netns(link.netns[sender]):
            source = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
        pad = b"\0" * max(0, size - _STAMP.size)
        target = (link.spec.addr(receiver), sink.getsockname()[1])
        next_send = time.monotonic()
        for seq in range(count):
            source.sendto(_STAMP.pack(seq, time.time()) + pad, target)
            next_send += interval
            if interval:
                time.sleep(max(0.0, next_send - time.monotonic()))
        arrivals: list[tuple[int, float]] = []
        sink.settimeout(wait)
        with contextlib.suppress(OSError):  # the kernel holds what arrived meanwhile (4 MiB of buffer)
            while len(arrivals) < count:
                data, arrived, _ = _receive(sink, size)
                seq, sent = _STAMP.unpack(data[:_STAMP.size])
                arrivals.append((seq, arrived - sent))
    return arrivals
