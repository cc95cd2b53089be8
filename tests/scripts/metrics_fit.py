"""A tiny split CNN on random images through the experiments' CLI: loggers, run folder and callbacks by default.

    python tests/scripts/metrics_fit.py fit --trainer.default_root_dir /tmp/runs [--trainer.strategy.init_args.chunks 2]

Each image is 3x16x16; the up cut carries [B, 8, 8, 8] float32 activations, the down cut [B, 16, 2, 2], so per
micro-batch of ``m`` images the up cut moves ``m * 2048`` bytes and the down cut ``m * 256`` each way.
The label is the sign of the image's mean, so validation accuracy rises above chance within the run.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from experiments.cli import run_cli  # noqa: E402
from splitlit import Split  # noqa: E402

BASE = """\
seed_everything: 0
trainer:
  accelerator: cpu
  devices: 2
  strategy:
    class_path: splitlit.SplitPipelineStrategy
    init_args: {chunks: 2, timeout: 120}
  max_epochs: 2
  log_every_n_steps: 2
  num_sanity_val_steps: 0
  enable_progress_bar: false
  enable_model_summary: false
model: {lr: 0.05}
data: {batch_size: 8, train_batches: 4, val_batches: 2}
"""


class TinyNet(L.LightningModule):
    """conv (client) | relu, 2 convs (server) | pool + linear (client)."""

    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.head = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.body = nn.Sequential(nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
                                  nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.ReLU())
        self.tail = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(16, 2))
        self._split: Split | None = None

    def configure_split(self) -> Split:
        if self._split is None:
            self._split = Split(self.head, self.body, self.tail)
        return self._split

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.configure_split()(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss, on_step=True, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val/loss", F.cross_entropy(logits, y))
        self.log("val/acc", (logits.argmax(-1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


class RandomImages(L.LightningDataModule):
    """Random 3x16x16 images labelled by the sign of their mean."""

    def __init__(self, batch_size: int = 8, train_batches: int = 4, val_batches: int = 2) -> None:
        super().__init__()
        self.save_hyperparameters()

    def _loader(self, batches: int, seed: int) -> DataLoader:
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(batches * self.hparams.batch_size, 3, 16, 16, generator=g)
        x += torch.randn(len(x), 1, 1, 1, generator=g)  # a per-image offset makes the label learnable
        y = (x.mean((1, 2, 3)) > 0).long()
        return DataLoader(TensorDataset(x, y), batch_size=self.hparams.batch_size)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.hparams.train_batches, 0)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.hparams.val_batches, 1)


def main(args: list[str] | None = None) -> None:
    base = Path(tempfile.gettempdir()) / "splitlit_metrics_fit.yaml"
    base.write_text(BASE)
    run_cli(TinyNet, RandomImages, default_config=str(base), args=args)


if __name__ == "__main__":
    main()
