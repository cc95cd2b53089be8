"""The delay line's CPU while its link is full: one TCP stream through a two-host delay line, timed.

    sudo python -m experiments.bench_delayline --bandwidth 100mbit --delay 25ms --seconds 3

prints the stream's rate, the delay line's CPU seconds over the stream's wall seconds (its exact on-CPU time from
``/proc/<pid>/schedstat``, so the link's setup and idle time are left out) and per packet read, e.g. (2 loaded
cores)::

    100mbit, 25 ms one way, MTU 1500, offload on: 95.7 Mbit/s; delay line 0.45 s of CPU in 3.49 s (12.9% of one
    core: 6.6% user, 6.0% system); 3565 reads up, 3103 down (68 us of CPU per read); up 25901 segments on the wire

and with ``--no-offload`` (one read per packet) 36-37% of one core. The goal (issue 19): under 5% of one core at
100 Mbit/s. Keep ``--seconds`` short on a shared machine.
"""

from __future__ import annotations

import argparse
import os
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.bench_delayline", description=__doc__.split("\n")[0])
    parser.add_argument("--bandwidth", default="100mbit")
    parser.add_argument("--delay", default="25ms")
    parser.add_argument("--loss", default=None)
    parser.add_argument("--mtu", type=int, default=1500)
    parser.add_argument("--seconds", type=float, default=3.0, help="length of the stream at the nominal rate")
    parser.add_argument("--no-offload", action="store_true", help="one read per packet (no GSO super-packets)")
    args = parser.parse_args(argv)
    spec = LinkSpec(bandwidth_bps=parse_rate(args.bandwidth), delay_s=parse_delay(args.delay),
                    loss=parse_percent(args.loss), mtu=args.mtu, emulator="delayline", seed=0,
                    offload=not args.no_offload)
    nbytes = int(spec.bandwidth / 8 * args.seconds)
    with ShapedLink(spec) as link:
        pid = link.delayline.pid
        cpu0, wall0 = cpu_seconds(pid), time.monotonic()
        rate = stream_rate(link, "client", "server", nbytes, args.seconds)
        after, wall = cpu_seconds(pid), time.monotonic() - wall0
    cpu, user, system = (b - a for a, b in zip(cpu0, after))
    report = link.delayline_report["links"][0]
    reads = report["up"]["packets"] + report["down"]["packets"]
    print(f"{args.bandwidth}, {spec.delay_s * 1e3:g} ms one way, MTU {spec.mtu}, offload "
          f"{'on' if spec.offload_active else 'off'}: {rate:.1f} Mbit/s; delay line {cpu:.2f} s of CPU in "
          f"{wall:.2f} s ({100 * cpu / wall:.1f}% of one core: {100 * user / wall:.1f}% user, "
          f"{100 * system / wall:.1f}% system); {report['up']['packets']} reads up, "
          f"{report['down']['packets']} down ({1e6 * cpu / max(reads, 1):.0f} us of CPU per read); "
          f"up {report['up']['segments']} segments on the wire")


if __name__ == "__main__":
    main()
