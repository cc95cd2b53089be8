"""The toy split with what makes resuming hard: shuffled data, dropout on both ranks, momentum and an LR schedule.

    python tests/scripts/resume_toy.py --out DIR [--kill-at 7] [--ckpt-path last]

Trains 2 epochs of 12 batches, checkpointing every 3 steps into DIR/ckpt (last.ckpt too). ``--kill-at N``
ends the client abruptly after N batches (os._exit, as a crash would); the server then fails on its lost peer.
Each rank that finishes writes its final weights, optimiser state and learning rate to DIR/final.rank<r>.pt.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from splitlit import SplitPipelineStrategy  # noqa: E402
from tests.scripts.toy import Toy  # noqa: E402


class DropoutToy(Toy):
    def __init__(self) -> None:
        super().__init__(lr=0.05)
        self.head = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Dropout(0.2))
        self.body = nn.Sequential(nn.Linear(12, 16), nn.GELU(), nn.Dropout(0.3), nn.Linear(16, 10), nn.GELU())

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=5, gamma=0.5)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


class KillAfter(L.Callback):
    def __init__(self, steps: int) -> None:
        self.steps = steps

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_rank == 0 and trainer.global_step == self.steps:
            os._exit(3)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--kill-at", type=int, default=None)
    p.add_argument("--ckpt-path", default=None)
    args = p.parse_args()
    L.seed_everything(0, verbose=False)
    model = DropoutToy()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(96, 6, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] > 1).long()
    train = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True)
    # Checkpoints after every 3rd step (ModelCheckpoint runs after the kill callback in a batch's hooks).
    callbacks = [ModelCheckpoint(dirpath=args.out / "ckpt", every_n_train_steps=3, save_last=True, save_top_k=-1)]
    if args.kill_at is not None:
        callbacks.insert(0, KillAfter(args.kill_at))
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=SplitPipelineStrategy(chunks=2, timeout=20),
                        max_epochs=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=callbacks)
    trainer.fit(model, train, ckpt_path=args.ckpt_path)
    optimizer = trainer.optimizers[0]
    state = {k: v for k, v in model.state_dict().items() if not v.is_meta}
    torch.save({"state": state, "optimizer": optimizer.state_dict(), "lr": optimizer.param_groups[0]["lr"],
                "global_step": trainer.global_step}, args.out / f"final.rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main()
