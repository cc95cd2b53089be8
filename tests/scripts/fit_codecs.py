"""Two-rank fits of a small CNN on real CIFAR-10 images, one per codec setting, in one pair of processes.

    python tests/scripts/fit_codecs.py --data ../shared/data/cifar10 [--only NAME]

For each setting the client (rank 0) and the server (rank 1) print one line
``RESULT {"name": ..., "rank": r, "bytes": {"up.activation": ...}, "expected": {...}, "loss": ..., ...}``
with the bytes their link meter recorded (each flow once per rank) and the analytic size, so the test can
compare them. Each fit: 2 training batches of 8 in 2 chunks, then 1 validation batch (forward only).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset
from torchvision.transforms import v2

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from callbacks.codec_calibration import CodecCalibration  # noqa: E402
from experiments.cifar10_mobilenet import LocalCIFAR10  # noqa: E402
from splitlit import Split, SplitPipelineStrategy  # noqa: E402
from splitlit.codecs import ConvInsert, PowerIteration  # noqa: E402
from splitlit.traffic import analytic_link_bytes  # noqa: E402

BATCH, CHUNKS, TRAIN_BATCHES, VAL_BATCHES = 8, 2, 2, 1
UP_SHAPE, DOWN_SHAPE = (BATCH, 8, 16, 16), (BATCH, 16, 4, 4)  # the cuts for 32x32 inputs

SETTINGS = {
    "none": dict(),
    "poweriter": dict(up=lambda: PowerIteration(2), down=lambda: PowerIteration(3, iters=2)),
    "convinsert": dict(up=lambda: ConvInsert(8, 4, kernel_size=2), down=lambda: ConvInsert(16, 4), calibrate=True),
    "wire": dict(wire={"up.activation": "int8", "up.gradient": "fp16",
                       "down.activation": {"name": "topk", "fraction": 0.25}, "down.gradient": "bf16"}),
    "poweriter+wire": dict(up=lambda: PowerIteration(2), down=lambda: PowerIteration(3),
                           wire={"up.activation": {"name": "int8-block", "block_size": 16},
                                 "down.gradient": "fp16"}),
}


class SmallNet(L.LightningModule):
    def __init__(self, up: nn.Module | None = None, down: nn.Module | None = None, lr: float = 0.05) -> None:
        super().__init__()
        self.head = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8))
        self.body = nn.Sequential(nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
                                  nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.ReLU())
        self.tail = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(16, 10))
        self.up, self.down, self.lr = up, down, lr
        self._split: Split | None = None

    def configure_split(self) -> Split:
        if self._split is None:
            self._split = Split(self.head, self.body, self.tail, up=self.up, down=self.down)
        return self._split

    def forward(self, x):
        return self.configure_split()(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def checksum(module: nn.Module | None) -> float | None:
    if module is None:
        return None
    return sum(float(p.detach().double().sum()) for p in module.parameters() if not p.is_meta) or None


class _RecordCalibration(CodecCalibration):
    """Remembers the server halves of the codecs as calibrated on the client, to compare with the server's."""

    def setup(self, trainer, pl_module, stage):
        self.body_before = checksum(pl_module.body)
        super().setup(trainer, pl_module, stage)
        self.sent = {"up.decoder": checksum(pl_module.up.decoder), "down.encoder": checksum(pl_module.down.encoder),
                     "body": checksum(pl_module.body)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--only", default=None)
    args = parser.parse_args()
    to_tensor = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])
    train = LocalCIFAR10(args.data, train=True, transform=to_tensor)
    names = [args.only] if args.only else list(SETTINGS)
    for name in names:
        setting = SETTINGS[name]
        L.seed_everything(0, verbose=False)
        up, down = (setting[k]() if k in setting else None for k in ("up", "down"))
        calibrate = setting.get("calibrate", False)
        model = SmallNet(up, down, lr=0.0 if calibrate else 0.05)
        callbacks = [_RecordCalibration(batches=2, warmup_steps=5, adapt_steps=5, adapt_lr=1e-2)] if calibrate else []
        strategy = SplitPipelineStrategy(chunks=CHUNKS, timeout=120, wire=setting.get("wire"))
        trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_epochs=1,
                            limit_train_batches=TRAIN_BATCHES, limit_val_batches=VAL_BATCHES, num_sanity_val_steps=0,
                            logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, callbacks=callbacks)
        data = Subset(train, range(BATCH * TRAIN_BATCHES))
        trainer.fit(model, DataLoader(data, batch_size=BATCH), DataLoader(data, batch_size=BATCH))
        measured: dict[str, int] = {}
        for t in strategy.meter.transfers:
            key = f"{t.cut}.{t.kind}"
            measured[key] = measured.get(key, 0) + t.nbytes
        step = analytic_link_bytes(UP_SHAPE, DOWN_SHAPE, chunks=CHUNKS, up=up, down=down, wire=setting.get("wire"))
        val = analytic_link_bytes(UP_SHAPE, DOWN_SHAPE, chunks=CHUNKS, up=up, down=down, wire=setting.get("wire"),
                                  train=False)
        expected = {k: TRAIN_BATCHES * step[k] + VAL_BATCHES * val[k] for k in measured}
        result = {"name": name, "rank": trainer.global_rank, "bytes": measured, "expected": expected,
                  "loss": float(trainer.callback_metrics.get("train_loss", float("nan"))),
                  "val_loss": float(trainer.callback_metrics.get("val_loss", float("nan"))),
                  "metric_names": sorted(trainer.callback_metrics)}
        if calibrate:
            if trainer.global_rank == 0:
                result["calibrated"] = callbacks[0].sent
                result["body_before"] = callbacks[0].body_before
                result["calibration"] = callbacks[0].report
            else:
                result["server_has"] = {"up.decoder": checksum(model.up.decoder),
                                        "down.encoder": checksum(model.down.encoder), "body": checksum(model.body)}
        # one write with its newline: both ranks share the pipe, and a line written in pieces can interleave
        sys.stdout.write("RESULT " + json.dumps(result) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
