"""The delay line's CPU while its link is full: one TCP stream through a two-host delay line, timed.

    sudo python -m experiments.bench_delayline --bandwidth 100mbit --delay 25ms --seconds 3

prints the stream's rate, the delay line's CPU seconds over the stream's wall seconds (its exact on-CPU time from
``/proc/<pid>/schedstat``, so the link's setup and idle time are left out) and per packet read, e.g. (2 loaded
cores)::

    100mbit, 25 ms one way, MTU 1500, offload on: 95.7 Mbit/s; delay line 0.45 s of CPU in 3.49 s (12.9% of one
    core: 6.6% user, 6.0% system); 3565 reads up, 3103 down (68 us of CPU per read); up 25901 segments on the wire

and with ``--no-offload`` (one read per packet) 36-37% of one core. The goal (issue 19): under 5% of one core at
100 Mbit/s. Keep ``--seconds`` short on a shared machine.

Part of that time is not the delay line's own work: a write into a TUN device runs the receiving host's IP and TCP
in the writer's time, work that a veth pair does too, in its softirq, charged to whoever runs then. ``--compare``
also streams the same bytes over a ``tc tbf`` veth pair at the same rate, alternating the two links ``--repeats``
times, and prints the machine's busy CPU during each stream (every core's time less its idle time, from
``/proc/stat``): the delay line's added CPU is the difference of the medians. Run it on an otherwise idle machine:
``/proc/stat`` counts everyone's work.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

from splitlit.link import LinkSpec, ShapedLink, parse_delay, parse_rate
from splitlit.link.probe import stream_rate
from splitlit.link.units import parse_percent

__all__ = ["main"]


def cpu_seconds(pid: int) -> tuple[float, float, float]:
    """(on-CPU, user, system) seconds of process ``pid`` so far: the scheduler's exact runtime
    (``/proc/<pid>/schedstat``, ns) and the tick-sampled user/system split (``/proc/<pid>/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    runtime = int(Path(f"/proc/{pid}/schedstat").read_text().split()[0]) / 1e9
    return runtime, int(fields[11]) / tick, int(fields[12]) / tick


def machine_idle_seconds() -> tuple[float, int]:
    """Seconds every core of the machine has been idle so far, and the number of cores (``/proc/stat``: idle and
    iowait, which the kernel counts exactly on a tickless machine, where busy time is only sampled at each tick and
    misses short wake-ups)."""
    lines = Path("/proc/stat").read_text().split("\n")
    fields = [int(v) for v in lines[0].split()[1:]]
    cores = sum(1 for line in lines if line.startswith("cpu") and line[3:4].isdigit())
    return (fields[3] + fields[4]) / os.sysconf("SC_CLK_TCK"), cores


def stream(spec: LinkSpec, seconds: float) -> dict[str, float]:
    """One TCP stream of ``seconds`` at the rate through a link of ``spec``: its rate, wall time, the machine's busy
    CPU seconds and (delay line only) the delay line's on-CPU, user and system seconds and its report."""
    nbytes = int(spec.bandwidth / 8 * seconds)
    with ShapedLink(spec) as link:
        pid = link.delayline.pid if link.tun else None
        cpu0, (idle0, cores), wall0 = cpu_seconds(pid) if pid else (0.0,) * 3, machine_idle_seconds(), time.monotonic()
        rate = stream_rate(link, "client", "server", nbytes, seconds)
        wall = time.monotonic() - wall0
        busy = cores * wall - (machine_idle_seconds()[0] - idle0)
        after = cpu_seconds(pid) if pid else (0.0,) * 3
    cpu, user, system = (b - a for a, b in zip(cpu0, after))
    return {"rate": rate, "wall": wall, "busy": busy, "cpu": cpu, "user": user, "system": system,
            "report": link.delayline_report["links"][0] if pid else {}}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.bench_delayline", description=__doc__.split("\n")[0])
    parser.add_argument("--bandwidth", default="100mbit")
    parser.add_argument("--delay", default="25ms")
    parser.add_argument("--loss", default=None)
    parser.add_argument("--mtu", type=int, default=1500)
    parser.add_argument("--seconds", type=float, default=3.0, help="length of the stream at the nominal rate")
    parser.add_argument("--no-offload", action="store_true", help="one read per packet (no GSO super-packets)")
    parser.add_argument("--compare", action="store_true",
                        help="also stream over a tc tbf veth pair at the rate; print the machine's CPU for both")
    parser.add_argument("--repeats", type=int, default=3, help="with --compare: streams per link, alternated")
    args = parser.parse_args(argv)
    spec = LinkSpec(bandwidth_bps=parse_rate(args.bandwidth), delay_s=parse_delay(args.delay),
                    loss=parse_percent(args.loss), mtu=args.mtu, emulator="delayline", seed=0,
                    offload=not args.no_offload)
    line = []
    tbf = []
    for _ in range(args.repeats if args.compare else 1):
        line.append(stream(spec, args.seconds))
        if args.compare:
            tbf.append(stream(LinkSpec(bandwidth_bps=spec.bandwidth, mtu=args.mtu, emulator="tbf"), args.seconds))
    for run in line:
        report = run["report"]
        cpu, user, system, wall = run["cpu"], run["user"], run["system"], run["wall"]
        reads = report["up"]["packets"] + report["down"]["packets"]
        print(f"{args.bandwidth}, {spec.delay_s * 1e3:g} ms one way, MTU {spec.mtu}, offload "
              f"{'on' if spec.offload_active else 'off'}: {run['rate']:.1f} Mbit/s; delay line {cpu:.2f} s of CPU in "
              f"{wall:.2f} s ({100 * cpu / wall:.1f}% of one core: {100 * user / wall:.1f}% user, "
              f"{100 * system / wall:.1f}% system); {report['up']['packets']} reads up, "
              f"{report['down']['packets']} down ({1e6 * cpu / max(reads, 1):.0f} us of CPU per read); "
              f"up {report['up']['segments']} segments on the wire; machine busy {100 * run['busy'] / wall:.1f}% "
              f"of one core")
    if tbf:
        for run in tbf:
            print(f"{args.bandwidth} over tc tbf (veth, no delay): {run['rate']:.1f} Mbit/s; machine busy "
                  f"{100 * run['busy'] / run['wall']:.1f}% of one core in {run['wall']:.2f} s")
        pct = lambda runs: statistics.median(100 * r["busy"] / r["wall"] for r in runs)  # noqa: E731
        own = statistics.median(100 * r["cpu"] / r["wall"] for r in line)
        print(f"medians of {len(line)}: machine busy {pct(line):.1f}% of one core through the delay line, "
              f"{pct(tbf):.1f}% through tbf: the delay line adds {pct(line) - pct(tbf):.1f}% of one core "
              f"(its own process: {own:.1f}%, the receivers' TCP included)")


if __name__ == "__main__":
    main()
