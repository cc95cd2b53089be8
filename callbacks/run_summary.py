"""The run summary the callbacks write to: W&B's ``run.summary`` and ``summary.json`` beside each CSV log."""

from __future__ import annotations

import json
from pathlib import Path

from lightning.pytorch import Trainer
from lightning.pytorch.loggers import CSVLogger, WandbLogger

__all__ = ["SUMMARY_FILE", "write_run_summary"]

SUMMARY_FILE = "summary.json"


def write_run_summary(trainer: Trainer, values: dict[str, float]) -> None:
    """Put ``values`` in the run summary: W&B's ``run.summary`` and ``summary.json`` in each CSVLogger's folder."""
    if not trainer.is_global_zero or not values:
        return
    values = {k: float(v) for k, v in values.items()}
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.experiment.summary.update(values)
        elif isinstance(logger, CSVLogger):
            path = Path(logger.log_dir) / SUMMARY_FILE
            path.parent.mkdir(parents=True, exist_ok=True)
            summary = json.loads(path.read_text()) if path.is_file() else {}
            summary.update(values)
            path.write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
