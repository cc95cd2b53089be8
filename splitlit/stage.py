"""``MeteredStage``: a ``PipelineStage`` that encodes what crosses a cut and records it in a :class:`LinkMeter`.

Usage::

    meter = LinkMeter()
    stage = MeteredStage(module, stage_index=0, num_stages=3, device=device, meter=meter, wire=plan)

Each send and receive op goes through the stage's wire codecs (:mod:`splitlit.wire`) and is then recorded by
the meter (:mod:`splitlit.meter`); each forward and backward is timed. The stage's shape metadata crosses as
tensors, never as pickles.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining._utils import _StageBackwardMeta, _StageForwardMeta, _TensorMeta

from splitlit.batchnorm import DeferredBatchNorm
from splitlit.meter import Compute, LinkMeter
from splitlit.transport import Ledger, pack, unpack
from splitlit.wire import WireEndpoint, WirePlan

__all__ = ["MeteredStage"]

# Stage index -> which cut its forward output / forward input crosses (U placement: 0 client, 1 server, 2 client).
_FWD_SEND_CUT = {0: "up", 1: "down"}
_FWD_RECV_CUT = {1: "up", 2: "down"}


class MeteredStage(PipelineStage):
    """``PipelineStage`` that reports the tensors of its send and receive ops to a :class:`LinkMeter`."""

    def __init__(self, *args, meter: LinkMeter, wire: WirePlan | None = None, ledger: Ledger | None = None,
                 **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.meter = meter
        self.ledger = ledger if ledger is not None else Ledger()
        self.wire = WireEndpoint(wire)  # wire codecs: encode what is sent, decode what arrives (splitlit.wire)

    # torch sends the stages' shape metadata as pickles (send_object_list): a peer that could send a pickle could
    # run code here. The same metadata crosses as tensors instead: shapes, strides, dtype names, requires_grad.
    def _send_meta(self, meta: Any, dst_stage: int) -> None:
        data = pack(_meta_to_plain(meta))
        peer = self._resolve_peer_global_rank(dst_stage)
        dist.send(torch.tensor([len(data)], dtype=torch.int64, device=self.device), dst=peer, group=self.group)
        dist.send(torch.frombuffer(bytearray(data), dtype=torch.uint8).to(self.device), dst=peer, group=self.group)

    def _recv_meta(self, src_stage: int) -> Any:
        peer = self._resolve_peer_global_rank(src_stage)
        size = torch.zeros(1, dtype=torch.int64, device=self.device)
        dist.recv(size, src=peer, group=self.group)
        payload = torch.empty(int(size), dtype=torch.uint8, device=self.device)
        dist.recv(payload, src=peer, group=self.group)
        self.ledger.book("stage metadata", int(size) + size.element_size())
        return _meta_from_plain(unpack(payload.cpu().numpy().tobytes()))

    # torch infers a stage's output shapes by running it once at a step with new shapes: the first stage on
    # micro-batch 0, the others on uninitialised placeholders (torch.empty). That run is not a training forward:
    # BatchNorm would fold garbage into its running statistics and dropout would draw from the random stream. It
    # runs on copies of the buffers (its graph, used later for the gradients' shapes, keeps them) and a forked
    # random stream.
    def _forward_metadata_inference(self, *args, **kwargs) -> Any:
        originals = [(m, name, b) for m in self.submod.modules() for name, b in m._buffers.items() if b is not None]
        for module, name, buffer in originals:
            module._buffers[name] = buffer.clone()
        devices = [self.device] if self.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices):
                return super()._forward_metadata_inference(*args, **kwargs)
        finally:
            for module, name, buffer in originals:
                module._buffers[name] = buffer
            for module in self.submod.modules():
                if isinstance(module, DeferredBatchNorm):
                    module.discard()

    def _timed(self, what: str, mb: int, fn, *args, **kwargs) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        except Exception as err:
            if getattr(err, "splitlit_stage", None) is None:  # the innermost stage names itself once
                part = ("head", "body", "tail")[self.stage_index] if self.num_stages == 3 else str(self.stage_index)
                err.splitlit_stage = self.stage_index  # type: ignore[attr-defined]
                err.add_note(f"raised by the {part} (pipeline stage {self.stage_index}) in its {what} of "
                             f"micro-batch {mb} on rank {dist.get_rank() if dist.is_initialized() else 0}")
            raise
        finally:
            self.meter.add_compute(Compute(what, self.stage_index, mb, start, time.perf_counter()))

    def forward_one_chunk(self, fwd_chunk_id: int, *args, **kwargs) -> Any:
        return self._timed("forward", fwd_chunk_id, super().forward_one_chunk, fwd_chunk_id, *args, **kwargs)

    def backward_one_chunk(self, bwd_chunk_id: int, *args, **kwargs) -> Any:
        return self._timed("backward", bwd_chunk_id, super().backward_one_chunk, bwd_chunk_id, *args, **kwargs)

    def backward_weight_one_chunk(self, bwd_chunk_id: int, *args, **kwargs) -> Any:
        return self._timed("backward_weight", bwd_chunk_id, super().backward_weight_one_chunk, bwd_chunk_id,
                           *args, **kwargs)

    def get_fwd_send_ops(self, fwd_chunk_id: int) -> list[dist.P2POp]:
        ops = self.wire.send(super().get_fwd_send_ops(fwd_chunk_id), cut=_FWD_SEND_CUT.get(self.stage_index, ""),
                             kind="activation")
        if ops:
            self.meter.record(ops, cut=_FWD_SEND_CUT[self.stage_index], kind="activation", role="sent",
                              microbatch=fwd_chunk_id)
        return ops

    def get_fwd_recv_ops(self, fwd_chunk_id: int) -> list[dist.P2POp]:
        ops = self.wire.recv(super().get_fwd_recv_ops(fwd_chunk_id), cut=_FWD_RECV_CUT.get(self.stage_index, ""),
                             kind="activation", chunk=fwd_chunk_id)
        if ops:
            self.meter.record(ops, cut=_FWD_RECV_CUT[self.stage_index], kind="activation", role="received",
                              microbatch=fwd_chunk_id)
        return ops

    def get_bwd_send_ops(self, bwd_chunk_id: int) -> list[dist.P2POp]:
        ops = self.wire.send(super().get_bwd_send_ops(bwd_chunk_id), cut=_FWD_RECV_CUT.get(self.stage_index, ""),
                             kind="gradient")
        if ops:  # a stage sends the gradient of its input back over the cut it received it from
            self.meter.record(ops, cut=_FWD_RECV_CUT[self.stage_index], kind="gradient", role="sent",
                              microbatch=bwd_chunk_id)
        return ops

    def get_bwd_recv_ops(self, bwd_chunk_id: int) -> list[dist.P2POp]:
        ops = self.wire.recv(super().get_bwd_recv_ops(bwd_chunk_id), cut=_FWD_SEND_CUT.get(self.stage_index, ""),
                             kind="gradient", chunk=bwd_chunk_id)
        if ops:
            self.meter.record(ops, cut=_FWD_SEND_CUT[self.stage_index], kind="gradient", role="received",
                              microbatch=bwd_chunk_id)
        return ops

    def _retrieve_recv_activations(self, fwd_chunk_id: int) -> tuple:
        self.wire.decode(kind="activation", chunk=fwd_chunk_id)  # the recv has completed: decode into the buffers
        return super()._retrieve_recv_activations(fwd_chunk_id)

    def _retrieve_recv_grads(self, bwd_chunk_id: int) -> tuple:
        self.wire.decode(kind="gradient", chunk=bwd_chunk_id)
        return super()._retrieve_recv_grads(bwd_chunk_id)


def _meta_to_plain(meta: Any) -> dict[str, Any]:
    if isinstance(meta, _StageForwardMeta):
        kind, metas = "forward", meta.forward_metas
    elif isinstance(meta, _StageBackwardMeta):
        kind, metas = "backward", meta.backward_metas
    else:
        raise TypeError(f"Unexpected pipeline stage metadata {type(meta).__name__}.")
    plain = []
    for m in metas:
        if m is not None and type(m) is not _TensorMeta:
            raise TypeError(f"splitlit sends plain tensors between the ranks, got a {type(m).__name__} "
                            f"(DTensors are not supported across the cut).")
        plain.append(None if m is None else {"shape": list(m.shape), "stride": list(m.stride),
                                             "dtype": str(m.dtype).removeprefix("torch."),
                                             "requires_grad": bool(m.requires_grad)})
    return {"kind": kind, "metas": plain}


def _meta_from_plain(plain: dict[str, Any]) -> Any:
    metas = []
    for m in plain["metas"]:
        if m is None:
            metas.append(None)
            continue
        dtype = getattr(torch, m["dtype"], None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"The peer described a tensor of dtype {m['dtype']!r}, which is not a torch dtype.")
        metas.append(_TensorMeta(shape=torch.Size(int(d) for d in m["shape"]),
                                 stride=tuple(int(d) for d in m["stride"]), dtype=dtype,
                                 requires_grad=bool(m["requires_grad"])))
    if plain["kind"] == "forward":
        return _StageForwardMeta(forward_metas=tuple(metas))
    return _StageBackwardMeta(backward_metas=tuple(metas))
