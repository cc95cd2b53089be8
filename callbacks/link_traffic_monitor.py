"""``LinkTrafficMonitor``: the bytes that cross the link between client and server, and the bandwidth they need."""

from __future__ import annotations

from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from callbacks.link_monitor import LinkMonitor
from splitlit.traffic import FLOWS, BatchLink, LinkTotals, ServerView

__all__ = ["LinkTrafficMonitor"]

MB = 1e6  # bandwidths are in MB/s with MB = 10**6 bytes, as in the report


class LinkTrafficMonitor(LinkMonitor):
    r"""Logs what crosses the two cuts of a split model, counted at the transport, and the bandwidth it needs.

    Usage::

        strategy = SplitPipelineStrategy(chunks=4)
        trainer = Trainer(accelerator="cpu", devices=2, strategy=strategy, callbacks=[LinkTrafficMonitor()])

    Bytes are those of the tensors handed to ``torch.distributed``'s point-to-point ops (after any wire codec),
    as recorded by the strategy's :class:`~splitlit.meter.LinkMeter`; transport headers are not included.
    Only training batches count: validation, test and sanity-check traffic is discarded. Everything is logged
    once, by the client (rank 0); the server's figures reach it through one small ``gather`` to the client on each
    logging step and at each epoch end, which both ranks run.

    Logged keys. The per-batch keys below are logged on Lightning's logging steps (``log_every_n_steps``) and
    describe that one batch; the same key with ``_epoch`` appended is logged at each training epoch end over the
    epoch's batches; with ``_run`` appended it goes into the run summary (W&B ``run.summary`` and
    ``summary.json`` beside the CSV log), over the run's batches except the first ``warmup_batches``.

    - ``link/up_activation_bytes_per_chunk``: bytes of activations the client sent to the server (up cut), per
      micro-batch (chunk): the flow's bytes / the number of micro-batches.
    - ``link/up_gradient_bytes_per_chunk``: bytes of gradients the server sent back over the up cut, per chunk.
    - ``link/down_activation_bytes_per_chunk``: activations the server sent to the client (down cut), per chunk.
    - ``link/down_gradient_bytes_per_chunk``: gradients the client sent back over the down cut, per chunk.
    - ``link/bytes_per_batch``: the four flows together, per training batch (each tensor counted once).
    - ``link/compress_rate``: those bytes / the bytes the same flows take without any codec (the cut tensors as
      the head returns them and the tail receives them, floating-point ones only for gradients). 1.0 without a
      codec; measured on the client from the cut tensors' sizes.
    - ``link/bandwidth_avg_MBps``: the report's average bandwidth: bytes sent or received (all four flows) /
      computation time, where computation time is the forward and backward stage computations of the client
      and of the server added up (no waiting: the time one device would compute the batch). MB = 10**6 bytes.
    - ``link/bandwidth_peak_client_MBps``: the report's client peak: the largest send rate on the client, over
      every tensor it sent, of ``bytes / seconds`` from posting the send to its completion (a send's time
      includes any wait for the server to post the matching receive). A send completes once its bytes are in
      the kernel's socket buffers, so a send smaller than those buffers completes faster than any link: on a
      slow link read the server peak, which is bounded by what actually arrived.
    - ``link/bandwidth_peak_server_MBps``: the report's server peak: the largest receive rate on the server
      (``bytes / seconds`` from posting the receive to its completion, so it includes the wait for the sender),
      measured on the server and gathered to the client.

    Without a split (a strategy with no ``meter``) there is no link: the callback warns once and logs nothing.

    Args:
        warmup_batches: first training batches of the fit left out of the ``_run`` figures (the first batch
            builds the pipeline stages and infers their shapes).
    """

    def __init__(self, warmup_batches: int = 1) -> None:
        super().__init__(warmup_batches)
        self._raw_per_chunk = dict.fromkeys(FLOWS, 0)
        self._hooks: list[RemovableHandle] = []

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self._meter is None:
            rank_zero_warn(f"LinkTrafficMonitor: the strategy {type(trainer.strategy).__name__} has no link meter "
                           f"(the model is not split), so there is no traffic to log. Use SplitPipelineStrategy.")

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        split = getattr(trainer.strategy, "split", None)
        if self._meter is None or split is None or not trainer.strategy.is_client:
            return
        # The tensors at the cuts before any codec: what the head returns and what the tail receives (after the
        # down codec's decoder). Every micro-batch of a batch has the same size, so the last one seen is kept.
        self._hooks = [split.head.register_forward_hook(self._head_output),
                       split.tail.register_forward_pre_hook(self._tail_input)]

    def _head_output(self, module: Any, args: Any, output: Any) -> None:
        self._raw_per_chunk["up.activation"], self._raw_per_chunk["up.gradient"] = _cut_bytes(output)

    def _tail_input(self, module: Any, args: Any) -> None:
        self._raw_per_chunk["down.activation"], self._raw_per_chunk["down.gradient"] = _cut_bytes(args)

    @override
    def measured(self, batch: BatchLink | None) -> dict[str, float]:
        return {"raw_bytes": sum(self._raw_per_chunk.values()) * batch.microbatches}

    @override
    def figures(self, totals: LinkTotals, server: ServerView | None) -> dict[str, float]:
        chunks = max(totals.microbatches, 1)
        compute = totals.compute_s + server.compute_s
        nan = float("nan")
        # The logged keys spell a flow with "_" ("link/up_activation_bytes_per_chunk"), as W&B runs already have.
        figures = {f"link/{flow.replace('.', '_')}_bytes_per_chunk": totals.flows[flow] / chunks for flow in FLOWS}
        figures.update({
            "link/bytes_per_batch": totals.bytes / max(totals.batches, 1),
            "link/compress_rate": totals.bytes / totals.raw_bytes if totals.raw_bytes else nan,
            "link/bandwidth_avg_MBps": totals.bytes / compute / MB if compute > 0 else nan,
            "link/bandwidth_peak_client_MBps": totals.peak_send_Bps / MB,
            "link/bandwidth_peak_server_MBps": server.peak_recv_Bps / MB,
        })
        return figures

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []


def _cut_bytes(value: Any) -> tuple[int, int]:
    """Bytes of the tensors at a cut: all of them forward; backward only floating-point ones that need a gradient."""
    tensors = [t for t in (value if isinstance(value, tuple) else (value,)) if isinstance(t, Tensor)]
    forward = sum(t.numel() * t.element_size() for t in tensors)
    backward = sum(t.numel() * t.element_size() for t in tensors if t.is_floating_point() and t.requires_grad)
    return forward, backward

