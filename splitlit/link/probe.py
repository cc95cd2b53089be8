"""Measuring the link as the ranks will see it: the TCP throughput of each direction."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from typing import TYPE_CHECKING

from splitlit.link.errors import LinkError
from splitlit.link.netns import in_netns

if TYPE_CHECKING:
    from splitlit.link.shaped import ShapedLink

__all__ = ["probe_rates", "stream_rate"]


def probe_rates(link: ShapedLink, seconds: float = 1.0, tries: int = 3) -> dict[str, float]:
    """Measure the throughput of one TCP stream each way, about ``seconds`` each at the nominal rate.

    A short stream can lose a large part of its time to one stall (a retransmission timeout after a drop at
    the shaper's queue, the host scheduling something else), which says nothing about the link's rate. So a
    direction whose stream delivers under 90% of the nominal rate is measured again, up to ``tries``
    streams, and the best is kept (a stall only ever lowers the rate; the shaper caps it).
    """
    if isinstance(tries, bool) or not isinstance(tries, int) or tries < 1:
        raise ValueError(f"probe(tries={tries!r}): give at least 1 try.")
    nbytes = max(16 * 1024, int(link.spec.bandwidth_bps / 8 * seconds))
    enough = 0.9 * link.spec.bandwidth_bps / 1e6
    rates = {}
    for sender, receiver, key in (("client", "server", "up_mbit"), ("server", "client", "down_mbit")):
        best = 0.0
        for _ in range(tries):
            best = max(best, stream_rate(link, sender, receiver, nbytes, seconds))
            if best >= enough:
                break
        rates[key] = round(best, 2)
    return {**rates, "bytes": nbytes}


def stream_rate(link: ShapedLink, sender: str, receiver: str, nbytes: int, seconds: float) -> float:
    """Mbit/s of payload one TCP stream of ``nbytes`` delivers from ``sender`` to ``receiver``."""
    limit = 10 + 20 * seconds
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
            buf = bytearray(1 << 20)
            got = conn.recv_into(buf)
            first, start = got, time.perf_counter()  # the clock starts at the first byte: no handshake
            while got < nbytes and not errors:
                n = conn.recv_into(buf)
                if n == 0:
                    break
                got += n
            elapsed = time.perf_counter() - start
        thread.join(limit)
    if errors or got < nbytes:
        raise LinkError(f"the bandwidth probe {sender} -> {receiver} got {got} of {nbytes} bytes "
                        f"({errors[0] if errors else 'connection closed'}).")
    return (got - first) * 8 / max(elapsed, 1e-9) / 1e6
