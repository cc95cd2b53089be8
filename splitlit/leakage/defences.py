"""The client's defences, as hooks on its own modules at the cuts: nothing is added to what crosses the link.

    handles = nopeek(split, alpha=0.1) + activation_noise(split, 0.1) + gradient_noise(split, 1e-4)
    ...
    for h in handles: h.remove()

Each returns the hook handles; :class:`callbacks.Defences` installs them on the client at set-up.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from splitlit.leakage.attacks import distance_correlation
from splitlit.leakage.view import down_cut_module, up_cut_module
from splitlit.split import Split

__all__ = ["activation_noise", "gradient_noise", "nopeek"]


def _floats(value: Any) -> list[int]:
    items = value if isinstance(value, tuple) else (value,)
    return [i for i, t in enumerate(items) if isinstance(t, Tensor) and t.is_floating_point() and not t.is_meta]


def _replace(value: Any, index: list[int], new: list[Tensor]) -> Any:
    if not isinstance(value, tuple):
        return new[0]
    items = list(value)
    for i, t in zip(index, new):
        items[i] = t
    return tuple(items)


class _AddGradient(torch.autograd.Function):
    """Identity forward; backward adds ``extra(tensors)`` to the incoming gradients.

    The outputs are copies, not views: the next module may work in place (MobileNetV2's ReLU6), which autograd
    forbids on a view made inside a custom Function."""

    @staticmethod
    def forward(ctx: Any, extra: Callable, *tensors: Tensor) -> tuple[Tensor, ...]:
        ctx.extra = extra
        ctx.save_for_backward(*tensors)
        return tuple(t.clone() for t in tensors)

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple:
        added = ctx.extra(ctx.saved_tensors)
        return (None, *(g + a for g, a in zip(grads, added)))


def nopeek(split: Split, alpha: float) -> list[RemovableHandle]:
    """NoPeek: the client adds ``alpha * dCor(head inputs, up-cut activations)`` to its loss, per micro-batch.

    Vepakomma, Singh, Gupta and Raskar, "NoPeek: Information leakage reduction to share activations in
    distributed deep learning" (ICDMW 2020). The penalty depends on the client's weights only through the up-cut
    activation, so its exact gradient is ``alpha * d dCor / d activation`` flowing back through the head: a
    hook wraps the activation in an identity whose backward adds that term, computed from the saved (detached)
    head inputs. The loss the model reports is unchanged, and nothing extra crosses the link. Micro-batches of
    fewer than 4 samples get no penalty (the bias-corrected dCor needs 4).
    """
    inputs: list[Tensor] = []

    def keep_input(module: Any, args: tuple) -> None:
        if torch.is_grad_enabled():
            inputs[:] = [args[0].detach()]

    def penalise(module: Any, args: tuple, output: Any) -> Any:
        index = _floats(output)
        if not torch.is_grad_enabled() or not inputs or not index:
            return None
        x = inputs[0]
        tensors = [output[i] if isinstance(output, tuple) else output for i in index]
        if x.shape[0] < 4 or not any(t.requires_grad for t in tensors):
            return None

        def extra(saved: tuple[Tensor, ...]) -> list[Tensor]:
            with torch.enable_grad():
                z = [t.detach().requires_grad_() for t in saved]
                dcor = distance_correlation(x, torch.cat([t.reshape(t.shape[0], -1) for t in z], dim=1))
                return list(torch.autograd.grad(alpha * dcor, z))

        return _replace(output, index, list(_AddGradient.apply(extra, *tensors)))

    return [split.head.register_forward_pre_hook(keep_input),
            up_cut_module(split).register_forward_hook(penalise)]


def activation_noise(split: Split, scale: float) -> list[RemovableHandle]:
    """Gaussian noise of standard deviation ``scale`` added to the up-cut activations the client sends
    (in training and evaluation alike: what the server receives is always noisy); the gradient passes as is."""

    def add(module: Any, args: tuple, output: Any) -> Any:
        index = _floats(output)
        if not index:
            return None
        items = output if isinstance(output, tuple) else (output,)
        return _replace(output, index, [items[i] + scale * torch.randn_like(items[i]) for i in index])

    return [up_cut_module(split).register_forward_hook(add)]


def gradient_noise(split: Split, scale: float) -> list[RemovableHandle]:
    """Gaussian noise of standard deviation ``scale`` added to the down-cut gradients the client sends back
    (the gradient w.r.t. the tail's input, or the down decoder's): the server's body trains on the noisy one."""

    def arm(module: Any, args: tuple) -> None:
        if not torch.is_grad_enabled():
            return
        for t in args:
            if isinstance(t, Tensor) and t.is_floating_point() and t.requires_grad:
                t.register_hook(lambda g: g + scale * torch.randn_like(g))

    return [down_cut_module(split).register_forward_pre_hook(arm)]
