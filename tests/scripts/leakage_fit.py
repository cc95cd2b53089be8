"""A split fit of the tiny CNN with or without the LeakageMonitor and the Defences, recording what crossed.

    python tests/scripts/leakage_fit.py --out DIR [--monitor] [--order zb]

Each rank writes DIR/<tag>.rank<r>.json: the bytes its link meter booked (sent and received, by cut and kind),
the bytes its transport ledger received outside the pipeline, and the monitor's measurements (none on the server);
with the monitor, the client writes its reconstruction grid DIR/leak_recon.png.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from callbacks import Defences, LeakageMonitor  # noqa: E402
from splitlit import SplitPipelineStrategy  # noqa: E402
from tests.scripts.metrics_fit import TinyNet  # noqa: E402

from splitlit.traffic import link_bytes

BATCH, BATCHES = 16, 6


def images(seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(BATCH * BATCHES, 3, 16, 16, generator=g) + torch.randn(BATCH * BATCHES, 1, 1, 1, generator=g)
    return TensorDataset(x, (x.mean((1, 2, 3)) > 0).long())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--monitor", action="store_true")
    parser.add_argument("--order", default="1f1b")
    args = parser.parse_args()
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    # The server's "public" images and head: random ones, enough to run the reconstruction attack end to end.
    public = SimpleNamespace(images=lambda: torch.randn(32, 3, 16, 16), check_disjoint=lambda trainer: None)
    callbacks = [LeakageMonitor(every_n_steps=2, max_samples=12, attacks=("label_auc", "dcor", "recon"),
                                public_images=public, public_head=torch.nn.Conv2d(3, 8, 3, stride=2, padding=1),
                                recon_steps=3, image_mean=None, image_std=None),
                 Defences(nopeek=0.1, activation_noise=0.01, gradient_noise=1e-4)] if args.monitor else []
    strategy = SplitPipelineStrategy(chunks=4, order=args.order, timeout=60, wire={"up.activation": "int8"})
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_epochs=1, num_sanity_val_steps=0,
                        logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, callbacks=callbacks, default_root_dir=args.out)
    trainer.fit(TinyNet(lr=0.05), DataLoader(images(0), batch_size=BATCH), DataLoader(images(1), batch_size=BATCH))
    result = {"sent": link_bytes(strategy.meter, role="sent"), "received": link_bytes(strategy.meter, role="received"),
              "ledger": sum(n for _, n in strategy.ledger.received),
              "history": callbacks[0].history if callbacks else []}
    tag = "monitor" if args.monitor else "plain"
    (Path(args.out) / f"{tag}.rank{trainer.global_rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
