"""A small split fit that ends (SIGKILL) or stalls (SIGSTOP) one rank at a chosen phase; see experiments.bench_faults.

    python tests/scripts/fault_fit.py --out DIR --fault mid_epoch --victim server [--timeout 20]
    python tests/scripts/fault_fit.py --out DIR --ckpt-path DIR/ckpt/last.ckpt    # resume, no fault

The model is resume_toy's (dropout on both ranks, momentum, an LR schedule), 2 epochs of 12 batches with a
validation after each, checkpoints every 3 steps. The client "calibrates" alone in set-up for 3 s (as
CodecCalibration does). Each rank prints ``FAULT <t>`` when it is hit and ``RANK_EXIT <rank> <t>`` when it
leaves, so the bench can time the survivor.
"""

from __future__ import annotations

import argparse
import atexit
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from splitlit import SplitPipelineStrategy  # noqa: E402
from tests.scripts.resume_toy import DropoutToy  # noqa: E402

VICTIM_RANK = {"client": 0, "server": 1}


def hit(stall: float | None = None) -> None:
    print(f"FAULT {time.time():.3f}", flush=True)
    if stall is None:
        os.kill(os.getpid(), signal.SIGKILL)
    # Stopped for `stall` seconds by a watcher outside this process, then left to find its peer gone.
    subprocess.Popen(["sh", "-c", f"sleep {stall}; kill -CONT {os.getpid()}"], start_new_session=True)
    os.kill(os.getpid(), signal.SIGSTOP)


class Fault(L.Callback):
    def __init__(self, phase: str | None, victim: str | None, stall: float) -> None:
        self.phase, self.rank, self.stall = phase, VICTIM_RANK.get(victim or "", -1), stall
        self.saves = 0

    def _mine(self, trainer) -> bool:
        return trainer.global_rank == self.rank

    def setup(self, trainer, pl_module, stage):
        if self.phase == "setup" and self._mine(trainer):
            hit()
        if trainer.global_rank == 0:  # the client's calibration: alone, for 3 s, while the server waits
            if self.phase == "calibration" and self._mine(trainer):
                threading.Timer(1.5, hit).start()
            time.sleep(3)
        elif self.phase == "calibration" and self._mine(trainer):
            threading.Timer(1.5, hit).start()  # the server dies while it waits for the client's set-up

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if not self._mine(trainer):
            return
        if self.phase == "first_step" and trainer.global_step == 0:
            hit()
        if self.phase == "mid_epoch" and trainer.global_step == 7:
            hit()
        if self.phase == "stall" and trainer.global_step == 7:
            hit(stall=self.stall)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if self.phase == "validation" and self._mine(trainer):
            hit()

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        self.saves += 1
        if self.phase == "checkpoint" and self._mine(trainer) and self.saves == 2:
            hit()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--fault", default=None)
    p.add_argument("--victim", default=None, choices=("client", "server"))
    p.add_argument("--timeout", type=float, default=20.0)
    p.add_argument("--ckpt-path", default=None)
    p.add_argument("--two-hosts", action="store_true", help="num_nodes=2, devices=1 (NODE_RANK from the caller)")
    args = p.parse_args()
    L.seed_everything(0, verbose=False)
    model = DropoutToy()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(120, 6, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] > 1).long()
    train = DataLoader(TensorDataset(x[:96], y[:96]), batch_size=8, shuffle=True)
    val = DataLoader(TensorDataset(x[96:], y[96:]), batch_size=8)
    callbacks = [Fault(args.fault, args.victim, stall=args.timeout + 20),
                 ModelCheckpoint(dirpath=args.out / "ckpt", every_n_train_steps=3, save_last=True, save_top_k=-1)]
    strategy = SplitPipelineStrategy(chunks=2, timeout=args.timeout)
    ranks = dict(num_nodes=2, devices=1) if args.two_hosts else dict(devices=2)
    trainer = L.Trainer(accelerator="cpu", strategy=strategy, max_epochs=2, logger=False, **ranks,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        callbacks=callbacks)
    atexit.register(lambda: print(f"RANK_EXIT {trainer.global_rank} {time.time():.3f}", flush=True))
    trainer.fit(model, train, val, ckpt_path=args.ckpt_path)


if __name__ == "__main__":
    main()
