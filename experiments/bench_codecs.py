"""Codec benchmark: the report's MobileNetV2 / CIFAR-10 codecs, unsplit on one CPU, short fine-tune from ImageNet.

    python -m experiments.bench_codecs --train 3200 --epochs 2 --test 2000     # ~45 CPU-minutes for all rows

For each codec (none, power iteration (3,7), conv insert 0.097 / 0.070) and each option, with and without
(1 or 2 power iterations; fresh conv layers, PCA calibrated with BatchNorm on its ImageNet running statistics
or on batch statistics, the codecs' distillation warm-up, and the network's adaptation to its codecs that
``CodecCalibration`` runs by default: see ``RUNS``) it fine-tunes the pretrained MobileNetV2
with the report's SGD settings (lr 0.005, momentum 0.1, batch 64) on real CIFAR-10 at reduced resolution and
prints one table row: test accuracy, its difference from no compression, the compress rate at this resolution
and at the report's 224 px, the bytes per chunk crossing each cut (activation forward; its gradient back is
the same size), each codec's relative reconstruction error on the calibration batches when fine-tuning
starts, the relative error of the tail's input after adaptation, and the seconds spent calibrating and
fine-tuning. ``--seed`` changes the new classifier, the batch order and the flips (not the calibration
batches). The codecs run unsplit (same modules as the split run); bytes are
:func:`splitlit.wire.analytic_link_bytes`, which the two-rank tests prove equal to what the transport sends.
``--only`` / ``--skip`` pick rows, so rows can run in parallel processes (``--baseline`` then gives the
accuracy of ``none`` for the delta column).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from experiments.cifar10_mobilenet import IMAGENET_MEAN, IMAGENET_STD, LocalCIFAR10, MobileNetV2Classifier
from splitlit.codecs import REPORT_CODECS, calibrate, report_codecs
from splitlit.wire import analytic_link_bytes

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"

# (codec row, label, options for report_codecs, options for calibrate or None for no calibration). For each option,
# a row with it and one without: 1 vs 2 (the default) power iterations; calibration with BatchNorm on the ImageNet
# running statistics vs on batch statistics (the default); the codecs' distillation warm-up; the adaptation of the
# network (CodecCalibration's default: --adapt-steps at --adapt-lr).
RUNS = {
    "none": [("-", {}, None)],
    "poweriter3_7": [("iters=1", {"iters": 1}, {}), ("iters=2", {}, {}),
                     ("iters=2, adapt (default)", {}, {"adapt": True})],
    "convinsert097": [("fresh", {}, {"pca": False}), ("pca, eval BN", {}, {"batch_stats": False}),
                      ("pca, batch BN", {}, {}), ("pca, batch BN, distil", {}, {"distill": True}),
                      ("pca, adapt (default)", {}, {"adapt": True})],
    "convinsert070": [("pca, eval BN", {}, {"batch_stats": False}), ("pca, batch BN", {}, {}),
                      ("pca, adapt (default)", {}, {"adapt": True})],
}


def load_images(root: Path, train: bool, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    ds = LocalCIFAR10(str(root), train=train)
    n = min(n, len(ds.data))  # the files interleave the classes, so a prefix is balanced
    return torch.from_numpy(ds.data[:n]).permute(0, 3, 1, 2).contiguous(), torch.tensor(ds.targets[:n])


def prepare(images: torch.Tensor, size: int, flip: bool) -> torch.Tensor:
    x = images.float().div_(255)
    if size != x.shape[-1]:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    if flip:
        mask = torch.rand(len(x)) < 0.5
        x[mask] = x[mask].flip(-1)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


@torch.no_grad()
def accuracy(model: MobileNetV2Classifier, images, labels, size: int, batch: int = 200) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(images), batch):
        logits = model(prepare(images[i:i + batch], size, flip=False))
        correct += (logits.argmax(1) == labels[i:i + batch]).sum().item()
    return 100.0 * correct / len(images)


def run(row: str, options: dict, calibration: dict | None, args, data) -> dict:
    torch.manual_seed(args.seed)
    (train_x, train_y), (test_x, test_y) = data
    up, down = report_codecs(row, **options)
    model = MobileNetV2Classifier(pretrained=str(args.weights), lr=args.lr, momentum=args.momentum,
                                  up_codec=up, down_codec=down, codec_lr=args.codec_lr)
    split = model.configure_split()
    gen = torch.Generator().manual_seed(args.seed + 1)
    calib = [(prepare(train_x[i:i + args.batch], args.size, flip=False),)
             for i in range(0, args.calib_batches * args.batch, args.batch)]
    errors = {}
    calib_start = time.perf_counter()
    if calibration is not None:  # initialises as asked, and measures each cut's reconstruction error
        distil = calibration.get("distill", False)
        report = calibrate(split, calib, pca=calibration.get("pca", True),
                           batch_stats=calibration.get("batch_stats", True),
                           distill_steps=args.distill_steps if distil else 0, distill_lr=args.distill_lr,
                           adapt_steps=args.adapt_steps if calibration.get("adapt") else 0, adapt_lr=args.adapt_lr)
        errors = {cut: r["error_after"] for cut, r in report.items() if cut in ("up", "down")}
        errors.update({"tail": r["error_after"] for cut, r in report.items() if cut == "adapted"})
    start = time.perf_counter()
    calib_seconds = start - calib_start
    opt = model.configure_optimizers()
    for _ in range(args.epochs):
        model.train()
        order = torch.randperm(len(train_x), generator=gen)
        for i in range(0, len(order) - args.batch + 1, args.batch):
            idx = order[i:i + args.batch]
            loss = F.cross_entropy(model(prepare(train_x[idx], args.size, flip=True)), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    acc = accuracy(model, test_x, test_y, args.size)
    up_shape = lambda s: (args.batch, 32, s // 2, s // 2)  # noqa: E731
    down_shape = lambda s: (args.batch, 1280, math.ceil(s / 32), math.ceil(s / 32))  # noqa: E731
    here = analytic_link_bytes(up_shape(args.size), down_shape(args.size), chunks=args.chunks, up=up, down=down)
    base = analytic_link_bytes(up_shape(args.size), down_shape(args.size), chunks=args.chunks)
    r224 = analytic_link_bytes((64, 32, 112, 112), (64, 1280, 7, 7), up=up, down=down)
    b224 = analytic_link_bytes((64, 32, 112, 112), (64, 1280, 7, 7))
    return {"codec": row, "acc": acc, "rate": here["total"] / base["total"],
            "rate224": r224["total"] / b224["total"], "up": here["up.activation"] // args.chunks,
            "down": here["down.activation"] // args.chunks, "err_up": errors.get("up"), "err_down": errors.get("down"),
            "err_tail": errors.get("tail"), "seconds": time.perf_counter() - start, "calib_seconds": calib_seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=SHARED / "cifar10")
    p.add_argument("--weights", type=Path, default=SHARED / "weights" / "mobilenet_v2-b0353104.pth")
    p.add_argument("--size", type=int, default=96, help="image side (the report: 224)")
    p.add_argument("--train", type=int, default=4000, help="training images (a balanced prefix)")
    p.add_argument("--test", type=int, default=2000, help="test images")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--chunks", type=int, default=4, help="micro-batches per batch, for the bytes per chunk")
    p.add_argument("--lr", type=float, default=0.005)
    p.add_argument("--momentum", type=float, default=0.1)
    p.add_argument("--codec-lr", type=float, default=None, help="codec learning rate (default: the model's, --lr / 10)")
    p.add_argument("--calib-batches", type=int, default=16, help="calibration batches (CodecCalibration's default)")
    p.add_argument("--distill-steps", type=int, default=40)
    p.add_argument("--distill-lr", type=float, default=1e-4)
    p.add_argument("--adapt-steps", type=int, default=50, help="network adaptation steps (CodecCalibration's default)")
    p.add_argument("--adapt-lr", type=float, default=5e-4)
    p.add_argument("--seed", type=int, default=0, help="seed of the new classifier, the batch order and the flips")
    p.add_argument("--only", nargs="*", default=None, choices=sorted(REPORT_CODECS), help="codec rows to run")
    p.add_argument("--skip", nargs="*", default=(), help="labels of runs to leave out, e.g. fresh")
    p.add_argument("--baseline", type=float, default=None,
                   help="accuracy of 'none' from another invocation (same settings), for the delta column")
    args = p.parse_args()
    data = (load_images(args.data, True, args.train), load_images(args.data, False, args.test))
    print(f"MobileNetV2 (ImageNet) on CIFAR-10: {len(data[0][0])} train / {len(data[1][0])} test images at "
          f"{args.size} px, {args.epochs} epoch(s), SGD lr {args.lr} momentum {args.momentum}, batch {args.batch}; "
          f"bytes per chunk at chunks={args.chunks} (float32; the gradient back is the same size)", flush=True)
    header = (f"| {'codec':<14}| {'initialisation':<24}| {'acc %':>6} | {'Δ acc':>6} | {'rate':>6} | "
              f"{'rate@224':>8} | {'up B/chunk':>11} | {'down B/chunk':>12} | {'err up':>6} | {'err down':>8} | "
              f"{'err tail':>8} | {'calib s':>7} | {'s':>5} |")
    print(header + "\n|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|", flush=True)
    baseline = args.baseline
    for row, runs in RUNS.items():
        if args.only and row not in args.only:
            continue
        for label, options, calibration in runs:
            if label in args.skip:
                continue
            r = run(row, options, calibration, args, data)
            baseline = r["acc"] if row == "none" else baseline
            delta = f"{r['acc'] - baseline:+.2f}" if baseline is not None else "n/a"
            err = lambda v: f"{v:.3f}" if v is not None else "-"  # noqa: E731
            print(f"| {row:<14}| {label:<24}| {r['acc']:6.2f} | {delta:>6} | {r['rate']:6.4f} | "
                  f"{r['rate224']:8.4f} | {r['up']:11,} | {r['down']:12,} | {err(r['err_up']):>6} | "
                  f"{err(r['err_down']):>8} | {err(r['err_tail']):>8} | {r['calib_seconds']:7.0f} | "
                  f"{r['seconds']:5.0f} |", flush=True)


if __name__ == "__main__":
    main()
