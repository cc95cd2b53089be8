"""A small U-shaped model with a wide up cut (512 KiB per batch) and almost no server weights, run as two hosts.

    python -m splitlit.link --bandwidth 500kbit -- python tests/scripts/link_wide.py --timeout 3
    python -m splitlit.link --bandwidth 100mbit --delay 25ms -- python tests/scripts/link_wide.py --save /tmp/w

Made to be slower than the strategy's timeout on a slow link: each activation takes seconds to cross, while the
setup (the server's few weights) crosses at once. Trainer(num_nodes=2, devices=1): the link command sets the env.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from splitlit import Split, SplitPipelineStrategy  # noqa: E402

WIDTH = 16384  # up-cut features per sample: 8 samples x 16384 x 4 bytes = 512 KiB per batch


class Wide(L.LightningModule):
    """head: Linear 6 -> 16384 (client), body: 1x1 Conv1d over 16 groups + pooling (server, 272 weights), tail: 3."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Sequential(nn.Linear(6, WIDTH), nn.Tanh())
        self.body = nn.Sequential(nn.Unflatten(1, (16, WIDTH // 16)), nn.Conv1d(16, 16, 1), nn.GELU(),
                                  nn.AdaptiveAvgPool1d(2), nn.Flatten(1))
        self.tail = nn.Linear(32, 3)

    def configure_split(self) -> Split:
        return Split(head=self.head, body=self.body, tail=self.tail)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(self.body(self.head(x)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--save", help="write each rank's own weights after training to SAVE.rank<N>.pt")
    args = p.parse_args(argv)
    L.seed_everything(0, verbose=False)
    x = torch.randn(8 * args.steps, 6)
    train = DataLoader(TensorDataset(x, (x[:, 0] > 0).long()), batch_size=8)
    trainer = L.Trainer(accelerator="cpu", num_nodes=2, devices=1, max_steps=args.steps, logger=False,
                        strategy=SplitPipelineStrategy(chunks=1, timeout=args.timeout), enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    model = Wide()
    trainer.fit(model, train)
    if args.save:  # the weights this rank holds (the others are meta tensors here)
        own = {k: v.detach().clone() for k, v in model.state_dict().items() if not v.is_meta}
        torch.save(own, f"{args.save}.rank{trainer.global_rank}.pt")
    print(f"rank {trainer.global_rank} finished {trainer.global_step} steps")


if __name__ == "__main__":
    main()
