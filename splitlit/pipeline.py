"""Run a :class:`~splitlit.split.Split` on two ranks with ``torch.distributed.pipelining``.

The client (rank 0) calls ``train_step(*inputs, target=..., loss_fn=...)`` or ``eval_step(*inputs)``; the
server (rank 1) calls the same method with no arguments. Before each step the client broadcasts a small
header (step kind, micro-batch count, order and warm-up, input shapes and dtypes): the server learns what comes
without ever seeing the data, and both ranks pick the same stages (a server given another order or warm-up stops
there, saying so). Stages and schedules are cached per header, since ``torch.distributed.pipelining`` fixes the
tensor shapes of a stage at its first step (a short last batch or a new padded sequence length gets stages of
its own).

    pipeline = SplitPipeline(split, rank=rank, device=device, chunks=4)
    out, losses = pipeline.train_step(x, target=y, loss_fn=loss_fn)   # client
    pipeline.train_step()                                              # server
"""

from __future__ import annotations

import contextlib
import logging
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist

from splitlit.meter import LinkMeter
from splitlit.schedule import ORDERS, USchedule
from splitlit.split import CLIENT_RANK, SERVER_RANK, Split
from splitlit.stage import MeteredStage
from splitlit.transport import Ledger
from splitlit.wire import WirePlan

__all__ = ["PeerLostError", "SplitPipeline", "link_errors", "microbatch_count"]

log = logging.getLogger(__name__)

_TRAIN, _EVAL = 1, 2
_KINDS = {_TRAIN: "training", _EVAL: "evaluation"}
_HEADER_LEN = 64
_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32,
           torch.int16, torch.int8, torch.uint8, torch.bool]


class PeerLostError(RuntimeError):
    """The other rank stopped answering: it died, or a step took longer than the timeout."""


def microbatch_count(batch_size: int, chunks: int) -> int:
    """``chunks`` when it divides the batch, else the largest divisor of the batch below it (a short last batch)."""
    return max(d for d in range(1, min(chunks, batch_size) + 1) if batch_size % d == 0)


# What gloo and the c10d store say when the other end is gone or silent. Matched on the transport's own words,
# never on a word like "peer" or "gloo" alone: a genuine error in a stage must surface as itself.
_TRANSPORT_FAILURES = ("connection closed by peer", "connection reset by peer", "broken pipe", "timed out",
                       "socket timeout", "connection refused", "gloo/transport")


def _is_link_failure(err: BaseException) -> bool:
    if getattr(err, "splitlit_stage", None) is not None:
        return False  # raised by a stage's own computation (see MeteredStage): the user's error, not the link's
    if isinstance(err, dist.DistError):
        return True
    text = str(err).lower()
    return any(s in text for s in _TRANSPORT_FAILURES)


class _DeviceBridge(torch.nn.Module):
    """Runs ``module`` on ``compute`` while the pipeline stage around it lives (and communicates) on ``comm``."""

    def __init__(self, module: torch.nn.Module, *, compute: torch.device, comm: torch.device, sends: bool) -> None:
        super().__init__()
        self.module, self.compute, self.comm, self.sends = module, compute, comm, sends

    def forward(self, *args: Any) -> Any:
        out = self.module(*(a.to(self.compute) if isinstance(a, torch.Tensor) else a for a in args))
        if not self.sends:  # the last stage's output stays where the loss and the metrics are
            return out
        if isinstance(out, tuple):
            return tuple(o.to(self.comm) if isinstance(o, torch.Tensor) else o for o in out)
        return out.to(self.comm)


class SplitPipeline:
    """Both ranks' side of a two-rank U-shaped pipeline (see the module docstring).

    Args:
        split: the model's :class:`Split`; each rank only runs (and needs real weights for) its own part.
        rank: the role on this link: ``CLIENT_RANK`` (0) for the client, ``SERVER_RANK`` (1) for the server.
        device: where this rank's stages run.
        chunks: micro-batches per batch.
        order: ``"1f1b"``, ``"gpipe"`` or ``"zb"`` (see :mod:`splitlit.schedule`).
        warmup: micro-batches 1f1b and zb send forward before the first backward
            (see :func:`splitlit.schedule.u_order`).
        timeout: seconds, only used to word errors; the process group enforces it.
        meter: records every tensor handed to the transport.
        ledger: books each step header the server receives (see :class:`splitlit.transport.Ledger`).
        wire: wire codecs per cut and direction (see :mod:`splitlit.wire`); both ranks must give the same.
        group: the link's process group when the job has more ranks than this link's two (many clients:
            ``dist.new_group([client, server])``); ``None`` is the default group of a two-rank job.
    """

    def __init__(self, split: Split, *, rank: int, device: torch.device, chunks: int, order: str = "1f1b",
                 warmup: int = 2, timeout: float = 300.0, meter: LinkMeter | None = None, cache_size: int = 16,
                 wire: WirePlan | Mapping[str, Any] | None = None, ledger: Ledger | None = None,
                 group: dist.ProcessGroup | None = None) -> None:
        if rank not in (CLIENT_RANK, SERVER_RANK):
            raise ValueError(f"SplitPipeline runs on ranks 0 (client) and 1 (server), got rank={rank}.")
        self.split = split
        self.rank = rank
        self.device = device
        self.chunks = chunks
        self.order = order
        self.warmup = warmup
        self.timeout = timeout
        self.meter = meter if meter is not None else LinkMeter()
        self.ledger = ledger if ledger is not None else Ledger()
        self.wire = WirePlan.parse(wire)
        self.group = group
        self.peer: str | None = None  # two ranks: link_errors names them; many clients: by global rank
        if group is not None:
            other = dist.get_global_rank(group, SERVER_RANK if rank == CLIENT_RANK else CLIENT_RANK)
            self.peer = f"{'server' if rank == CLIENT_RANK else 'client'} (rank {other})"
        self._client_global = CLIENT_RANK if group is None else dist.get_global_rank(group, CLIENT_RANK)
        # gloo carries CPU tensors only: with a GPU rank on gloo (the report's CPU client + GPU server), the
        # stages talk on the CPU and a bridge moves each stage's inputs to the GPU and its outputs back.
        self.comm_device = torch.device("cpu") if dist.get_backend() == "gloo" else device
        modules = split.stages()
        if self.comm_device != device:
            modules = tuple(_DeviceBridge(m, compute=device, comm=self.comm_device, sends=idx < 2)
                            for idx, m in enumerate(modules))
        self._modules = modules
        self._schedules: OrderedDict[tuple, USchedule] = OrderedDict()
        self._cache_size = cache_size
        self._loss_fn: Callable | None = None
        self._running: USchedule | None = None
        self.steps = 0

    @property
    def is_client(self) -> bool:
        return self.rank == CLIENT_RANK

    # -- public steps -------------------------------------------------------------------------------------------
    def train_step(self, *inputs: torch.Tensor, target: Any = None,
                   loss_fn: Callable | None = None) -> tuple[Any, list[torch.Tensor]]:
        """One forward+backward over a batch; returns the merged logits and per-micro-batch losses (client)."""
        if self.is_client and loss_fn is None:
            raise ValueError("SplitPipeline.train_step on the client needs loss_fn(output, target).")
        self._loss_fn = loss_fn
        losses: list[torch.Tensor] = []
        schedule = self._running = self._schedule_for(_TRAIN, inputs)
        with self._link_errors("training"):
            out = schedule.step(*inputs, target=target, losses=losses) if self.is_client else schedule.step()
        self.steps += 1
        return out, losses

    @torch.no_grad()
    def eval_step(self, *inputs: torch.Tensor) -> Any:
        """Forward only over a batch of any size; returns the merged logits on the client, None on the server."""
        schedule = self._schedule_for(_EVAL, inputs)
        with self._link_errors("evaluation"):
            return schedule.step(*inputs) if self.is_client else schedule.step()

    # -- header and stage cache ---------------------------------------------------------------------------------
    def _schedule_for(self, kind: int, inputs: tuple) -> USchedule:
        header = torch.zeros(_HEADER_LEN, dtype=torch.int64, device=self.comm_device)
        if self.is_client:
            header.copy_(self._encode_header(kind, inputs).to(self.comm_device))
        with self._link_errors(f"the header of a {_KINDS[kind]} step"):
            dist.broadcast(header, src=self._client_global, group=self.group)
        if not self.is_client:
            self.ledger.book("header", header.numel() * header.element_size())
        key = tuple(header.tolist())
        if key[0] != kind:
            raise RuntimeError(
                f"The client and the server are out of step: the server expected a {_KINDS[kind]} step, "
                f"the client started a {_KINDS.get(key[0], f'unknown ({key[0]})')} step. Both ranks must run the "
                f"same Trainer settings (limit_*_batches, val_check_interval, num_sanity_val_steps)."
            )
        if key[2:4] != (ORDERS.index(self.order), self.warmup):
            theirs = ORDERS[key[2]] if 0 <= key[2] < len(ORDERS) else f"unknown ({key[2]})"
            raise RuntimeError(
                f"The client and the server run different pipelines: the client order={theirs!r}, warmup={key[3]}; "
                f"this server order={self.order!r}, warmup={self.warmup}. Give both ranks the same "
                f"--trainer.strategy.init_args.order and --trainer.strategy.init_args.warmup (the same command line "
                f"and config on both hosts)."
            )
        schedule = self._schedules.get(key)
        if schedule is None:
            schedule = self._build(kind, n_microbatches=key[1])
            self._schedules[key] = schedule
            if len(self._schedules) > self._cache_size:
                self._schedules.popitem(last=False)
        else:
            self._schedules.move_to_end(key)
        return schedule

    def _encode_header(self, kind: int, inputs: tuple) -> torch.Tensor:
        if not inputs or not all(isinstance(t, torch.Tensor) for t in inputs):
            raise TypeError(
                f"The head's inputs must be tensors, got {[type(t).__name__ for t in inputs]}. "
                f"Return a tuple of tensors from split_inputs(batch)."
            )
        batch = inputs[0].shape[0]
        for t in inputs:
            if t.ndim == 0 or t.shape[0] != batch:
                raise ValueError(f"Every head input must have the batch dimension first ({batch}); "
                                 f"got shapes {[tuple(t.shape) for t in inputs]}.")
        words = [kind, microbatch_count(batch, self.chunks), ORDERS.index(self.order), self.warmup, len(inputs)]
        for t in inputs:
            if t.dtype not in _DTYPES:
                raise TypeError(f"Head input dtype {t.dtype} cannot be described to the server; use one of {_DTYPES}.")
            words += [_DTYPES.index(t.dtype), t.ndim, *t.shape]
        if len(words) > _HEADER_LEN:
            raise ValueError(f"Too many head inputs or dimensions to describe ({len(words)} > {_HEADER_LEN} words).")
        return torch.tensor(words + [0] * (_HEADER_LEN - len(words)), dtype=torch.int64)

    def _build(self, kind: int, *, n_microbatches: int) -> USchedule:
        head, server, tail = self._modules
        make = lambda mod, idx: MeteredStage(mod, idx, 3, self.comm_device, meter=self.meter,  # noqa: E731
                                             wire=self.wire, ledger=self.ledger, group=self.group)
        stages = [make(head, 0), make(tail, 2)] if self.is_client else [make(server, 1)]
        loss_fn = self._dispatch_loss if kind == _TRAIN else None
        log.debug("rank %d: new %s schedule with %d micro-batches", self.rank, _KINDS[kind], n_microbatches)
        return USchedule(stages, n_microbatches, loss_fn=loss_fn, order=self.order, warmup=self.warmup)

    def _dispatch_loss(self, output: Any, target: Any) -> torch.Tensor:
        if self._running is not None and self._running.inferring_shapes:
            # torch infers gradient shapes by running the loss on placeholder outputs: keep user code (and its
            # logging and metrics) out of that, any differentiable scalar will do.
            return sum(t.float().sum() for t in output if t.is_floating_point()) * 0.0 \
                if isinstance(output, tuple) else output.float().sum() * 0.0
        assert self._loss_fn is not None  # set by train_step on the client, the only rank with the last stage
        return self._loss_fn(output, target)

    # -- errors -------------------------------------------------------------------------------------------------
    def _link_errors(self, what: str) -> contextlib.AbstractContextManager:
        return link_errors(f"{what} (step {self.steps})", rank=self.rank, timeout=self.timeout, peer=self.peer)


@contextlib.contextmanager
def link_errors(what: str, *, rank: int, timeout: float, peer: str | None = None) -> Iterator[None]:
    """Turn a transport failure inside the block into a :class:`PeerLostError` that says what to do.

    ``rank`` is this rank's role on the link (``CLIENT_RANK`` or ``SERVER_RANK``); ``peer`` names the other end
    when the job has more than two ranks.
    """
    try:
        yield
    except RuntimeError as exc:
        if isinstance(exc, PeerLostError) or not _is_link_failure(exc):
            raise
        if peer is None:
            peer = "server (rank 1)" if rank == CLIENT_RANK else "client (rank 0)"
        raise PeerLostError(
            f"The {peer} stopped answering during {what}: {exc}\n"
            f"Either it died (its own output says why), or a step took longer than the timeout of {timeout:g} s. "
            f"Restart both ranks and resume from the last checkpoint (fit(ckpt_path='last') or --ckpt_path last); "
            f"if the link is just slow, raise SplitPipelineStrategy(timeout=...) "
            f"(--trainer.strategy.init_args.timeout on the command line)."
        ) from exc
