"""Network namespace plumbing: the requirements, running ``ip``/``tc``, entering a namespace, removing one."""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from splitlit.link.errors import LinkError

__all__ = ["NS_PREFIX", "STOP_SIGNALS", "Namespaces", "check_requirements", "host_env", "in_netns", "interface_bytes",
           "point_to_point", "remove_all", "remove_netns", "remove_stale_links", "run"]

NS_PREFIX = "splitlit-link-"
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_NS_PATTERN = re.compile(rf"^{re.escape(NS_PREFIX)}(\d+)-\d+-(client\d*|server)$")
_CLONE_NEWNET = 0x40000000


def check_requirements(*, tun: bool = False) -> None:
    """Raise :class:`LinkError` saying what is missing: Linux, root, ``ip``, ``tc``, or (``tun``) ``/dev/net/tun``."""
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
    if tun and not os.path.exists("/dev/net/tun"):
        raise LinkError("the delay line (--delay, --jitter, --loss) needs /dev/net/tun, which this machine lacks: "
                        "load the tun module (modprobe tun) or, in a container, pass the device (docker run "
                        "--device /dev/net/tun --cap-add NET_ADMIN).")


def run(cmd: Sequence[str], what: str) -> str:
    """Run an ``ip``/``tc`` command; a failure is a :class:`LinkError` saying what was being done."""
    result = subprocess.run(list(cmd), capture_output=True, text=True)
    if result.returncode != 0:
        raise LinkError(f"{what} failed: `{shlex.join(cmd)}` exited {result.returncode}: "
                        f"{(result.stderr or result.stdout).strip()}")
    return result.stdout


@contextlib.contextmanager
def in_netns(name: str) -> Iterator[None]:
    """Sockets (and TUN devices) created in this block belong to namespace ``name`` (switches this thread only)."""
    libc = ctypes.CDLL(None, use_errno=True)
    with open("/proc/thread-self/ns/net") as home, open(f"/run/netns/{name}") as target:
        if libc.setns(target.fileno(), _CLONE_NEWNET) != 0:
            raise LinkError(f"cannot enter network namespace {name}: {os.strerror(ctypes.get_errno())}")
        try:
            yield
        finally:
            if libc.setns(home.fileno(), _CLONE_NEWNET) != 0:  # pragma: no cover - cannot happen as root
                raise LinkError(f"cannot return from network namespace {name}")


def remove_netns(name: str) -> None:
    """Stop every process in namespace ``name`` (SIGTERM, then SIGKILL after 5 s), then delete it."""
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
            remove_netns(name)
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


def remove_all(names: list[str]) -> None:
    """Delete the namespaces ``names`` (last made first); a second Ctrl-C waits until the clean-up is done."""
    held = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        for name in reversed(names):
            remove_netns(name)
        names.clear()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


def point_to_point(netns: str, ifname: str, *, addr: str, peer: str, mtu: int, gso_max_segs: int | None) -> None:
    """Address a delay line's TUN device ``ifname`` as one end of a point-to-point link to ``peer`` and bring it up;
    ``gso_max_segs``: the most segments of a TCP super-packet it takes (None: it takes none, offload is off)."""
    ip = ["ip", "-n", netns]
    run(ip + ["addr", "add", f"{addr}/32", "peer", f"{peer}/32", "dev", ifname], f"addressing {ifname} in {netns}")
    segs = ["gso_max_segs", str(gso_max_segs)] if gso_max_segs else []
    run(ip + ["link", "set", ifname, "mtu", str(mtu), "txqueuelen", "1000", *segs, "up"],
        f"bringing up {ifname} in {netns}" + (" (if `gso_max_segs` is refused, this kernel or iproute2 is too old "
                                              "for super-packets: give --no-offload)" if segs else ""))


def host_env(base: dict[str, str] | None, *, master_addr: str, port: int, node_rank: int, world_size: int,
             ifname: str, link_env: tuple[str, str]) -> dict[str, str]:
    """The environment of one host's rank: the multi-host variables, gloo's interface and the link settings."""
    env = dict(os.environ if base is None else base)
    for key in ("RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "TORCHELASTIC_RUN_ID", "SLURM_NTASKS", "SLURM_JOB_ID"):
        env.pop(key, None)  # another cluster environment would take precedence over NODE_RANK
    env.update({"MASTER_ADDR": master_addr, "MASTER_PORT": str(port), "NODE_RANK": str(node_rank),
                "LOCAL_RANK": "0", "WORLD_SIZE": str(world_size), "GLOO_SOCKET_IFNAME": ifname,
                link_env[0]: link_env[1]})
    return env


class Namespaces:
    """Base of the links: a context manager that builds its namespaces on enter and removes them all on exit (or
    when building fails half-way). Subclasses call ``super().__init__()`` and give ``_create`` (recording each
    namespace in ``_made`` as it is made, and the delay line, if any, in ``delayline``) and ``tun`` (whether the
    link needs ``/dev/net/tun``)."""

    tun = False

    def __init__(self) -> None:
        self._made: list[str] = []  # the namespaces made so far, removed (last first) by :meth:`close`
        self.delayline = None  # a DelayLine: stopped (its report kept in ``delayline_report``) before they go
        self.delayline_report: dict = {}

    def __enter__(self):  # noqa: ANN204 - the subclass
        check_requirements(tun=self.tun)
        remove_stale_links()  # what a killed launcher left behind (its pid is gone) goes first
        try:
            self._create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _create(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Stop the delay line (its report goes to ``delayline_report``), then remove the namespaces, and with them
        whatever still runs in them, the interfaces and the qdiscs."""
        # A second Ctrl-C must not cut the clean-up short: signals wait until it is done.
        held = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            if self.delayline is not None:
                self.delayline_report = self.delayline.stop()
                self.delayline = None
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
        remove_all(self._made)
