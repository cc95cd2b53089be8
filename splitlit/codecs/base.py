"""``Codec``: what changes the model at a cut; the sender runs ``codec.encoder``, the receiver ``codec.decoder``.

The pipeline carries the encoder's parts forward and their gradients backward. An encoder takes
``(activation, *extras)`` and returns ``(part1, ..., *extras)``; the decoder takes ``(part1, ..., *extras)`` and
returns ``activation_hat`` (``(activation_hat, *extras)`` when there are extras such as an attention mask,
which pass through untouched). The same modules run unsplit (``codec(x)`` = decoder(encoder(x))), so their
effect on accuracy can be studied in one process.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from splitlit.split import as_tuple

__all__ = ["Codec", "Shape"]

Shape = tuple[int, ...]


def _unpack(x_hat: Tensor, extras: tuple) -> Any:
    """What a decoder returns: the activation alone, or with the extras that rode along."""
    return (x_hat, *extras) if extras else x_hat


class Codec(nn.Module):
    """An encoder (sender side of a cut) and a decoder (receiver side), plus the analytic size of what crosses.

    Subclasses set ``self.encoder`` and ``self.decoder`` and implement :meth:`payload_shapes`.
    """

    encoder: nn.Module
    decoder: nn.Module

    def forward(self, x: Tensor, *extras: Any) -> Any:
        return self.decoder(*as_tuple(self.encoder(x, *extras)))

    def payload_shapes(self, shape: Shape) -> list[Shape]:
        """Shapes of the float tensors the encoder sends for an activation of ``shape`` (extras not included)."""
        raise NotImplementedError

    def payload_bytes(self, shape: Shape, dtype: torch.dtype = torch.float32) -> int:
        """Bytes the encoder sends for one activation of ``shape``; its gradient crossing back has the same size."""
        size = torch.empty((), dtype=dtype).element_size()
        return sum(math.prod(s) for s in self.payload_shapes(tuple(shape))) * size

    def rate(self, shape: Shape) -> float:
        """Payload size / activation size."""
        return sum(math.prod(s) for s in self.payload_shapes(tuple(shape))) / math.prod(shape)

    # -- initialisation from data (no-ops for a parameter-free codec) --------------------------------------------
    def init_from_activations(self, activations: Tensor) -> None:
        """Initialise the codec from activations it will carry (e.g. their principal components)."""

    def warmup(self, activations: Tensor, *, steps: int, lr: float = 1e-3, batch_size: int = 32,
               seed: int = 0) -> tuple[float, float]:
        """Train the codec alone to reconstruct ``activations`` (Adam on the mean squared error).

        Returns the relative reconstruction error ``||x_hat - x|| / ||x||`` before and after.
        """
        before = self.reconstruction_error(activations)
        params = [p for p in self.parameters() if p.requires_grad]
        if steps <= 0 or not params:
            return before, before
        gen = torch.Generator().manual_seed(seed)
        opt = torch.optim.Adam(params, lr=lr)
        with torch.enable_grad():
            for _ in range(steps):
                idx = torch.randint(len(activations), (min(batch_size, len(activations)),), generator=gen)
                x = activations[idx]
                loss = F.mse_loss(as_tuple(self(x))[0], x)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        return before, self.reconstruction_error(activations)

    @torch.no_grad()
    def reconstruction_error(self, activations: Tensor, batch_size: int = 64) -> float:
        err = ref = 0.0
        for x in activations.split(batch_size):
            err += (as_tuple(self(x))[0] - x).double().pow(2).sum().item()
            ref += x.double().pow(2).sum().item()
        return math.sqrt(err / max(ref, 1e-30))
