"""BatchNorm whose running statistics cover the whole batch, not each micro-batch.

A pipeline runs every micro-batch through the network on its own, so ``nn.BatchNorm*`` in training mode
normalises with the statistics of each micro-batch (as an unsplit model would with a batch of that size) and
updates its running statistics once per micro-batch: ``chunks`` times per batch, each from a ``1/chunks`` slice.
The model evaluated afterwards then depends on ``chunks``. GPipe (Huang et al., 2019) and torchgpipe
(``GPipe(deferred_batch_norm=True)``) defer the update instead: the micro-batches are normalised as before, but
the running statistics are updated once per batch, from the mean and variance of the whole batch, so they are
those of the unsplit model trained on the whole batch.

:class:`DeferredBatchNorm` does the same: each micro-batch's count, mean and sum of squared deviations are kept,
and :meth:`DeferredBatchNorm.commit` (called by :class:`~splitlit.SplitPipelineStrategy` after each training
batch) pools them (Chan et al.'s parallel variance, no catastrophic cancellation) and updates the running
statistics as ``nn.BatchNorm`` would on the whole batch: momentum, ``momentum=None`` (a cumulative average) and
the unbiased variance included. Its state dict is BatchNorm's, so checkpoints load into the plain model.

    SplitPipelineStrategy(chunks=8, deferred_batchnorm=True)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["DeferredBatchNorm", "commit_deferred", "convert_deferred"]


class DeferredBatchNorm(_BatchNorm):
    """A BatchNorm layer that normalises each micro-batch and updates its running statistics once per batch."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats=True)
        self._pending: list[tuple[int, Tensor, Tensor]] = []  # (count, mean, sum of squared deviations)

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"DeferredBatchNorm expects a batch of at least 2 dimensions (N, C, ...), got "
                             f"{input.dim()}D input of shape {tuple(input.shape)}.")

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        if not self.training:
            return F.batch_norm(input, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0,
                                self.eps)
        if input.is_meta:
            return F.batch_norm(input, None, None, self.weight, self.bias, True, 0.0, self.eps)
        # BatchNorm's own kernel gives this micro-batch's statistics: "running" buffers updated with momentum 1
        # are the batch mean and the unbiased batch variance (no second pass over the input).
        mean = torch.zeros_like(self.running_mean)
        var = torch.ones_like(self.running_var)
        out = F.batch_norm(input, mean, var, self.weight, self.bias, True, 1.0, self.eps)
        count = input.numel() // input.shape[1]
        self._pending.append((count, mean, var * max(count - 1, 0)))
        return out

    @torch.no_grad()
    def commit(self) -> bool:
        """Update the running statistics from the micro-batches seen since the last commit (one batch).

        Returns whether there was anything to commit."""
        if not self._pending:
            return False
        pending, self._pending = self._pending, []
        total = sum(n for n, _, _ in pending)
        mean = sum(n * m for n, m, _ in pending) / total
        squares = sum(s + n * (m - mean) ** 2 for n, m, s in pending)
        var = squares / max(total - 1, 1)  # unbiased, as nn.BatchNorm's running_var
        assert self.num_batches_tracked is not None and self.running_mean is not None
        self.num_batches_tracked.add_(1)
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        self.running_mean.mul_(1 - factor).add_(mean.to(self.running_mean.dtype), alpha=factor)
        self.running_var.mul_(1 - factor).add_(var.to(self.running_var.dtype), alpha=factor)
        return True

    def discard(self) -> None:
        """Forget the micro-batches seen since the last commit (a forward that was not training)."""
        self._pending.clear()

    @classmethod
    def from_batchnorm(cls, bn: _BatchNorm) -> DeferredBatchNorm:
        assert bn.running_mean is not None
        new = cls(bn.num_features, bn.eps, bn.momentum, bn.affine).to(bn.running_mean.device,
                                                                        bn.running_mean.dtype)
        new.load_state_dict(bn.state_dict())
        return new.train(bn.training)


def convert_deferred(*roots: nn.Module) -> int:
    """Replace, in place, every BatchNorm layer under ``roots`` that tracks running statistics by a
    :class:`DeferredBatchNorm` with the same parameters and statistics; returns how many were replaced.

    A layer held by several parents (a model and the containers of a cached :class:`~splitlit.Split`) becomes
    one new layer in all of them, so pass every root that holds one."""
    new: dict[int, DeferredBatchNorm] = {}
    for root in roots:
        for parent in list(root.modules()):
            for name, child in list(parent.named_children()):
                if (isinstance(child, _BatchNorm) and not isinstance(child, DeferredBatchNorm)
                        and child.track_running_stats and not isinstance(child, nn.SyncBatchNorm)):
                    if id(child) not in new:
                        new[id(child)] = DeferredBatchNorm.from_batchnorm(child)
                    setattr(parent, name, new[id(child)])
    return len(new)


def commit_deferred(module: nn.Module) -> int:
    """Commit every :class:`DeferredBatchNorm` in ``module`` (the end of a training batch); returns how many
    had micro-batches to commit."""
    return sum(m.commit() for m in module.modules() if isinstance(m, DeferredBatchNorm))
