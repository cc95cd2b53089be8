"""The shaped link: two namespaces joined by a veth pair, shaped with ``tc``; removed again on exit."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
from typing import Any

from splitlit.link.errors import LinkError
from splitlit.link.netns import NS_PREFIX, check_requirements, remove_netns, run
from splitlit.link.probe import probe_rates
from splitlit.link.spec import IFNAME, NODE_RANK, ROLES, LinkSpec

__all__ = ["LINK_ENV", "STOP_SIGNALS", "ShapedLink"]

LINK_ENV = "SPLITLIT_LINK_JSON"  # read by experiments.cli into the run config
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_counter = itertools.count()


class ShapedLink:
    """Two namespaces joined by a shaped veth pair; a context manager that removes all it made on exit.

        with ShapedLink(LinkSpec(bandwidth_bps=100_000_000)) as link:
            link.probe(seconds=1.0)            # {"up_mbit": 95.8, "down_mbit": 95.9, ...}
            subprocess.run(link.exec_prefix("client") + ["python", "..."], env=link.env("client"))

    Namespace names: ``splitlit-link-<pid>-<n>-client`` / ``-server``.
    """

    def __init__(self, spec: LinkSpec, *, port: int = 29500) -> None:
        self.spec = spec
        self.port = port
        stem = f"{NS_PREFIX}{os.getpid()}-{next(_counter)}"
        self.netns = {role: f"{stem}-{role}" for role in ROLES}
        self.probed: dict[str, float] | None = None
        self._made: list[str] = []

    # set-up and tear-down
    def __enter__(self) -> ShapedLink:
        check_requirements()
        try:
            self._create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _create(self) -> None:
        spec, ns = self.spec, self.netns
        for role in ROLES:
            run(["ip", "netns", "add", ns[role]], f"creating network namespace {ns[role]}")
            self._made.append(ns[role])
        # Both ends are created inside their namespaces: no interface ever appears on the host.
        run(["ip", "link", "add", IFNAME["client"], "netns", ns["client"], "mtu", str(spec.mtu), "type", "veth",
             "peer", "name", IFNAME["server"], "netns", ns["server"], "mtu", str(spec.mtu)], "creating the veth pair")
        for role in ROLES:
            ip = ["ip", "-n", ns[role]]
            run(ip + ["addr", "add", f"{spec.addr(role)}/30", "dev", IFNAME[role]], f"addressing {IFNAME[role]}")
            run(ip + ["link", "set", "lo", "up"], f"bringing up lo in {ns[role]}")
            run(ip + ["link", "set", IFNAME[role], "up"], f"bringing up {IFNAME[role]}")
            self._shape(role)

    def _shape(self, role: str) -> None:
        spec, dev = self.spec, ["dev", IFNAME[role]]
        tc = ["tc", "-n", self.netns[role], "qdisc", "add", *dev]
        tbf = ["tbf", "rate", f"{spec.bandwidth_bps}bit", "burst", str(spec.burst),
               "latency", f"{spec.queue_s * 1e3:g}ms"]
        if not spec.delay_s:
            run(tc + ["root", "handle", "1:", *tbf], f"shaping {IFNAME[role]} with tbf")
            return
        result = subprocess.run(tc + ["root", "handle", "1:", "netem", "delay", f"{spec.delay_s * 1e6:.0f}us"],
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise LinkError(f"--delay needs tc's netem qdisc, which this kernel lacks or refused "
                            f"({result.stderr.strip()}). Latency cannot be emulated here: leave --delay out "
                            f"(only the bandwidth is then shaped).")
        run(tc + ["parent", "1:1", "handle", "10:", *tbf], f"shaping {IFNAME[role]} with tbf under netem")

    def close(self) -> None:
        """Stop whatever still runs in the namespaces, then delete them (the veth pair and qdiscs go with them)."""
        # A second Ctrl-C must not cut the clean-up short: signals wait until it is done.
        held = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            for name in reversed(self._made):
                remove_netns(name)
            self._made = []
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)

    # using it
    def exec_prefix(self, role: str) -> list[str]:
        """Prefix that runs a command on ``role``'s host."""
        return ["ip", "netns", "exec", self.netns[role]]

    def env(self, role: str, base: dict[str, str] | None = None) -> dict[str, str]:
        """The environment of ``role``'s rank: the multi-host variables, gloo's interface and the link settings."""
        env = dict(os.environ if base is None else base)
        for key in ("RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "TORCHELASTIC_RUN_ID", "SLURM_NTASKS", "SLURM_JOB_ID"):
            env.pop(key, None)  # another cluster environment would take precedence over NODE_RANK
        env.update({"MASTER_ADDR": self.spec.client_addr, "MASTER_PORT": str(self.port),
                    "NODE_RANK": str(NODE_RANK[role]), "LOCAL_RANK": "0", "WORLD_SIZE": "2",
                    "GLOO_SOCKET_IFNAME": IFNAME[role], LINK_ENV: json.dumps(self.describe())})
        return env

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

    def probe(self, seconds: float = 1.0, tries: int = 3) -> dict[str, float]:
        """Measure the link each way (see :func:`splitlit.link.probe.probe_rates`); kept for :meth:`describe`."""
        self.probed = probe_rates(self, seconds, tries)
        return self.probed
