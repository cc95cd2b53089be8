"""The shaped link: two namespaces joined by a shaped veth pair or by the delay line; removed again on exit."""

from __future__ import annotations

import itertools
import json
import os
import random
import signal
import subprocess
from typing import Any

from splitlit.link.delay import DelayQueue
from splitlit.link.delayline import DelayLine
from splitlit.link.errors import LinkError
from splitlit.link.netns import NS_PREFIX, STOP_SIGNALS, Namespaces, host_env, remove_all, run
from splitlit.link.probe import ping, probe_rates
from splitlit.link.spec import DIRECTIONS, ETHERNET_HEADER, IFNAME, NODE_RANK, ROLES, LinkSpec

__all__ = ["LINK_ENV", "STOP_SIGNALS", "ShapedLink"]

LINK_ENV = "SPLITLIT_LINK_JSON"  # read by experiments.cli into the run config
_counter = itertools.count()


class ShapedLink(Namespaces):
    """Two namespaces joined by an emulated link; a context manager that removes all it made on exit.

        with ShapedLink(LinkSpec(bandwidth_bps=100_000_000, delay_s=0.025)) as link:
            link.probe(seconds=1.0)            # {"up_mbit": 95.6, "down_mbit": 95.7, "rtt_ms": 50.3, ...}
            subprocess.run(link.exec_prefix("client") + ["python", "..."], env=link.env("client"))

    The link is a veth pair shaped by ``tc tbf`` (rate only) or ``netem``, or two TUN devices joined by the
    delay line (:mod:`splitlit.link.delayline`): ``spec.mode`` says which. Either way the client's interface is
    ``sl-client`` and the server's ``sl-server``. Namespace names: ``splitlit-link-<pid>-<n>-client`` / ``-server``.
    """

    def __init__(self, spec: LinkSpec, *, port: int = 29500) -> None:
        self.spec = spec
        self.port = port
        stem = f"{NS_PREFIX}{os.getpid()}-{next(_counter)}"
        self.netns = {role: f"{stem}-{role}" for role in ROLES}
        self.probed: dict[str, float] | None = None
        self.delayline: DelayLine | None = None
        self.delayline_report: dict[str, Any] = {}
        self._made: list[str] = []

    @property
    def tun(self) -> bool:
        return self.spec.mode == "delayline"

    def _create(self) -> None:
        spec, ns = self.spec, self.netns
        for role in ROLES:
            run(["ip", "netns", "add", ns[role]], f"creating network namespace {ns[role]}")
            self._made.append(ns[role])
            for key, value in spec.sysctls:
                run(["ip", "netns", "exec", ns[role], "sysctl", "-q", "-w", f"{key}={value}"],
                    f"--sysctl {key}={value} in {ns[role]}")
        if spec.mode == "delayline":
            self._start_delayline()
            return
        # Both ends are created inside their namespaces: no interface ever appears on the host.
        run(["ip", "link", "add", IFNAME["client"], "netns", ns["client"], "mtu", str(spec.mtu), "type", "veth",
             "peer", "name", IFNAME["server"], "netns", ns["server"], "mtu", str(spec.mtu)], "creating the veth pair")
        for role in ROLES:
            ip = ["ip", "-n", ns[role]]
            run(ip + ["addr", "add", f"{spec.addr(role)}/30", "dev", IFNAME[role]], f"addressing {IFNAME[role]}")
            run(ip + ["link", "set", "lo", "up"], f"bringing up lo in {ns[role]}")
            run(ip + ["link", "set", IFNAME[role], "up"], f"bringing up {IFNAME[role]}")
            self._shape(role)

    def _start_delayline(self) -> None:
        """Fork the delay line (it makes the two TUN devices), then address them point to point and bring them up."""
        spec, ns = self.spec, self.netns
        seed = random.Random(spec.seed).getrandbits(64)  # None: a fresh seed; else the same draws every run
        queues = {d: DelayQueue(rate_bps=spec.rate(d), delay_s=spec.delay_s, jitter_s=spec.jitter_s, loss=spec.loss,
                                limit_bytes=spec.limit(d), overhead=ETHERNET_HEADER, rng=random.Random(f"{seed}{d}"))
                  for d in DIRECTIONS}
        self.delayline = DelayLine(netns=ns, up=queues["up"], down=queues["down"])
        self.delayline.start()
        for role, peer in zip(ROLES, reversed(ROLES)):
            ip = ["ip", "-n", ns[role]]
            run(ip + ["addr", "add", f"{spec.addr(role)}/32", "peer", f"{spec.addr(peer)}/32", "dev", IFNAME[role]],
                f"addressing {IFNAME[role]}")
            run(ip + ["link", "set", "lo", "up"], f"bringing up lo in {ns[role]}")
            run(ip + ["link", "set", IFNAME[role], "mtu", str(spec.mtu), "txqueuelen", "1000", "up"],
                f"bringing up {IFNAME[role]}")

    def _shape(self, role: str) -> None:
        spec, dev = self.spec, ["dev", IFNAME[role]]
        rate = spec.rate("up" if role == "client" else "down")  # each end shapes what leaves it
        tc = ["tc", "-n", self.netns[role], "qdisc", "add", *dev]
        tbf = ["tbf", "rate", f"{rate}bit", "burst", str(spec.burst), "latency", f"{spec.queue_s * 1e3:g}ms"]
        if spec.mode == "tbf":
            run(tc + ["root", "handle", "1:", *tbf], f"shaping {IFNAME[role]} with tbf")
            return
        netem = ["netem", "delay", f"{spec.delay_s * 1e6:.0f}us"]
        if spec.jitter_s:
            netem += [f"{spec.jitter_s * 1e6:.0f}us"]
        if spec.loss:
            netem += ["loss", "random", f"{spec.loss * 100:g}%"]
        result = subprocess.run(tc + ["root", "handle", "1:", *netem], capture_output=True, text=True)
        if result.returncode != 0:
            raise LinkError(f"--emulator netem needs tc's netem qdisc, which this kernel lacks or refused "
                            f"({result.stderr.strip()}). Use the delay line instead: leave --emulator out "
                            f"(or give --emulator delayline).")
        run(tc + ["parent", "1:1", "handle", "10:", *tbf], f"shaping {IFNAME[role]} with tbf under netem")

    def close(self) -> None:
        """Stop whatever still runs in the namespaces, then delete them (the veth pair and qdiscs go with them)."""
        # A second Ctrl-C must not cut the clean-up short: signals wait until it is done.
        held = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            if self.delayline is not None:
                self.delayline_report = self.delayline.stop()
                self.delayline = None
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
        remove_all(self._made)

    # using it
    def exec_prefix(self, role: str) -> list[str]:
        """Prefix that runs a command on ``role``'s host."""
        return ["ip", "netns", "exec", self.netns[role]]

    def env(self, role: str, base: dict[str, str] | None = None) -> dict[str, str]:
        """The environment of ``role``'s rank: the multi-host variables, gloo's interface and the link settings."""
        return host_env(base, master_addr=self.spec.client_addr, port=self.port, node_rank=NODE_RANK[role],
                        world_size=2, ifname=IFNAME[role], link_env=(LINK_ENV, json.dumps(self.describe())))

    def describe(self) -> dict[str, Any]:
        settings = self.spec.describe()
        if self.probed is not None:
            settings.update({f"probe_{k}": v for k, v in self.probed.items()})
        return settings

    def counters(self) -> dict[str, dict[str, int]]:
        """Bytes each end has received and sent so far (the kernel's interface counters)."""
        out = {}
        for role in ROLES:
            text = run(["ip", "-n", self.netns[role], "-s", "-j", "link", "show", "dev", IFNAME[role]],
                       f"reading {IFNAME[role]}'s counters")
            stats = json.loads(text)[0]["stats64"]
            out[role] = {"rx_bytes": int(stats["rx"]["bytes"]), "tx_bytes": int(stats["tx"]["bytes"])}
        return out

    def probe(self, seconds: float = 1.0, tries: int = 3, pings: int = 20) -> dict[str, float]:
        """Measure the round trip (:func:`~splitlit.link.probe.ping`, on the idle link, first) and each direction's
        rate (:func:`~splitlit.link.probe.probe_rates`); kept for :meth:`describe` and so the run config."""
        measured = ping(self, pings) if pings else {}
        self.probed = {**probe_rates(self, seconds, tries), **measured}
        return self.probed
