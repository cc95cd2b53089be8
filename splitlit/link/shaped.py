"""The shaped link: two namespaces joined by a shaped veth pair or by the delay line; removed again on exit."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
from typing import Any

from splitlit.link.delayline import DelayLine, wire
from splitlit.link.errors import LinkError
from splitlit.link.netns import NS_PREFIX, STOP_SIGNALS, Namespaces, host_env, point_to_point, run
from splitlit.link.probe import measure
from splitlit.link.spec import IFNAME, NODE_RANK, ROLES, LinkSpec

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
        super().__init__()
        self.spec = spec
        self.port = port
        stem = f"{NS_PREFIX}{os.getpid()}-{next(_counter)}"
        self.netns = {role: f"{stem}-{role}" for role in ROLES}
        self.probed: dict[str, float] | None = None

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
        self.delayline = DelayLine([wire(spec, client=(ns["client"], IFNAME["client"]),
                                         server=(ns["server"], IFNAME["server"]))])
        self.delayline.start()
        for role, peer, sends in (("client", "server", "up"), ("server", "client", "down")):
            run(["ip", "-n", ns[role], "link", "set", "lo", "up"], f"bringing up lo in {ns[role]}")
            point_to_point(ns[role], IFNAME[role], addr=spec.addr(role), peer=spec.addr(peer), mtu=spec.mtu,
                           gso_max_segs=spec.super_packet_segments(sends) if spec.offload_active else None)

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
        """The round trip and each direction's rate (:func:`~splitlit.link.probe.measure`); kept for
        :meth:`describe` and so the run config."""
        self.probed = measure(self, seconds, tries, pings)
        return self.probed
