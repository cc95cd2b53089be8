"""What the measurement callbacks share: one batch's link records summed up, the server's share, the run summary.

A :class:`~splitlit.stage.LinkMeter` holds the raw records of one rank: every tensor handed to the transport
(:class:`~splitlit.stage.Transfer`) and every stage computation (:class:`~splitlit.stage.Compute`).
:func:`summarize` turns one training batch's records into a :class:`BatchLink`; :class:`LinkTotals` adds batches
up over a window (a batch, an epoch, the run); :func:`from_server` hands the server's totals to the client in
one small collective, which both ranks must call at the same point.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import CSVLogger, WandbLogger

__all__ = ["FLOWS", "SUMMARY_FILE", "BatchLink", "LinkTotals", "LinkWindows", "ServerView", "from_server",
           "link_meter", "summarize", "write_run_summary"]

FLOWS = ("up_activation", "up_gradient", "down_activation", "down_gradient")
SUMMARY_FILE = "summary.json"


@dataclass(frozen=True)
class BatchLink:
    """One training batch on one rank.

    ``flows``: bytes per flow (``"<cut>_<kind>"``); each rank sees all four flows, every tensor once (as sent
    or as received). ``compute_s``: the sum of this rank's stage computations (forward and backward, no waiting).
    ``pipeline_s``: from the first record of the batch (a computation starting or a transfer being posted) to
    the last (a computation ending or a transfer completing). ``peak_*_Bps``: the largest ``nbytes / seconds``
    over this rank's sent / received transfers (0 when there is none).
    """

    flows: dict[str, int]
    microbatches: int
    compute_s: float
    pipeline_s: float
    peak_send_Bps: float
    peak_recv_Bps: float


def summarize(transfers: Iterable[Any], computes: Iterable[Any]) -> BatchLink:
    """Sum up one batch's :class:`~splitlit.stage.Transfer` and :class:`~splitlit.stage.Compute` records."""
    flows = dict.fromkeys(FLOWS, 0)
    peak = {"sent": 0.0, "received": 0.0}
    first, last = math.inf, -math.inf
    microbatches: set[int] = set()
    for t in transfers:
        flows[f"{t.cut}_{t.kind}"] += t.nbytes
        microbatches.add(t.microbatch)
        first, last = min(first, t.posted), max(last, t.posted)
        seconds = t.seconds
        if seconds is not None:
            last = max(last, t.done[0])
            if seconds > 0:
                peak[t.role] = max(peak[t.role], t.nbytes / seconds)
    compute = 0.0
    for c in computes:
        compute += c.end - c.start
        microbatches.add(c.microbatch)
        first, last = min(first, c.start), max(last, c.end)
    return BatchLink(flows=flows, microbatches=len(microbatches), compute_s=compute,
                     pipeline_s=max(0.0, last - first) if last >= first else 0.0,
                     peak_send_Bps=peak["sent"], peak_recv_Bps=peak["received"])


@dataclass
class LinkTotals:
    """Batches added up: sums of bytes, micro-batches and seconds, maxima of the peak rates.

    ``wall_s`` and ``raw_bytes`` are filled by the callback that measures them (wall time per batch; the bytes the
    cuts would carry without any codec).
    """

    batches: int = 0
    microbatches: int = 0
    flows: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FLOWS, 0))
    compute_s: float = 0.0
    pipeline_s: float = 0.0
    peak_send_Bps: float = 0.0
    peak_recv_Bps: float = 0.0
    wall_s: float = 0.0
    raw_bytes: int = 0

    @property
    def bytes(self) -> int:
        return sum(self.flows.values())

    def add(self, batch: BatchLink | None, *, wall_s: float = 0.0, raw_bytes: int = 0) -> None:
        self.batches += 1
        self.wall_s += wall_s
        self.raw_bytes += raw_bytes
        if batch is None:
            return
        self.microbatches += batch.microbatches
        for k, v in batch.flows.items():
            self.flows[k] += v
        self.compute_s += batch.compute_s
        self.pipeline_s += batch.pipeline_s
        self.peak_send_Bps = max(self.peak_send_Bps, batch.peak_send_Bps)
        self.peak_recv_Bps = max(self.peak_recv_Bps, batch.peak_recv_Bps)


class LinkWindows:
    """The three windows a callback reports: this batch, this epoch, the run after ``warmup_batches`` batches.

    The first batches of a fit build the pipeline's stages and infer their shapes: they are kept out of the run's
    figures (and kept in the epoch's).
    """

    def __init__(self, warmup_batches: int) -> None:
        self.warmup_batches = warmup_batches
        self.batch = LinkTotals()
        self.epoch = LinkTotals()
        self.run = LinkTotals()
        self._seen = 0

    def add(self, batch: BatchLink | None, *, wall_s: float = 0.0, raw_bytes: int = 0) -> None:
        self.batch = LinkTotals()
        for window in (self.batch, self.epoch) + ((self.run,) if self._seen >= self.warmup_batches else ()):
            window.add(batch, wall_s=wall_s, raw_bytes=raw_bytes)
        self._seen += 1

    def new_epoch(self) -> None:
        self.epoch = LinkTotals()


@dataclass(frozen=True)
class ServerView:
    """The server's share of a window, as the client receives it."""

    compute_s: float
    pipeline_s: float
    peak_recv_Bps: float


def from_server(strategy: Any, windows: Sequence[LinkTotals]) -> list[ServerView] | None:
    """Both ranks call this at the same point; the client gets the server's view of each window, the server None.

    One ``gather`` of ``3 * len(windows)`` float64 values to the client: the server receives nothing.
    """
    values = [x for w in windows for x in (w.compute_s, w.pipeline_s, w.peak_recv_Bps)]
    rows = strategy.gather_to_client(torch.tensor(values, dtype=torch.float64, device=strategy.root_device))
    if rows is None:
        return None
    server = rows[1].tolist()
    return [ServerView(*server[i:i + 3]) for i in range(0, len(server), 3)]


def link_meter(trainer: Trainer) -> Any:
    """The strategy's :class:`~splitlit.stage.LinkMeter`, or None when the model is not split."""
    return getattr(trainer.strategy, "meter", None)


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
