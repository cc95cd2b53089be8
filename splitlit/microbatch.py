"""Micro-batches on the client: the head's inputs, slices of a batch, one log per batch, the pipeline's output.

The LightningModule's own ``training_step`` computes the loss of each micro-batch; its ``self(...)`` call
returns what the pipeline computed for that micro-batch (:func:`_returning`), and what it logs per micro-batch
is logged once per batch (:class:`_LogsPerBatch`), as an unsplit step would.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor


def _head_inputs(module: LightningModule, batch: Any) -> tuple[Tensor, ...]:
    hook: Callable | None = getattr(module, "split_inputs", None)
    if hook is not None:
        inputs = hook(batch)
        return inputs if isinstance(inputs, tuple) else (inputs,)
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        return (batch[0],)
    raise MisconfigurationException(
        f"SplitPipelineStrategy cannot tell the head's inputs in a {type(batch).__name__} batch. Define "
        f"`split_inputs(self, batch)` on {type(module).__name__} returning the tensors the head takes."
    )


def _slice_batch(batch: Any, start: int, stop: int, size: int) -> Any:
    """The micro-batch [start, stop) of every tensor or list whose first dimension is the batch."""
    if isinstance(batch, Tensor):
        return batch[start:stop] if batch.ndim and batch.shape[0] == size else batch
    if isinstance(batch, Mapping):
        return type(batch)({k: _slice_batch(v, start, stop, size) for k, v in batch.items()})
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(_slice_batch(v, start, stop, size) for v in batch))
    if isinstance(batch, (tuple, list)):
        if len(batch) == size and not any(isinstance(v, (Tensor, Mapping, tuple, list)) for v in batch):
            return type(batch)(batch[start:stop])
        return type(batch)(_slice_batch(v, start, stop, size) for v in batch)
    return batch


class _LogsPerBatch:
    """Collects what ``training_step`` logs for each micro-batch and logs it once for the batch.

    Values are combined with the logged ``reduce_fx`` (mean by default, over equal micro-batches: the value an
    unsplit step logs); a logged torchmetrics object has already seen every micro-batch and is logged once.
    """

    _COMBINE = {"mean": torch.mean, "sum": torch.sum, "max": torch.max, "min": torch.min}

    def __init__(self, module: LightningModule) -> None:
        self.module = module
        self.calls: dict[str, tuple[list[Any], dict[str, Any]]] = {}

    def _record(self, name: str, value: Any, **kwargs: Any) -> None:
        self.calls.setdefault(name, ([], kwargs))[0].append(value)

    def __enter__(self) -> _LogsPerBatch:
        self.module.log = self._record  # type: ignore[method-assign]
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        del self.module.log
        if exc_type is not None:
            return
        for name, (values, kwargs) in self.calls.items():
            last = values[-1]
            if isinstance(last, (Tensor, float, int)) and not isinstance(last, bool):
                reduce = kwargs.get("reduce_fx", "mean")
                combine = self._COMBINE.get(reduce if isinstance(reduce, str) else "", None)
                if combine is not None:
                    stacked = torch.stack([torch.as_tensor(v, dtype=torch.float32).detach().reshape(())
                                           for v in values])
                    last = combine(stacked)
            self.module.log(name, last, **kwargs)


@contextmanager
def _returning(module: LightningModule, output: Any) -> Iterator[None]:
    """Within the block, ``module(...)`` returns ``output`` (what the pipeline computed) instead of running."""
    module.forward = lambda *args, **kwargs: output  # type: ignore[method-assign]
    try:
        yield
    finally:
        del module.forward
