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
from splitlit.link.spec import LinkSpec
from splitlit.link.star import StarLink
from splitlit.link.units import parse_delay, parse_percent, parse_rate, parse_size, per_client

__all__ = ["main"]


_VALUE_OPTIONS = ("--bandwidth", "--up", "--down", "--delay", "--jitter", "--loss", "--limit")
_PER_CLIENT = ("bandwidth", "up", "down", "delay", "jitter", "loss")  # one value, or one per client link


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m splitlit.link", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run a two-rank job (client and server) as two hosts on this machine, joined by an emulated link "
                    "(rate, and with --delay/--jitter/--loss the userspace delay line).",
        epilog="examples:\n  sudo python -m splitlit.link --bandwidth 100mbit -- "
               "python -m experiments.cifar10_mobilenet fit --config experiments/configs/cifar10_small.yaml\n"
               "  sudo python -m splitlit.link --up 5mbit --down 50mbit --delay 40ms --jitter 5ms --loss 0.1% -- ...\n"
               "  sudo python -m splitlit.link --clients 4 --bandwidth 100mbit --delay 5ms,5ms,5ms,80ms -- ...\n"
               "--bandwidth, --up, --down, --delay, --jitter and --loss take one value, or with --clients one per "
               "client link, separated by commas.")
    parser.add_argument("--bandwidth", help="rate of both directions, tc units: 100mbit, 1gbit, 500kbit; with "
                                            "--clients one value, or one per client: 100mbit,100mbit,10mbit")
    parser.add_argument("--up", help="client -> server rate (overrides --bandwidth for that direction)")
    parser.add_argument("--down", help="server -> client rate (overrides --bandwidth for that direction)")
    parser.add_argument("--clients", type=int, default=1,
                        help="many clients: a namespace per client, each on a link of its own to the server's "
                             "(rate, delay, jitter, loss: a slow or far one is the straggler); the job runs on "
                             "clients + 1 hosts")
    parser.add_argument("--delay", default=None, help="one-way delay of each direction, e.g. 25ms (round trip: "
                                                      "twice it); one value, or one per client link: 5ms,80ms")
    parser.add_argument("--jitter", default=None, help="each packet's delay varies uniformly within +-jitter "
                                                       "(at most the delay; packets are never reordered), e.g. 5ms; "
                                                       "or one per client link")
    parser.add_argument("--loss", default=None, help="random loss per packet and direction, e.g. 0.1%%; or one per "
                                                     "client link")
    parser.add_argument("--limit", default=None, help="delay line's queue per direction in bytes (tail drop), "
                                                      "e.g. 256kb; default one bandwidth-delay product, >= 50 ms")
    parser.add_argument("--emulator", default="auto", choices=["auto", "tbf", "delayline", "netem"],
                        help="auto (default): the delay line when --delay/--jitter/--loss is given, tc tbf "
                             "otherwise; netem needs the kernel's sch_netem")
    parser.add_argument("--seed", type=int, default=None, help="seed of the delay line's loss and jitter")
    parser.add_argument("--no-offload", action="store_true",
                        help="the delay line reads every packet on its own (default without --loss: TCP "
                             "super-packets of up to ~1 ms of the line, timed as their segments; less CPU)")
    parser.add_argument("--sysctl", action="append", default=[], metavar="KEY=VALUE",
                        help="set in both namespaces (repeatable), e.g. net.ipv4.tcp_slow_start_after_idle=0")
    parser.add_argument("--mtu", type=int, default=1500, help="MTU of the link's interfaces (default 1500)")
    parser.add_argument("--burst", type=int, default=None, help="tbf bucket in bytes (default max(32 KiB, 2 ms))")
    parser.add_argument("--queue-ms", type=float, default=50.0, help="tbf queue, in ms at the rate (default 50)")
    parser.add_argument("--port", type=int, default=29500, help="MASTER_PORT (the namespaces are private)")
    parser.add_argument("--probe-seconds", type=float, default=1.0,
                        help="rate probe per direction before the job, seconds at the nominal rate, after 20 "
                             "round trips (0: no probe)")
    parser.add_argument("--grace", type=float, default=900.0,
                        help="seconds the other rank gets to exit after one fails (default 900)")
    parser.add_argument("--stats", type=Path, help="write the settings, probe, interface counters, the delay "
                                                   "line's counters and CPU time and the exit codes here (JSON)")
    parser.add_argument("--no-trainer-args", action="store_true",
                        help="do not append --trainer.num_nodes 2 --trainer.devices 1 to a LightningCLI command")
    parser.add_argument("--cleanup", action="store_true",
                        help="remove namespaces left by splitlit.link runs that were killed, then exit")
    return parser


def _attach_values(argv: list[str]) -> list[str]:
    """``--delay -5ms`` -> ``--delay=-5ms``: argparse would take ``-5ms`` for an option and hide the value."""
    out: list[str] = []
    for arg in argv:
        if out and out[-1] in _VALUE_OPTIONS and arg.startswith("-") and arg not in _VALUE_OPTIONS:
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
    return out


def spec_from_args(args: argparse.Namespace) -> LinkSpec:
    """One link the command line asks for (one value per option: see :func:`_per_client`); a :class:`LinkError`
    names a bad value and how to write it."""
    if not args.bandwidth and not (args.up and args.down):
        raise LinkError("give --bandwidth (both directions), or both --up and --down, e.g. --bandwidth 10mbit or "
                        "--up 5mbit --down 50mbit.")
    delay = parse_delay(args.delay)
    jitter = parse_delay(args.jitter, "--jitter")  # at most the delay: LinkSpec checks it
    sysctls = []
    for item in args.sysctl:
        key, _, value = item.partition("=")
        if not key.strip() or not value.strip():
            raise LinkError(f"--sysctl {item!r}: give KEY=VALUE, e.g. net.ipv4.tcp_slow_start_after_idle=0.")
        sysctls.append((key.strip(), value.strip()))
    return LinkSpec(bandwidth_bps=parse_rate(args.bandwidth) if args.bandwidth else None,
                    up_bps=parse_rate(args.up, "--up") if args.up else None,
                    down_bps=parse_rate(args.down, "--down") if args.down else None,
                    delay_s=delay, jitter_s=jitter, loss=parse_percent(args.loss), limit_bytes=parse_size(args.limit),
                    emulator=args.emulator, seed=args.seed, mtu=args.mtu, queue_s=args.queue_ms / 1e3,
                    burst_bytes=args.burst, sysctls=tuple(sysctls), offload=not args.no_offload)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[argv.index("--") + 1:] if "--" in argv else []
    parser = _parser()
    args = parser.parse_args(_attach_values(argv[:argv.index("--")] if "--" in argv else argv))
    try:
        if args.cleanup:
            check_requirements()
            removed = remove_stale_links()
            print(f"splitlit.link: removed {len(removed)} stale namespaces" + (f": {', '.join(removed)}" if removed
                                                                                else ""))
            return 0
        if args.clients < 1:
            raise LinkError(f"--clients {args.clients}: give the number of clients, 1 or more.")
        specs = _specs(args)
        if not command:
            parser.error("give the command after --, e.g. --bandwidth 100mbit -- python -m ...")
        if not args.no_trainer_args:
            command = with_trainer_args(command, hosts=args.clients + 1)
        link = StarLink(specs, port=args.port) if args.clients > 1 else ShapedLink(specs[0], port=args.port)
        return _run_job(link, command, args)
    except LinkError as err:
        print(f"splitlit.link: {err}", file=sys.stderr)
        return 2


def _per_client(args: argparse.Namespace) -> list[argparse.Namespace]:
    """One set of link options per client: ``--bandwidth a,b,c`` gives client i the i-th rate, ``--delay 5ms``
    every client 5 ms (see :data:`_PER_CLIENT`)."""
    values = {name: per_client(getattr(args, name) or None, args.clients, f"--{name}") for name in _PER_CLIENT}
    return [argparse.Namespace(**{**vars(args), **{k: v[i] for k, v in values.items()}}) for i in range(args.clients)]


def _specs(args: argparse.Namespace) -> list[LinkSpec]:
    """Each client link's :class:`LinkSpec`; with many clients an error names the client whose value it refused."""
    specs = []
    for i, one in enumerate(_per_client(args)):
        try:
            specs.append(spec_from_args(one))
        except LinkError as err:
            raise (LinkError(f"client {i}'s link: {err}") if args.clients > 1 else err) from None
    return specs


def _settings_text(spec: LinkSpec) -> str:
    """``10mbit each way, 25 ms one way +-5 ms, 0.1% loss (delay line)``."""
    settings = spec.describe()
    text = settings["bandwidth"] + (" each way" if spec.up_bps == spec.down_bps else "")
    if spec.delay_s:
        text += f", {spec.delay_s * 1e3:g} ms one way" + (f" +-{spec.jitter_s * 1e3:g} ms" if spec.jitter_s else "")
    if spec.loss:
        text += f", {spec.loss * 100:g}% loss"
    return text + {"delayline": " (delay line)", "netem": " (netem)", "tbf": " (tbf)"}[spec.mode]


def _probe_text(probed: dict[str, Any]) -> str:
    text = (f"client -> server {probed['up_mbit']:.1f} Mbit/s, server -> client {probed['down_mbit']:.1f} Mbit/s")
    if "rtt_ms" in probed:
        text += (f", round trip {probed['rtt_ms']:.1f} ms (one way {probed['up_delay_ms']:.1f} ms up, "
                 f"{probed['down_delay_ms']:.1f} ms down; median of {probed['pings']} pings"
                 + (f", {probed['pings_lost']} lost" if probed["pings_lost"] else "") + ")")
    return text


def _delayline_text(report: dict[str, Any]) -> str:
    """``delay line: 14295 packets up (0 lost, ...), ...; 1.73 s of CPU ...``; with many clients each link's
    packets after ``client i:``."""
    def direction(link: dict[str, Any], name: str) -> str:
        d = link[name]
        return (f"{d['packets'] + d['lost'] + d['dropped']} packets {name} ({d['lost']} lost, {d['dropped']} dropped "
                f"at the full queue)")

    links = report["links"]
    counts = [f"{direction(link, 'up')}, {direction(link, 'down')}" for link in links]
    if len(links) > 1:
        counts = [f"client {i}: {text}" for i, text in enumerate(counts)]
    return (f"delay line: {'; '.join(counts)}; {report['cpu_s']:.2f} s of CPU in {report['wall_s']:.1f} s "
            f"({report['cpu_pct_of_one_core']:.1f}% of one core)")


def _announce_two(link: ShapedLink, command: list[str], args: argparse.Namespace, stats: dict[str, Any]) -> None:
    spec = link.spec
    if args.probe_seconds > 0:
        probed = link.probe(args.probe_seconds)
        print(f"splitlit.link: {_settings_text(spec)}; probe: {_probe_text(probed)}", flush=True)
    else:
        print(f"splitlit.link: {_settings_text(spec)}; not probed", flush=True)
    print(f"splitlit.link: client {spec.client_addr} ({link.netns['client']}), server {spec.server_addr} "
          f"({link.netns['server']}); running: {shlex.join(command)}", flush=True)


def _announce_star(link: StarLink, command: list[str], args: argparse.Namespace, stats: dict[str, Any]) -> None:
    rates = "; ".join(f"client {i}: {_settings_text(spec)}" for i, spec in enumerate(link.specs))
    print(f"splitlit.link: {len(link.specs)} clients ({rates})", flush=True)
    if args.probe_seconds > 0:
        stats["probe"] = link.probe(args.probe_seconds)
        for i, probed in enumerate(stats["probe"]):
            print(f"splitlit.link: client {i} probe: {_probe_text(probed)}", flush=True)
    print(f"splitlit.link: running: {shlex.join(command)}", flush=True)


def _run_job(link: ShapedLink | StarLink, command: list[str], args: argparse.Namespace) -> int:
    """Build the link, say what it is, run the job's hosts over it, write ``--stats``; the exit code is the job's."""
    def interrupt(signum: int, frame: Any) -> None:
        raise Interrupted(signum)

    previous = {s: signal.signal(s, interrupt) for s in STOP_SIGNALS}
    result = JobResult()
    stats: dict[str, Any] = {"command": command}
    try:
        with link:
            (_announce_star if isinstance(link, StarLink) else _announce_two)(link, command, args, stats)
            stats["link"] = link.describe()
            before = link.counters()
            try:
                result = run_two_hosts(link, command, grace=args.grace)
            finally:
                after = link.counters()
                stats["counters"] = {r: {k: after[r][k] - before[r][k] for k in after[r]} for r in after}
        report = getattr(link, "delayline_report", None)
        if report:
            stats["delayline"] = report
            print(f"splitlit.link: {_delayline_text(report)}", flush=True)
    except Interrupted as err:
        print(f"splitlit.link: interrupted by {err}; every rank stopped and the link removed.", file=sys.stderr)
        return 128 + err.signum
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if args.stats:
            stats.update(exit={"client": result.client, "server": result.server}, seconds=round(result.seconds, 3),
                         note=result.note)
            args.stats.parent.mkdir(parents=True, exist_ok=True)
            args.stats.write_text(json.dumps(stats, indent=1) + "\n")
    clients = "clients" if isinstance(link, StarLink) else "client"
    summary = (f"splitlit.link: {clients} exited {result.client}, server exited {result.server} in "
               f"{result.seconds:.1f} s")
    print(summary + (f" ({result.note})" if result.note else ""), file=sys.stderr if result.returncode else sys.stdout,
          flush=True)
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
