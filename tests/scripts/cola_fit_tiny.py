"""A few CoLA training steps of a tiny random RoBERTa (real tokenizer and data), split or unsplit.

    python tests/scripts/cola_fit_tiny.py --out DIR [--chunks 4] [--order zb]     # split on two ranks
    python tests/scripts/cola_fit_tiny.py --out DIR --chunks 0       # unsplit, one process

Rank 0 writes DIR/weights.pt (the whole model's trained state, gathered from both ranks by the checkpoint) and
DIR/result.json (dev rows scored, validation metrics, optimiser parameter counts of both ranks).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch import Callback

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from experiments.cola_data import CoLADataModule  # noqa: E402
from experiments.cola_roberta import CoLAClassifier  # noqa: E402
from splitlit import SplitPipelineStrategy  # noqa: E402
from tests.twoproc import SHARED_DATA  # noqa: E402

TINY = {"num_hidden_layers": 3, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4,
        "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}


class SGDCoLA(CoLAClassifier):
    """Plain SGD, so the weights after a step differ exactly as much as the gradients (Adam would blow the float
    noise of near-zero gradients up to a full step of size lr)."""

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


class Record(Callback):
    def __init__(self) -> None:
        self.dev_rows = 0
        self.metrics: dict[str, float] = {}
        self.optimizer_params = 0
        self.batches: list[int] = []  # a fingerprint of each training batch: both runs must see the same data

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if isinstance(batch, dict):
            self.batches.append(int((batch["input_ids"] * torch.arange(batch["input_ids"].shape[1])).sum()))

    def on_train_start(self, trainer, pl_module) -> None:
        self.optimizer_params = sum(p.numel() for g in trainer.optimizers[0].param_groups for p in g["params"])

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if not trainer.sanity_checking and isinstance(batch, dict):
            self.dev_rows += int(batch["labels"].shape[0])

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--chunks", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--order", default="1f1b")
    args = parser.parse_args()
    torch.set_num_threads(1)
    L.seed_everything(0)
    model = SGDCoLA(str(SHARED_DATA / "roberta-base-tokenizer"), pretrained=False, config_overrides=TINY)
    data = CoLADataModule(str(SHARED_DATA / "roberta-base-tokenizer"), str(SHARED_DATA / "cola"), batch_size=16,
                          eval_batch_size=100, train_subset=16 * args.steps)
    split = args.chunks > 0
    record = Record()
    trainer = L.Trainer(accelerator="cpu", devices=2 if split else 1,
                        strategy=(SplitPipelineStrategy(chunks=args.chunks, order=args.order, timeout=60) if split
                                  else "auto"),
                        max_epochs=1, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[record])
    trainer.fit(model, datamodule=data)
    counts = [record.optimizer_params, 0]
    if split:
        gathered: list = [None, None]
        dist.all_gather_object(gathered, record.optimizer_params)
        counts = gathered
    args.out.mkdir(parents=True, exist_ok=True)
    trainer.save_checkpoint(args.out / "model.ckpt")  # under the split: both ranks' weights, written by rank 0
    if trainer.is_global_zero:
        state = torch.load(args.out / "model.ckpt", map_location="cpu", weights_only=False)["state_dict"]
        torch.save(state, args.out / "weights.pt")
        (args.out / "result.json").write_text(json.dumps({
            "dev_rows": record.dev_rows, "batches": record.batches, "metrics": record.metrics,
            "optimizer_params": counts,
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}))


if __name__ == "__main__":
    main()
