"""``ConvInsert``: a learned convolution on the sender and its mirror on the receiver."""

from __future__ import annotations

import logging
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from splitlit.checks import check_count
from splitlit.codecs.base import Codec, Shape, _unpack

__all__ = ["ConvInsert"]

log = logging.getLogger(__name__)


class _ConvEncoder(nn.Module):
    def __init__(self, codec: ConvInsert) -> None:
        super().__init__()
        self.conv = nn.Conv2d(codec.in_channels, codec.code_channels, codec.kernel_size, codec.stride,
                              codec.padding)
        self._check = codec.check_shape

    def forward(self, x: Tensor, *extras: Any) -> tuple:
        self._check(tuple(x.shape))
        return self.conv(x), *extras


class _ConvDecoder(nn.Module):
    def __init__(self, codec: ConvInsert) -> None:
        super().__init__()
        k, s, p = codec.kernel_size, codec.stride, codec.padding
        if k == 1 and s == 1 and p == 0:
            self.conv: nn.Module = nn.Conv2d(codec.code_channels, codec.in_channels, 1)
        else:
            self.conv = nn.ConvTranspose2d(codec.code_channels, codec.in_channels, k, s, p)

    def forward(self, z: Tensor, *extras: Any) -> Any:
        return _unpack(self.conv(z), extras)


class ConvInsert(Codec):
    """A learned convolution on the sender and its mirror (transposed convolution) on the receiver.

        up = ConvInsert(32, 32, kernel_size=4)     # [B, 32, 112, 112] -> [B, 32, 28, 28] (4x4, stride 4)
        down = ConvInsert(1280, 320)               # [B, 1280, 7, 7]   -> [B, 320, 7, 7]  (1x1)

    Args:
        in_channels: channels of the activation at the cut.
        code_channels: channels sent.
        kernel_size: side of the square kernel; ``stride`` defaults to it (non-overlapping patches, which is
            what makes :meth:`init_from_activations` an exact PCA of the patches).
        stride / padding: of the encoder's convolution; the decoder inverts the geometry, so the activation's
            ``H + 2*padding - kernel_size`` must be a multiple of ``stride`` (checked on the first batch).

    Fresh layers wreck a pretrained network: initialise with :func:`calibrate` (``callbacks.CodecCalibration``).
    """

    def __init__(self, in_channels: int, code_channels: int, kernel_size: int = 1, stride: int | None = None,
                 padding: int = 0) -> None:
        super().__init__()
        self.in_channels = check_count("ConvInsert", "in_channels", in_channels)
        self.code_channels = check_count("ConvInsert", "code_channels", code_channels)
        self.kernel_size = check_count("ConvInsert", "kernel_size", kernel_size)
        self.stride = check_count("ConvInsert", "stride", kernel_size if stride is None else stride)
        self.padding = check_count("ConvInsert", "padding", padding, at_least=0)
        if self.stride > self.kernel_size:
            raise ValueError(f"ConvInsert(kernel_size={kernel_size}, stride={self.stride}): a stride larger than "
                             f"the kernel skips pixels the decoder cannot restore; use kernel_size >= stride.")
        if 2 * padding >= self.kernel_size and padding > 0:
            raise ValueError(f"ConvInsert(kernel_size={kernel_size}, padding={padding}): padding must be less than "
                             f"half the kernel size.")
        patch = self.in_channels * self.stride ** 2  # numbers per output position the code replaces
        if self.code_channels >= patch:
            warnings.warn(f"ConvInsert(in_channels={in_channels}, code_channels={code_channels}, "
                          f"stride={self.stride}) sends {self.code_channels} numbers per {patch}: it does not "
                          f"compress. Use code_channels < {patch}.", UserWarning, stacklevel=2)
        self.encoder = _ConvEncoder(self)
        self.decoder = _ConvDecoder(self)

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels}, code_channels={self.code_channels}, "
                f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}")

    def _out(self, side: int) -> int:
        return (side + 2 * self.padding - self.kernel_size) // self.stride + 1

    def check_shape(self, shape: Shape) -> None:
        if len(shape) != 4 or shape[1] != self.in_channels:
            raise ValueError(f"ConvInsert(in_channels={self.in_channels}) got an activation of shape {list(shape)}; "
                             f"it takes [B, {self.in_channels}, H, W]. Set in_channels to the cut's channel count.")
        for side in shape[2:]:
            if side + 2 * self.padding < self.kernel_size or (side + 2 * self.padding - self.kernel_size) % self.stride:
                raise ValueError(
                    f"ConvInsert(kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}) "
                    f"cannot invert its geometry on an activation {list(shape)}: H + 2*padding - kernel_size "
                    f"= {side + 2 * self.padding - self.kernel_size} must be >= 0 and a multiple of the stride. "
                    f"Change kernel_size/stride/padding or the image size."
                )

    def payload_shapes(self, shape: Shape) -> list[Shape]:
        self.check_shape(shape)
        return [(shape[0], self.code_channels, self._out(shape[2]), self._out(shape[3]))]

    @torch.no_grad()
    def init_from_activations(self, activations: Tensor) -> None:
        """PCA of the activation's patches: encoder = top principal directions, decoder = their transpose.

        The codec then starts as the best linear projection of each (non-overlapping) patch onto
        ``code_channels`` dimensions around the per-channel mean. With overlapping patches or padding there is
        no exact PCA form; such a codec keeps its initialisation (use ``warmup``).
        """
        if self.kernel_size != self.stride or self.padding:
            log.info("ConvInsert: kernel_size != stride or padding > 0, no PCA initialisation (use warm-up)")
            return
        self.check_shape(tuple(activations.shape))
        k, c = self.kernel_size, self.in_channels
        x = activations.float()
        mean_c = x.double().mean(dim=(0, 2, 3))                               # [C]
        patches = F.unfold(x - mean_c.float().view(1, c, 1, 1), k, stride=k)  # [n, C*k*k, L]
        rows = patches.transpose(1, 2).reshape(-1, c * k * k)
        # The covariance in float32 (centred rows, so no cancellation; float64 would cost 4x on a CPU), its
        # eigenvectors in float64.
        eigvals, eigvecs = torch.linalg.eigh((rows.T @ rows).double() / max(len(rows), 1))
        top = eigvecs[:, eigvals.argsort(descending=True)[: self.code_channels]]   # [C*k*k, code]
        if top.shape[1] < self.code_channels:  # more channels than patch dimensions: pad with zero filters
            top = torch.cat([top, top.new_zeros(top.shape[0], self.code_channels - top.shape[1])], dim=1)
        weight = top.T.reshape(self.code_channels, c, k, k)                    # Conv2d / ConvTranspose2d layout
        mean_patch = mean_c.repeat_interleave(k * k)                           # unfold order: channel-major
        enc, dec = self.encoder.conv, self.decoder.conv
        enc.weight.copy_(weight)
        enc.bias.copy_(-(top.T @ mean_patch))
        if isinstance(dec, nn.ConvTranspose2d):
            dec.weight.copy_(weight)                                           # [code, C, k, k]
        else:
            dec.weight.copy_(weight.permute(1, 0, 2, 3))                       # [C, code, 1, 1]
        dec.bias.copy_(mean_c)
