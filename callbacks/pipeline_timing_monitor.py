"""``PipelineTimingMonitor``: where the time of a training batch goes on the client and on the server."""

from __future__ import annotations

import time
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from typing_extensions import override

from callbacks.link_monitor import LinkMonitor
from splitlit.traffic import BatchLink, LinkTotals, ServerView

__all__ = ["PipelineTimingMonitor"]


class PipelineTimingMonitor(LinkMonitor):
    r"""Logs the wall time of each training batch, each rank's computation time, its waiting, and the bubble.

    Usage::

        strategy = SplitPipelineStrategy(chunks=4)
        trainer = Trainer(accelerator="cpu", devices=2, strategy=strategy, callbacks=[PipelineTimingMonitor()])

    Times come from ``time.perf_counter()``; stage computations from the strategy's
    :class:`~splitlit.meter.LinkMeter` (each stage's forward or backward of one micro-batch, timed around the
    computation alone). Everything is logged once, by the client (rank 0); the server's times reach it through
    one small ``gather`` to the client on each logging step and at each epoch end, which both ranks run.

    Logged keys, in seconds per training batch unless said otherwise. The per-batch keys are logged on
    Lightning's logging steps (``log_every_n_steps``) and describe that batch; with ``_epoch`` appended they are
    logged at each training epoch end as the mean over the epoch's batches; with ``_run`` appended they go into
    the run summary (W&B ``run.summary`` and ``summary.json`` beside the CSV log) as the mean over the run's
    batches except the first ``warmup_batches``.

    - ``time/batch_s``: total time per batch: wall time on the client from ``on_train_batch_start`` to
      ``on_train_batch_end`` (the pipeline step, the optimiser step and Lightning's work for the batch; loading
      the batch is not included).
    - ``time/compute_client_s``: the client's computation: its head and tail forward and backward over every
      micro-batch, without any waiting.
    - ``time/compute_server_s``: the server's computation: its body forward and backward over every micro-batch.
    - ``time/compute_s``: ``compute_client_s + compute_server_s``, the computation time of the batch (the time
      one device would need for it; the report's "computation time").
    - ``time/pipeline_client_s``: the client's pipeline step, from its first record (a computation starting or a
      transfer being posted) to its last (a computation ending or a transfer completing).
    - ``time/wait_client_s``: time waiting on the link on the client: ``pipeline_client_s - compute_client_s``,
      the part of its pipeline step in which it computes nothing because it waits for a transfer to complete
      (the wire time plus the time the server takes to produce what the client waits for).
    - ``time/wait_server_s``: the same on the server (its pipeline step minus its computation).
    - ``time/outside_client_s``: ``batch_s - pipeline_client_s``, the client's time for the batch outside its
      pipeline step: the optimiser step, gradient clipping (a round trip to the server), the callbacks' and
      Lightning's work.
    - ``time/bound_ratio``: ``batch_s / max(compute_client_s, compute_server_s)``, the batch's time over what a
      perfect two-rank pipeline on a free link would take (1 at best; the busier rank computes all the time).
    - ``time/bubble``: the pipeline bubble, a fraction in [0, 1]: the ranks' idle time over their pipeline time,
      ``(wait_client_s + wait_server_s) / (pipeline_client_s + pipeline_server_s)``. 0 when both ranks compute
      all the time; about 0.5 for one micro-batch on a free link with balanced ranks, since they take turns.

    Without a split (a strategy with no ``meter``) only ``time/batch_s`` is logged.

    Args:
        warmup_batches: first training batches of the fit left out of the ``_run`` figures (the first batch
            builds the pipeline stages and infers their shapes).
    """

    logs_unsplit = True  # time/batch_s

    def __init__(self, warmup_batches: int = 1) -> None:
        super().__init__(warmup_batches)
        self._start = self._wall_s = 0.0

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        self._start = time.perf_counter()

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._wall_s = time.perf_counter() - self._start
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    @override
    def measured(self, batch: BatchLink | None) -> dict[str, float]:
        return {"wall_s": self._wall_s}

    @override
    def figures(self, totals: LinkTotals, server: ServerView | None) -> dict[str, float]:
        n = max(totals.batches, 1)
        figures = {"time/batch_s": totals.wall_s / n}
        if server is not None:
            wait_client = totals.pipeline_s - totals.compute_s
            wait_server = server.pipeline_s - server.compute_s
            pipeline = totals.pipeline_s + server.pipeline_s
            busiest = max(totals.compute_s, server.compute_s)
            figures.update({
                "time/compute_client_s": totals.compute_s / n,
                "time/compute_server_s": server.compute_s / n,
                "time/compute_s": (totals.compute_s + server.compute_s) / n,
                "time/pipeline_client_s": totals.pipeline_s / n,
                "time/wait_client_s": wait_client / n,
                "time/wait_server_s": wait_server / n,
                "time/outside_client_s": (totals.wall_s - totals.pipeline_s) / n,
                "time/bound_ratio": totals.wall_s / busiest if busiest > 0 else float("nan"),
                "time/bubble": (wait_client + wait_server) / pipeline if pipeline > 0 else float("nan"),
            })
        return figures
