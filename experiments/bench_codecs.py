"""Codec benchmark: the report's MobileNetV2 / CIFAR-10 codecs, unsplit on one CPU, short fine-tune from ImageNet.

    python -m experiments.bench_codecs --seeds 0-4 --default-only   # each codec's default, and the controls
    python -m experiments.bench_codecs --train 3200 --seed 0         # every option, 1 seed

For each codec (none, power iteration (3,7), conv insert 0.097 / 0.070) and each option, with and without
(1 or 2 power iterations; fresh conv layers, PCA calibrated with BatchNorm on its ImageNet running statistics
or on batch statistics, the codecs' distillation warm-up, and the network's adaptation to its codecs that
``CodecCalibration`` runs by default: see ``RUNS``; ``--default-only`` keeps that default alone) it fine-tunes
the pretrained MobileNetV2 with the report's SGD settings (lr 0.005, momentum 0.1, batch 64) on real CIFAR-10
at reduced resolution and prints one table row: test accuracy, the compress rate at this resolution and at the
report's 224 px, the bytes per chunk crossing each cut (activation forward; its gradient back is the same size),
each codec's relative reconstruction error on the calibration batches when fine-tuning starts, the relative
error of the tail's input after adaptation, and the seconds spent calibrating and fine-tuning (per seed).

A seed sets the new classifier, the batch order, the flips and dropout (not the calibration batches). With
``--seeds`` (two or more: ``0-4``, ``0,1,2``) every row runs every seed and prints the accuracy's mean ± sample
standard deviation, n, and the paired difference to its baseline (same seeds) with its 95% Student-t interval
(:mod:`experiments.stats`) and what that interval says against ±1 point; ``--seed`` runs one seed (no spread,
no interval). The baseline is ``none``, except for a codec whose network adapts to it (``CodecCalibration``'s
default): that adaptation also trains the network (its student sees BatchNorm's batch statistics, its teacher
the running ones), so such a row is paired with ``none`` given the same adaptation steps (the control row).
Runs go seed by seed, and ``--json`` (default ``runs/bench_codecs.json``) is rewritten after each with every
row's per-seed values, so a bench cut short keeps the seeds it finished. ``--only`` / ``--skip`` pick rows, so
rows can run in parallel processes; ``--merge`` then joins their JSON files into one paired table.

The codecs run unsplit (same modules as the split run); bytes are :func:`splitlit.traffic.analytic_link_bytes`,
which the two-rank tests prove equal to what the transport sends. Time: on 2 CPU cores a run of ``--train
2000 --epochs 2`` takes about 1.5 minutes (none) to 3 minutes (a codec, with its calibration) when the
machine is otherwise idle; the test suite runs a 2-seed tiny version (``tests/test_bench_codecs.py``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from experiments.cifar10_mobilenet import (IMAGENET_MEAN, IMAGENET_STD, REPORT_ROWS, LocalCIFAR10,
                                          MobileNetV2Classifier, report_codecs)
from experiments.stats import format_difference, format_mean, over_seeds, paired_seeds_argument, verdict
from splitlit.calibration import calibrate
from splitlit.traffic import analytic_link_bytes

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"

# (codec row, label, options for report_codecs, options for calibrate or None for no calibration). For each option,
# a row with it and one without: 1 vs 2 (the default) power iterations; calibration with BatchNorm on the ImageNet
# running statistics vs on batch statistics (the default); the codecs' distillation warm-up; the adaptation of the
# network (CodecCalibration's default: --adapt-steps at --adapt-lr).
RUNS = {
    "none": [("-", {}, None), ("adapt (control)", {}, {"adapt": True})],
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


def run(row: str, options: dict, calibration: dict | None, args, data, seed: int) -> dict:
    """One fine-tune of one codec row with one seed; returns its accuracy, rates, bytes, errors and seconds."""
    torch.manual_seed(seed)
    (train_x, train_y), (test_x, test_y) = data
    up, down = report_codecs(row, **options)
    model = MobileNetV2Classifier(pretrained=str(args.weights), lr=args.lr, momentum=args.momentum,
                                  up_codec=up, down_codec=down, codec_lr=args.codec_lr)
    split = model.configure_split()
    gen = torch.Generator().manual_seed(seed + 1)
    calib = [(prepare(train_x[i:i + args.batch], args.size, flip=False),)
             for i in range(0, args.calib_batches * args.batch, args.batch)]
    errors = {}
    calib_start = time.perf_counter()
    if calibration is not None:  # initialises as asked, and measures each cut's reconstruction error
        distil = calibration.get("distill", False)
        report = calibrate(split, calib, pca=calibration.get("pca", True),
                           batch_stats=calibration.get("batch_stats", True),
                           distill_steps=args.distill_steps if distil else 0, distill_lr=args.distill_lr,
                           adapt_steps=args.adapt_steps if calibration.get("adapt") else 0, adapt_lr=args.adapt_lr,
                           adapt_uncompressed=row == "none")
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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=SHARED / "cifar10")
    p.add_argument("--weights", type=Path, default=SHARED / "weights" / "mobilenet_v2-b0353104.pth")
    p.add_argument("--size", type=int, default=96, help="image side (the report: 224)")
    p.add_argument("--train", type=int, default=2000, help="training images (a balanced prefix)")
    p.add_argument("--test", type=int, default=2000, help="test images")
    p.add_argument("--epochs", type=int, default=2)
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
    seeds = p.add_mutually_exclusive_group()
    seeds.add_argument("--seed", type=int, default=0, help="one run per row with this seed (no spread, no interval)")
    seeds.add_argument("--seeds", type=paired_seeds_argument, default=None,
                       help="two or more seeds, e.g. 0-4 or 0,1,2: every row runs each, and prints mean ± std and "
                            "the paired difference to none with its 95%% interval")
    p.add_argument("--only", nargs="*", default=None, choices=sorted(REPORT_ROWS), help="codec rows to run")
    p.add_argument("--skip", nargs="*", default=(), help="labels of runs to leave out, e.g. fresh")
    p.add_argument("--default-only", action="store_true",
                   help="only each codec's default initialisation (CodecCalibration's adaptation) beside none")
    p.add_argument("--threads", type=int, default=1,
                   help="intra-op threads (default 1, as the README's numbers). A seed reproduces its accuracy to the "
                        "last digit only with the same thread count: another count sums in another order, and 2 "
                        "epochs amplify it")
    p.add_argument("--json", type=Path, default=Path("runs/bench_codecs.json"),
                   help="where to write every row with its per-seed values (rewritten after each run)")
    p.add_argument("--figure", type=Path, default=None,
                   help="also draw each row's paired difference to none with its 95%% interval (PNG)")
    p.add_argument("--merge", type=Path, nargs="+", default=None, metavar="JSON",
                   help="no runs: the table of the rows in these --json files (rows run in parallel processes with "
                        "--only, same settings), each paired with none over the seeds both have")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for the JSON: the command that made it
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.merge:
        results, settings = _merge(args.merge)
        print(_table(results))
        if args.figure:
            print(f"wrote {figure(results, args.figure)}", file=sys.stderr)
        _write_json(args, sorted({s for r in results for s in r["seeds"]}), results, settings)
        return results
    seeds = args.seeds or [args.seed]
    if args.threads is not None:  # None: torch's default
        torch.set_num_threads(args.threads)
    args.threads = torch.get_num_threads()  # recorded in the JSON's settings
    data = (load_images(args.data, True, args.train), load_images(args.data, False, args.test))
    print(f"MobileNetV2 (ImageNet) on CIFAR-10: {len(data[0][0])} train / {len(data[1][0])} test images at "
          f"{args.size} px, {args.epochs} epoch(s), SGD lr {args.lr} momentum {args.momentum}, batch {args.batch}; "
          f"seeds {','.join(map(str, seeds))}, {args.threads} thread(s); bytes per chunk at chunks={args.chunks} "
          f"(float32; the gradient back is the same size)", flush=True)
    wanted = [(row, label, options, calibration) for row, runs in RUNS.items() for label, options, calibration in runs
              if not (args.only and row not in args.only) and label not in args.skip
              and not (args.default_only and row != "none" and "(default)" not in label)]  # none: with its control
    per_seed: dict[tuple[str, str], dict[int, dict]] = {(row, label): {} for row, label, _, _ in wanted}
    for seed in seeds:  # seed by seed: a bench cut short holds every row for the seeds it finished (paired)
        for row, label, options, calibration in wanted:
            r = per_seed[row, label][seed] = run(row, options, calibration, args, data, seed)
            print(f"  {row} / {label}, seed {seed}: {r['acc']:.2f}% ({r['seconds']:.0f} s)", file=sys.stderr,
                  flush=True)
            _write_json(args, seeds, _rows(per_seed))
    results = _rows(per_seed)
    print(_table(results), flush=True)
    if args.figure:
        print(f"wrote {figure(results, args.figure)}", file=sys.stderr)
    print(f"wrote {args.json}", file=sys.stderr)
    return results


CONTROL = ("none", "adapt (control)")


def _adapts(row: str, label: str) -> bool:
    return any(lab == label and (calibration or {}).get("adapt") for lab, _, calibration in RUNS.get(row, []))


def _rows(per_seed: dict[tuple[str, str], dict[int, dict]]) -> list[dict]:
    """Every row over its seeds, its difference to its baseline paired over the seeds both have: a row whose
    network adapts to its codecs is paired with none given the same adaptation (the control) when it ran, every
    other row (and the control) with plain none."""
    plain = per_seed.get(("none", "-"))
    control = per_seed.get(CONTROL)
    results = []
    for (row, label), runs in per_seed.items():
        base, name = (control, "none / " + CONTROL[1]) if control and _adapts(row, label) and row != "none" \
            else (plain, "none / -")
        if base is not None and (row, label) != ("none", "-"):
            runs = {s: r for s, r in runs.items() if s in base}
        if runs:
            baseline = {s: base[s]["acc"] for s in runs} if base is not None else None
            results.append({**_row(row, label, runs, baseline), "baseline": name if base is not None else None})
    return results


def _row(row: str, label: str, per_seed: dict[int, dict], baseline: dict[int, float] | None) -> dict:
    """A table row over seeds: accuracy with its statistics, the other figures as the mean over seeds."""
    first = next(iter(per_seed.values()))
    mean = lambda key: (None if first[key] is None  # noqa: E731
                        else sum(r[key] for r in per_seed.values()) / len(per_seed))
    return {"codec": row, "initialisation": label, "seeds": sorted(per_seed),
            "acc": over_seeds({s: r["acc"] for s, r in per_seed.items()}, baseline),
            **{k: first[k] for k in ("rate", "rate224", "up", "down")},
            **{k: mean(k) for k in ("err_up", "err_down", "err_tail", "seconds", "calib_seconds")},
            "per_seed": {str(s): r for s, r in sorted(per_seed.items())}}


def _merge(paths: list[Path]) -> tuple[list[dict], dict]:
    """The rows of several ``--json`` files (rows run in parallel processes, same settings), paired again, and the
    settings they share."""
    per_seed: dict[tuple[str, str], dict[int, dict]] = {}
    settings = None
    for path in paths:
        saved = json.loads(path.read_text())
        mine = {k: v for k, v in saved["settings"].items() if k not in _PER_INVOCATION}
        if settings is not None and mine != settings:
            differ = sorted(k for k in {*mine, *settings} if mine.get(k) != settings.get(k))
            raise SystemExit(f"bench_codecs --merge: {path} was run with other settings ({differ}); merge only "
                             f"invocations that differ in their rows and seeds.")
        settings = mine
        for r in saved["rows"]:
            per_seed.setdefault((r["codec"], r["initialisation"]), {}).update(
                {int(s): v for s, v in r["per_seed"].items()})
    return _rows(per_seed), settings or {}


_PER_INVOCATION = ("seed", "seeds", "only", "skip", "default_only", "json", "merge", "figure")


def _table(results: list[dict]) -> str:
    header = (f"| {'codec':<14}| {'initialisation':<24}| {'acc % (mean ± std)':>18} | {'n':>2} | "
              f"{'paired with':<22} | {'Δ acc, paired [95% CI]':>22} | {'verdict':>16} | {'rate':>6} | "
              f"{'rate@224':>8} | {'up B/chunk':>11} | {'down B/chunk':>12} | {'err up':>6} | {'err down':>8} | "
              f"{'err tail':>8} | {'calib s':>7} | {'s':>5} |")
    rule = "|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|"
    return "\n".join([header, rule, *map(_table_line, results)])


def _table_line(r: dict) -> str:
    err = lambda v: f"{v:.3f}" if v is not None else "-"  # noqa: E731
    return (f"| {r['codec']:<14}| {r['initialisation']:<24}| {format_mean(r['acc']):>18} | {r['acc']['n']:>2} | "
            f"{r.get('baseline') or '-':<22} | {format_difference(r['acc']):>22} | "
            f"{verdict(r['acc']) if (r['codec'], r['initialisation']) != ('none', '-') else '-':>16} | "
            f"{r['rate']:6.4f} | {r['rate224']:8.4f} | {r['up']:11,} | {r['down']:12,} | {err(r['err_up']):>6} | "
            f"{err(r['err_down']):>8} | {err(r['err_tail']):>8} | "
            f"{r['calib_seconds']:7.0f} | {r['seconds']:5.0f} |")


def figure(results: list[dict], path: Path) -> Path:
    """Each row's accuracy minus its baseline's (see :func:`_rows`), paired by seed: the mean, its 95% interval,
    every seed, and the ±1 point band."""
    from experiments.report import _figure, _save

    rows = [r for r in results if (r["codec"], r["initialisation"]) != ("none", "-")
            and r["acc"]["difference"] is not None and r["acc"]["difference"]["low"] is not None]
    if not rows:
        raise SystemExit("bench_codecs --figure: no row has a paired interval (run none and a codec over 2+ seeds).")
    plt, fig, ax = _figure()
    ax.axvspan(-1, 1, color="0.9")
    ax.axvline(0, color="0.4", linewidth=0.8)
    for i, r in enumerate(rows):
        d = r["acc"]["difference"]
        ax.errorbar(d["mean"], i, xerr=[[d["mean"] - d["low"]], [d["high"] - d["mean"]]], fmt="o", capsize=4,
                    color=f"C{int(r['codec'] == 'none')}")
        for value in d["per_seed"].values():
            ax.plot(value, i, "|", color=f"C{int(r['codec'] == 'none')}", alpha=0.5, markersize=10)
    ax.set_yticks(range(len(rows)), [f"{r['codec']}, {r['initialisation']}\n{format_mean(r['acc'])} % "
                                     f"(n={r['acc']['n']}), rate {r['rate224']:.3f}\nvs {r['baseline']}"
                                     for r in rows], fontsize="small")
    ax.invert_yaxis()
    none = next((r["acc"] for r in results if (r["codec"], r["initialisation"]) == ("none", "-")), None)
    base = f"none / -: {format_mean(none)} % (n={none['n']}); " if none else ""
    ax.set_xlabel(f"test accuracy minus its baseline's on the same seed, points\n{base}grey: ±1 point")
    fig.suptitle("Each row minus its baseline, paired by seed: mean, 95% t interval, each seed |",
                 fontsize="medium")
    ax.grid(alpha=0.3, axis="x")
    fig.subplots_adjust(left=0.34, right=0.97, bottom=0.17)
    path.parent.mkdir(parents=True, exist_ok=True)
    return _save(plt, fig, path)


def _write_json(args: argparse.Namespace, seeds: list[int], results: list[dict], merged: dict | None = None) -> None:
    # a merge records the settings its inputs were run with, beside its own invocation
    settings = {k: v for k, v in vars(args).items() if k != "argv" and (merged is None or k in _PER_INVOCATION)}
    settings.update(merged or {})
    command = "python -m experiments.bench_codecs " + " ".join(args.argv)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"command": command, "settings": settings, "seeds": seeds, "rows": results},
                                    indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
