"""Which rank owns which tensors, and keeping everything else off it.

Each rank keeps real tensors only for its own part of the :class:`~splitlit.split.Split` (the server the body
and its halves of the codecs, the client everything else); the rest become ``meta`` tensors, shapes without
memory. The server never prepares, sets up or loads data.
"""

from __future__ import annotations

import logging

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import nn

from splitlit.resume import ServerBatches
from splitlit.split import Split, SplitError

log = logging.getLogger("splitlit.strategy")


def _keep_data_off_server(trainer: Trainer) -> None:
    """The server never prepares, sets up or loads data: the data hooks of the datamodule and of the
    LightningModule become no-ops there (loaders passed to ``fit`` are never iterated: see process_dataloader)."""
    loaders = ("train_dataloader", "val_dataloader", "test_dataloader", "predict_dataloader")
    # Replace only what the class overrides, so Lightning's is_overridden() answers the same on both ranks.
    module = trainer.lightning_module
    for hook in loaders:
        if module is not None and is_overridden(hook, module):
            setattr(module, hook, lambda: ServerBatches(0))
    dm = trainer.datamodule
    if dm is None:
        return
    for hook in ("prepare_data", "setup", "teardown"):
        if is_overridden(hook, dm):
            setattr(dm, hook, lambda *a, **k: None)
    for hook in loaders:
        if is_overridden(hook, dm):
            setattr(dm, hook, lambda: ServerBatches(0))


def _split_of(module: LightningModule) -> Split:
    hook = getattr(module, "configure_split", None)
    if hook is None:
        raise MisconfigurationException(
            f"{type(module).__name__} has no configure_split() hook, so SplitPipelineStrategy cannot tell the "
            f"client's layers from the server's. Add `def configure_split(self) -> splitlit.Split` returning "
            f"Split(head=..., body=..., tail=...)."
        )
    split = hook()
    if not isinstance(split, Split):
        raise MisconfigurationException(
            f"{type(module).__name__}.configure_split() must return a splitlit.Split, got {type(split).__name__}."
        )
    owned = {id(t) for t in list(module.parameters()) + list(module.buffers())}
    for part in ("head", "body", "tail", "up", "down"):
        value = getattr(split, part)
        if value is not None and any(id(t) not in owned for t in list(value.parameters()) + list(value.buffers())):
            raise SplitError(
                f"Split.{part} ({type(value).__name__}) has tensors that are not part of {type(module).__name__}: "
                f"assign its layers to attributes in __init__ (self.{part} = ...) so they are saved, loaded and "
                f"moved with the model."
            )
    return split


def _owned_tensors(split: Split, module: nn.Module, is_client: bool) -> set[int]:
    """Ids of the parameters and buffers a rank owns: the server the body and its halves of the codecs, the
    client everything else (head, tail, codec halves and any tensor outside the split)."""
    server = {id(t) for m in split.server_modules() for t in list(m.parameters()) + list(m.buffers())}
    if not is_client:
        return server
    return {id(t) for t in list(module.parameters()) + list(module.buffers())} - server


def _tensor_names(module: nn.Module, ids: set[int]) -> list[str]:
    return [k for k, v in module.state_dict(keep_vars=True).items() if id(v) in ids]


def _to_meta_except(module: nn.Module, keep: set[int], device: torch.device) -> None:
    """Move the tensors in ``keep`` to ``device`` and every other one to ``meta`` (shape only, no memory)."""
    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is None or p.is_meta:
                continue
            if id(p) in keep:
                p.data = p.data.to(device)
            else:
                sub._parameters[name] = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)
        for name, b in list(sub._buffers.items()):
            if b is not None and not b.is_meta:
                sub._buffers[name] = b.to(device) if id(b) in keep else b.to("meta")


def _keep_own_params(optimizers: list, owned: list[nn.Parameter], role: str) -> None:
    ids = {id(p) for p in owned}
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["params"] = [p for p in group["params"] if id(p) in ids]
        if not any(group["params"] for group in optimizer.param_groups):
            log.warning("the %s owns no parameter of optimizer %s", role, type(optimizer).__name__)


def _meta_limitation(err: BaseException | None) -> bool:
    text = str(err).lower()
    return isinstance(err, NotImplementedError) or "meta" in text or "item()" in text or "data-dependent" in text


def _disable_metric_sync(module: nn.Module) -> None:
    try:
        from torchmetrics import Metric
    except ImportError:  # pragma: no cover - torchmetrics is a dependency
        return
    for m in module.modules():
        if isinstance(m, Metric):
            m.sync_on_compute = False
            m.dist_sync_on_step = False
            # torchmetrics copied sync_on_compute at construction; its public distributed_available_fn (asked before
            # every sync) stops the syncs that copy would still ask for.
            m.distributed_available_fn = _no_peer


def _no_peer() -> bool:
    """A client's metric has no peer to sync with (a function, not a lambda: metrics stay picklable)."""
    return False
