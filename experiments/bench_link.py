"""The report's timing table over a shaped link: MobileNetV2 / CIFAR-10 as two hosts on this machine.

    sudo .venv/bin/python -m experiments.bench_link --out runs/bench_link          # ~20 min on 2 CPU cores

For each bandwidth (default 10mbit and 100mbit; add 1gbit with ``--bandwidths``), each compression (none, conv
insert 0.097, power iteration (3,7)) and each chunk count (1, 4, 8), one run of ``python -m splitlit.link
--bandwidth B -- python -m experiments.cifar10_mobilenet fit --config <codec preset> --config
experiments/configs/cifar10_link.yaml`` (128 px, batch 16, 5 training batches, one thread per rank). Then
``python -m experiments.report`` draws each bandwidth's table and figures into ``<out>/report/<bandwidth>/``, and
the goals are checked into ``<out>/goals.md`` (``--figures docs/figures`` also copies figures 6-9 of each bandwidth
there, as the README shows them); runs already in ``--out`` are kept unless ``--rerun``:

- compression: conv insert's time per batch at least 5x shorter than no compression's, per chunk count;
- pipelining: chunks 4 or 8 at least 1.3x faster than chunks 1 without compression (where the link dominates);
- counting: the bytes :class:`~callbacks.LinkTrafficMonitor` counted per batch within 10% of those the client's
  veth carried in both directions during the same batches (:class:`WireBytes`, the kernel's counters);
- the bound: every row of the timing table is printed beside its bound (:func:`batch_bound`, no delay) and the
  ratio to it; no compression at the largest chunk count within 1.10x of its bound.

Why 10mbit: this CPU computes a batch ~10-25x slower than the report's GPU, so at 100 Mbit/s the link is not the
bottleneck here the way it was there; 10 Mbit/s puts link time against compute time where the report had them.

What pipelining buys on a far link (``--delays``): every run then goes over the delay line (delay 0 too, so all
rows share one emulator), once per one-way delay, and ``<out>/delay.md`` tabulates time per batch against the
delay with each row's bound and the ratio to it, ``<out>/report/time_vs_rtt_<bandwidth>_<codec>.png`` draws
it (one line per chunk count):

    sudo .venv/bin/python -m experiments.bench_link --out runs/bench_delay --bandwidths 10mbit \\
        --codecs convinsert097 --delays 0,25ms                                  # 6 runs, ~6 min on 2 CPU cores

``--orders gpipe 1f1b zb`` runs each setting once per pipeline order (a run's name ends in its order, but for
1f1b): the report's figures then have a line per order, and the delay table a row per order. The goals compare
the 1f1b runs.

The bound of a row (:func:`batch_bound`): the busiest of the four stages a batch goes through (client compute,
server compute, the client -> server bytes at the up rate, the server -> client bytes at the down rate, as
measured in that run), plus the pipeline's fill and drain (the other three stages' time for one micro-batch:
their sum / chunks), plus four one-way delays (the U crosses the link twice forward and twice backward, and the
first micro-batch's forward and the last one's backward overlap nothing).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import CSVLogger
from typing_extensions import override

from splitlit.link import IFNAME, LinkError, interface_bytes, parse_delay
from splitlit.schedule import ORDERS

__all__ = ["WireBytes", "batch_bound", "check_goals", "delay_rows", "main", "parse_delay_list"]

REPO = Path(__file__).resolve().parents[1]
CODECS = {"none": "none", "convinsert097": "conv insert 0.097", "poweriter3_7": "poweriter (3,7)"}
WIRE_FILE = "wire.json"
LINK_FIGURES = ("bandwidth_peak.png", "bandwidth_avg.png", "computation_time.png", "time_per_batch.png")  # figs 6-9
WIRE_PER_PAYLOAD = 1514 / 1448  # Ethernet frame per TCP payload at MTU 1500 (what the rate carries)


class WireBytes(Callback):
    """Counts the bytes the client's end of the shaped link carried during each training batch (both directions).

    Reads the kernel's counters of ``GLOO_SOCKET_IFNAME`` (set by ``python -m splitlit.link``) at the start and end
    of each training batch on the client, so the window is the one :class:`~callbacks.LinkTrafficMonitor` counts;
    the first ``warmup_batches`` are left out, as in its ``_run`` figures. Writes ``wire.json`` into the run folder
    (the CSV logger's): ``batches``, ``wire_bytes`` (Ethernet frames: payload and the TCP/IP headers and
    acknowledgements) and ``wire_bytes_per_batch``. Does nothing off the shaped link. Logs no metric.
    """

    def __init__(self, warmup_batches: int = 1) -> None:
        self.warmup_batches = warmup_batches
        self.ifname: str | None = None
        self._start = self._seen = self.batches = self.total = 0

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        ifname = os.environ.get("GLOO_SOCKET_IFNAME")
        self.ifname = ifname if trainer.global_rank == 0 and ifname == IFNAME["client"] else None

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self.ifname:
            self._start = sum(interface_bytes(self.ifname))

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self.ifname:
            return
        if self._seen >= self.warmup_batches:
            self.total += sum(interface_bytes(self.ifname)) - self._start
            self.batches += 1
        self._seen += 1

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        csv = next((lg for lg in trainer.loggers if isinstance(lg, CSVLogger)), None)
        if not self.ifname or csv is None:
            return
        record = {"ifname": self.ifname, "batches": self.batches, "wire_bytes": self.total,
                  "wire_bytes_per_batch": self.total / self.batches if self.batches else None}
        Path(csv.log_dir, WIRE_FILE).write_text(json.dumps(record, indent=1) + "\n")


def run_command(*, bandwidth: str, codec: str, chunks: int, root: Path, group: str, stats: Path,
                extra: list[str], delay_ms: float | None = None, name: str | None = None,
                sysctls: list[str] = (), order: str = "1f1b") -> list[str]:
    """One run over the shaped link (over the delay line, with ``delay_ms`` one way, when that is given)."""
    fit = [sys.executable, "-m", "experiments.cifar10_mobilenet", "fit",
           "--config", f"experiments/configs/cifar10_{codec}_c{chunks}.yaml",
           "--config", "experiments/configs/cifar10_link.yaml",
           "--trainer.default_root_dir", str(root), "--run.group", group,
           "--run.name", name or f"{bandwidth}-{codec}-c{chunks}", "--run.codec", CODECS[codec],
           "--run.wandb", "offline", "--trainer.callbacks+=experiments.bench_link.WireBytes",
           "--trainer.strategy.init_args.order", order, *extra]
    link = ["--bandwidth", bandwidth]
    if delay_ms is not None:
        link += ["--delay", f"{delay_ms:g}ms", "--emulator", "delayline"]
    for item in sysctls:
        link += ["--sysctl", item]
    return [sys.executable, "-m", "splitlit.link", *link, "--stats", str(stats), "--", *fit]


def parse_delay_list(text: str) -> list[float]:
    """``"0,10,25,50ms"`` -> [0, 10, 25, 50] ms: a value without a unit takes the last value's unit."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    unit = next((p.lstrip("0123456789.") for p in reversed(parts) if p.lstrip("0123456789.")), "ms")
    try:
        return [parse_delay(p if p.lstrip("0123456789.") else p + unit, "--delays") * 1e3 for p in parts]
    except LinkError as err:
        raise SystemExit(f"experiments.bench_link: {err}") from err


def batch_bound(*, client_s: float, server_s: float, up_bytes: float, down_bytes: float, up_bps: float,
                down_bps: float, delay_s: float, chunks: int) -> float:
    """The shortest time a batch can take: the busiest stage, the fill and drain, four one-way delays.

    ``up_bytes`` / ``down_bytes``: payload per batch client -> server (up activations, down gradients) and server
    -> client (up gradients, down activations); they occupy the link at ``WIRE_PER_PAYLOAD`` times their size.
    """
    stages = [client_s, server_s, up_bytes * 8 * WIRE_PER_PAYLOAD / up_bps,
              down_bytes * 8 * WIRE_PER_PAYLOAD / down_bps]
    busiest = max(stages)
    return busiest + (sum(stages) - busiest) / chunks + 4 * delay_s


def delay_rows(out: Path, links: list[tuple[str, str, float]], codecs: list[str],
               chunks: list[int], orders: list[str] = ("1f1b",)) -> list[dict[str, Any]]:
    """One row per finished run of the delay sweep: time per batch, its parts, the bound and the ratio to it.

    ``links``: (bandwidth, the runs' folder name, one-way delay in ms); a folder name ending in ``_sysctl`` (runs
    with ``--sysctl``) labels its rows ``<bandwidth>_sysctl``."""
    rows = []
    for bandwidth, link_name, delay_ms in links:
        label = bandwidth + ("_sysctl" if link_name.endswith("_sysctl") else "")
        for codec, n, order in ((c, n, o) for c in codecs for n in chunks for o in orders):
            run = out / link_name / (f"{link_name}-{codec}-c{n}" + ("" if order == "1f1b" else f"-{order}"))
            if not (run / "summary.json").is_file():
                continue
            rows.append({"bandwidth": label, "delay_ms": delay_ms, "codec": codec, "order": order,
                         **run_bound(run, n, delay_ms)})
    return rows


def run_bound(run: Path, chunks: int, delay_ms: float = 0.0) -> dict[str, Any]:
    """A finished run's time per batch beside its bound (:func:`batch_bound`) from its own measurements: each
    rank's computation, the bytes each way (its summary) and the link's rates (its run config)."""
    s = json.loads((run / "summary.json").read_text())
    link = json.loads((run / "run.json").read_text()).get("link") or {}
    per_chunk = lambda flow: s.get(f"link/{flow}_bytes_per_chunk_run", 0.0) * chunks  # noqa: E731
    up = per_chunk("up_activation") + per_chunk("down_gradient")
    down = per_chunk("up_gradient") + per_chunk("down_activation")
    client, server = s["time/compute_client_s_run"], s["time/compute_server_s_run"]
    bound = batch_bound(client_s=client, server_s=server, up_bytes=up, down_bytes=down,
                        up_bps=link["up_mbit"] * 1e6, down_bps=link["down_mbit"] * 1e6, delay_s=delay_ms / 1e3,
                        chunks=chunks)
    return {"rtt_ms": link.get("probe_rtt_ms"), "chunks": chunks, "time_per_batch_s": s["time/batch_s_run"],
            "client_s": client, "server_s": server, "up_MB": up / 1e6, "down_MB": down / 1e6, "bound_s": bound,
            "ratio": s["time/batch_s_run"] / bound}


def _delay_markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| bandwidth | one-way delay (ms) | measured RTT (ms) | codec | order | chunks | time per batch (s) "
             "| client (s) | server (s) | up MB | down MB | bound (s) | time / bound |", "|---" * 13 + "|"]
    for r in rows:
        rtt = f"{r['rtt_ms']:.1f}" if r["rtt_ms"] is not None else "-"
        lines.append(f"| {r['bandwidth']} | {r['delay_ms']:g} | {rtt} | {CODECS[r['codec']]} "
                     f"| {r.get('order', '1f1b')} | {r['chunks']} "
                     f"| {r['time_per_batch_s']:.3f} | {r['client_s']:.3f} | {r['server_s']:.3f} | {r['up_MB']:.2f} "
                     f"| {r['down_MB']:.2f} | {r['bound_s']:.3f} | {r['ratio']:.2f} |")
    piped = [r for r in rows if r["chunks"] == max(x["chunks"] for x in rows)]
    lines += ["", f"chunks {piped[0]['chunks'] if piped else '-'}: {sum(r['ratio'] <= 1.10 for r in piped)} of "
                  f"{len(piped)} rows within 1.10x of their bound (the goal)."]
    return "\n".join(lines) + "\n"


def _delay_figures(rows: list[dict[str, Any]], folder: Path) -> list[Path]:
    """Time per batch against the round trip, one line per chunk count, per bandwidth and codec."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for bandwidth, codec in sorted({(r["bandwidth"], r["codec"]) for r in rows}):
        fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
        orders = sorted({r.get("order", "1f1b") for r in rows})
        for n, order in sorted({(r["chunks"], r.get("order", "1f1b")) for r in rows}):
            mine = sorted((r for r in rows if (r["bandwidth"], r["codec"], r["chunks"], r.get("order", "1f1b"))
                           == (bandwidth, codec, n, order)), key=lambda r: r["delay_ms"])
            if mine:
                rtts = [2 * r["delay_ms"] for r in mine]
                label = f"chunks {n}" + (f", {order}" if len(orders) > 1 else "")
                line, = ax.plot(rtts, [r["time_per_batch_s"] for r in mine], marker="o", label=label)
                ax.plot(rtts, [r["bound_s"] for r in mine], ls=":", color=line.get_color())
        ax.set(xlabel="round trip (ms, twice the one-way delay)", ylabel="time per batch (s)",
               title=f"{bandwidth}, {CODECS[codec]}: measured (solid) and bound (dotted)")
        ax.legend()
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"time_vs_rtt_{bandwidth}_{codec}.png"
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written


def check_goals(tables: dict[str, pd.DataFrame], wire: dict[str, float]) -> list[dict[str, Any]]:
    """The issue's goals, one row each: what was compared, the measured value, the target and whether it is met."""
    goals = []
    for bandwidth, table in tables.items():
        times = {(r.codec, int(r.chunks)): float(r.time_per_batch_s) for r in table.itertuples() if r.order == "1f1b"}
        for chunks in sorted({c for _, c in times}):
            none, conv = times.get(("none", chunks)), times.get(("convinsert097", chunks))
            if none and conv:
                goals.append({"goal": f"{bandwidth}: none / conv insert time per batch, chunks {chunks}",
                              "value": none / conv, "target": 5.0})
        ratios = {int(r.chunks): float(r.ratio) for r in table.itertuples()
                  if r.order == "1f1b" and r.codec == "none" and "ratio" in table}
        if ratios:
            most = max(ratios)
            goals.append({"goal": f"{bandwidth}: none chunks {most} time per batch / its bound", "value": ratios[most],
                          "target": 1.10, "at_most": True})
        pipelined = [(times[("none", c)], c) for c in (4, 8) if ("none", c) in times]
        if ("none", 1) in times and pipelined:
            best = min(pipelined)
            goals.append({"goal": f"{bandwidth}: none chunks 1 / chunks {best[1]} time per batch",
                          "value": times[("none", 1)] / best[0], "target": 1.3})
        for r in table.itertuples():
            counted = r.bytes_per_batch
            if r.run in wire and counted:
                goals.append({"goal": f"{bandwidth}: {r.codec} c{int(r.chunks)} veth bytes / counted bytes",
                              "value": wire[r.run] / counted, "target": 1.10, "at_most": True})
    for g in goals:
        g["met"] = g["value"] <= g["target"] if g.get("at_most") else g["value"] >= g["target"]
    return goals


def _load(out: Path, bandwidths: list[str]) -> tuple[dict[str, pd.DataFrame], dict[str, float]]:
    tables, wire = {}, {}
    for bandwidth in bandwidths:
        table = pd.read_csv(out / "report" / bandwidth / "table.csv")
        parts = table["run"].str.split("-")
        table["codec"] = parts.str[1]
        table["order"] = parts.str[3].fillna("1f1b")  # "<link>-<codec>-c<chunks>[-<order>]"
        table["bytes_per_batch"] = [
            json.loads((out / bandwidth / run / "summary.json").read_text()).get("link/bytes_per_batch_run")
            for run in table["run"]]
        bounds = [run_bound(out / bandwidth / run, int(n)) for run, n in zip(table["run"], table["chunks"])]
        table["bound_s"], table["ratio"] = [b["bound_s"] for b in bounds], [b["ratio"] for b in bounds]
        tables[bandwidth] = table
        for run in table["run"]:
            record = out / bandwidth / run / WIRE_FILE
            if record.is_file():
                wire[run] = json.loads(record.read_text())["wire_bytes_per_batch"]
    return tables, wire


def _goals_markdown(goals: list[dict[str, Any]], tables: dict[str, pd.DataFrame]) -> str:
    lines = ["| bandwidth | codec | order | chunks | time per batch (s) | computation (s) | MB per batch | bound (s) "
             "| time / bound |", "|---|---|---|---|---|---|---|---|---|"]
    for bandwidth, table in tables.items():
        for r in table.itertuples():
            lines.append(f"| {bandwidth} | {CODECS.get(r.codec, r.codec)} | {r.order} | {int(r.chunks)} | "
                         f"{r.time_per_batch_s:.3f} | {r.computation_time_s:.3f} | {r.bytes_per_batch / 1e6:.2f} | "
                         f"{r.bound_s:.3f} | {r.ratio:.2f} |")
    lines += ["", "| goal | measured | target | met |", "|---|---|---|---|"]
    for g in goals:
        op = "<=" if g.get("at_most") else ">="
        lines.append(f"| {g['goal']} | {g['value']:.3f} | {op} {g['target']:g} | {'yes' if g['met'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(prog="python -m experiments.bench_link", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/bench_link"))
    parser.add_argument("--bandwidths", nargs="+", default=["10mbit", "100mbit"])
    parser.add_argument("--codecs", nargs="+", default=list(CODECS), choices=list(CODECS))
    parser.add_argument("--chunks", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--orders", nargs="+", default=["1f1b"], choices=list(ORDERS),
                        help="pipeline orders; each run once per order (a run's name ends in its order unless 1f1b)")
    parser.add_argument("--delays", type=parse_delay_list, default=None,
                        help="one-way delays, e.g. 0,10,25,50ms: each run over the delay line once per delay")
    parser.add_argument("--sysctl", action="append", default=[], metavar="KEY=VALUE",
                        help="passed to splitlit.link (both namespaces), e.g. net.ipv4.tcp_slow_start_after_idle=0; "
                             "the runs' folders get '_sysctl' appended")
    parser.add_argument("--report-only", action="store_true", help="only redraw the report and goals from --out")
    parser.add_argument("--figures", type=Path, default=None, metavar="DIR",
                        help="also copy the report's figures 6-9 of each bandwidth to DIR/link_<bandwidth>_<figure>.png"
                             " (the README's: docs/figures)")
    parser.add_argument("--rerun", action="store_true", help="repeat runs that finished in --out already")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", WANDB_MODE="offline", WANDB_SILENT="true",
               PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO))
    started = time.monotonic()
    # (bandwidth, the folder and run-name stem of its link, one-way delay in ms or None)
    tag = "_sysctl" if args.sysctl else ""
    links = [(b, (b if d is None else f"{b}_{d:g}ms") + tag, d) for b in args.bandwidths
             for d in (args.delays or [None])]
    if not args.report_only:
        runs = [(link, c, n, o) for link in links for c in args.codecs for n in args.chunks for o in args.orders]
        for i, ((bandwidth, link_name, delay_ms), codec, chunks, order) in enumerate(runs, 1):
            name = f"{link_name}-{codec}-c{chunks}" + ("" if order == "1f1b" else f"-{order}")
            stats = out / "link" / f"{name}.json"
            summary = out / link_name / name / "summary.json"
            if not args.rerun and summary.is_file() and "time/batch_s_run" in json.loads(summary.read_text()):
                print(f"[{i}/{len(runs)}] {name}: done already (--rerun to repeat)")
                continue
            cmd = run_command(bandwidth=bandwidth, codec=codec, chunks=chunks, root=out / link_name,
                              group=f"bench_link-{link_name}", stats=stats, extra=extra, delay_ms=delay_ms, name=name,
                              sysctls=args.sysctl, order=order)
            print(f"[{i}/{len(runs)}] {time.monotonic() - started:.0f} s: {shlex.join(cmd)}", flush=True)
            log = out / "logs" / f"{name}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            with log.open("w") as f:
                code = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
            if code != 0:
                print(f"experiments.bench_link: run failed (exit {code}); see {log}", file=sys.stderr)
                return 1
    if args.delays is not None:
        rows = delay_rows(out, links, args.codecs, args.chunks, args.orders)
        text = _delay_markdown(rows)
        (out / "delay.md").write_text(text)
        figures = _delay_figures(rows, out / "report")
        print(text + f"\n{len(rows)} runs; {time.monotonic() - started:.0f} s; figures: "
                     f"{', '.join(str(f) for f in figures)}")
        return 0
    for bandwidth in args.bandwidths:
        code = subprocess.run([sys.executable, "-m", "experiments.report", str(out / bandwidth),
                               "--out", str(out / "report" / bandwidth)], cwd=REPO, env=env).returncode
        if code != 0:
            return code
        if args.figures is not None:
            args.figures.mkdir(parents=True, exist_ok=True)
            for file in LINK_FIGURES:
                shutil.copyfile(out / "report" / bandwidth / file, args.figures / f"link_{bandwidth}_{file}")
    tables, wire = _load(out, args.bandwidths)
    goals = check_goals(tables, wire)
    text = _goals_markdown(goals, tables)
    (out / "goals.md").write_text(text)
    print(text + f"\n{len(goals)} goals, {sum(g['met'] for g in goals)} met; "
                 f"{time.monotonic() - started:.0f} s; tables and figures in {out / 'report'}")
    return 0 if all(g["met"] for g in goals if math.isfinite(g["value"])) else 1


if __name__ == "__main__":
    sys.exit(main())
