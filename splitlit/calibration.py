"""Fit a split's codecs to the activations they will carry, unsplit, before training.

    report = calibrate(split, batches, adapt_steps=50)   # PCA init of learned codecs, then the network adapts

:func:`calibrate` initialises each codec from its cut's activations (PCA for :class:`~splitlit.codecs.ConvInsert`),
can warm it up on a reconstruction loss, and can :func:`distill` the codecs (and the network) so that the tail
receives what it would without them. ``callbacks.CodecCalibration`` runs it before a fit.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from splitlit.codecs import Codec
from splitlit.split import Split, as_tuple

__all__ = ["calibrate", "distill"]

log = logging.getLogger(__name__)

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
    tail's input over all batches, before and after. How the defaults were chosen, and what they do to accuracy:
    the README's "Compression at the cuts" and ``python -m experiments.bench_codecs``.
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
              adapt_uncompressed: bool = False, seed: int = 0) -> dict[str, dict[str, float]]:
    """Fit the split's codecs to the activations they will carry, unsplit, before training.

    1. Per cut, the up codec first (on the head's outputs), then the down codec on the body's outputs computed
       *through* the calibrated up codec, so it sees what it will carry: PCA initialisation (``pca``), then
       ``warmup_steps`` of Adam on the reconstruction error (:meth:`Codec.warmup`).
    2. ``distill_steps`` of :func:`distill`: both codecs together, on the error of what the tail receives.
    3. ``adapt_steps`` of :func:`distill` with ``network=True``: the head, the body and the codecs together,
       towards what the tail received before any of it changed (the network adapts to its codecs). Skipped
       without a codec unless ``adapt_uncompressed``: the same steps on the uncompressed network, a control for
       what the adaptation does besides undoing compression (its student sees BatchNorm's batch statistics,
       its teacher the running ones).

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
        if adapt_steps > 0 and (adapt_uncompressed or any(isinstance(c, Codec) for c in (split.up, split.down))):
            before, after = distill(split, batches, steps=adapt_steps, lr=adapt_lr, network=True, seed=seed)
            report["adapted"] = {"error_before": before, "error_after": after}
            log.info("adapted the network to its codecs (%d steps): relative error of the tail's input %.4f -> %.4f",
                     adapt_steps, before, after)
    return report
