"""The report's timing table over a shaped link: MobileNetV2 / CIFAR-10 as two hosts on this machine.

    sudo .venv/bin/python -m experiments.bench_link --out runs/bench_link          # ~20 min on 2 CPU cores

For each bandwidth (default 10mbit and 100mbit; add 1gbit with ``--bandwidths``), each compression (none, conv
insert 0.097, power iteration (3,7)) and each chunk count (1, 4, 8), one run of ``python -m splitlit.link
--bandwidth B -- python -m experiments.cifar10_mobilenet fit --config <codec preset> --config
experiments/configs/cifar10_link.yaml`` (128 px, batch 16, 5 training batches, one thread per rank). Then
``python -m experiments.report`` draws each bandwidth's table and figures into ``<out>/report/<bandwidth>/``, and
the goals are checked into ``<out>/goals.md``; runs already in ``--out`` are kept unless ``--rerun``:

- compression: conv insert's time per batch at least 5x shorter than no compression's, per chunk count;
- pipelining: chunks 4 or 8 at least 1.3x faster than chunks 1 without compression (where the link dominates);
- counting: the bytes :class:`~callbacks.LinkTrafficMonitor` counted per batch within 10% of those the client's
  veth carried in both directions during the same batches (:class:`WireBytes`, the kernel's counters).

Why 10mbit: this CPU computes a batch ~10-25x slower than the report's GPU, so at 100 Mbit/s the link is not the
bottleneck here the way it was there; 10 Mbit/s puts link time against compute time where the report had them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import CSVLogger
from typing_extensions import override

from splitlit.link import IFNAME, interface_bytes

__all__ = ["WireBytes", "check_goals", "main"]

REPO = Path(__file__).resolve().parents[1]
CODECS = {"none": "none", "convinsert097": "conv insert 0.097", "poweriter3_7": "poweriter (3,7)"}
WIRE_FILE = "wire.json"


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
                extra: list[str]) -> list[str]:
    """One run over the shaped link."""
    fit = [sys.executable, "-m", "experiments.cifar10_mobilenet", "fit",
           "--config", f"experiments/configs/cifar10_{codec}_c{chunks}.yaml",
           "--config", "experiments/configs/cifar10_link.yaml",
           "--trainer.default_root_dir", str(root), "--run.group", group,
           "--run.name", f"{bandwidth}-{codec}-c{chunks}", "--run.codec", CODECS[codec], "--run.wandb", "offline",
           "--trainer.callbacks+=experiments.bench_link.WireBytes", *extra]
    return [sys.executable, "-m", "splitlit.link", "--bandwidth", bandwidth, "--stats", str(stats), "--", *fit]


def check_goals(tables: dict[str, pd.DataFrame], wire: dict[str, float]) -> list[dict[str, Any]]:
    """The issue's goals, one row each: what was compared, the measured value, the target and whether it is met."""
    goals = []
    for bandwidth, table in tables.items():
        times = {(r.codec, int(r.chunks)): float(r.time_per_batch_s) for r in table.itertuples()}
        for chunks in sorted({c for _, c in times}):
            none, conv = times.get(("none", chunks)), times.get(("convinsert097", chunks))
            if none and conv:
                goals.append({"goal": f"{bandwidth}: none / conv insert time per batch, chunks {chunks}",
                              "value": none / conv, "target": 5.0})
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
        table["codec"] = table["run"].str.split("-").str[1]
        table["bytes_per_batch"] = [
            json.loads((out / bandwidth / run / "summary.json").read_text()).get("link/bytes_per_batch_run")
            for run in table["run"]]
        tables[bandwidth] = table
        for run in table["run"]:
            record = out / bandwidth / run / WIRE_FILE
            if record.is_file():
                wire[run] = json.loads(record.read_text())["wire_bytes_per_batch"]
    return tables, wire


def _goals_markdown(goals: list[dict[str, Any]], tables: dict[str, pd.DataFrame]) -> str:
    lines = ["| bandwidth | codec | chunks | time per batch (s) | computation (s) | MB per batch |",
             "|---|---|---|---|---|---|"]
    for bandwidth, table in tables.items():
        for r in table.itertuples():
            lines.append(f"| {bandwidth} | {CODECS.get(r.codec, r.codec)} | {int(r.chunks)} | {r.time_per_batch_s:.3f} "
                         f"| {r.computation_time_s:.3f} | {r.bytes_per_batch / 1e6:.2f} |")
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
    parser.add_argument("--report-only", action="store_true", help="only redraw the report and goals from --out")
    parser.add_argument("--rerun", action="store_true", help="repeat runs that finished in --out already")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", WANDB_MODE="offline", WANDB_SILENT="true",
               PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO))
    started = time.monotonic()
    if not args.report_only:
        runs = [(b, c, n) for b in args.bandwidths for c in args.codecs for n in args.chunks]
        for i, (bandwidth, codec, chunks) in enumerate(runs, 1):
            stats = out / "link" / f"{bandwidth}-{codec}-c{chunks}.json"
            summary = out / bandwidth / f"{bandwidth}-{codec}-c{chunks}" / "summary.json"
            if not args.rerun and summary.is_file() and "time/batch_s_run" in json.loads(summary.read_text()):
                print(f"[{i}/{len(runs)}] {bandwidth}-{codec}-c{chunks}: done already (--rerun to repeat)")
                continue
            cmd = run_command(bandwidth=bandwidth, codec=codec, chunks=chunks, root=out / bandwidth,
                              group=f"bench_link-{bandwidth}", stats=stats, extra=extra)
            print(f"[{i}/{len(runs)}] {time.monotonic() - started:.0f} s: {shlex.join(cmd)}", flush=True)
            log = out / "logs" / f"{bandwidth}-{codec}-c{chunks}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            with log.open("w") as f:
                code = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
            if code != 0:
                print(f"experiments.bench_link: run failed (exit {code}); see {log}", file=sys.stderr)
                return 1
    for bandwidth in args.bandwidths:
        code = subprocess.run([sys.executable, "-m", "experiments.report", str(out / bandwidth),
                               "--out", str(out / "report" / bandwidth)], cwd=REPO, env=env).returncode
        if code != 0:
            return code
    tables, wire = _load(out, args.bandwidths)
    goals = check_goals(tables, wire)
    text = _goals_markdown(goals, tables)
    (out / "goals.md").write_text(text)
    print(text + f"\n{len(goals)} goals, {sum(g['met'] for g in goals)} met; "
                 f"{time.monotonic() - started:.0f} s; tables and figures in {out / 'report'}")
    return 0 if all(g["met"] for g in goals if math.isfinite(g["value"])) else 1


if __name__ == "__main__":
    sys.exit(main())
