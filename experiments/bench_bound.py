"""Benchmark: time per training batch over its bound, max(client computation, server computation), per order.

    python -m experiments.bench_bound --presets cola_small cifar10_small --orders gpipe 1f1b zb --chunks 4 \\
        --batches 30 --repeats 3 --out runs/bench_bound

Each run is a preset through its own entry point (``python -m experiments.cola_roberta fit --config
experiments/configs/cola_small.yaml ...``, as a user runs it: Lightning's loop, the optimiser steps, the
callbacks), cut to ``--batches`` training batches of one epoch without validation. Its ``summary.json`` holds
:class:`~callbacks.PipelineTimingMonitor`'s run figures (the mean over the batches after the first): the time per
batch, each rank's computation, the client's time outside its pipeline step, and their ratio
``time/bound_ratio_run``. Within a repeat the orders run one after the other, so a drift of the machine reaches
every order; the table gives the median over the repeats and the ratio's range. The goal (issue 15): at chunks 4
the ratio is at most 1.10 in a compute-bound run. Run it on an otherwise idle machine: the two ranks take one core
each, and anything else running shows up as time outside the computation.

Writes ``<out>/runs.json`` (every run's figures), ``<out>/results.md`` (the table and the goals) and prints it;
``--merge a/runs.json b/runs.json`` rebuilds the table from runs made in several sittings.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from experiments.cli import CONFIG_DIR
from splitlit.schedule import ORDERS

__all__ = ["GOAL", "command", "main", "markdown", "report", "rows"]

GOAL = 1.10  # time per batch / max(client, server computation), compute-bound, chunks 4
ENTRY = {"cola": "experiments.cola_roberta", "cifar10": "experiments.cifar10_mobilenet"}
FIGURES = ("batch_s", "compute_client_s", "compute_server_s", "outside_client_s", "bound_ratio")


def command(preset: str, order: str, chunks: int, batches: int, root: Path) -> list[str]:
    """The command line of one run: the preset's own entry point, ``batches`` training batches, no validation."""
    family = preset.split("_")[0]
    if family not in ENTRY:
        raise ValueError(f"bench_bound: preset {preset!r} is neither a cola_* nor a cifar10_* preset; choose one "
                         f"of experiments/configs ({', '.join(sorted(p.stem for p in CONFIG_DIR.glob('*.yaml')))}).")
    config = CONFIG_DIR / f"{preset}.yaml"
    if not config.is_file():
        raise ValueError(f"bench_bound: no preset {preset!r} ({config} does not exist).")
    return [sys.executable, "-m", ENTRY[family], "fit", "--config", str(config), "--trainer.max_epochs", "1",
            "--trainer.limit_train_batches", str(batches), "--trainer.limit_val_batches", "0",
            "--trainer.num_sanity_val_steps", "0", "--trainer.strategy.init_args.order", order,
            "--trainer.strategy.init_args.chunks", str(chunks), "--trainer.default_root_dir", str(root)]


def read_run(root: Path) -> dict[str, float]:
    """The timing figures of the run under ``root`` (its ``summary.json``, ``time/<figure>_run``)."""
    found = sorted(root.glob("*/summary.json"))
    if len(found) != 1:
        raise RuntimeError(f"bench_bound: expected one summary.json under {root}, found {len(found)}; see its log.")
    summary = json.loads(found[0].read_text())
    missing = [f for f in FIGURES if f"time/{f}_run" not in summary]
    if missing:
        raise RuntimeError(f"bench_bound: {found[0]} lacks {missing}: was the run split (a SplitPipelineStrategy)?")
    return {f: float(summary[f"time/{f}_run"]) for f in FIGURES}


def rows(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (preset, order, chunks): the median of each figure over its repeats, the ratio's range, the goal."""
    groups: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault((run["preset"], run["order"], run["chunks"]), []).append(run)
    presets = list(dict.fromkeys(run["preset"] for run in runs))
    rank = {o: i for i, o in enumerate(ORDERS)}
    out = []
    for (preset, order, chunks), group in sorted(groups.items(), key=lambda kv: (presets.index(kv[0][0]),
                                                                                 kv[0][2], rank.get(kv[0][1], 99))):
        row: dict[str, Any] = {"preset": preset, "order": order, "chunks": chunks, "n": len(group)}
        row.update({f: statistics.median(r[f] for r in group) for f in FIGURES})
        ratios = [r["bound_ratio"] for r in group]
        row.update(ratio_min=min(ratios), ratio_max=max(ratios), met=row["bound_ratio"] <= GOAL)
        out.append(row)
    return out


def markdown(table: list[dict[str, Any]]) -> str:
    lines = ["| preset | order | chunks | n | time/batch s | client comp. s | server comp. s | client outside s "
             "| time / bound, median [range] | <= 1.10 |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in table:
        lines.append(f"| {r['preset']} | {r['order']} | {r['chunks']} | {r['n']} | {r['batch_s']:.3f} | "
                     f"{r['compute_client_s']:.3f} | {r['compute_server_s']:.3f} | {r['outside_client_s']:.3f} | "
                     f"{r['bound_ratio']:.3f} [{r['ratio_min']:.3f}, {r['ratio_max']:.3f}] | "
                     f"{'yes' if r['met'] else 'NO'} |")
    lines.append("")
    for preset in dict.fromkeys(r["preset"] for r in table):
        mine = [r for r in table if r["preset"] == preset]
        best = min(mine, key=lambda r: r["bound_ratio"])
        met = [f"{r['order']} c{r['chunks']}" for r in mine if r["met"]]
        lines.append(f"- {preset}: lowest time / bound {best['bound_ratio']:.3f} ({best['order']}, chunks "
                     f"{best['chunks']}); within {GOAL:.2f}x: {', '.join(met) or 'none'}.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.bench_bound", description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=["cola_small", "cifar10_small"])
    parser.add_argument("--orders", nargs="+", default=list(ORDERS), choices=ORDERS)
    parser.add_argument("--chunks", type=int, nargs="+", default=[4])
    parser.add_argument("--batches", type=int, default=30, help="training batches per run (the first is left out)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per setting; the table shows their median")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_bound"))
    parser.add_argument("--merge", type=Path, nargs="+", metavar="RUNS_JSON",
                        help="no runs: the table of the runs in these runs.json files, written to --out")
    args = parser.parse_args(argv)
    if args.merge:
        missing = [str(p) for p in args.merge if not p.is_file()]
        if missing:
            parser.error(f"--merge {' '.join(missing)}: no such file; give the runs.json of earlier bench_bound runs.")
        runs = [run for path in args.merge for run in json.loads(path.read_text())]
        report(runs, args.out)
        return
    if args.batches < 3 or args.repeats < 1:
        parser.error(f"--batches {args.batches} --repeats {args.repeats}: give at least 3 batches (the first is "
                     f"left out) and 1 repeat, e.g. --batches 30 --repeats 3.")
    for preset in args.presets:
        command(preset, args.orders[0], args.chunks[0], args.batches, args.out)  # a bad preset fails before any run
    env = dict(os.environ, WANDB_MODE=os.environ.get("WANDB_MODE", "offline"), OMP_NUM_THREADS="1")
    runs = []
    for repeat in range(args.repeats):
        for preset in args.presets:
            for chunks in args.chunks:
                for order in args.orders:
                    root = args.out / preset / f"{order}-c{chunks}-r{repeat}"
                    shutil.rmtree(root, ignore_errors=True)  # an earlier sitting's run of this setting: replaced
                    root.mkdir(parents=True)
                    with open(root / "log.txt", "w") as log:
                        code = subprocess.call(command(preset, order, chunks, args.batches, root), env=env,
                                               stdout=log, stderr=subprocess.STDOUT)
                    if code:
                        sys.exit(f"bench_bound: {preset} {order} chunks {chunks} exited {code}; see {root}/log.txt")
                    runs.append({"preset": preset, "order": order, "chunks": chunks, "repeat": repeat,
                                 **read_run(root)})
                    print(f"{preset} {order} c{chunks} repeat {repeat}: {runs[-1]['batch_s']:.3f} s/batch, "
                          f"time / bound {runs[-1]['bound_ratio']:.3f}", flush=True)
                    # after every run, so a stopped benchmark keeps what it measured (--merge tables it)
                    (args.out / "runs.json").write_text(json.dumps(runs, indent=1) + "\n")
    report(runs, args.out)


def report(runs: list[dict[str, Any]], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "runs.json").write_text(json.dumps(runs, indent=1) + "\n")
    text = markdown(rows(runs))
    (out / "results.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
