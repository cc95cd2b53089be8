"""A callback that kills its own rank mid-epoch, as a crash or ``kill -9`` would, for the shaped-link failure tests.

    --trainer.callbacks+=tests.scripts.link_kill.KillRank --trainer.callbacks.rank=1 --trainer.callbacks.step=5 \\
        --trainer.callbacks.stamp=/tmp/killed_at
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import lightning as L


class KillRank(L.Callback):
    """SIGKILLs this process at the start of training batch ``step`` on global rank ``rank``; writes the time first."""

    def __init__(self, rank: int, step: int, stamp: str | None = None) -> None:
        self.rank, self.step, self.stamp = rank, step, stamp

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            if self.stamp:
                Path(self.stamp).write_text(f"{time.time()}\n")
            os.kill(os.getpid(), signal.SIGKILL)
