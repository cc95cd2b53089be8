"""Which random state each dropout draws from, per rank: DropoutToy (dropout on both ranks), chunks 2, 6 batches.

    python tests/scripts/dropout_draws.py --out DIR

Each rank writes DIR/draws.rank<r>.json: a digest of the torch random state when the fit starts ("start") and at
every training-mode dropout call ("draws", in order; the shape-only checks on meta tensors left out).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from splitlit import SplitPipelineStrategy  # noqa: E402
from tests.scripts.resume_toy import DropoutToy  # noqa: E402


class RecordDraws(L.Callback):
    def __init__(self, out: Path) -> None:
        self.out, self.draws = out, []

    def setup(self, trainer, pl_module, stage):
        for module in pl_module.modules():
            if isinstance(module, nn.Dropout):
                module.register_forward_pre_hook(self._record)

    def on_fit_start(self, trainer, pl_module):
        self.start = _digest()

    def _record(self, module, args):
        if module.training and not args[0].is_meta:
            self.draws.append(_digest())

    def on_fit_end(self, trainer, pl_module):
        record = {"start": self.start, "draws": self.draws}
        (self.out / f"draws.rank{trainer.global_rank}.json").write_text(json.dumps(record))


def _digest() -> str:
    return hashlib.sha256(torch.get_rng_state().numpy().tobytes()).hexdigest()[:16]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    L.seed_everything(0, verbose=False)
    model = DropoutToy()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(48, 6, generator=g)
    y = (x[:, 0] > 0).long()
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=SplitPipelineStrategy(chunks=2, timeout=30),
                        max_epochs=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, callbacks=[RecordDraws(args.out)])
    trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True))


if __name__ == "__main__":
    main()
