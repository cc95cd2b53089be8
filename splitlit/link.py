"""Two hosts on one machine: run a client/server job over an emulated, bandwidth-limited link.

    sudo python -m splitlit.link --bandwidth 100mbit -- \\
        python -m experiments.cifar10_mobilenet fit --config experiments/configs/cifar10_small.yaml

What the command does, in order:

1. two network namespaces, the client's and the server's "host", joined by a veth pair; the client's end is
   ``sl-client`` with 10.77.0.1, the server's ``sl-server`` with 10.77.0.2 (these addresses exist only inside
   the two namespaces, which have no route anywhere else);
2. ``tc tbf`` at ``--bandwidth`` on both ends (each direction is shaped where it leaves), so the client -> server
   and the server -> client directions each carry at most that rate, like a full-duplex line;
3. a short TCP probe of the throughput each way (``--probe-seconds``; 0 skips it);
4. the command twice, once in each namespace, through the multi-host path: ``NODE_RANK`` 0 (client) or 1
   (server), ``LOCAL_RANK=0``, ``WORLD_SIZE=2``, ``MASTER_ADDR`` = the client's address, ``GLOO_SOCKET_IFNAME``
   = that namespace's end of the pair, and ``SPLITLIT_LINK_JSON`` = the link's settings and the probe's result,
   which :mod:`experiments.cli` records in the run config (W&B config and ``run.json``). A LightningCLI command
   (one naming ``fit``, ``validate``, ``test`` or ``predict``) gets ``--trainer.num_nodes 2 --trainer.devices 1``
   appended; any other script must build ``Trainer(num_nodes=2, devices=1)`` itself. Output lines are prefixed
   ``[client]`` / ``[server]``;
5. removes both namespaces, and with them the veth pair and its qdiscs, when the job ends, fails or is
   interrupted (SIGINT, SIGTERM, SIGHUP): the ranks are stopped first. A ``kill -9`` of this command itself leaves
   them behind; ``python -m splitlit.link --cleanup`` removes those of runs that are gone.

Latency: ``--delay`` adds a one-way delay on each end with ``netem`` where the kernel has it. Kernels without
``sch_netem`` (like the one these experiments were run on) cannot delay packets with ``tc`` at all (``fq``, which
could pace by timestamp, is missing too), so there ``--delay`` fails with a clear error and only the bandwidth is
emulated: the round trip is the veth's, tens of microseconds.

Needs Linux, root (or CAP_NET_ADMIN + CAP_SYS_ADMIN) and iproute2's ``ip`` and ``tc``.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import itertools
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

__all__ = ["LINK_ENV", "LinkError", "LinkSpec", "ShapedLink", "interface_bytes", "main", "parse_delay",
           "parse_rate", "remove_stale_links", "run_two_hosts"]

LINK_ENV = "SPLITLIT_LINK_JSON"  # read by experiments.cli into the run config
ROLES = ("client", "server")
NODE_RANK = {"client": 0, "server": 1}
IFNAME = {"client": "sl-client", "server": "sl-server"}
NS_PREFIX = "splitlit-link-"
CLI_SUBCOMMANDS = ("fit", "validate", "test", "predict")
_NS_PATTERN = re.compile(rf"^{re.escape(NS_PREFIX)}(\d+)-\d+-(client|server)$")
_RATE_UNITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9, "tbit": 10**12}
_TIME_UNITS = {"us": 1e-6, "usec": 1e-6, "ms": 1e-3, "msec": 1e-3, "s": 1.0, "sec": 1.0}
_CLONE_NEWNET = 0x40000000
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_counter = itertools.count()


class LinkError(RuntimeError):
    """The link cannot be set up: missing privileges or tools, a bad setting, a qdisc the kernel lacks."""


# -- settings ---------------------------------------------------------------------------------------------------
def parse_rate(text: str) -> int:
    """``"100mbit"`` -> 100_000_000 bits per second (tc's decimal units: bit, kbit, mbit, gbit, tbit)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]+)\s*", str(text))
    unit = match.group(2).lower() if match else ""
    if not match or unit not in _RATE_UNITS:
        raise LinkError(f"--bandwidth {text!r}: give a rate in bits per second with tc's units "
                        f"{'/'.join(_RATE_UNITS)}, e.g. 100mbit or 1gbit (tc's 'mbps' means megaBYTES per second, "
                        f"so it is refused here to avoid an 8x mistake).")
    bps = int(float(match.group(1)) * _RATE_UNITS[unit])
    if bps < 8_000:
        raise LinkError(f"--bandwidth {text!r} is {bps} bit/s: give at least 8kbit.")
    return bps


def parse_delay(text: str | None) -> float:
    """``"20ms"`` -> 0.02 seconds (us, ms or s); None or "0" -> 0."""
    if text in (None, "", "0"):
        return 0.0
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-z]+)\s*", str(text))
    if not match or match.group(2) not in _TIME_UNITS:
        raise LinkError(f"--delay {text!r}: give a duration such as 20ms, 500us or 0.1s.")
    return float(match.group(1)) * _TIME_UNITS[match.group(2)]


def _rate_text(bps: int) -> str:
    for unit, scale in sorted(_RATE_UNITS.items(), key=lambda kv: -kv[1]):
        if bps % scale == 0:
            return f"{bps // scale}{unit}"
    return f"{bps}bit"


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
                "bandwidth": _rate_text(self.bandwidth_bps), "rate_mbit": self.bandwidth_bps / 1e6,
                "qdisc": "netem+tbf" if self.delay_s else "tbf", "burst_bytes": self.burst,
                "queue_ms": self.queue_s * 1e3, "delay_ms": self.delay_s * 1e3 if self.delay_s else None,
                "latency": f"{2 * self.delay_s * 1e3:g} ms round trip added (netem)" if self.delay_s
                else "not emulated (veth round trip, ~0.05 ms)",
                "mtu": self.mtu, "client_addr": self.client_addr, "server_addr": self.server_addr,
                "client_ifname": IFNAME["client"], "server_ifname": IFNAME["server"]}


# -- requirements -----------------------------------------------------------------------------------------------
def check_requirements() -> None:
    """Raise :class:`LinkError` saying what is missing: Linux, root, ``ip`` or ``tc``."""
    if not sys.platform.startswith("linux"):
        raise LinkError(f"splitlit.link needs Linux network namespaces; this is {sys.platform}. Run the two ranks "
                        f"on two hosts instead (see the README's two-host recipe).")
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        raise LinkError(f"splitlit.link needs iproute2's `ip` and `tc` commands; not found on PATH: "
                        f"{', '.join(missing)}. Install iproute2 (e.g. apt-get install iproute2).")
    if os.geteuid() != 0:
        raise LinkError(f"splitlit.link needs root to create network namespaces and shape them with tc "
                        f"(`ip netns add`, `ip link add ... type veth`, `tc qdisc add ... tbf`); running as uid "
                        f"{os.geteuid()}. Run it with sudo (sudo -E env PATH=\"$PATH\" python -m splitlit.link ...) "
                        f"or in a container with CAP_NET_ADMIN and CAP_SYS_ADMIN.")


def _run(cmd: Sequence[str], what: str) -> str:
    result = subprocess.run(list(cmd), capture_output=True, text=True)
    if result.returncode != 0:
        raise LinkError(f"{what} failed: `{shlex.join(cmd)}` exited {result.returncode}: "
                        f"{(result.stderr or result.stdout).strip()}")
    return result.stdout


# -- the link ---------------------------------------------------------------------------------------------------
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
            _run(["ip", "netns", "add", ns[role]], f"creating network namespace {ns[role]}")
            self._made.append(ns[role])
        # Both ends are created inside their namespaces: no interface ever appears on the host.
        _run(["ip", "link", "add", IFNAME["client"], "netns", ns["client"], "mtu", str(spec.mtu), "type", "veth",
              "peer", "name", IFNAME["server"], "netns", ns["server"], "mtu", str(spec.mtu)], "creating the veth pair")
        for role in ROLES:
            ip = ["ip", "-n", ns[role]]
            _run(ip + ["addr", "add", f"{spec.addr(role)}/30", "dev", IFNAME[role]], f"addressing {IFNAME[role]}")
            _run(ip + ["link", "set", "lo", "up"], f"bringing up lo in {ns[role]}")
            _run(ip + ["link", "set", IFNAME[role], "up"], f"bringing up {IFNAME[role]}")
            self._shape(role)

    def _shape(self, role: str) -> None:
        spec, dev = self.spec, ["dev", IFNAME[role]]
        tc = ["tc", "-n", self.netns[role], "qdisc", "add", *dev]
        tbf = ["tbf", "rate", f"{spec.bandwidth_bps}bit", "burst", str(spec.burst),
               "latency", f"{spec.queue_s * 1e3:g}ms"]
        if not spec.delay_s:
            _run(tc + ["root", "handle", "1:", *tbf], f"shaping {IFNAME[role]} with tbf")
            return
        result = subprocess.run(tc + ["root", "handle", "1:", "netem", "delay", f"{spec.delay_s * 1e6:.0f}us"],
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise LinkError(f"--delay needs tc's netem qdisc, which this kernel lacks or refused "
                            f"({result.stderr.strip()}). Latency cannot be emulated here: leave --delay out "
                            f"(only the bandwidth is then shaped).")
        _run(tc + ["parent", "1:1", "handle", "10:", *tbf], f"shaping {IFNAME[role]} with tbf under netem")

    def close(self) -> None:
        """Stop whatever still runs in the namespaces, then delete them (the veth pair and qdiscs go with them)."""
        # A second Ctrl-C must not cut the clean-up short: signals wait until it is done.
        held = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            for name in reversed(self._made):
                _remove_netns(name)
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
            text = _run(["ip", "-n", self.netns[role], "-s", "-j", "link", "show", "dev", IFNAME[role]],
                        f"reading {IFNAME[role]}'s counters")
            stats = json.loads(text)[0]["stats64"]
            out[role] = {"rx_bytes": int(stats["rx"]["bytes"]), "tx_bytes": int(stats["tx"]["bytes"])}
        return out

    def probe(self, seconds: float = 1.0, tries: int = 3) -> dict[str, float]:
        """Measure the throughput of one TCP stream each way, about ``seconds`` each at the nominal rate.

        A short stream can lose a large part of its time to one stall (a retransmission timeout after a drop at
        the shaper's queue, the host scheduling something else), which says nothing about the link's rate. So a
        direction whose stream delivers under 90% of the nominal rate is measured again, up to ``tries``
        streams, and the best is kept (a stall only ever lowers the rate; the shaper caps it).
        """
        if isinstance(tries, bool) or not isinstance(tries, int) or tries < 1:
            raise ValueError(f"probe(tries={tries!r}): give at least 1 try.")
        nbytes = max(16 * 1024, int(self.spec.bandwidth_bps / 8 * seconds))
        enough = 0.9 * self.spec.bandwidth_bps / 1e6
        rates = {}
        for sender, receiver, key in (("client", "server", "up_mbit"), ("server", "client", "down_mbit")):
            best = 0.0
            for _ in range(tries):
                best = max(best, self._stream(sender, receiver, nbytes, seconds))
                if best >= enough:
                    break
            rates[key] = round(best, 2)
        self.probed = {**rates, "bytes": nbytes}
        return self.probed

    def _stream(self, sender: str, receiver: str, nbytes: int, seconds: float) -> float:
        limit = 10 + 20 * seconds
        with contextlib.ExitStack() as sockets:
            with _in_netns(self.netns[receiver]):
                server = sockets.enter_context(socket.create_server((self.spec.addr(receiver), 0)))
            with _in_netns(self.netns[sender]):
                client = sockets.enter_context(socket.create_connection(
                    (self.spec.addr(receiver), server.getsockname()[1]), timeout=limit))
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


@contextlib.contextmanager
def _in_netns(name: str) -> Iterator[None]:
    """Sockets created in this block belong to namespace ``name`` (switches this thread only)."""
    libc = ctypes.CDLL(None, use_errno=True)
    with open("/proc/thread-self/ns/net") as home, open(f"/run/netns/{name}") as target:
        if libc.setns(target.fileno(), _CLONE_NEWNET) != 0:
            raise LinkError(f"cannot enter network namespace {name}: {os.strerror(ctypes.get_errno())}")
        try:
            yield
        finally:
            if libc.setns(home.fileno(), _CLONE_NEWNET) != 0:  # pragma: no cover - cannot happen as root
                raise LinkError(f"cannot return from network namespace {name}")


def _remove_netns(name: str) -> None:
    pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout.split()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = [int(p) for p in pids if _signal(int(p), sig)]
        deadline = time.monotonic() + 5
        while alive and time.monotonic() < deadline:
            alive = [p for p in alive if _alive(p)]
            time.sleep(0.05)
        if not alive:
            break
        pids = [str(p) for p in alive]
    subprocess.run(["ip", "netns", "del", name], capture_output=True)


def _signal(pid: int, sig: int) -> bool:
    try:
        os.kill(pid, sig)
        return True
    except ProcessLookupError:
        return False


def _alive(pid: int) -> bool:
    try:
        waited, _ = os.waitpid(pid, os.WNOHANG)  # reap our own children, or they stay zombies
        if waited:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    return False


def remove_stale_links() -> list[str]:
    """Delete the namespaces of splitlit.link runs whose process no longer exists; returns their names."""
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split("\n")
    removed = []
    for line in listed:
        name = line.split(" ")[0]
        match = _NS_PATTERN.match(name)
        if match and not Path(f"/proc/{match.group(1)}").exists():
            _remove_netns(name)
            removed.append(name)
    return removed


def interface_bytes(ifname: str) -> tuple[int, int]:
    """(received, sent) bytes of ``ifname`` in this process's network namespace, from ``/proc/net/dev``."""
    for line in Path("/proc/net/dev").read_text().splitlines()[2:]:
        name, _, values = line.partition(":")
        if name.strip() == ifname:
            fields = values.split()
            return int(fields[0]), int(fields[8])
    raise LinkError(f"no interface {ifname!r} in this network namespace (is this process on the shaped link?).")


# -- the job ----------------------------------------------------------------------------------------------------
@dataclass
class JobResult:
    """Exit codes (negative: killed by that signal) and what happened."""

    client: int | None = None
    server: int | None = None
    seconds: float = 0.0
    note: str = ""

    @property
    def returncode(self) -> int:
        for code in (self.client, self.server):
            if code:
                return code if code > 0 else 128 - code
        return 0 if self.client == 0 and self.server == 0 else 1


class _Interrupted(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def with_trainer_args(command: list[str]) -> list[str]:
    """A LightningCLI command gets ``--trainer.num_nodes 2 --trainer.devices 1``; other commands are unchanged."""
    if not any(arg in CLI_SUBCOMMANDS for arg in command) or any(
            a.startswith(("--trainer.num_nodes", "--trainer.devices")) for a in command):
        return command
    return [*command, "--trainer.num_nodes", "2", "--trainer.devices", "1"]


def run_two_hosts(link: ShapedLink, command: list[str], *, grace: float = 900.0, out: TextIO | None = None,
                  env: dict[str, str] | None = None) -> JobResult:
    """Run ``command`` on both hosts of ``link`` (client first); stop both if interrupted.

    When one rank exits with an error the other is given ``grace`` seconds to notice (the strategy's timeout
    makes it fail with a clear error) before it is stopped.
    """
    out = out or sys.stdout
    result = JobResult()
    start = time.monotonic()
    procs: dict[str, subprocess.Popen] = {}
    pumps = []
    try:
        for role in ROLES:
            procs[role] = subprocess.Popen(link.exec_prefix(role) + command, env=link.env(role, env),
                                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                           errors="replace", start_new_session=True)
            pump = threading.Thread(target=_pump, args=(procs[role].stdout, f"[{role}] ", out), daemon=True)
            pump.start()
            pumps.append(pump)
        deadline = None
        while any(p.poll() is None for p in procs.values()):
            failed = [r for r, p in procs.items() if p.returncode not in (None, 0)]
            if failed and deadline is None:
                deadline = time.monotonic() + grace
            if deadline is not None and time.monotonic() > deadline:
                late = [r for r, p in procs.items() if p.poll() is None]
                result.note = (f"the {failed[0]} exited {procs[failed[0]].returncode}; the {late[0]} was still "
                               f"running {grace:g} s later and was stopped")
                _stop(procs)
            time.sleep(0.1)
    except _Interrupted as err:
        result.note = f"interrupted by {err}: both ranks stopped"
        _stop(procs)
        raise
    except BaseException:
        _stop(procs)
        raise
    finally:
        for pump in pumps:
            pump.join(5)
        result.client = procs["client"].returncode if "client" in procs else None
        result.server = procs["server"].returncode if "server" in procs else None
        result.seconds = time.monotonic() - start
    return result


def _pump(stream: TextIO, prefix: str, out: TextIO) -> None:
    for line in stream:
        out.write(prefix + line if line.endswith("\n") else prefix + line + "\n")
        out.flush()


def _stop(procs: dict[str, subprocess.Popen]) -> None:
    """SIGTERM to each rank's process group, SIGKILL to what is left 10 s later."""
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        running = [p for p in procs.values() if p.poll() is None]
        for p in running:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, sig)
        deadline = time.monotonic() + wait
        while any(p.poll() is None for p in running) and time.monotonic() < deadline:
            time.sleep(0.05)


# -- the command ------------------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m splitlit.link", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run a two-rank job (client and server) as two hosts on this machine, joined by a shaped link.",
        epilog="example:\n  sudo python -m splitlit.link --bandwidth 100mbit -- "
               "python -m experiments.cifar10_mobilenet fit --config experiments/configs/cifar10_small.yaml")
    parser.add_argument("--bandwidth", help="rate of each direction, tc units: 100mbit, 1gbit, 500kbit")
    parser.add_argument("--delay", default=None,
                        help="one-way delay added on each end, e.g. 10ms (needs the netem qdisc; absent here)")
    parser.add_argument("--mtu", type=int, default=1500, help="MTU of the veth pair (default 1500)")
    parser.add_argument("--burst", type=int, default=None, help="tbf bucket in bytes (default max(32 KiB, 2 ms))")
    parser.add_argument("--queue-ms", type=float, default=50.0, help="tbf queue, in ms at the rate (default 50)")
    parser.add_argument("--port", type=int, default=29500, help="MASTER_PORT (the namespaces are private)")
    parser.add_argument("--probe-seconds", type=float, default=1.0,
                        help="bandwidth probe per direction before the job, seconds at the nominal rate (0: none)")
    parser.add_argument("--grace", type=float, default=900.0,
                        help="seconds the other rank gets to exit after one fails (default 900)")
    parser.add_argument("--stats", type=Path, help="write the settings, probe, interface counters and exit codes "
                                                   "here (JSON)")
    parser.add_argument("--no-trainer-args", action="store_true",
                        help="do not append --trainer.num_nodes 2 --trainer.devices 1 to a LightningCLI command")
    parser.add_argument("--cleanup", action="store_true",
                        help="remove namespaces left by splitlit.link runs that were killed, then exit")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[argv.index("--") + 1:] if "--" in argv else []
    parser = _parser()
    args = parser.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    try:
        if args.cleanup:
            check_requirements()
            removed = remove_stale_links()
            print(f"splitlit.link: removed {len(removed)} stale namespaces" + (f": {', '.join(removed)}" if removed
                                                                                else ""))
            return 0
        if not args.bandwidth or not command:
            parser.error("give --bandwidth and the command after --, e.g. --bandwidth 100mbit -- python -m ...")
        spec = LinkSpec(bandwidth_bps=parse_rate(args.bandwidth), delay_s=parse_delay(args.delay), mtu=args.mtu,
                        queue_s=args.queue_ms / 1e3, burst_bytes=args.burst)
        if not args.no_trainer_args:
            command = with_trainer_args(command)
        return _run_job(spec, command, args)
    except LinkError as err:
        print(f"splitlit.link: {err}", file=sys.stderr)
        return 2


def _run_job(spec: LinkSpec, command: list[str], args: argparse.Namespace) -> int:
    def interrupt(signum: int, frame: Any) -> None:
        raise _Interrupted(signum)

    previous = {s: signal.signal(s, interrupt) for s in _STOP_SIGNALS}
    result = JobResult()
    stats: dict[str, Any] = {"command": command}
    try:
        with ShapedLink(spec, port=args.port) as link:
            if args.probe_seconds > 0:
                probed = link.probe(args.probe_seconds)
                print(f"splitlit.link: {link.spec.describe()['bandwidth']} each way; probe: client -> server "
                      f"{probed['up_mbit']:.1f} Mbit/s, server -> client {probed['down_mbit']:.1f} Mbit/s", flush=True)
            print(f"splitlit.link: client {spec.client_addr} ({link.netns['client']}), server {spec.server_addr} "
                  f"({link.netns['server']}); running: {shlex.join(command)}", flush=True)
            stats["link"] = link.describe()
            before = link.counters()
            try:
                result = run_two_hosts(link, command, grace=args.grace)
            finally:
                after = link.counters()
                stats["counters"] = {r: {k: after[r][k] - before[r][k] for k in after[r]} for r in ROLES}
    except _Interrupted as err:
        print(f"splitlit.link: interrupted by {err}; both ranks stopped and the link removed.", file=sys.stderr)
        return 128 + err.signum
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if args.stats:
            stats.update(exit={"client": result.client, "server": result.server}, seconds=round(result.seconds, 3),
                         note=result.note)
            args.stats.parent.mkdir(parents=True, exist_ok=True)
            args.stats.write_text(json.dumps(stats, indent=1) + "\n")
    summary = f"splitlit.link: client exited {result.client}, server exited {result.server} in {result.seconds:.1f} s"
    print(summary + (f" ({result.note})" if result.note else ""), file=sys.stderr if result.returncode else sys.stdout,
          flush=True)
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
