"""Run one preset at several epoch counts (and chunk counts) as one W&B group: the overfitting curves of figures 1-4.

    python -m experiments.sweep --experiment experiments.cola_roberta \\
        --config experiments/configs/cola_gpipe.yaml --epochs 10 20 40 80
    python -m experiments.sweep --experiment experiments.cifar10_mobilenet \\
        --config experiments/configs/cifar10_small.yaml --epochs 1 --chunks 1 4 8 -- --data.train_subset 512

    python -m experiments.sweep --experiment experiments.cola_roberta \\
        --config experiments/configs/cola_small.yaml --epochs 3 --seeds 0-4      # 5 seeds: curves with a band

Each run is its own process (``python -m <experiment> fit --config ... --trainer.max_epochs E``), one after
the other, in the group ``--group`` (default ``<preset>-sweep-<time>``); arguments after ``--`` go to every run.
``--seeds`` runs every setting once per seed (``--seed_everything S``, and CoLA's ``--data.seed S``), all in the
same group, named ``...-s<S>-...``.
Then ``python -m experiments.report <default_root_dir> --group <group>`` draws them. A failed run stops the sweep.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path

from experiments.stats import seeds_argument

__all__ = ["SEED_ARGS", "commands", "main"]

# What a seed changes beyond Lightning's global seed (--seed_everything): CoLA's training order has a generator of
# its own (so split and unsplit runs see the same batches), seeded by --data.seed.
SEED_ARGS = {"experiments.cola_roberta": ["--data.seed", "{seed}"]}


def commands(*, experiment: str, configs: list[str], epochs: list[int], chunks: list[int] | None, group: str,
             extra: list[str], stamp: str, seeds: list[int] | None = None) -> list[list[str]]:
    """The command of each run: every epoch count times every chunk count (the preset's chunks if none) times
    every seed (the preset's seed if none). Every run is in ``group``: runs that differ only by seed are drawn as
    one mean curve with a band by ``experiments.report``."""
    preset = "+".join(Path(c).stem for c in configs) or experiment.rsplit(".", 1)[-1]
    runs = []
    for e in epochs:
        for c in chunks or [None]:
            for seed in seeds or [None]:
                name = (f"{preset}-e{e}" + (f"-c{c}" if c is not None else "")
                        + (f"-s{seed}" if seed is not None else "") + f"-{stamp}")
                cmd = [sys.executable, "-m", experiment, "fit", *(a for cfg in configs for a in ("--config", cfg)),
                       "--trainer.max_epochs", str(e), "--run.group", group, "--run.name", name]
                if c is not None:
                    cmd += ["--trainer.strategy.init_args.chunks", str(c)]
                if seed is not None:
                    cmd += ["--seed_everything", str(seed), *SEED_ARGS.get(experiment, [])]
                    cmd = [a.replace("{seed}", str(seed)) for a in cmd]
                runs.append(cmd + extra)
    return runs


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(prog="python -m experiments.sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiment", required=True, help="module of the experiment, e.g. experiments.cola_roberta")
    parser.add_argument("--config", action="append", default=[], help="preset file(s), in order")
    parser.add_argument("--epochs", type=int, nargs="+", required=True, help="epoch counts, e.g. 10 20 40 80")
    parser.add_argument("--chunks", type=int, nargs="+", help="chunk counts (default: the preset's)")
    parser.add_argument("--seeds", type=seeds_argument, default=None,
                        help="run every setting with each seed, e.g. 0-4 or 0,1,2 (default: the preset's seed)")
    parser.add_argument("--group", help="W&B group of every run (default: <preset>-sweep-<time>)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands only")
    args = parser.parse_args(argv)
    if any(e < 1 for e in args.epochs) or any(c < 1 for c in args.chunks or []):
        parser.error(f"--epochs {args.epochs} and --chunks {args.chunks} must be positive counts.")
    preset = "+".join(Path(c).stem for c in args.config) or args.experiment.rsplit(".", 1)[-1]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    group = args.group or f"{preset}-sweep-{stamp}"
    runs = commands(experiment=args.experiment, configs=args.config, epochs=args.epochs, chunks=args.chunks,
                    group=group, extra=extra, stamp=stamp, seeds=args.seeds)
    for i, cmd in enumerate(runs, 1):
        print(f"[{i}/{len(runs)}] {shlex.join(cmd)}", flush=True)
        if not args.dry_run and subprocess.run(cmd).returncode != 0:
            print(f"experiments.sweep: run {i} failed; stopping. Group {group!r} holds the runs so far.",
                  file=sys.stderr)
            return 1
    print(f"Group {group!r}: {len(runs)} runs. Draw them with: python -m experiments.report <runs folder> "
          f"--group {group}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
