"""Callbacks that tests add to real runs (``--trainer.callbacks+=tests.probes.StateProbe``) to look inside them."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import torch


class StateProbe(L.Callback):
    """Writes, per rank, the weights this rank owns at train start and end, and what its link carried.

    Files in ``out_dir``: ``rank{r}_start.pt`` / ``rank{r}_end.pt`` (state dicts without meta tensors) and
    ``rank{r}_transfers.json`` (cut, kind, role, shape, dtype of every tensor the rank sent or received).
    """

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.seen: list[dict] = []

    def _own_state(self, pl_module: L.LightningModule) -> dict:
        return {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items() if not v.is_meta}

    def on_train_start(self, trainer, pl_module):
        self.out_dir.mkdir(parents=True, exist_ok=True)
        torch.save(self._own_state(pl_module), self.out_dir / f"rank{trainer.global_rank}_start.pt")

    def _collect(self, trainer):
        meter = getattr(trainer.strategy, "meter", None)
        if meter is not None:
            transfers, _ = meter.reset()
            self.seen += [{"cut": t.cut, "kind": t.kind, "role": t.role, "shape": list(t.shape), "dtype": t.dtype}
                          for t in transfers]

    def on_train_batch_end(self, trainer, *args):
        self._collect(trainer)

    def on_validation_batch_end(self, trainer, *args):
        self._collect(trainer)

    def on_train_end(self, trainer, pl_module):
        self._collect(trainer)
        torch.save(self._own_state(pl_module), self.out_dir / f"rank{trainer.global_rank}_end.pt")
        (self.out_dir / f"rank{trainer.global_rank}_transfers.json").write_text(json.dumps(self.seen))
