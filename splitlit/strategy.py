"""``SplitPipelineStrategy``: train a LightningModule split in a U shape between a client and a server.

Usage::

    trainer = Trainer(accelerator="cpu", devices=2, strategy=SplitPipelineStrategy(chunks=4))
    trainer.fit(model, datamodule=dm)   # model.configure_split() -> Split(head, body, tail, up, down)

Rank 0 is the client: it holds the data, the labels, the head, the tail and their optimiser state.
Rank 1 is the server: it holds the body and never builds a dataset or sees a batch; its loops iterate
placeholders of the same length as the client's loaders. Each training batch runs through
``torch.distributed.pipelining`` in ``chunks`` micro-batches; the LightningModule's own
``training_step`` computes the loss of each micro-batch on the client (its ``self(...)`` call returns
the pipeline's output for that micro-batch), so the same module trains unsplit under any other strategy.
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.trainer.states import RunningStage
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor, nn
from typing_extensions import override

from splitlit.pipeline import CLIENT, SERVER, SplitPipeline, link_errors
from splitlit.schedule import ORDERS
from splitlit.split import Split, SplitError
from splitlit.stage import LinkMeter
from splitlit.wire import WirePlan

__all__ = ["SplitPipelineStrategy"]

log = logging.getLogger(__name__)


class SplitPipelineStrategy(DDPStrategy):
    """Two ranks, one U-shaped model: client (rank 0) = head + tail, server (rank 1) = body.

    Args:
        chunks: micro-batches per batch. A training batch must be a multiple of it (checked at setup);
            a shorter last batch runs with the largest divisor of its size.
        order: ``"1f1b"`` (default, less memory) or ``"gpipe"`` (fill-drain).
        timeout: seconds either rank waits for the other before failing with a clear error.
        wire: wire codecs applied by the transport, per cut and direction, e.g.
            ``{"up.activation": "int8", "down.gradient": "fp16"}`` (see :mod:`splitlit.wire`); the model is
            untouched and the link meter records the encoded bytes.
        process_group_backend: ``"gloo"`` by default (CPU, or a CPU client with a GPU server);
            ``"nccl"`` when both ranks are on CUDA.
        **kwargs: passed to :class:`~lightning.pytorch.strategies.DDPStrategy` (cluster environment,
            checkpoint IO, ...).

    The LightningModule provides ``configure_split() -> Split`` and, when its batches are not
    ``(inputs, target)`` tuples, ``split_inputs(batch) -> tuple[Tensor, ...]`` naming the head's inputs.
    ``training_step``/``validation_step``/``test_step`` must call ``self(...)`` once for the model output.
    """

    strategy_name = "split_pipeline"

    def __init__(self, chunks: int = 1, order: str = "1f1b", timeout: float = 300.0,
                 process_group_backend: str | None = "gloo",
                 wire: dict[str, str | dict[str, Any]] | None = None, **kwargs: Any) -> None:
        if not isinstance(chunks, int) or chunks < 1:
            raise ValueError(f"SplitPipelineStrategy(chunks={chunks!r}): chunks must be a positive integer "
                             f"(micro-batches per batch), e.g. 1, 4 or 8.")
        if order not in ORDERS:
            raise ValueError(f"SplitPipelineStrategy(order={order!r}): choose one of {ORDERS}.")
        if not timeout or timeout <= 0:
            raise ValueError(f"SplitPipelineStrategy(timeout={timeout!r}): give the seconds a rank waits for "
                             f"the other, e.g. 300.")
        self.wire = WirePlan.parse(wire)  # checked here: a bad key or codec name fails before any process starts
        super().__init__(process_group_backend=process_group_backend, timeout=timedelta(seconds=timeout),
                         **kwargs)
        self.chunks = chunks
        self.order = order
        self.timeout_s = float(timeout)
        self.meter = LinkMeter()
        self.pipeline: SplitPipeline | None = None
        self.split: Split | None = None
        self._owned: list[nn.Parameter] = []
        self._fresh_grads: list[Tensor | None] | None = None
        self._composes_checked = False

    # -- who is who ---------------------------------------------------------------------------------------------
    @property
    def is_client(self) -> bool:
        return self.global_rank == CLIENT

    @property
    def role(self) -> str:
        return "client" if self.is_client else "server"

    @property
    @override
    def restore_checkpoint_after_setup(self) -> bool:
        return True  # weights load after each rank knows which part it owns

    # -- set-up -------------------------------------------------------------------------------------------------
    @override
    def setup_environment(self) -> None:
        super().setup_environment()
        if self.world_size != 2:
            raise MisconfigurationException(
                f"SplitPipelineStrategy runs on exactly 2 processes (client and server), got world size "
                f"{self.world_size}. Use Trainer(devices=2) on one machine, or num_nodes=2, devices=1 on two."
            )
        log.info("rank %d is the %s", self.global_rank, self.role)
        trainer = self.lightning_module.trainer
        # Only the client reads data, and it reads all of it with the user's own loader and sampler: Lightning
        # would otherwise swap in a shuffling DistributedSampler for this DDP subclass.
        trainer._accelerator_connector.use_distributed_sampler = False
        if not self.is_client:
            _keep_data_off_server(trainer)

    @override
    def setup(self, trainer: Trainer) -> None:
        assert self.accelerator is not None and self.lightning_module is not None
        self.accelerator.setup(trainer)
        module = self.lightning_module
        # 1. The split, checked before anything moves.
        self.split = _split_of(module)
        self._check_precision()
        # 2. Each rank keeps real tensors only for its own part; the rest become meta (no memory).
        self.precision_plugin.convert_module(module)
        owned = _owned_tensors(self.split, module, self.is_client)
        self._sync_server_weights(module)
        _to_meta_except(module, owned, self.root_device)
        self._owned = [p for p in module.parameters() if not p.is_meta]
        # 3. Metrics live on the client only: never let torchmetrics wait for the server, and silence
        #    Lightning's advice to sync_dist logged values (there is nothing on the server to sync with).
        _disable_metric_sync(module)
        warnings.filterwarnings("ignore", message=r".*sync_dist=True.*distributed setting.*")
        # 4. The pipeline over this rank's stages.
        self.pipeline = SplitPipeline(self.split, rank=self.global_rank, device=self.root_device,
                                      chunks=self.chunks, order=self.order, timeout=self.timeout_s,
                                      meter=self.meter, wire=self.wire)
        # 5. Optimisers see only this rank's parameters; clipping uses the norm over both ranks.
        if trainer.state.fn == "fit":
            self.setup_optimizers(trainer)
            _keep_own_params(self.optimizers, self._owned, self.role)
        self.setup_precision_plugin()
        self.precision_plugin.clip_grad_by_norm = self._clip_grad_by_global_norm  # type: ignore[method-assign]
        # 6. The server needs the client's logged metrics to take the same checkpoint decisions.
        if not any(isinstance(cb, _ClientMetricsToServer) for cb in trainer.callbacks):
            trainer.callbacks.insert(0, _ClientMetricsToServer())

    def _check_precision(self) -> None:
        plugin = self.precision_plugin
        if isinstance(plugin, MixedPrecision) and plugin.scaler is not None:
            raise MisconfigurationException(
                "SplitPipelineStrategy does not support precision='16-mixed': its gradient scaler would have to "
                "scale the loss inside the pipeline. Use precision='bf16-mixed' (CPU and recent GPUs) or '32-true'."
            )

    def _sync_server_weights(self, module: LightningModule) -> None:
        """Give the server the client's initial body weights, so only the client needs to load pretrained files."""
        assert self.split is not None
        server_names = _tensor_names(module, _owned_tensors(self.split, module, is_client=False))
        state = module.state_dict()
        payload: list[Any] = [None]
        if self.is_client and not any(state[k].is_meta for k in server_names):  # not yet split (first setup)
            payload[0] = {k: state[k].cpu() for k in server_names}
        with link_errors("set-up (sending the server its initial weights)", rank=self.global_rank,
                         timeout=self.timeout_s):
            dist.broadcast_object_list(payload, src=CLIENT)
        if not self.is_client and payload[0] is not None:
            module.load_state_dict(payload[0], strict=False)

    # -- data ---------------------------------------------------------------------------------------------------
    @override
    def process_dataloader(self, dataloader: object) -> object:
        info: list[Any] = [None]
        if self.is_client:
            info[0] = self._describe_loader(dataloader)
        dist.broadcast_object_list(info, src=CLIENT)
        length, error = info[0]
        if error:
            raise MisconfigurationException(error)
        return dataloader if self.is_client else _ServerBatches(length)

    def _describe_loader(self, dataloader: object) -> tuple[int, str | None]:
        try:
            length = len(dataloader)  # type: ignore[arg-type]
        except TypeError:
            return 0, (f"SplitPipelineStrategy needs loaders with a length (the server iterates the same number "
                       f"of steps), got {type(dataloader).__name__} without __len__.")
        trainer = self.lightning_module.trainer
        batch_size = getattr(dataloader, "batch_size", None)
        if trainer.state.stage == RunningStage.TRAINING and batch_size and batch_size % self.chunks:
            return length, (f"The training batch size {batch_size} is not a multiple of chunks={self.chunks}: "
                            f"every micro-batch must have the same size. Use a batch size divisible by "
                            f"{self.chunks} or another chunk count.")
        return length, None

    # -- steps --------------------------------------------------------------------------------------------------
    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        assert self.pipeline is not None
        module = self.lightning_module
        with self.precision_plugin.train_step_context(), self._fresh_gradients():
            if not self.is_client:
                self.pipeline.train_step()
                return torch.zeros((), device=self.root_device)  # Lightning steps the optimiser only on a tensor
            batch, batch_idx, rest = args[0], args[1] if len(args) > 1 else 0, args[2:]
            inputs = self._client_inputs(batch)
            size = inputs[0].shape[0]

            def microbatch_loss(output: Any, index: Tensor) -> Tensor:
                start, stop = int(index[0]), int(index[-1]) + 1
                with _returning(module, output):
                    result = module.training_step(_slice_batch(batch, start, stop, size), batch_idx, *rest,
                                                  **kwargs)
                loss = result["loss"] if isinstance(result, Mapping) else result
                if not isinstance(loss, Tensor):
                    raise MisconfigurationException(
                        f"{type(module).__name__}.training_step must return the loss tensor (or a dict with "
                        f"'loss') under SplitPipelineStrategy, got {type(result).__name__}."
                    )
                return loss

            index = torch.arange(size, device=inputs[0].device)
            with _LogsPerBatch(module):
                _, losses = self.pipeline.train_step(*inputs, target=index, loss_fn=microbatch_loss)
        return torch.stack([loss.detach().float() for loss in losses]).mean()

    def _client_inputs(self, batch: Any) -> tuple[Tensor, ...]:
        inputs = _head_inputs(self.lightning_module, batch)
        if not self._composes_checked:
            # Once, on shapes only: a meta copy of the whole split, so a head/body/tail mismatch is reported
            # here with the part named, not as a shape error deep inside the server's stage.
            assert self.split is not None
            parts = {name: getattr(self.split, name) for name in ("head", "body", "tail", "up", "down")}
            meta_split = Split(**{k: copy.deepcopy(v).to("meta") if v is not None else None
                                  for k, v in parts.items()})
            try:
                meta_split.check_composes(*(t.to("meta") for t in inputs))
            except SplitError as err:
                if not _meta_limitation(err.__cause__):
                    raise
                # Data-dependent code (.item(), a value-based branch) cannot run on shapes alone: skip the
                # early check; a real mismatch still fails in the pipeline's own shape inference.
                log.warning("skipping the split's shape check: %s", err.__cause__)
            self._composes_checked = True
        return inputs

    @contextmanager
    def _fresh_gradients(self) -> Iterator[None]:
        """Keep the pipeline's gradients aside until ``backward``.

        Lightning zeroes gradients after ``training_step`` and before ``backward``, but the pipeline's backward
        runs inside ``training_step``; the schedule also rescales whatever ``.grad`` already holds.
        """
        before = [p.grad for p in self._owned]
        for p in self._owned:
            p.grad = None
        try:
            yield
            self._fresh_grads = [p.grad for p in self._owned]
        finally:
            for p, g in zip(self._owned, before):
                p.grad = g

    @override
    def backward(self, closure_loss: Tensor, optimizer: Any, *args: Any, **kwargs: Any) -> Tensor:
        module = self.lightning_module
        closure_loss = self.precision_plugin.pre_backward(closure_loss, module)
        fresh, self._fresh_grads = self._fresh_grads, None
        scale = 1.0 / module.trainer.accumulate_grad_batches
        for p, g in zip(self._owned, fresh or []):
            if g is None:
                continue
            if scale != 1.0:
                g = g * scale
            p.grad = g if p.grad is None else p.grad + g
        return self.precision_plugin.post_backward(closure_loss, module)

    @override
    def validation_step(self, *args: Any, **kwargs: Any) -> Any:
        with self.precision_plugin.val_step_context():
            return self._forward_only("validation_step", *args, **kwargs)

    @override
    def test_step(self, *args: Any, **kwargs: Any) -> Any:
        with self.precision_plugin.test_step_context():
            return self._forward_only("test_step", *args, **kwargs)

    @override
    def predict_step(self, *args: Any, **kwargs: Any) -> Any:
        with self.precision_plugin.predict_step_context():
            return self._forward_only("predict_step", *args, **kwargs)

    def _forward_only(self, hook: str, *args: Any, **kwargs: Any) -> Any:
        assert self.pipeline is not None
        if not self.is_client:
            self.pipeline.eval_step()
            return None
        module = self.lightning_module
        output = self.pipeline.eval_step(*self._client_inputs(args[0]))
        with _returning(module, output):
            return getattr(module, hook)(*args, **kwargs)

    # -- collectives: the client is the only rank with metrics ---------------------------------------------------
    @override
    def reduce(self, tensor: Any, group: Any = None, reduce_op: Any = "mean") -> Any:
        return tensor  # logged values exist on the client only; there is nothing to reduce them with

    @override
    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
        return bool(self.broadcast(decision, src=CLIENT))

    def _clip_grad_by_global_norm(self, optimizer: Any, clip_val: float) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        local = torch.nn.utils.get_total_norm([p.grad for p in params]) if params else torch.zeros(())
        assert self.pipeline is not None
        squared = (local.double() ** 2).to(self.pipeline.comm_device)
        dist.all_reduce(squared)  # both ranks clip by the norm of the whole model's gradient
        if params:
            total = squared.sqrt().to(device=params[0].grad.device, dtype=local.dtype)
            torch.nn.utils.clip_grads_with_norm_(params, clip_val, total)

    # -- checkpoints: one file, written by the client, loadable into the unsplit module --------------------------
    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        own = {k: v.cpu() for k, v in self.lightning_module.state_dict().items()
               if not (isinstance(v, Tensor) and v.is_meta)}
        parts: list[Any] = [None, None]
        with link_errors("checkpointing (gathering the weights)", rank=self.global_rank, timeout=self.timeout_s):
            dist.all_gather_object(parts, own)
        return {**parts[SERVER], **parts[CLIENT]} if self.is_client else own

    @override
    def optimizer_state(self, optimizer: Any) -> dict[str, Any]:
        own = super().optimizer_state(optimizer)
        parts: list[Any] = [None, None]
        with link_errors("checkpointing (gathering the optimiser states)", rank=self.global_rank,
                         timeout=self.timeout_s):
            dist.all_gather_object(parts, own)
        return {"split_ranks": parts}

    @override
    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        # The client reads the file and hands the server its share: the server may be another machine.
        payload: list[Any] = [None]
        if self.is_client:
            checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
            server_keys = {k for k, v in self.lightning_module.state_dict().items() if v.is_meta}
            payload[0] = {**checkpoint,
                          "state_dict": {k: v for k, v in checkpoint["state_dict"].items() if k in server_keys}}
        dist.broadcast_object_list(payload, src=CLIENT)
        return checkpoint if self.is_client else payload[0]

    @override
    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        module = self.lightning_module
        own = {k for k, v in module.state_dict().items() if not v.is_meta}
        state = {k: v for k, v in checkpoint["state_dict"].items() if k in own}
        missing = sorted(own - state.keys())
        if strict and missing:
            raise KeyError(f"The checkpoint lacks {len(missing)} tensors the {self.role} owns, e.g. {missing[:5]}. "
                           f"Was it written for another model or split?")
        module.load_state_dict(state, strict=False)

    @override
    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        for optimizer, state in zip(self.optimizers, checkpoint["optimizer_states"]):
            if "split_ranks" not in state:
                raise KeyError("This checkpoint's optimiser states were not written by SplitPipelineStrategy; "
                               "resume it without the split, or load its weights only.")
            optimizer.load_state_dict(state["split_ranks"][self.global_rank])

    # -- teardown -----------------------------------------------------------------------------------------------
    @override
    def teardown(self) -> None:
        module = self.lightning_module
        if module is not None and any(t.is_meta for t in module.state_dict().values()):
            # Strategy.teardown moves the whole module to the CPU, which meta tensors cannot do.
            for p in list(module.parameters()) + list(module.buffers()):
                if not p.is_meta:
                    p.data = p.data.cpu()
            self.precision_plugin.teardown()
            assert self.accelerator is not None
            self.accelerator.teardown()
            self.checkpoint_io.teardown()
            return
        super().teardown()


# ---------------------------------------------------------------------------------------------------------------
class _ClientMetricsToServer(Callback):
    """Copies the client's logged metrics to the server before checkpoint and early-stopping callbacks read them."""

    def _sync(self, trainer: Trainer) -> None:
        strategy = trainer.strategy
        metrics = {k: v.detach().cpu() if isinstance(v, Tensor) else v for k, v in trainer.callback_metrics.items()}
        metrics = strategy.broadcast(metrics, src=CLIENT)
        if strategy.global_rank != CLIENT:
            trainer.callback_metrics.update(metrics)

    def on_train_batch_end(self, trainer: Trainer, *args: Any) -> None:
        if any(getattr(cb, "_every_n_train_steps", 0) for cb in trainer.checkpoint_callbacks):
            self._sync(trainer)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._sync(trainer)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._sync(trainer)


class _ServerBatches:
    """What the server's loops iterate: as many placeholder steps as the client has batches, and no data."""

    def __init__(self, length: int) -> None:
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.length))


def _keep_data_off_server(trainer: Trainer) -> None:
    """The server never prepares, sets up or loads data: the datamodule's data hooks become no-ops there."""
    dm = trainer.datamodule
    if dm is None:
        return
    # Replace only what the class overrides, so Lightning's is_overridden() answers the same on both ranks.
    for hook in ("prepare_data", "setup", "teardown"):
        if is_overridden(hook, dm):
            setattr(dm, hook, lambda *a, **k: None)
    for hook in ("train_dataloader", "val_dataloader", "test_dataloader", "predict_dataloader"):
        if is_overridden(hook, dm):
            setattr(dm, hook, lambda: _ServerBatches(0))


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
            m._to_sync = False  # torchmetrics copies sync_on_compute here at construction
            m.dist_sync_on_step = False


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
