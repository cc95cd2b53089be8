"""Leakage benchmark: compression, accuracy and what the server can learn, per codec and defence, in one table.

    python -m experiments.bench_leakage                      # both tasks, every row (45-60 min on 2 busy cores)
    python -m experiments.bench_leakage --tasks cifar10 --only none "nopeek 0.5"
    python -m experiments.bench_leakage --quick              # a minute: tiny data, every row (the test runs it)

For each task (the small CIFAR-10 preset: MobileNetV2 from ImageNet, 96 px, 2,048 training and 512 test
images, batch 32, one epoch; the small CoLA preset: all-MiniLM-L6-v2, 4,096 training sentences, one epoch at
lr 1e-4, the whole dev set) and each row (no compression, the report's codecs, wire int8 and top-k, NoPeek at
three weights, Gaussian noise at two scales), it fine-tunes once with :class:`callbacks.LeakageMonitor` on
(every 16 steps from the first, 32 samples, 8 of them reconstructed) and prints one row: the compress rate
(bytes crossing both cuts, forward and backward, over the same without any codec:
:func:`analytic_link_bytes`, float tensors only), accuracy (CIFAR-10) or MCC (CoLA) on the
held-out set after the epoch, the label AUCs (norm, cosine; in the JSON/CSV also at the logits, what a server
holding the classifier would get), dCor, PSNR and SSIM of the reconstruction (CIFAR-10) or the share of tokens
recovered (CoLA), each the mean over the monitor's measurements in the epoch, and the monitor's overhead: its
seconds over the training batches' seconds.

Runs are unsplit, in one process ("simulation mode"): the same modules and maths as two ranks (the two-rank
tests prove the split gradients equal the unsplit ones), with the wire codecs applied by
:func:`splitlit.leakage.simulate_wire` exactly as the transport would, which 2 shared CPU cores can afford for
19 runs. The reconstruction decoder and the attacks' public data: see ``experiments/leakage_public.py``.
Results go to ``--out`` (default ``runs/bench_leakage``): ``leakage.json`` (rewritten after every row, so a bench
cut short keeps what it finished) and ``leakage.csv``; the markdown table is printed.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch import Callback

from callbacks import CodecCalibration, Defences, LeakageMonitor
from experiments.leakage_public import PublicCIFAR10
from splitlit.codecs import PowerIteration, make_codec
from splitlit.leakage import simulate_wire

from splitlit.traffic import analytic_link_bytes

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
MINILM = "sentence-transformers/all-MiniLM-L6-v2"

# row name -> what it changes: codecs ("codecs": the report's (up, down) make_codec specs; "up": an up power
# iteration's rank), wire plan, defences.
_WIRE_AND_DEFENCES: dict[str, dict[str, Any]] = {
    "wire int8": {"wire": {"up.activation": "int8", "down.gradient": "int8"}},
    "wire top-k 10%": {"wire": {"up.activation": {"name": "topk", "fraction": 0.1},
                                "down.gradient": {"name": "topk", "fraction": 0.1}}},
    "nopeek 0.1": {"defences": {"nopeek": 0.1}},
    "nopeek 0.5": {"defences": {"nopeek": 0.5}},
    "nopeek 5": {"defences": {"nopeek": 5.0}},  # 0.1 and 0.5 (the paper's range) hardly move dCor in one epoch
    "noise 0.1 / 1e-4": {"defences": {"activation_noise": 0.1, "gradient_noise": 1e-4}},
    "noise 0.5 / 1e-3": {"defences": {"activation_noise": 0.5, "gradient_noise": 1e-3}},
}
ROWS: dict[str, dict[str, dict[str, Any]]] = {
    "cifar10": {"none": {},
                "poweriter3_7": {"codecs": ({"name": "poweriter", "rank": 3}, {"name": "poweriter", "rank": 7})},
                "convinsert070": {"codecs": ({"name": "convinsert", "in_channels": 32, "code_channels": 20,
                                              "kernel_size": 4},
                                             {"name": "convinsert", "in_channels": 1280, "code_channels": 320})},
                **_WIRE_AND_DEFENCES},
    "cola": {"none": {}, "poweriter16": {"up": 16}, **_WIRE_AND_DEFENCES},
}
COLUMNS = ["task", "row", "compress_rate", "accuracy", "label_auc_norm", "label_auc_cosine", "label_auc_norm_logits",
           "label_auc_cosine_logits", "dcor", "recon_psnr", "recon_ssim", "token_recovery", "overhead_pct",
           "measurements", "seconds"]


class _BatchClock(Callback):
    """Seconds spent in training batches, and the simulated wire's hooks (installed before the monitor's)."""

    def __init__(self, wire: dict | None) -> None:
        self.wire, self.seconds, self._start, self._hooks = wire, 0.0, 0.0, []

    def on_fit_start(self, trainer, pl_module) -> None:
        if self.wire:
            self._hooks = simulate_wire(pl_module.configure_split(), self.wire)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seconds += time.perf_counter() - self._start

    def teardown(self, trainer, pl_module, stage) -> None:
        for h in self._hooks:
            h.remove()


def _settings(task: str, quick: bool) -> dict[str, Any]:
    if task == "cifar10":
        return dict(image_size=96, train=32 if quick else 2048, val=32 if quick else 512,
                    batch=16 if quick else 32, public=32 if quick else 512, recon_steps=5 if quick else 150,
                    every=2 if quick else 16)
    return dict(train=64 if quick else 4096, batch=16 if quick else 32, max_length=32 if quick else 64,
                limit_val=2 if quick else 1.0, every=2 if quick else 16)


def _cifar10(row: dict, s: dict) -> tuple[L.LightningModule, L.LightningDataModule, list[Callback], dict]:
    from experiments.cifar10_mobilenet import CIFAR10DataModule, MobileNetV2Classifier

    up, down = (make_codec(**spec) for spec in row["codecs"]) if "codecs" in row else (None, None)
    model = MobileNetV2Classifier(pretrained=str(SHARED / "weights" / "mobilenet_v2-b0353104.pth"),
                                  up_codec=up, down_codec=down)
    data = CIFAR10DataModule(str(SHARED / "cifar10"), batch_size=s["batch"], image_size=s["image_size"],
                             train_subset=s["train"], val_subset=s["val"], download=False)
    public = PublicCIFAR10(str(SHARED / "cifar10"), first=50_000 - s["public"], count=s["public"],
                           image_size=s["image_size"])
    monitor = LeakageMonitor(every_n_steps=s["every"], max_samples=32, attacks=("label_auc", "dcor", "recon"),
                             public_images=public, recon_steps=s["recon_steps"])
    side = s["image_size"]
    shapes = ((s["batch"], 32, side // 2, side // 2), (s["batch"], 1280, side // 32, side // 32))
    callbacks = [CodecCalibration(batches=4, adapt_steps=20)] if up is not None else []
    return model, data, callbacks + [monitor], {"shapes": shapes, "up": up, "down": down, "metric": "val/acc"}


def _cola(row: dict, s: dict) -> tuple[L.LightningModule, L.LightningDataModule, list[Callback], dict]:
    from experiments.cola_data import CoLADataModule
    from experiments.cola_roberta import CoLAClassifier

    up = PowerIteration(rank=row["up"]) if "up" in row else None
    model = CoLAClassifier(model_name_or_path=MINILM, lr=1e-4, weight_decay=0.01, up_codec=up)
    data = CoLADataModule(tokenizer=MINILM, data_dir=str(SHARED / "cola"), max_length=s["max_length"],
                          batch_size=s["batch"], train_subset=s["train"],
                          padding="max_length" if up is not None else "longest")
    monitor = LeakageMonitor(every_n_steps=s["every"], max_samples=32, attacks=("label_auc", "dcor", "tokens"))
    hidden = model.encoder.config.hidden_size
    shapes = ((s["batch"], s["max_length"], hidden), (s["batch"], hidden))
    return model, data, [monitor], {"shapes": shapes, "up": up, "down": None, "metric": "val/mcc"}


def run(task: str, name: str, *, quick: bool, out: Path) -> dict[str, Any]:
    """One fine-tune with the monitor on; returns the table row."""
    torch.manual_seed(0)
    L.seed_everything(0, verbose=False)
    row, s = ROWS[task][name], _settings(task, quick)
    model, data, callbacks, info = (_cifar10 if task == "cifar10" else _cola)(row, s)
    clock = _BatchClock(row.get("wire"))
    monitor = next(c for c in callbacks if isinstance(c, LeakageMonitor))
    callbacks = [clock, *callbacks] + ([Defences(**row["defences"])] if "defences" in row else [])
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0,
                        limit_val_batches=s.get("limit_val", 1.0), default_root_dir=out / task / name.replace(" ", "_"),
                        callbacks=callbacks)
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    seconds = time.perf_counter() - start
    up_shape, down_shape = info["shapes"]
    with_codec = analytic_link_bytes(up_shape, down_shape, up=info["up"], down=info["down"], wire=row.get("wire"))
    raw = analytic_link_bytes(up_shape, down_shape)
    mean = lambda key: _mean([h.get(f"leak/{key}", math.nan) for h in monitor.history])  # noqa: E731
    monitor_s = sum(h["leak/seconds"] for h in monitor.history)
    return {"task": task, "row": name, "compress_rate": with_codec["total"] / raw["total"],
            "accuracy": float(trainer.callback_metrics.get(info["metric"], math.nan)),
            "label_auc_norm": mean("label_auc_norm"), "label_auc_cosine": mean("label_auc_cosine"),
            "label_auc_norm_logits": mean("label_auc_norm_logits"),
            "label_auc_cosine_logits": mean("label_auc_cosine_logits"),
            "dcor": mean("dcor"), "recon_psnr": mean("recon_psnr"), "recon_ssim": mean("recon_ssim"),
            "token_recovery": mean("token_recovery"),
            "overhead_pct": 100 * monitor_s / max(clock.seconds - monitor_s, 1e-9),
            "measurements": len(monitor.history), "seconds": seconds}


def _mean(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def table(results: list[dict[str, Any]]) -> str:
    """The markdown trade-off table (accuracy is % for CIFAR-10, MCC for CoLA)."""
    head = ("| task | row | compress rate | acc % / MCC | label AUC norm | label AUC cos | dCor | PSNR dB | SSIM "
            "| tokens recovered | monitor overhead % |")
    lines = [head, "|" + " --- |" * 11]
    fmt = lambda v, p=3: "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{p}f}"  # noqa: E731
    for r in results:
        acc = 100 * r["accuracy"] if r["task"] == "cifar10" else r["accuracy"]
        digits = 2 if r["task"] == "cifar10" else 3
        lines.append(f"| {r['task']} | {r['row']} | {fmt(r['compress_rate'])} | {fmt(acc, digits)} "
                     f"| {fmt(r['label_auc_norm'])} | {fmt(r['label_auc_cosine'])} | {fmt(r['dcor'])} "
                     f"| {fmt(r['recon_psnr'], 1)} | {fmt(r['recon_ssim'])} | {fmt(r['token_recovery'])} "
                     f"| {fmt(r['overhead_pct'], 1)} |")
    return "\n".join(lines)


def write(results: list[dict[str, Any]], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "leakage.json").write_text(json.dumps(results, indent=1) + "\n")
    with open(out / "leakage.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows({k: r.get(k) for k in COLUMNS} for r in results)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=["cifar10", "cola"], choices=sorted(ROWS))
    parser.add_argument("--only", nargs="+", default=None, help="row names to run (default: all)")
    parser.add_argument("--quick", action="store_true", help="tiny data and settings: checks the bench runs")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_leakage"))
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    args = parser.parse_args(argv)
    for task in args.tasks:
        unknown = [r for r in args.only or [] if not any(r in rows for rows in ROWS.values())]
        if unknown:
            parser.error(f"--only {unknown}: unknown rows; choose from {sorted({r for v in ROWS.values() for r in v})}")
    return args


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    results: list[dict[str, Any]] = []
    for task in args.tasks:
        for name in ROWS[task]:
            if args.only is None or name in args.only:
                results.append(run(task, name, quick=args.quick, out=args.out))
                write(results, args.out)
                print(table(results[-1:]).splitlines()[-1], flush=True)
    print(table(results))
    return results


if __name__ == "__main__":
    main()
