"""Many clients on one machine: a namespace per client, each joined to the server's by a link of its own.

    with StarLink([LinkSpec(bandwidth_bps=10**8), LinkSpec(bandwidth_bps=10**7)]) as link:   # a slow client 1
        subprocess.run(link.exec_prefix("client1") + ["python", "..."], env=link.env("client1"))
    StarLink([LinkSpec(bandwidth_bps=10**8, delay_s=0.005), LinkSpec(bandwidth_bps=10**8, delay_s=0.08)])  # a far one

Client ``i``'s link joins its namespace (``sl-client``, 10.78.i.1) to the server's (``sl-c<i>``, 10.78.i.2):

- rates alone: a veth pair shaped by ``tc tbf`` at each end (the client's end at its up rate, the server's at its
  down rate);
- when any client link asks for a delay, jitter or loss: every link is a pair of TUN devices (one in the
  client's namespace, one in the server's) served by ONE delay line process (:mod:`splitlit.link.delayline`)
  that selects over all of them, each link with its own queues (rate, delay, jitter, loss, limit). Links
  without a delay still cross the delay line, at their rate: one emulator for all keeps the clients comparable.

The server's namespace forwards between the links, so what the clients send each other (SplitFed's averaging,
sequential's hand-offs) crosses both clients' links, as it would cross their access links.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
from types import SimpleNamespace
from typing import Any

from splitlit.link.delayline import DelayLine, wire
from splitlit.link.errors import LinkError
from splitlit.link.netns import NS_PREFIX, Namespaces, host_env, point_to_point, run
from splitlit.link.probe import measure
from splitlit.link.shaped import LINK_ENV
from splitlit.link.spec import LinkSpec

__all__ = ["StarLink"]

_counter = itertools.count()
CLIENT_IF = "sl-client"


class StarLink(Namespaces):
    """``len(specs)`` clients and a server, each client on a link of its own (see the module docstring)."""

    def __init__(self, specs: list[LinkSpec], *, port: int = 29500) -> None:
        super().__init__()
        if len(specs) > 250:
            raise LinkError(f"--clients {len(specs)}: at most 250 client links.")
        for i, spec in enumerate(specs):
            if spec.mode == "netem":
                raise LinkError(f"StarLink: client {i}'s link asks for --emulator netem; with --clients the links "
                                f"are tc tbf (rates) or the delay line: leave --emulator out (or give delayline).")
        self.mode = "delayline" if any(spec.mode == "delayline" for spec in specs) else "tbf"
        # One emulator for every link: the ones without a delay say so in the run record (emulator: delayline).
        self.specs = [dataclasses.replace(spec, emulator=self.mode) for spec in specs]
        self.port = port
        self.probed: list[dict[str, float]] | None = None
        self.roles = [f"client{i}" for i in range(len(specs))] + ["server"]
        stem = f"{NS_PREFIX}{os.getpid()}-{next(_counter)}"
        self.netns = {role: f"{stem}-{role}" for role in self.roles}

    @staticmethod
    def addr(client: int, role: str) -> str:
        return f"10.78.{client}.{1 if role == 'client' else 2}"

    def server_if(self, client: int) -> str:
        return f"sl-c{client}"

    @property
    def tun(self) -> bool:
        return self.mode == "delayline"

    def _create(self) -> None:
        server = self.netns["server"]
        for role in self.roles:
            run(["ip", "netns", "add", self.netns[role]], f"creating network namespace {self.netns[role]}")
            self._made.append(self.netns[role])
            run(["ip", "-n", self.netns[role], "link", "set", "lo", "up"], f"bringing up lo in {self.netns[role]}")
        run(["ip", "netns", "exec", server, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1"],
            "letting the server's namespace forward between the client links")
        if self.mode == "delayline":
            self._start_delayline()
        else:
            self._make_veths()
        for i in range(len(self.specs)):
            run(["ip", "-n", self.netns[f"client{i}"], "route", "add", "10.78.0.0/16", "via", self.addr(i, "server")],
                f"routing client {i} to the others through the server")

    def _start_delayline(self) -> None:
        """Fork the one delay line (it makes a TUN device at both ends of every client link), then address each
        pair point to point and bring it up."""
        server = self.netns["server"]
        self.delayline = DelayLine([wire(spec, client=(self.netns[f"client{i}"], CLIENT_IF),
                                         server=(server, self.server_if(i)), name=f"client{i}")
                                    for i, spec in enumerate(self.specs)])
        self.delayline.start()
        # The server forwards one client's super-packets into another's link as they are: every device gets the
        # smallest cap of all links, so none overflows the slowest link's queue.
        cap = min(spec.super_packet_segments(d) for spec in self.specs for d in ("up", "down"))
        for i, spec in enumerate(self.specs):
            client, server_addr, client_addr = self.netns[f"client{i}"], self.addr(i, "server"), self.addr(i, "client")
            segs = cap if spec.offload_active else None
            point_to_point(client, CLIENT_IF, addr=client_addr, peer=server_addr, mtu=spec.mtu, gso_max_segs=segs)
            point_to_point(server, self.server_if(i), addr=server_addr, peer=client_addr, mtu=spec.mtu,
                           gso_max_segs=segs)

    def _make_veths(self) -> None:
        server = self.netns["server"]
        for i, spec in enumerate(self.specs):
            client = self.netns[f"client{i}"]
            run(["ip", "link", "add", CLIENT_IF, "netns", client, "mtu", str(spec.mtu), "type", "veth", "peer", "name",
                 self.server_if(i), "netns", server, "mtu", str(spec.mtu)], f"creating client {i}'s veth pair")
            for ns, dev, role, rate in ((client, CLIENT_IF, "client", spec.up_bps),
                                        (server, self.server_if(i), "server", spec.down_bps)):
                run(["ip", "-n", ns, "addr", "add", f"{self.addr(i, role)}/30", "dev", dev], f"addressing {dev}")
                run(["ip", "-n", ns, "link", "set", dev, "up"], f"bringing up {dev}")
                run(["tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "handle", "1:", "tbf", "rate", f"{rate}bit",
                     "burst", str(spec.burst), "latency", f"{spec.queue_s * 1e3:g}ms"], f"shaping {dev} with tbf")

    def exec_prefix(self, role: str) -> list[str]:
        return ["ip", "netns", "exec", self.netns[role]]

    def env(self, role: str, base: dict[str, str] | None = None) -> dict[str, str]:
        """Rank ``i`` for client ``i``, the last rank for the server; the store is on client 0."""
        return host_env(base, master_addr=self.addr(0, "client"), port=self.port, node_rank=self.roles.index(role),
                        world_size=len(self.roles), ifname=CLIENT_IF if role != "server" else self.server_if(0),
                        link_env=(LINK_ENV, json.dumps(self.describe())))

    def describe(self) -> dict[str, Any]:
        """Each client link's settings (and, once probed, its ``probe_*`` results), as they go into the run config."""
        clients = [spec.describe() for spec in self.specs]
        for settings, probed in zip(clients, self.probed or []):
            settings.update({f"probe_{k}": v for k, v in probed.items()})
        joined = {"tbf": "a veth pair shaped by tc tbf",
                  "delayline": "a pair of TUN devices, all served by one userspace delay line process"}[self.mode]
        return {"clients": clients, "emulator": self.mode,
                "emulated": f"a network namespace per client, each joined to the server's by {joined}; the "
                            f"server's namespace forwards between the client links"}

    def link_of(self, client: int) -> Any:
        """Client ``client``'s link as a two-host link (``spec``, ``netns``), for :mod:`splitlit.link.probe`."""
        spec = dataclasses.replace(self.specs[client], client_addr=self.addr(client, "client"),
                                   server_addr=self.addr(client, "server"))
        return SimpleNamespace(spec=spec, netns={"client": self.netns[f"client{client}"],
                                                 "server": self.netns["server"]})

    def probe(self, seconds: float = 1.0, tries: int = 3, pings: int = 20) -> list[dict[str, float]]:
        """Each client link's round trip and rates (:func:`~splitlit.link.probe.measure`), one link at a time;
        kept for :meth:`describe` and so the run config."""
        self.probed = [measure(self.link_of(i), seconds, tries, pings) for i in range(len(self.specs))]
        return self.probed

    def counters(self) -> dict[str, dict[str, int]]:
        """Bytes each client's link carried so far, as its own end counts them."""
        out = {}
        for i in range(len(self.specs)):
            text = run(["ip", "-n", self.netns[f"client{i}"], "-s", "-j", "link", "show", "dev", CLIENT_IF],
                       f"reading client {i}'s counters")
            stats = json.loads(text)[0]["stats64"]
            out[f"client{i}"] = {"rx_bytes": int(stats["rx"]["bytes"]), "tx_bytes": int(stats["tx"]["bytes"])}
        return out
