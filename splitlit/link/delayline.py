"""The userspace delay line: a TUN device at each end of each link and one process moving packets between them.

    line = DelayLine([wire(spec, client=(client_ns, "sl-client"), server=(server_ns, "sl-server"))])
    line.start()        # forks; returns once every TUN device exists (address them, bring them up)
    ...
    line.stop()         # {"links": [{"up": {...packets, lost, dropped...}, "down": {...}}], "cpu_s": 0.8, ...}

A :class:`Wire` is one link (two hosts' TUN devices and a queue per direction); one process serves every wire
(the two-host link has one, the many-clients link one per client), so the CPU cost stays one process.

For kernels without ``sch_netem`` (and without ``fq``, so no EDT pacing from BPF either): every IP packet the
client sends to the server leaves through ``sl-client`` (a TUN device), is read by this process, held in the
``up`` :class:`~splitlit.link.delay.DelayQueue` for its serialisation time at the rate plus the one-way delay,
and written into ``sl-server``, where the server's kernel receives it; the ``down`` direction is the mirror.
TCP's acknowledgements cross the same way, so TCP sees the real round trip.

Note: super-packets
    Where the link has no loss (:attr:`~splitlit.link.spec.LinkSpec.offload_active`), the TUN devices take the
    kernel's checksum and TCP segmentation offload: one read carries a TCP super-packet of several segments
    (after a ``virtio_net_hdr``), timed as its segments on the wire (:func:`wire_size`) and written whole, header
    included, into the far device, whose kernel takes it as the segments it stands for. Each device's
    ``gso_max_segs`` keeps one to about 1 ms of the line (:meth:`~splitlit.link.spec.LinkSpec.super_packet_segments`).
    At 100 Mbit/s this cuts the reads from ~7,400 to ~1,000 a second and the CPU from ~36% to ~13% of a core
    (``experiments.bench_delayline``). With loss every packet is read on its own: loss is per packet on the
    wire, and a super-packet would be lost whole.

Note: the process
    It is forked from the launcher (no second Python start, no second import) and sets ``PR_SET_PDEATHSIG``:
    the launcher's death (even ``kill -9``) sends it SIGTERM, on which it removes the link's namespaces itself, so
    a killed launcher leaves nothing behind. The launcher stops it with SIGUSR1 instead (it removes the
    namespaces itself). Checking ``getppid()`` cannot tell the two apart: the death signal comes when the
    launcher's *thread* that forked it exits, and while the launcher's other threads (its output pumps) are
    still dying, the parent is still the launcher. It ignores SIGINT/SIGHUP (the launcher handles those). One
    ``select`` loop over every device: read what is ready (one packet per device per turn), write what is
    due, sleep until the next packet is due. Its CPU time is reported by :meth:`DelayLine.stop`.
    The TUN devices are not persistent: they disappear with the process.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import os
import random
import resource
import select
import signal
import struct
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Any

from splitlit.link.delay import DelayQueue
from splitlit.link.errors import LinkError
from splitlit.link.netns import in_netns, remove_netns
from splitlit.link.spec import DIRECTIONS, ETHERNET_HEADER, LinkSpec

__all__ = ["DelayLine", "Wire", "open_tun", "wire", "wire_size"]

_TUNSETIFF, _TUNSETOFFLOAD = 0x400454CA, 0x400454D0
_IFF_TUN, _IFF_NO_PI, _IFF_VNET_HDR = 0x0001, 0x1000, 0x4000
_TUN_F_CSUM, _TUN_F_TSO4, _TUN_F_TSO6 = 0x01, 0x02, 0x04
_VNET_HDR = struct.Struct("<BBHHHH")  # virtio_net_hdr: flags, gso_type, hdr_len, gso_size, csum_start, csum_offset
_GSO_NONE, _GSO_ECN = 0, 0x80
_PR_SET_PDEATHSIG = 1
_READ_SIZE = 1 << 17  # a GSO super-packet (64 KiB of IP) and its header fit
_READY_TIMEOUT_S = 15.0
_STOP = signal.SIGUSR1  # from the launcher: stop and report
_ORPHANED = signal.SIGTERM  # the launcher's death signal (PR_SET_PDEATHSIG), or anyone's: remove the namespaces


def open_tun(netns: str, ifname: str, *, offload: bool = False) -> int:
    """A non-blocking fd of a new TUN device ``ifname`` (IP packets) created in namespace ``netns``.

    ``offload``: the device takes checksum and TCP segmentation offload (IPv4 and IPv6), so the kernel hands it
    a TCP super-packet of up to 64 KB per read instead of one per segment, and each packet, read or written,
    starts with a ``virtio_net_hdr`` (:data:`_VNET_HDR`) that says how it is segmented; else plain IP packets."""
    flags = _IFF_TUN | _IFF_NO_PI | (_IFF_VNET_HDR if offload else 0)
    with in_netns(netns):  # the device is made in the namespace of the thread that opens it
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH22x", ifname.encode(), flags))
            if offload:
                fcntl.ioctl(fd, _TUNSETOFFLOAD, _TUN_F_CSUM | _TUN_F_TSO4 | _TUN_F_TSO6)
        except OSError as err:
            os.close(fd)
            raise LinkError(f"cannot create the TUN device {ifname} in {netns}: {err}") from err
    return fd


def wire_size(packet: bytes) -> tuple[int, int]:
    """(bytes on the wire, segments) of a packet read with its ``virtio_net_hdr``: one segment unless it is a TCP
    super-packet, whose ``gso_size`` payload per segment each carry a copy of its IP and TCP headers."""
    gso_type, gso_size = packet[1], packet[4] | packet[5] << 8
    ip_bytes = len(packet) - _VNET_HDR.size
    if gso_type & ~_GSO_ECN == _GSO_NONE or not gso_size:
        return ip_bytes, 1
    ip = _VNET_HDR.size
    l4 = ip + ((packet[ip] & 0x0F) * 4 if packet[ip] >> 4 == 4 else 40)  # IPv6: TCP right after the fixed header
    headers = l4 - ip + (packet[l4 + 12] >> 4) * 4
    segments = -(-(ip_bytes - headers) // gso_size)
    return ip_bytes + (segments - 1) * headers, segments


@dataclass
class Wire:
    """One link of the delay line: the client's and the server's TUN device, ``(namespace, interface)`` each, and
    the queue of each direction (``up``: client -> server)."""

    client: tuple[str, str]
    server: tuple[str, str]
    up: DelayQueue
    down: DelayQueue
    offload: bool = False  # the TUN devices take TCP super-packets (see :func:`open_tun`)


def wire(spec: LinkSpec, *, client: tuple[str, str], server: tuple[str, str], name: str = "") -> Wire:
    """The wire of ``spec``'s rates, delay, jitter, loss and queues between two ``(namespace, interface)`` ends.

    ``spec.seed`` seeds each direction's draws (None: fresh ones each run); ``name`` tells the wires of one link
    apart, so that clients with the same seed do not lose the same packets. The TUN devices take super-packets
    where ``spec.offload_active`` (offload asked for, and no loss: loss is per packet on the wire)."""
    seed = random.Random(spec.seed).getrandbits(64)
    queues = {d: DelayQueue(rate_bps=spec.rate(d), delay_s=spec.delay_s, jitter_s=spec.jitter_s, loss=spec.loss,
                            limit_bytes=spec.limit(d), overhead=ETHERNET_HEADER, rng=random.Random(f"{seed}{name}{d}"))
              for d in DIRECTIONS}
    return Wire(client=client, server=server, up=queues["up"], down=queues["down"], offload=spec.offload_active)


class DelayLine:
    """The delay line's process, seen from the launcher: :meth:`start`, :meth:`stop`, :attr:`pid`."""

    def __init__(self, wires: list[Wire]) -> None:
        self.wires = wires
        self.netns = list(dict.fromkeys(ns for w in wires for ns, _ in (w.client, w.server)))  # to remove if orphaned
        self.pid: int | None = None
        self._pipe: int | None = None

    def start(self) -> None:
        """Fork the process; return once every TUN device exists, or raise :class:`LinkError` with its error."""
        read_end, write_end = os.pipe()
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child; its behaviour is tested through the link
            os.close(read_end)
            code = 1
            try:
                code = self._child(write_end, parent)
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        os.close(write_end)
        self.pid, self._pipe = pid, read_end
        line = self._read_line(_READY_TIMEOUT_S)
        if line != "ready":
            self.stop()
            if line.startswith("error: "):
                raise LinkError(line[len("error: "):])
            raise LinkError(f"the delay line did not start ({line or 'no answer in 15 s'}); see its error above.")

    def stop(self) -> dict[str, Any]:
        """Stop the process (SIGUSR1; SIGKILL after 5 s) and return what it did; {} if it died without saying."""
        if self.pid is None:
            return {}
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, _STOP)
        line = self._read_line(5.0)
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)
        os.close(self._pipe)
        self.pid = self._pipe = None
        with contextlib.suppress(ValueError):
            return json.loads(line)
        return {}

    def _read_line(self, timeout: float) -> str:
        data, deadline = b"", time.monotonic() + timeout
        while not data.endswith(b"\n") and time.monotonic() < deadline:
            ready, _, _ = select.select([self._pipe], [], [], max(0.0, deadline - time.monotonic()))
            chunk = os.read(self._pipe, 65536) if ready else b""
            if ready and not chunk:
                break
            data += chunk
        return data.decode(errors="replace").strip()

    # -- the child ----------------------------------------------------------------------------------------------
    def _child(self, pipe: int, parent: int) -> int:  # pragma: no cover - runs in the forked process
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, _ORPHANED)
        for sig in (signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        signal.signal(_STOP, _raise_stop)
        signal.signal(_ORPHANED, _raise_stop)
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        start, cpu0 = time.monotonic(), _cpu_seconds()
        orphaned = False
        try:
            if os.getppid() != parent:
                raise _Stop(_ORPHANED)
            routes = {}
            for w in self.wires:
                client, server = open_tun(*w.client, offload=w.offload), open_tun(*w.server, offload=w.offload)
                routes.update({client: (w.up, server, w.offload), server: (w.down, client, w.offload)})
            os.write(pipe, b"ready\n")
            _serve(routes)
        except _Stop as stop:
            orphaned = stop.signum == _ORPHANED
        except LinkError as err:
            os.write(pipe, f"error: {err}\n".replace("\n", " ").encode() + b"\n")
            return 1
        finally:
            for sig in (_STOP, _ORPHANED):
                signal.signal(sig, signal.SIG_IGN)
        wall, cpu = time.monotonic() - start, _cpu_seconds() - cpu0
        links = [{"up": w.up.stats.as_dict(), "down": w.down.stats.as_dict()} for w in self.wires]
        report = {"links": links, "cpu_s": round(cpu, 3),
                  "wall_s": round(wall, 3), "cpu_pct_of_one_core": round(100 * cpu / max(wall, 1e-9), 2)}
        if orphaned:  # the launcher was killed: remove what it made, and exit
            print(f"splitlit.link: the launcher (pid {parent}) is gone; the delay line removes "
                  f"{', '.join(self.netns)}", file=sys.stderr, flush=True)
            for name in self.netns:
                remove_netns(name)
            return 0
        with contextlib.suppress(OSError):
            os.write(pipe, (json.dumps(report) + "\n").encode())
        return 0


class _Stop(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _raise_stop(signum: int, frame: Any) -> None:
    raise _Stop(signum)


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _serve(routes: dict[int, tuple[DelayQueue, int, bool]]) -> None:  # pragma: no cover - in the forked process
    """Move packets until stopped: each fd's packets go through its queue to its other fd (a super-packet, read
    with its ``virtio_net_hdr``, counted at its segments' bytes on the wire and written with the header).

    A turn reads one packet from each ready device (the next ``select`` returns at once while more wait), so no
    read ends in ``EAGAIN``: raising and dropping that exception each turn cost ~10% of the CPU at 100 Mbit/s."""
    fds = list(routes)
    queues = [(queue, out) for queue, out, _ in routes.values()]
    clock, read, write, wait = time.monotonic, os.read, os.write, select.select
    while True:
        first = None  # the next packet due anywhere: when to wake if nothing arrives
        for queue, _ in queues:
            due = queue.next_due()
            if due is not None and (first is None or due < first):
                first = due
        readable, _, _ = wait(fds, (), (), None if first is None else max(0.0, first - clock()))
        now = clock()
        for fd in readable:
            queue, _, offload = routes[fd]
            try:
                packet = read(fd, _READ_SIZE)
            except BlockingIOError:
                continue
            if offload:
                size, segments = wire_size(packet)
                queue.push(packet, now, size=size, segments=segments)
            else:
                queue.push(packet, now)
        now = clock()
        for queue, out in queues:
            for packet in queue.pop_due(now):
                try:
                    write(out, packet)
                except OSError:  # the far device went away (the namespace is being removed)
                    queue.stats.dropped += 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit("splitlit.link.delayline is started by `python -m splitlit.link`, not on its own.")
