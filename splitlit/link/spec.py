"""What the emulated link is: its rates, delay, jitter, loss and queue, and the two hosts' names and addresses."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from splitlit.link.errors import LinkError
from splitlit.link.units import rate_text

__all__ = ["EMULATORS", "IFNAME", "NODE_RANK", "ROLES", "LinkSpec"]

ROLES = ("client", "server")
NODE_RANK = {"client": 0, "server": 1}
IFNAME = {"client": "sl-client", "server": "sl-server"}
DIRECTIONS = {"up": ("client", "server"), "down": ("server", "client")}  # direction -> (sender, receiver)
EMULATORS = ("auto", "tbf", "delayline", "netem")
ETHERNET_HEADER = 14  # bytes a TUN packet lacks, counted at the rate so both emulators mean the same rate


@dataclass(frozen=True)
class LinkSpec:
    """What the emulated link is.

        LinkSpec(bandwidth_bps=10**7, delay_s=0.025)                       # 10 Mbit/s each way, 50 ms round trip
        LinkSpec(up_bps=5 * 10**6, down_bps=5 * 10**7, delay_s=0.04, jitter_s=0.005, loss=0.001)

    Args:
        bandwidth_bps: rate of both directions, bits per second (``up_bps`` / ``down_bps`` override one).
        up_bps / down_bps: client -> server / server -> client rates.
        delay_s: one-way delay of each direction, so the round trip grows by twice it.
        jitter_s: each packet's delay varies uniformly within +-jitter_s (never reordered; at most the delay).
        loss: probability that a packet is lost, per packet and direction, in [0, 1).
        limit_bytes: the bottleneck's queue per direction (delay line; tail drop); default: see :meth:`limit`.
        emulator: ``tbf`` (rate only, veth + tc), ``delayline`` (TUN devices and a userspace process),
            ``netem`` (veth + tc netem, where the kernel has it) or ``auto``: the delay line when a delay,
            jitter or loss is asked for, tbf otherwise.
        mtu: of the link's interfaces (1500, Ethernet's).
        queue_s: tbf's queue, seconds at the rate (its ``latency``); also the delay line's smallest queue.
        burst_bytes: tbf's bucket; default max(32 KiB, 2 ms at the rate).
        seed: of the delay line's loss and jitter (None: a fresh one each run).
        offload: the delay line's TUN devices take TCP segmentation offload: one read carries a super-packet of up
            to 64 KB, timed as its segments on the wire (a third of the CPU at 100 Mbit/s). Only without loss
            (loss is per packet on the wire, and a super-packet is lost whole): see :attr:`offload_active`.
        sysctls: ``(key, value)`` pairs set in both namespaces, e.g. ``("net.ipv4.tcp_slow_start_after_idle",
            "0")`` (each namespace has its own TCP settings; the host's are untouched).
        client_addr / server_addr: the two ends, on addresses that exist only in the namespaces.
    """

    bandwidth_bps: int | None = None
    delay_s: float = 0.0
    mtu: int = 1500
    queue_s: float = 0.05
    burst_bytes: int | None = None
    client_addr: str = "10.77.0.1"
    server_addr: str = "10.77.0.2"
    up_bps: int | None = None
    down_bps: int | None = None
    jitter_s: float = 0.0
    loss: float = 0.0
    limit_bytes: int | None = None
    emulator: str = "auto"
    seed: int | None = None
    sysctls: tuple[tuple[str, str], ...] = ()
    offload: bool = True

    def __post_init__(self) -> None:
        up, down = self.up_bps or self.bandwidth_bps, self.down_bps or self.bandwidth_bps
        if up is None or down is None:
            raise LinkError("LinkSpec: give bandwidth_bps (--bandwidth), or both up_bps and down_bps "
                            "(--up and --down), e.g. --bandwidth 10mbit or --up 5mbit --down 50mbit.")
        object.__setattr__(self, "up_bps", int(up))
        object.__setattr__(self, "down_bps", int(down))
        for name, bps in (("up", up), ("down", down)):
            if bps < 8_000:
                raise LinkError(f"LinkSpec({name}_bps={bps}): give at least 8000 bit/s.")
        if not 576 <= self.mtu <= 65_535:
            raise LinkError(f"--mtu {self.mtu}: give an MTU between 576 and 65535 (Ethernet: 1500).")
        if self.delay_s < 0 or self.queue_s <= 0:
            raise LinkError(f"delay {self.delay_s} s and queue {self.queue_s} s must be >= 0 and > 0.")
        if not 0 <= self.jitter_s <= self.delay_s:
            raise LinkError(f"--jitter {self.jitter_s * 1e3:g}ms is larger than --delay {self.delay_s * 1e3:g}ms: "
                            f"a packet cannot arrive before it was sent; give a jitter of at most the delay.")
        if not 0 <= self.loss < 1:
            raise LinkError(f"--loss {self.loss * 100:g}% is outside [0, 100%): give e.g. 0.1%.")
        if self.emulator not in EMULATORS:
            raise LinkError(f"--emulator {self.emulator!r}: give one of {', '.join(EMULATORS)}.")
        if self.emulator == "tbf" and (self.delay_s or self.jitter_s or self.loss):
            raise LinkError("--emulator tbf shapes the rate only: leave out --delay, --jitter and --loss, or use "
                            "--emulator delayline (or auto).")
        if self.limit_bytes is not None and self.limit_bytes < self.mtu:
            raise LinkError(f"--limit {self.limit_bytes} bytes is less than one packet (--mtu {self.mtu}): "
                            f"give at least {self.mtu} bytes, or leave it out for the default.")

    @property
    def bandwidth(self) -> int:
        """The rate when both directions have the same one (else the faster one's)."""
        return max(self.up_bps, self.down_bps)

    @property
    def mode(self) -> str:
        """The emulator used: ``auto`` resolved."""
        if self.emulator != "auto":
            return self.emulator
        return "delayline" if (self.delay_s or self.jitter_s or self.loss) else "tbf"

    @property
    def offload_active(self) -> bool:
        """Whether the delay line reads TCP super-packets: offload asked for and no loss (with loss, every packet on
        the wire is read, and lost, on its own, as netem's ``loss random``)."""
        return self.mode == "delayline" and self.offload and not self.loss

    def super_packet_segments(self, direction: str) -> int:
        """The most segments in one TCP super-packet the delay line reads from ``direction``'s sender (its TUN
        device's ``gso_max_segs``, which also holds for forwarded packets): about 1 ms of the line (the kernel's
        own TSO sizing at the rate, which a short round trip would otherwise raise to 64 KB), at least 2, and
        at most half the queue, so that a super-packet never overflows an empty queue."""
        frame = self.mtu + ETHERNET_HEADER
        one_ms = int(self.rate(direction) / 8 * 1e-3) // frame
        return max(1, min(self.limit(direction) // 2 // frame, max(2, one_ms)))

    @property
    def burst(self) -> int:
        return self.burst_bytes or max(32 * 1024, int(self.bandwidth / 8 * 0.002))

    def rate(self, direction: str) -> int:
        """Bits per second of ``up`` (client -> server) or ``down``."""
        return self.up_bps if direction == "up" else self.down_bps

    def limit(self, direction: str) -> int:
        """The delay line's queue in bytes: ``limit_bytes``, else one bandwidth-delay product (the rate times the
        round trip) or ``queue_s`` at the rate, whichever is larger, and at least 4 full packets."""
        if self.limit_bytes is not None:
            return self.limit_bytes
        seconds = max(2 * self.delay_s + 2 * self.jitter_s, self.queue_s)
        return max(int(self.rate(direction) / 8 * seconds), 4 * (self.mtu + ETHERNET_HEADER))

    def addr(self, role: str) -> str:
        return self.client_addr if role == "client" else self.server_addr

    def describe(self) -> dict[str, Any]:
        """The settings as they go into the run config."""
        up, down = self.up_bps, self.down_bps
        mode = self.mode
        emulated = {"tbf": "veth pair between two network namespaces, tc tbf on both ends",
                    "netem": "veth pair between two network namespaces, tc netem + tbf on both ends",
                    "delayline": "a TUN device in each of two network namespaces, packets moved by a userspace "
                                 "delay line (rate, delay, jitter, loss, tail-drop queue)"}[mode]
        if mode == "tbf":
            latency = "not emulated (veth round trip, ~0.05 ms)"
        else:
            latency = f"{2 * self.delay_s * 1e3:g} ms round trip added ({mode})"
        settings = {"emulated": emulated, "emulator": mode,
                    "bandwidth": rate_text(up) if up == down else f"{rate_text(up)} up, {rate_text(down)} down",
                    "rate_mbit": up / 1e6 if up == down else None, "up_mbit": up / 1e6, "down_mbit": down / 1e6,
                    "delay_ms": self.delay_s * 1e3 if self.delay_s else None,
                    "jitter_ms": self.jitter_s * 1e3 if self.jitter_s else None,
                    "loss_pct": self.loss * 100 if self.loss else None, "latency": latency,
                    "mtu": self.mtu, "client_addr": self.client_addr, "server_addr": self.server_addr,
                    "client_ifname": IFNAME["client"], "server_ifname": IFNAME["server"]}
        if self.sysctls:
            settings["sysctls"] = dict(self.sysctls)
        if mode == "delayline":
            settings.update(limit_bytes={d: self.limit(d) for d in DIRECTIONS}, seed=self.seed,
                            offload=self.offload_active)
        else:
            settings.update(qdisc="netem+tbf" if mode == "netem" else "tbf", burst_bytes=self.burst,
                            queue_ms=self.queue_s * 1e3)
        return settings
