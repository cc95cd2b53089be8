"""A ``PipelineStage`` that records every tensor it hands to the transport.

The counts come from the P2P ops themselves (the payload torch.distributed sends or receives), so they
are the bytes that cross the link, not an estimate from shapes::

    meter = LinkMeter()
    stage = MeteredStage(module, stage_index=0, num_stages=3, device=device, meter=meter)
    ...  # run a schedule
    meter.bytes(cut="up", kind="activation", role="sent")
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch.distributed as dist
from torch.distributed.pipelining import PipelineStage

__all__ = ["LinkMeter", "MeteredStage", "Transfer"]

# Stage index -> which cut its forward output / forward input crosses (U placement: 0 client, 1 server, 2 client).
_FWD_SEND_CUT = {0: "up", 1: "down"}
_FWD_RECV_CUT = {1: "up", 2: "down"}


@dataclass(frozen=True)
class Transfer:
    """One tensor handed to the transport.

    ``cut`` is "up" (client -> server activations, server -> client gradients) or "down";
    ``kind`` is "activation" or "gradient"; ``role`` is "sent" or "received" from this rank's side.
    """

    cut: str
    kind: str
    role: str
    microbatch: int
    nbytes: int
    shape: tuple[int, ...]
    dtype: str
    posted: float  # time.perf_counter() when the op was handed to the transport


@dataclass
class LinkMeter:
    """Transfers recorded on this rank since the last :meth:`reset`."""

    transfers: list[Transfer] = field(default_factory=list)
    enabled: bool = True

    def record(self, ops: list[dist.P2POp], *, cut: str, kind: str, role: str, microbatch: int) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        for op in ops:
            t = op.tensor
            self.transfers.append(Transfer(cut, kind, role, microbatch, t.numel() * t.element_size(),
                                           tuple(t.shape), str(t.dtype).removeprefix("torch."), now))

    def bytes(self, *, cut: str | None = None, kind: str | None = None, role: str | None = None) -> int:
        return sum(t.nbytes for t in self.transfers
                   if (cut is None or t.cut == cut) and (kind is None or t.kind == kind)
                   and (role is None or t.role == role))

    def reset(self) -> list[Transfer]:
        done, self.transfers = self.transfers, []
        return done


class MeteredStage(PipelineStage):
    """``PipelineStage`` that reports the tensors of its send and receive ops to a :class:`LinkMeter`."""

    def __init__(self, *args, meter: LinkMeter, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.meter = meter

    def get_fwd_send_ops(self, fwd_chunk_id: int) -> list[dist.P2POp]:
        ops = super().get_fwd_send_ops(fwd_chunk_id)
        if ops:
            self.meter.record(ops, cut=_FWD_SEND_CUT[self.stage_index], kind="activation", role="sent",
                              microbatch=fwd_chunk_id)
        return ops

    def get_fwd_recv_ops(self, fwd_chunk_id: int) -> list[dist.P2POp]:
        ops = super().get_fwd_recv_ops(fwd_chunk_id)
        if ops:
            self.meter.record(ops, cut=_FWD_RECV_CUT[self.stage_index], kind="activation", role="received",
                              microbatch=fwd_chunk_id)
        return ops

    def get_bwd_send_ops(self, bwd_chunk_id: int) -> list[dist.P2POp]:
        ops = super().get_bwd_send_ops(bwd_chunk_id)
        if ops:  # a stage sends the gradient of its input back over the cut it received it from
            self.meter.record(ops, cut=_FWD_RECV_CUT[self.stage_index], kind="gradient", role="sent",
                              microbatch=bwd_chunk_id)
        return ops

    def get_bwd_recv_ops(self, bwd_chunk_id: int) -> list[dist.P2POp]:
        ops = super().get_bwd_recv_ops(bwd_chunk_id)
        if ops:
            self.meter.record(ops, cut=_FWD_SEND_CUT[self.stage_index], kind="gradient", role="received",
                              microbatch=bwd_chunk_id)
        return ops
