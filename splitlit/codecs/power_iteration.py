"""``PowerIteration``: send low-rank factors of each activation, found by power iteration (the report's "Poweriter")."""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import Tensor, nn

from splitlit.checks import check_count
from splitlit.codecs.base import Codec, Shape, _unpack

__all__ = ["PowerIteration"]


class _PowerEncoder(nn.Module):
    def __init__(self, codec: PowerIteration) -> None:
        super().__init__()
        self.rank, self.iters, self.seed = codec.rank, codec.iters, codec.seed
        self._check = codec.check_shape
        self._starts: dict[tuple, Tensor] = {}

    def _start(self, n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        # The same random start for every sample and step: the encoding is a deterministic function of x.
        key = (n, dtype, device)
        if key not in self._starts:
            gen = torch.Generator().manual_seed(self.seed)
            self._starts[key] = torch.randn(n, self.rank, generator=gen, dtype=torch.float64).to(device, dtype)
        return self._starts[key]

    def forward(self, x: Tensor, *extras: Any) -> tuple:
        self._check(tuple(x.shape))
        b, c, rest = x.shape[0], x.shape[1], x.shape[2:]
        work = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x  # QR needs float32/64
        # ("meta" has no autocast: SplitPipelineStrategy's shape-only composition check runs this on meta tensors)
        with torch.autocast("cpu" if x.is_meta else x.device.type, enabled=False):  # ... also under bf16-mixed
            m = work.reshape(b, c, -1)                                              # [B, C, N]
            q = torch.linalg.qr(m @ self._start(m.shape[2], m.dtype, m.device))[0]  # [B, C, r]
            for _ in range(self.iters - 1):                                          # subspace iteration
                q = torch.linalg.qr(m @ (m.transpose(1, 2) @ q))[0]
            p = q.transpose(1, 2) @ m                                                # [B, r, N]
        # contiguous: the transport sends these buffers as they are (QR returns a column-major Q)
        return q.to(x.dtype).contiguous(), p.reshape(b, self.rank, *rest).to(x.dtype).contiguous(), *extras


class _PowerDecoder(nn.Module):
    def forward(self, q: Tensor, p: Tensor, *extras: Any) -> Any:
        b, c, r = q.shape
        return _unpack((q @ p.reshape(b, r, -1)).reshape(b, c, *p.shape[2:]), extras)


class PowerIteration(Codec):
    """Low-rank factors found by power iteration with QR orthogonalisation (the report's "Poweriter").

        codec = PowerIteration(rank=3)       # [B, 32, 112, 112] -> [B, 32, 3] + [B, 3, 112, 112]
        x_hat = codec(x)                     # the projection of x on its (approximate) top-3 left subspace

    An activation [B, C, *rest] is viewed as B matrices [C, N] (N = prod(rest); a sequence [B, T, D] is [T, D])
    and sent as Q [B, C, r] (orthonormal columns) and P = Q^T x [B, r, *rest] (the report's [B, r, H*W], kept
    in the activation's trailing shape so the receiver needs no side information). The decoder returns Q P.

    Args:
        rank: r, at most min(C, N). A rank with r >= C*N/(C+N) sends as many numbers as it saves: warned.
        iters: power (subspace) iterations; 1 is the report's, more approach the best rank-r approximation
            (the default 2 nearly reaches it on MobileNetV2's cuts, for two extra small matrix products).
        seed: seed of the fixed random start, so encoding is deterministic.

    Differentiable end to end (through the QR), so the gradient that crosses back is that of the two factors.
    """

    def __init__(self, rank: int, iters: int = 2, seed: int = 0) -> None:
        super().__init__()
        self.rank = check_count("PowerIteration", "rank", rank)
        self.iters = check_count("PowerIteration", "iters", iters)
        self.seed = int(seed)
        self._warned: set[Shape] = set()
        self.encoder = _PowerEncoder(self)
        self.decoder = _PowerDecoder()

    def extra_repr(self) -> str:
        return f"rank={self.rank}, iters={self.iters}, seed={self.seed}"

    def check_shape(self, shape: Shape) -> None:
        if len(shape) < 3:
            raise ValueError(f"PowerIteration needs an activation [B, C, ...] (e.g. [B, C, H, W] or [B, T, D]), "
                             f"got shape {list(shape)}.")
        c, n = shape[1], math.prod(shape[2:])
        if self.rank > min(c, n):
            raise ValueError(f"PowerIteration(rank={self.rank}) is impossible for an activation {list(shape)}: "
                             f"viewed as [{c}, {n}] per sample, its rank is at most {min(c, n)}. "
                             f"Choose rank <= {min(c, n)}.")
        if self.rank >= c * n / (c + n) and shape not in self._warned:
            self._warned.add(shape)
            warnings.warn(f"PowerIteration(rank={self.rank}) saves nothing on an activation {list(shape)}: it "
                          f"sends {self.rank * (c + n)} numbers per sample for {c * n}. Use rank < "
                          f"{c * n / (c + n):.1f} or no codec at this cut.", UserWarning, stacklevel=3)

    def payload_shapes(self, shape: Shape) -> list[Shape]:
        self.check_shape(shape)
        return [(shape[0], shape[1], self.rank), (shape[0], self.rank, *shape[2:])]
