"""Codecs on the wire: the transport encodes what a stage sends and decodes what it receives; the model is untouched.

    strategy = SplitPipelineStrategy(chunks=4, wire={"up.activation": "int8", "down.gradient": "fp16"})

or in YAML (``trainer.strategy.init_args``)::

    wire:
      up.activation: int8                          # per-channel scales
      up.gradient: {name: topk, fraction: 0.05}    # keep 5% of each sample's entries (+ their indices)
      down.activation: bf16

Keys are ``<cut>.<kind>`` with cut ``up`` (client -> server activations, their gradients back) or ``down``, and
kind ``activation`` (forward) or ``gradient`` (backward). Values: a name from :data:`WIRE_CODECS`, a mapping
``{name: ..., <option>: ...}``, or a :class:`WireCodec`. Only floating-point tensors are encoded (an int64
attention mask travels as it is). Every encoding has a fixed size for a given shape, so the receiver allocates
its wire buffers from the shape it expects, and :meth:`WireCodec.nbytes` is exactly what the
:class:`~splitlit.meter.LinkMeter` records.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from splitlit.checks import check_count

# What users configure; CUTS, KINDS and WireEndpoint serve the stage and splitlit.traffic.
__all__ = ["WIRE_CODECS", "Cast", "Int8", "TopK", "WireCodec", "WirePlan", "make_wire_codec"]

CUTS = ("up", "down")
KINDS = ("activation", "gradient")
Spec = list[tuple[tuple[int, ...], torch.dtype]]


def _nbytes(spec: Spec) -> int:
    return sum(math.prod(shape) * torch.empty((), dtype=dtype).element_size() for shape, dtype in spec)


class WireCodec:
    """Encodes one floating-point tensor into a fixed list of tensors and back."""

    name = "identity"

    def spec(self, shape: tuple[int, ...], dtype: torch.dtype) -> Spec:
        """(shape, dtype) of each tensor sent for a tensor of ``shape``/``dtype``."""
        return [(tuple(shape), dtype)]

    def encode(self, t: Tensor) -> list[Tensor]:
        return [t]

    def decode(self, parts: list[Tensor], shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        return parts[0]

    def nbytes(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> int:
        """The analytic wire size of one tensor: what the transport sends for it."""
        return _nbytes(self.spec(tuple(shape), dtype))

    def __repr__(self) -> str:
        return self.name


class Cast(WireCodec):
    """Send in a narrower float type (``fp16`` or ``bf16``), cast back on arrival."""

    def __init__(self, dtype: str | torch.dtype = "fp16") -> None:
        types = {"fp16": torch.float16, "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
        if isinstance(dtype, torch.dtype) and dtype in types.values():
            self.dtype = dtype
        elif isinstance(dtype, str) and dtype in types:
            self.dtype = types[dtype]
        else:
            raise ValueError(f"Cast(dtype={dtype!r}): choose 'fp16' or 'bf16'.")
        self.name = "fp16" if self.dtype == torch.float16 else "bf16"

    def spec(self, shape, dtype):
        return [(tuple(shape), self.dtype)]

    def encode(self, t):
        return [t.to(self.dtype)]

    def decode(self, parts, shape, dtype):
        return parts[0].to(dtype)


class Int8(WireCodec):
    """Symmetric int8 with float32 scales, one per channel or one per block of values.

    ``granularity="channel"``: one scale per (sample, channel), the channel being dim 1 ([B, C, H, W]: per feature
    map; [B, T, D]: per token; [B, F]: per sample). ``"block"``: one scale per ``block_size`` consecutive values of
    the flattened tensor.
    """

    def __init__(self, granularity: str = "channel", block_size: int = 64) -> None:
        if granularity not in ("channel", "block"):
            raise ValueError(f"Int8(granularity={granularity!r}): choose 'channel' or 'block'.")
        check_count("Int8", "block_size", block_size, fix="give a positive integer, e.g. 64.")
        self.granularity, self.block_size = granularity, block_size
        self.name = "int8" if granularity == "channel" else f"int8-block{block_size}"

    def _rows(self, shape: tuple[int, ...]) -> tuple[int, int]:
        """(rows, values per row) the scales apply to; block rows are padded, only the real values are sent."""
        numel = math.prod(shape)
        if self.granularity == "block":
            return math.ceil(numel / self.block_size), self.block_size
        rows = math.prod(shape[:2]) if len(shape) >= 2 else 1
        return rows, numel // max(rows, 1)

    def spec(self, shape, dtype):
        return [(tuple(shape), torch.int8), ((self._rows(tuple(shape))[0],), torch.float32)]

    def encode(self, t):
        rows, width = self._rows(tuple(t.shape))
        flat = t.detach().reshape(-1).float()
        pad = rows * width - flat.numel()
        m = _zero_pad(flat, pad).view(rows, width)
        scale = m.abs().amax(dim=1) / 127.0
        q = torch.round(m / scale.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(1)).clamp_(-127, 127)
        return [q.to(torch.int8).reshape(-1)[: flat.numel()].view(t.shape), scale]

    def decode(self, parts, shape, dtype):
        q, scale = parts
        rows, width = self._rows(tuple(shape))
        flat = q.reshape(-1).float()
        m = _zero_pad(flat, rows * width - flat.numel()).view(rows, width) * scale.unsqueeze(1)
        return m.reshape(-1)[: flat.numel()].view(shape).to(dtype)


def _zero_pad(flat: Tensor, pad: int) -> Tensor:
    return torch.cat([flat, flat.new_zeros(pad)]) if pad else flat


class TopK(WireCodec):
    """Keep the ``fraction`` largest-magnitude values of each sample; send them with their indices.

    Indices are int16 when a sample has at most 32,768 values, else int32; both count in the bytes sent.
    """

    def __init__(self, fraction: float = 0.1) -> None:
        if not isinstance(fraction, (int, float)) or isinstance(fraction, bool) or not 0 < fraction <= 1:
            raise ValueError(f"TopK(fraction={fraction!r}): give the share of values kept, in (0, 1], e.g. 0.1.")
        self.fraction = float(fraction)
        self.name = f"topk{self.fraction:g}"

    def _geometry(self, shape: tuple[int, ...]) -> tuple[int, int, int, torch.dtype]:
        rows = shape[0] if len(shape) >= 1 else 1
        width = math.prod(shape) // max(rows, 1)
        k = max(1, math.ceil(self.fraction * width))
        return rows, width, k, torch.int16 if width <= 2 ** 15 else torch.int32

    def spec(self, shape, dtype):
        rows, _, k, index_dtype = self._geometry(tuple(shape))
        return [((rows, k), dtype), ((rows, k), index_dtype)]

    def encode(self, t):
        rows, width, k, index_dtype = self._geometry(tuple(t.shape))
        m = t.detach().reshape(rows, width)
        idx = m.abs().topk(k, dim=1, sorted=False).indices
        return [m.gather(1, idx), idx.to(index_dtype)]

    def decode(self, parts, shape, dtype):
        values, idx = parts
        rows, width, _, _ = self._geometry(tuple(shape))
        out = values.new_zeros(rows, width).scatter_(1, idx.long(), values)
        return out.view(shape).to(dtype)


WIRE_CODECS: dict[str, Any] = {
    "none": WireCodec,
    "fp16": lambda: Cast("fp16"),
    "bf16": lambda: Cast("bf16"),
    "int8": lambda **kw: Int8("channel", **kw),
    "int8-channel": lambda **kw: Int8("channel", **kw),
    "int8-block": lambda **kw: Int8("block", **kw),
    "topk": TopK,
}


def make_wire_codec(value: str | Mapping[str, Any] | WireCodec, *, where: str = "wire") -> WireCodec:
    """A wire codec from a name (``"int8"``), a mapping (``{"name": "topk", "fraction": 0.05}``) or an instance."""
    if isinstance(value, WireCodec):
        return value
    if isinstance(value, str):
        name, options = value, {}
    elif isinstance(value, Mapping) and "name" in value:
        name, options = value["name"], {k: v for k, v in value.items() if k != "name"}
    else:
        raise TypeError(f"{where}: give a wire codec name such as 'int8', or a mapping with 'name' "
                        f"(e.g. {{name: topk, fraction: 0.05}}); got {value!r}.")
    if name not in WIRE_CODECS:
        raise ValueError(f"{where}: unknown wire codec {name!r}; choose one of {sorted(WIRE_CODECS)}.")
    try:
        return WIRE_CODECS[name](**options)
    except TypeError as err:
        raise ValueError(f"{where}: bad options {options} for wire codec {name!r}: {err}") from err


@dataclass(frozen=True)
class WirePlan:
    """Which wire codec each (cut, kind) uses; absent pairs travel as they are."""

    codecs: dict[tuple[str, str], WireCodec] = field(default_factory=dict)

    @classmethod
    def parse(cls, value: WirePlan | Mapping[str, Any] | None) -> WirePlan:
        if value is None:
            return cls()
        if isinstance(value, WirePlan):
            return value
        if not isinstance(value, Mapping):
            raise TypeError(f"wire={value!r}: give a mapping such as {{'up.activation': 'int8', "
                            f"'down.gradient': 'fp16'}}.")
        valid = [f"{c}.{k}" for c in CUTS for k in KINDS]
        codecs = {}
        for key, spec in value.items():
            if key not in valid:
                raise ValueError(f"wire: unknown key {key!r}; use <cut>.<kind>, one of {valid}.")
            cut, kind = key.split(".")
            codec = make_wire_codec(spec, where=f"wire[{key!r}]")
            if type(codec) is not WireCodec:  # "none" is the same as leaving the key out
                codecs[(cut, kind)] = codec
        return cls(codecs)

    def get(self, cut: str, kind: str) -> WireCodec | None:
        return self.codecs.get((cut, kind))

    def __bool__(self) -> bool:
        return bool(self.codecs)

    def describe(self) -> dict[str, str]:
        return {f"{c}.{k}": repr(v) for (c, k), v in self.codecs.items()}


class WireEndpoint:
    """One stage's side of the wire: swaps its P2P ops for ops on encoded tensors, and decodes on arrival.

    The sender replaces each floating-point tensor by its encoded parts (in order); the receiver posts receives
    into buffers of the same shapes (known from the tensor it expects) and, once they have arrived, decodes
    them into the stage's own receive buffer before the stage computes.
    """

    def __init__(self, plan: WirePlan | Mapping[str, Any] | None = None) -> None:
        self.plan = WirePlan.parse(plan)
        self._pending: dict[tuple[str, int], list[tuple[Tensor, WireCodec, list[Tensor]]]] = {}

    def send(self, ops: list[dist.P2POp], *, cut: str, kind: str) -> list[dist.P2POp]:
        codec = self.plan.get(cut, kind)
        if codec is None:
            return ops
        out = []
        for op in ops:
            if not op.tensor.is_floating_point():
                out.append(op)
                continue
            for part in codec.encode(op.tensor.detach()):
                out.append(dist.P2POp(op.op, part.contiguous(), op.peer, op.group, op.tag))
        return out

    def recv(self, ops: list[dist.P2POp], *, cut: str, kind: str, chunk: int) -> list[dist.P2POp]:
        codec = self.plan.get(cut, kind)
        if codec is None:
            return ops
        out, pending = [], []
        for op in ops:
            target = op.tensor
            if not target.is_floating_point():
                out.append(op)
                continue
            parts = [torch.empty(shape, dtype=dtype, device=target.device)
                     for shape, dtype in codec.spec(tuple(target.shape), target.dtype)]
            pending.append((target, codec, parts))
            out += [dist.P2POp(op.op, part, op.peer, op.group, op.tag) for part in parts]
        self._pending[(kind, chunk)] = pending
        return out

    @torch.no_grad()
    def decode(self, *, kind: str, chunk: int) -> None:
        """Fill the stage's receive buffers of micro-batch ``chunk`` from what arrived (after the recv completed)."""
        for target, codec, parts in self._pending.pop((kind, chunk), []):
            target.copy_(codec.decode(parts, tuple(target.shape), target.dtype))
