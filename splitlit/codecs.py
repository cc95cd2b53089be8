"""Codecs that change the model at a cut: the sender runs ``codec.encoder``, the receiver ``codec.decoder``.

    up = PowerIteration(rank=3)                               # or make_codec("poweriter", rank=3)
    down = ConvInsert(in_channels=1280, code_channels=320)    # 1x1 conv 1280 -> 320 -> 1280
    split = Split(head, body, tail, up=up, down=down)

The pipeline then carries the encoder's parts forward and their gradients backward. An encoder takes
``(activation, *extras)`` and returns ``(part1, ..., *extras)``; the decoder takes ``(part1, ..., *extras)`` and
returns ``activation_hat`` (``(activation_hat, *extras)`` when there are extras such as an attention mask,
which pass through untouched). The same modules run unsplit (``codec(x)`` = decoder(encoder(x))), so their
effect on accuracy can be studied in one process.

A learned codec inserted into a pretrained network must start close to the identity on the activations it
carries: :func:`calibrate` (or the ``callbacks.CodecCalibration`` callback) initialises ConvInsert from the
principal components of a few calibration batches, can warm it up on a reconstruction loss, and can distil
the codecs so that the tail receives what it would without them.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from splitlit.split import Split, as_tuple

__all__ = [
    "CODECS",
    "REPORT_CODECS",
    "Codec",
    "ConvInsert",
    "PowerIteration",
    "calibrate",
    "distill",
    "make_codec",
    "report_codecs",
]

log = logging.getLogger(__name__)

Shape = tuple[int, ...]


def _unpack(x_hat: Tensor, extras: tuple) -> Any:
    return (x_hat, *extras) if extras else x_hat


def _positive_int(owner: str, name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{owner}({name}={value!r}): {name} must be a positive integer.")
    return value


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


# ---------------------------------------------------------------------------------------------------------------
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
        iters: power (subspace) iterations; 1 is the report's, more approach the best rank-r approximation.
            The default 2 nearly reaches it on MobileNetV2's cuts (relative error at the up cut, rank 3, 96 px:
            0.196 with 1, 0.135 with 2, 0.123 for the truncated SVD) for two extra small matrix products.
        seed: seed of the fixed random start, so encoding is deterministic.

    Differentiable end to end (through the QR), so the gradient that crosses back is that of the two factors.
    """

    def __init__(self, rank: int, iters: int = 2, seed: int = 0) -> None:
        super().__init__()
        self.rank = _positive_int("PowerIteration", "rank", rank)
        self.iters = _positive_int("PowerIteration", "iters", iters)
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


# ---------------------------------------------------------------------------------------------------------------
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
        self.in_channels = _positive_int("ConvInsert", "in_channels", in_channels)
        self.code_channels = _positive_int("ConvInsert", "code_channels", code_channels)
        self.kernel_size = _positive_int("ConvInsert", "kernel_size", kernel_size)
        self.stride = _positive_int("ConvInsert", "stride", kernel_size if stride is None else stride)
        if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
            raise ValueError(f"ConvInsert(padding={padding!r}): padding must be an integer >= 0.")
        self.padding = padding
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


# ---------------------------------------------------------------------------------------------------------------
CODECS: dict[str, type[Codec]] = {"poweriter": PowerIteration, "convinsert": ConvInsert}

# The report's rows for MobileNetV2 (up cut [B, 32, H/2, W/2], down cut [B, 1280, H/32, W/32]).
REPORT_CODECS: dict[str, tuple[dict[str, Any], dict[str, Any]] | None] = {
    "none": None,
    "convinsert097": ({"name": "convinsert", "in_channels": 32, "code_channels": 32, "kernel_size": 4},
                      {"name": "convinsert", "in_channels": 1280, "code_channels": 320}),
    "convinsert070": ({"name": "convinsert", "in_channels": 32, "code_channels": 20, "kernel_size": 4},
                      {"name": "convinsert", "in_channels": 1280, "code_channels": 320}),
    "poweriter3_7": ({"name": "poweriter", "rank": 3}, {"name": "poweriter", "rank": 7}),
}


def make_codec(name: str, **kwargs: Any) -> Codec | None:
    """A codec by short name: ``make_codec("poweriter", rank=3)``; ``"none"`` gives ``None`` (no codec)."""
    key = str(name).lower().replace("_", "").replace("-", "")
    if key == "none":
        if kwargs:
            raise ValueError(f"make_codec('none') takes no arguments, got {sorted(kwargs)}.")
        return None
    if key not in CODECS:
        raise ValueError(f"Unknown codec {name!r}; choose one of {sorted(CODECS)} or 'none'.")
    return CODECS[key](**kwargs)


def report_codecs(name: str, **overrides: Any) -> tuple[Codec | None, Codec | None]:
    """The (up, down) codecs of one of the report's rows: ``none``, ``convinsert097``, ``convinsert070``,
    ``poweriter3_7``. ``overrides`` (e.g. ``iters=2``) go to both codecs."""
    if name not in REPORT_CODECS:
        raise ValueError(f"Unknown report codec {name!r}; choose one of {sorted(REPORT_CODECS)}.")
    row = REPORT_CODECS[name]
    if row is None:
        return None, None
    return tuple(make_codec(**{**spec, **overrides}) for spec in row)  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------------------------
_BATCH_NORMS = (nn.modules.batchnorm._BatchNorm,)


@contextmanager
def _calibration_mode(parts: list[nn.Module], batch_stats: bool) -> Iterator[None]:
    """Every module in eval mode, but BatchNorm on batch statistics if ``batch_stats``; all restored afterwards.

    Batch statistics are what the codecs see while fine-tuning (and what the running statistics converge to):
    on upscaled CIFAR-10 the ImageNet running statistics put MobileNetV2's head output 50% away from them.
    The running statistics (and ``num_batches_tracked``) are saved and put back, so calibration changes no
    buffer of the network.
    """
    modules = [m for p in parts for m in p.modules()]
    modes = [(m, m.training) for m in modules]
    norms = [m for m in modules if isinstance(m, _BATCH_NORMS)] if batch_stats else []
    saved = [(b, b.clone()) for m in norms for b in m.buffers()]
    for m in modules:
        m.train(m in norms)
    try:
        yield
    finally:
        for buffer, value in saved:
            buffer.copy_(value)
        for m, mode in modes:
            m.train(mode)


@torch.no_grad()
def _cut_activations(split: Split, batches: list[tuple], cut: str) -> Tensor:
    """The activations entering the ``cut`` codec's encoder, computed unsplit (up codec in place for "down")."""
    found = []
    for inputs in batches:
        out: Any = split.head(*inputs)
        if cut == "down":
            if split.up is not None:
                out = split.up(*as_tuple(out))
            out = split.body(*as_tuple(out))
        found.append(as_tuple(out)[0].detach().float())
    return torch.cat(found)


def _tail_input(split: Split, inputs: tuple, *, codecs: bool) -> Tensor:
    """What the tail receives for ``inputs``: with the codecs in place, or as the uncompressed network has it."""
    out: Any = split.head(*inputs)
    if codecs and split.up is not None:
        out = split.up(*as_tuple(out))
    out = split.body(*as_tuple(out))
    if codecs and split.down is not None:
        out = split.down(*as_tuple(out))
    return as_tuple(out)[0]


def _relative(x_hat: Tensor, x: Tensor) -> float:
    return math.sqrt((x_hat - x).double().pow(2).sum().item() / max(x.double().pow(2).sum().item(), 1e-30))


def distill(split: Split, batches: list[tuple], *, steps: int, lr: float = 1e-4, network: bool = False,
            seed: int = 0) -> tuple[float, float]:
    """Train so the tail receives, with the codecs in place, what the uncompressed network gives it.

    Each step takes one calibration batch and minimises the mean squared error between the tail's input with
    the codecs and without them (computed once, before any step: the teacher is the network as it is now),
    relative to the latter's mean square, with Adam. Unlike the reconstruction warm-up this weighs an error
    at the up cut by what the body makes of it. Run it in calibration mode (see :func:`calibrate`).

    ``network=False`` trains the codecs' parameters only (gradients reach the up codec through the frozen
    body); ``network=True`` also trains the head and the body (every parameter with ``requires_grad``, so
    frozen or LoRA-only networks stay as they are; the tail is the loss's reference and stays): the network
    adapts to the codecs before fine-tuning, which is what a parameter-free codec such as power iteration
    needs. The teacher then runs as the pretrained network is used, BatchNorm on its running statistics,
    while the student sees batch statistics as it will while fine-tuning. Returns the relative error of the
    tail's input over all batches, before and after.

    The defaults (50 steps at lr 5e-4, the teacher on running statistics, the loss on the tail's input) were
    chosen on MobileNetV2 / CIFAR-10 at 96 px from runs of one to three seeds each; their accuracy over seeds,
    paired with no compression, is measured by ``python -m experiments.bench_codecs --seeds 0-4`` (numbers in
    the README's "Benchmarks"). ``network=False`` (codecs only), 40 steps at lr 1e-4 after PCA raised the
    tail-input error of conv insert 0.097 on 16 batches from 0.53 to 0.59.
    """
    parts = [split.up, split.down] + ([split.head, split.body] if network else [])
    params = [p for m in parts if m is not None and (network or isinstance(m, Codec))
              for p in m.parameters() if p.requires_grad]
    # The teacher of the network's adaptation is the network as it is used: BatchNorm on running statistics.
    teacher_mode = _calibration_mode([split.head, split.body], batch_stats=False) if network else nullcontext()
    with torch.no_grad(), teacher_mode:
        targets = [_tail_input(split, b, codecs=False).detach() for b in batches]

    def error() -> float:
        with torch.no_grad():
            found = [_tail_input(split, b, codecs=True) for b in batches]
        return _relative(torch.cat(found), torch.cat(targets))

    before = error()
    if steps <= 0 or not params:
        return before, before
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(batches) * math.ceil(steps / len(batches)), generator=gen)
    opt = torch.optim.Adam(params, lr=lr)
    with torch.enable_grad():
        for i in order[:steps].remainder(len(batches)).tolist():
            target = targets[i]
            found = _tail_input(split, batches[i], codecs=True)
            loss = F.mse_loss(found, target) / target.pow(2).mean().clamp_min(1e-12)
            grads = torch.autograd.grad(loss, params)  # only these parameters' gradients: no .grad left behind
            for p, g in zip(params, grads):
                p.grad = g
            opt.step()
            opt.zero_grad(set_to_none=True)
    return before, error()


def calibrate(split: Split, batches: Iterable[tuple[Tensor, ...]] | Iterable[Tensor], *, pca: bool = True,
              warmup_steps: int = 0, warmup_lr: float = 1e-3, distill_steps: int = 0, distill_lr: float = 1e-4,
              adapt_steps: int = 0, adapt_lr: float = 5e-4, batch_stats: bool = True,
              seed: int = 0) -> dict[str, dict[str, float]]:
    """Fit the split's codecs to the activations they will carry, unsplit, before training.

    1. Per cut, the up codec first (on the head's outputs), then the down codec on the body's outputs computed
       *through* the calibrated up codec, so it sees what it will carry: PCA initialisation (``pca``), then
       ``warmup_steps`` of Adam on the reconstruction error (:meth:`Codec.warmup`).
    2. ``distill_steps`` of :func:`distill`: both codecs together, on the error of what the tail receives.
    3. ``adapt_steps`` of :func:`distill` with ``network=True``: the head, the body and the codecs together,
       towards what the tail received before any of it changed (the network adapts to its codecs).

    Every module runs in eval mode except BatchNorm, which uses batch statistics when ``batch_stats`` (what the
    codecs see while fine-tuning); no buffer of the network changes, and no parameter unless ``adapt_steps``.
    Returns, per cut, the relative reconstruction error fresh / after PCA / after warm-up, and under
    ``"tail_input"`` / ``"adapted"`` the relative error of the tail's input before and after distillation /
    adaptation (when they run).
    """
    batches = [as_tuple(b) for b in batches]
    if not batches:
        raise ValueError("calibrate() needs at least one batch of head inputs.")
    parts = [m for m in (split.head, split.body, split.tail, split.up, split.down) if m is not None]
    report: dict[str, dict[str, float]] = {}
    with _calibration_mode(parts, batch_stats):
        for cut in ("up", "down"):
            codec = getattr(split, cut)
            if not isinstance(codec, Codec):
                continue
            acts = _cut_activations(split, batches, cut)
            start = codec.reconstruction_error(acts)
            if pca:
                codec.init_from_activations(acts)
            init = codec.reconstruction_error(acts)
            _, after = codec.warmup(acts, steps=warmup_steps, lr=warmup_lr, seed=seed)
            report[cut] = {"error_fresh": start, "error_init": init, "error_after": after}
            log.info("calibrated the %s codec on %s: relative error %.4f fresh -> %.4f (PCA) -> %.4f (warm-up)",
                     cut, list(acts.shape), start, init, after)
        if distill_steps > 0:
            before, after = distill(split, batches, steps=distill_steps, lr=distill_lr, seed=seed)
            report["tail_input"] = {"error_before": before, "error_after": after}
            log.info("distilled the codecs (%d steps): relative error of the tail's input %.4f -> %.4f",
                     distill_steps, before, after)
        if adapt_steps > 0 and any(isinstance(c, Codec) for c in (split.up, split.down)):
            before, after = distill(split, batches, steps=adapt_steps, lr=adapt_lr, network=True, seed=seed)
            report["adapted"] = {"error_before": before, "error_after": after}
            log.info("adapted the network to its codecs (%d steps): relative error of the tail's input %.4f -> %.4f",
                     adapt_steps, before, after)
    return report
