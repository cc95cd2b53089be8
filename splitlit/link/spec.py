"""What the emulated link is: its rate, delay and queue, and the two hosts' names and addresses."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from splitlit.link.errors import LinkError
from splitlit.link.units import rate_text

__all__ = ["IFNAME", "NODE_RANK", "ROLES", "LinkSpec"]

ROLES = ("client", "server")
NODE_RANK = {"client": 0, "server": 1}
IFNAME = {"client": "sl-client", "server": "sl-server"}


@dataclass(frozen=True)
class LinkSpec:
    """What the emulated link is.

    Args:
        bandwidth_bps: rate of each direction, bits per second.
        delay_s: one-way delay added on each end (netem only), so the round trip grows by twice it.
        mtu: of the veth pair (1500, Ethernet's).
        queue_s: how long a packet may wait in tbf's queue before being dropped (its ``latency``).
        burst_bytes: tbf's bucket; default max(32 KiB, 2 ms at the rate).
        client_addr / server_addr: the two ends, on a /30 that exists only in the namespaces.
    """

    bandwidth_bps: int
    delay_s: float = 0.0
    mtu: int = 1500
    queue_s: float = 0.05
    burst_bytes: int | None = None
    client_addr: str = "10.77.0.1"
    server_addr: str = "10.77.0.2"

    def __post_init__(self) -> None:
        if self.bandwidth_bps < 8_000:
            raise LinkError(f"LinkSpec(bandwidth_bps={self.bandwidth_bps}): give at least 8000 bit/s.")
        if not 576 <= self.mtu <= 65_535:
            raise LinkError(f"--mtu {self.mtu}: give an MTU between 576 and 65535 (Ethernet: 1500).")
        if self.delay_s < 0 or self.queue_s <= 0:
            raise LinkError(f"delay {self.delay_s} s and queue {self.queue_s} s must be >= 0 and > 0.")

    @property
    def burst(self) -> int:
        return self.burst_bytes or max(32 * 1024, int(self.bandwidth_bps / 8 * 0.002))

    def addr(self, role: str) -> str:
        return self.client_addr if role == "client" else self.server_addr

    def describe(self) -> dict[str, Any]:
        """The settings as they go into the run config."""
        return {"emulated": "veth pair between two network namespaces, tc tbf on both ends",
                "bandwidth": rate_text(self.bandwidth_bps), "rate_mbit": self.bandwidth_bps / 1e6,
                "qdisc": "netem+tbf" if self.delay_s else "tbf", "burst_bytes": self.burst,
                "queue_ms": self.queue_s * 1e3, "delay_ms": self.delay_s * 1e3 if self.delay_s else None,
                "latency": f"{2 * self.delay_s * 1e3:g} ms round trip added (netem)" if self.delay_s
                else "not emulated (veth round trip, ~0.05 ms)",
                "mtu": self.mtu, "client_addr": self.client_addr, "server_addr": self.server_addr,
                "client_ifname": IFNAME["client"], "server_ifname": IFNAME["server"]}
