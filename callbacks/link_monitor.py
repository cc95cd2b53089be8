"""``LinkMonitor``: what the link-measuring callbacks share, over :mod:`splitlit.traffic`."""

from __future__ import annotations

from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from typing_extensions import override

from callbacks.run_summary import write_run_summary
from splitlit.checks import check_count
from splitlit.traffic import BatchLink, LinkTotals, LinkWindows, ServerView, from_server, summarize

__all__ = ["LinkMonitor"]


class LinkMonitor(Callback):
    """Sums each training batch's link records into three windows and logs a subclass's figures for them.

    A subclass says what its figures are (:meth:`figures`) and what it measures beside the meter
    (:meth:`measured`). Per batch the figures are logged on Lightning's logging steps; with ``_epoch`` appended at
    each training epoch end; with ``_run`` appended they go into the run summary, over the run's batches except
    the first ``warmup_batches``. Everything is logged once, by the client (rank 0); the server's share reaches it
    through one small ``gather`` to the client on each logging step and at each epoch end, which both ranks run.

    Args:
        warmup_batches: first training batches of the fit left out of the ``_run`` figures (the first batch
            builds the pipeline stages and infers their shapes).
    """

    #: Whether the callback has figures without a split (a strategy with no ``meter``); if not, it logs nothing.
    logs_unsplit = False

    def __init__(self, warmup_batches: int = 1) -> None:
        self.warmup_batches = check_count(type(self).__name__, "warmup_batches", warmup_batches, at_least=0,
                                          fix="give a number of batches >= 0.")
        self._meter: Any = None
        self._windows = LinkWindows(warmup_batches)

    def figures(self, totals: LinkTotals, server: ServerView | None) -> dict[str, float]:
        """The logged figures of one window; ``server`` is None only without a split."""
        raise NotImplementedError

    def measured(self, batch: BatchLink | None) -> dict[str, float]:
        """What the callback measured itself for the batch just ended: ``wall_s`` and/or ``raw_bytes``."""
        return {}

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._meter = getattr(trainer.strategy, "meter", None)  # SplitPipelineStrategy's LinkMeter; None unsplit
        self._windows = LinkWindows(self.warmup_batches)

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self._meter is not None:
            self._meter.reset()  # drop what validation or an earlier batch left

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._meter is None and not self.logs_unsplit:
            return
        record = summarize(self._meter.transfers, self._meter.computes) if self._meter is not None else None
        self._windows.add(record, **self.measured(record))
        logs_now = getattr(trainer.strategy, "logs_now", None)  # the server of many clients: the served client's rule
        if not (logs_now(trainer) if logs_now else trainer._logger_connector.should_update_logs):
            return
        server = self._server_views(trainer, [self._windows.batch])
        if server is not None:
            trainer._logger_connector.log_metrics(self._suffixed(self._windows.batch, server[0]))

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._meter is None and not self.logs_unsplit:
            return
        epoch, run = self._windows.epoch, self._windows.run
        server = self._server_views(trainer, [epoch, run])
        self._windows.new_epoch()
        if server is None:
            return
        trainer._logger_connector.log_metrics(self._suffixed(epoch, server[0], "_epoch"))
        if run.batches:
            write_run_summary(trainer, self._suffixed(run, server[1], "_run"))

    def _server_views(self, trainer: Trainer, windows: list[LinkTotals]) -> list[ServerView | None] | None:
        if self._meter is None:  # not split: nothing to gather, the only rank logs
            return [None] * len(windows) if trainer.is_global_zero else None
        return from_server(trainer.strategy, windows)

    def _suffixed(self, totals: LinkTotals, server: ServerView | None, suffix: str = "") -> dict[str, float]:
        return {k + suffix: float(v) for k, v in self.figures(totals, server).items()}
