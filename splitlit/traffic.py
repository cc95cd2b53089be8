"""Link records added up: bytes per flow, compression rates, analytic sizes, and the windows the monitors report.

A :class:`~splitlit.meter.LinkMeter` holds the raw records of one rank. Here they become figures:

- :func:`link_bytes` sums one side's bytes per flow, per cut and in total; :func:`analytic_link_bytes` computes
  the same from shapes; :func:`compress_rates` divides one by the other.
- :func:`summarize` turns one training batch's records into a :class:`BatchLink`; :class:`LinkTotals` adds
  batches up over a window, :class:`LinkWindows` keeps the three windows the monitors report (batch, epoch,
  run); :func:`from_server` hands the server's totals to the client in one small collective, which both ranks
  must call at the same point.

A flow is named ``"<cut>.<kind>"`` (:data:`FLOWS`), as in the strategy's ``wire=`` option.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from splitlit.wire import CUTS, KINDS, WireCodec, WirePlan

__all__ = ["FLOWS", "BatchLink", "LinkTotals", "LinkWindows", "ServerView", "analytic_link_bytes", "compress_rates",
           "from_server", "link_bytes", "summarize"]

FLOWS = tuple(f"{cut}.{kind}" for cut in CUTS for kind in KINDS)  # up.activation, up.gradient, down.activation, ...


def link_bytes(transfers: Any, *, role: str = "sent") -> dict[str, int]:
    """Bytes per ``"<cut>.<kind>"``, per cut, and ``"total"`` from a :class:`~splitlit.meter.LinkMeter` (or its
    transfers), counting one side (``role="sent"``) so that each tensor counts once per rank."""
    items = getattr(transfers, "transfers", transfers)
    out: dict[str, int] = dict.fromkeys(FLOWS, 0)
    for t in items:
        if t.role == role:
            out[f"{t.cut}.{t.kind}"] += t.nbytes
    for c in CUTS:
        out[c] = out[f"{c}.activation"] + out[f"{c}.gradient"]
    out["total"] = out["up"] + out["down"]
    return out


def compress_rates(with_codec: Mapping[str, int], without: Mapping[str, int]) -> dict[str, float]:
    """Bytes with the codec / bytes without it, for each key of :func:`link_bytes` (nan where nothing was sent)."""
    return {k: (with_codec[k] / without[k] if without.get(k) else float("nan")) for k in with_codec}


def analytic_link_bytes(up_shape: tuple[int, ...], down_shape: tuple[int, ...], *, chunks: int = 1,
                        up: Any = None, down: Any = None, wire: WirePlan | Mapping[str, Any] | None = None,
                        dtype: torch.dtype = torch.float32, train: bool = True) -> dict[str, int]:
    """What one batch sends over each cut, computed from shapes, keyed like :func:`link_bytes`.

    ``up_shape``/``down_shape`` are the activations at the cuts for the whole batch (e.g. [64, 32, 112, 112] and
    [64, 1280, 7, 7]); ``up``/``down`` the model codecs (:class:`~splitlit.codecs.Codec`) and ``wire`` the wire
    plan. Each of the ``chunks`` micro-batches sends its parts forward and (``train``) their gradients back.
    """
    plan = WirePlan.parse(wire)
    out: dict[str, int] = {}
    for cut, shape, codec in (("up", up_shape, up), ("down", down_shape, down)):
        if shape[0] % chunks:
            raise ValueError(f"analytic_link_bytes: batch {shape[0]} is not a multiple of chunks={chunks}.")
        micro = (shape[0] // chunks, *shape[1:])
        parts = codec.payload_shapes(micro) if codec is not None else [micro]
        for kind in KINDS:
            w = plan.get(cut, kind) or WireCodec()
            per_micro = sum(w.nbytes(p, dtype) for p in parts)
            out[f"{cut}.{kind}"] = per_micro * chunks if (train or kind == "activation") else 0
        out[cut] = out[f"{cut}.activation"] + out[f"{cut}.gradient"]
    out["total"] = out["up"] + out["down"]
    return out


@dataclass(frozen=True)
class BatchLink:
    """One training batch on one rank.

    ``flows``: bytes per flow (``"<cut>.<kind>"``); each rank sees all four flows, every tensor once (as sent
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
    """Sum up one batch's :class:`~splitlit.meter.Transfer` and :class:`~splitlit.meter.Compute` records."""
    flows = dict.fromkeys(FLOWS, 0)
    peak = {"sent": 0.0, "received": 0.0}
    first, last = math.inf, -math.inf
    microbatches: set[int] = set()
    for t in transfers:
        flows[f"{t.cut}.{t.kind}"] += t.nbytes
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
