"""Codec benchmark: the report's MobileNetV2 / CIFAR-10 codecs, unsplit on one CPU, short fine-tune from ImageNet.

    python -m experiments.bench_codecs --train 4000 --test 2000 --epochs 1      # ~15 min on 2 cores

For each codec (none, conv insert 0.097 / 0.070, power iteration (3,7)) and each initialisation (fresh layers,
reconstruction warm-up, PCA from calibration batches; 1 or 3 power iterations) it fine-tunes the pretrained
MobileNetV2 with the report's SGD settings (lr 0.005, momentum 0.1, batch 64) on real CIFAR-10 at reduced
resolution and prints one table row: test accuracy, its difference from no compression, the compress rate
at this resolution and at the report's 224 px, the bytes per chunk crossing each cut (activation forward;
its gradient back is the same size), and the codec's reconstruction error when fine-tuning starts.
The codecs run unsplit (same modules as the split run); bytes are :func:`splitlit.wire.analytic_link_bytes`,
which the two-rank tests prove equal to what the transport sends.
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

# (codec row, initialisation, options for report_codecs)
RUNS = [
    ("none", "-", {}),
    ("poweriter3_7", "iters=1", {}),
    ("poweriter3_7", "iters=3", {"iters": 3}),
    ("convinsert097", "fresh", {}),
    ("convinsert097", "warm-up", {}),
    ("convinsert097", "pca", {}),
    ("convinsert070", "fresh", {}),
    ("convinsert070", "pca", {}),
]


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


def run(row: str, init: str, options: dict, args, data) -> dict:
    torch.manual_seed(0)
    (train_x, train_y), (test_x, test_y) = data
    up, down = report_codecs(row, **options)
    model = MobileNetV2Classifier(pretrained=str(args.weights), lr=args.lr, momentum=args.momentum,
                                  up_codec=up, down_codec=down, codec_lr=args.codec_lr)
    split = model.configure_split()
    gen = torch.Generator().manual_seed(1)
    calib = [(prepare(train_x[i:i + args.batch], args.size, flip=False),)
             for i in range(0, args.calib_batches * args.batch, args.batch)]
    errors = {}
    if row != "none":  # measures the reconstruction error; initialises when init asks for it
        report = calibrate(split, calib, pca=init == "pca", warmup_steps=args.warmup_steps if init == "warm-up" else 0,
                           warmup_lr=args.warmup_lr)
        errors = {cut: r["error_after"] for cut, r in report.items()}
    start = time.perf_counter()
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
    return {"codec": row, "init": init, "acc": acc, "rate": here["total"] / base["total"],
            "rate224": r224["total"] / b224["total"], "up": here["up.activation"] // args.chunks,
            "down": here["down.activation"] // args.chunks, "err_up": errors.get("up"), "err_down": errors.get("down"),
            "seconds": time.perf_counter() - start}


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
    p.add_argument("--codec-lr", type=float, default=None, help="codec learning rate (default: --lr)")
    p.add_argument("--calib-batches", type=int, default=4)
    p.add_argument("--warmup-steps", type=int, default=200)
    p.add_argument("--warmup-lr", type=float, default=1e-3)
    p.add_argument("--only", nargs="*", default=None, choices=sorted(REPORT_CODECS), help="codec rows to run")
    args = p.parse_args()
    data = (load_images(args.data, True, args.train), load_images(args.data, False, args.test))
    print(f"MobileNetV2 (ImageNet) on CIFAR-10: {len(data[0][0])} train / {len(data[1][0])} test images at "
          f"{args.size} px, {args.epochs} epoch(s), SGD lr {args.lr} momentum {args.momentum}, batch {args.batch}; "
          f"bytes per chunk at chunks={args.chunks} (float32; the gradient back is the same size)", flush=True)
    header = (f"| {'codec':<14}| {'init':<8}| {'acc %':>6} | {'Δ acc':>6} | {'rate':>6} | {'rate@224':>8} | "
              f"{'up B/chunk':>11} | {'down B/chunk':>12} | {'err up':>6} | {'err down':>8} | {'s':>5} |")
    print(header + "\n|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|", flush=True)
    baseline = None
    for row, init, options in RUNS:
        if args.only and row not in args.only:
            continue
        r = run(row, init, options, args, data)
        baseline = r["acc"] if row == "none" else baseline
        delta = f"{r['acc'] - baseline:+.2f}" if baseline is not None else "n/a"
        err = lambda v: f"{v:.3f}" if v is not None else "-"  # noqa: E731
        print(f"| {r['codec']:<14}| {r['init']:<8}| {r['acc']:6.2f} | {delta:>6} | {r['rate']:6.4f} | "
              f"{r['rate224']:8.4f} | {r['up']:11,} | {r['down']:12,} | {err(r['err_up']):>6} | "
              f"{err(r['err_down']):>8} | {r['seconds']:5.0f} |", flush=True)


if __name__ == "__main__":
    main()
