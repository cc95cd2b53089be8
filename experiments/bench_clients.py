"""Benchmark: many clients, one server — time per round, bytes per client and the server's memory, per paradigm.

    python -m experiments.bench_clients [--clients 1 2 4 8] [--paradigms sequential splitfed splitfed2]
                                        [--train 512] [--image-size 32] [--epochs 2] [--out runs/bench_clients]

Each cell is one job of the small CIFAR preset (``experiments/configs/cifar10_clients.yaml``, MobileNetV2 from
the ImageNet weights) from the command line, ``clients + 1`` processes of one thread each on this machine, the
same total training data split IID across the clients. Every rank writes what it measured (:class:`RankStats`);
the table gives per paradigm and client count:

* ``epoch_s``: wall time of the last round (epoch), on the server;
* ``server_compute_s``: the server's computation in that round (its stages' forward and backward, no waiting),
  the bound when the server is the bottleneck, and ``ratio`` = epoch_s / server_compute_s;
* ``MB/client``: bytes one client sent and received over its link in the round (mean over clients);
* ``avg MB/client``: SplitFed's weight averaging among the clients, or sequential's hand-offs, per client;
* ``server_peak_MB``: the server's peak resident memory (SplitFed v1 holds one body per client, v2 one);
* ``val_acc``: client 0's validation accuracy after the last round.

It prints a markdown table, writes ``results.csv`` in ``--out`` and draws ``--figure`` (the README's
``docs/figures/clients.png``: time per round, bytes per client, server memory and accuracy against the client
count).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer

from splitlit.traffic import summarize

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
_OUT_ENV = "SPLITLIT_BENCH_OUT"


class RankStats(Callback):
    """Every rank: the last round's wall time, its link bytes and computation, and its peak memory, to a JSON file
    named after its rank in ``$SPLITLIT_BENCH_OUT``."""

    def __init__(self) -> None:
        self.start = 0.0
        self.epoch_s = 0.0
        self.bytes = 0
        self.compute_s = 0.0

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.start, self.bytes, self.compute_s = time.perf_counter(), 0, 0.0
        self._ledger0 = trainer.strategy.ledger.bytes()

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        meter = trainer.strategy.meter
        record = summarize(meter.transfers, meter.computes)
        self.bytes += sum(record.flows.values())
        self.compute_s += record.compute_s

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.epoch_s = time.perf_counter() - self.start
        strategy = trainer.strategy
        stats = {"rank": trainer.global_rank, "client": strategy.is_client, "epoch_s": self.epoch_s,
                 "link_bytes": self.bytes, "compute_s": self.compute_s,
                 "received_outside_bytes": strategy.ledger.bytes() - self._ledger0,
                 "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                 "val_acc": float(trainer.callback_metrics.get("val/acc", float("nan")))}
        out = Path(os.environ[_OUT_ENV])
        out.mkdir(parents=True, exist_ok=True)
        (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(stats))


def run_cell(paradigm: str, clients: int, args: argparse.Namespace) -> dict[str, Any]:
    out = args.out / f"{paradigm}-{clients}"
    cmd = [sys.executable, "-m", "experiments.cifar10_mobilenet", "fit",
           "--config", "experiments/configs/cifar10_clients.yaml",
           "--trainer.strategy.init_args.clients", str(clients),
           "--trainer.strategy.init_args.paradigm", paradigm, "--trainer.strategy.init_args.timeout", "900",
           "--data.data_dir", str(args.data / "cifar10"), "--data.image_size", str(args.image_size),
           "--data.train_subset", str(args.train), "--data.val_subset", str(args.val),
           "--model.pretrained", str(args.data / "weights" / "mobilenet_v2-b0353104.pth"),
           "--trainer.max_epochs", str(args.epochs), "--trainer.num_sanity_val_steps", "0",
           "--trainer.default_root_dir", str(out / "runs"), "--run.wandb", "disabled",
           "--run.checkpoint_minutes", "null", "--trainer.enable_checkpointing", "false",
           "--trainer.callbacks+=experiments.bench_clients.RankStats"]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", **{_OUT_ENV: str(out)})
    started = time.perf_counter()
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    if result.returncode != 0:
        raise RuntimeError(f"{paradigm} with {clients} clients failed:\n{result.stdout[-3000:]}{result.stderr[-3000:]}")
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(clients + 1)]
    server, client_stats = ranks[-1], ranks[:-1]
    return {"paradigm": paradigm, "clients": clients, "job_s": time.perf_counter() - started,
            "epoch_s": server["epoch_s"], "server_compute_s": server["compute_s"],
            "ratio": server["epoch_s"] / max(server["compute_s"], 1e-9),
            "mb_per_client": sum(c["link_bytes"] for c in client_stats) / clients / 1e6,
            "avg_mb_per_client": sum(c["received_outside_bytes"] for c in client_stats) / clients / 1e6,
            "server_peak_mb": server["peak_rss_mb"], "val_acc": client_stats[0]["val_acc"]}


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| paradigm | clients | epoch_s | server_compute_s | ratio | MB/client | avg MB/client | server_peak_MB "
             "| val_acc |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['paradigm']} | {r['clients']} | {r['epoch_s']:.1f} | {r['server_compute_s']:.1f} | "
                     f"{r['ratio']:.2f} | {r['mb_per_client']:.1f} | {r['avg_mb_per_client']:.2f} | "
                     f"{r['server_peak_mb']:.0f} | {r['val_acc']:.3f} |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("epoch_s", "time per round (s)"), ("mb_per_client", "link MB per client per round"),
              ("server_peak_mb", "server peak memory (MB)"), ("val_acc", "client 0 val accuracy")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2))
    for ax, (key, title) in zip(axes, panels):
        for paradigm in dict.fromkeys(r["paradigm"] for r in rows):
            mine = [r for r in rows if r["paradigm"] == paradigm]
            ax.plot([r["clients"] for r in mine], [r[key] for r in mine], marker="o", label=paradigm)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("clients")
        ax.set_title(title, fontsize=10)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--paradigms", nargs="+", default=["sequential", "splitfed", "splitfed2"])
    p.add_argument("--train", type=int, default=512, help="training images, split across the clients")
    p.add_argument("--val", type=int, default=128)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=2, help="rounds; the table shows the last")
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--out", type=Path, default=Path("runs/bench_clients"))
    p.add_argument("--figure", type=Path, default=Path("docs/figures/clients.png"), help="the README's figure")
    p.add_argument("--timeout", type=float, default=1800)
    args = p.parse_args(argv)
    rows = []
    for paradigm in args.paradigms:
        for clients in args.clients:
            if clients == 1 and paradigm != args.paradigms[0]:
                rows.append({**rows[[r["clients"] for r in rows].index(1)], "paradigm": paradigm})
                continue  # one client is the two-rank split whatever the paradigm
            rows.append(run_cell(paradigm, clients, args))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(table(rows))
    args.figure.parent.mkdir(parents=True, exist_ok=True)
    plot(rows, args.figure)
    return rows


if __name__ == "__main__":
    main()
