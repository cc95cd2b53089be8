"""``python -m splitlit.link``: the command line that builds the link, probes it and runs the job over it."""

from __future__ import annotations

import argparse
import json
import shlex
import signal
import sys
from pathlib import Path
from typing import Any

from splitlit.link.errors import LinkError
from splitlit.link.job import Interrupted, JobResult, run_two_hosts, with_trainer_args
from splitlit.link.netns import check_requirements, remove_stale_links
from splitlit.link.shaped import STOP_SIGNALS, ShapedLink
from splitlit.link.spec import ROLES, LinkSpec
from splitlit.link.units import parse_delay, parse_rate

__all__ = ["main"]


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
        raise Interrupted(signum)

    previous = {s: signal.signal(s, interrupt) for s in STOP_SIGNALS}
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
    except Interrupted as err:
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
