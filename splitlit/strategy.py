"""``SplitPipelineStrategy``: train a LightningModule split in a U shape between a client and a server.

Usage::

    trainer = Trainer(accelerator="cpu", devices=2, strategy=SplitPipelineStrategy(chunks=4))
    trainer.fit(model, datamodule=dm)   # model.configure_split() -> Split(head, body, tail, up, down)

Rank 0 is the client: it holds the data, the labels, the head, the tail and their optimiser state.
Rank 1 is the server: it holds the body and never builds a dataset or sees a batch; its loops iterate
placeholders of the same length as the client's loaders. Outside the pipeline the server receives only its own
weights, its own share of a checkpoint on resume, loader lengths and the client's decisions (save now, stop),
all as tensors (:mod:`splitlit.transport`: nothing is unpickled), and only after both ranks proved they hold
the job's secret. Checkpoints are gathered to the client; callbacks that read metrics (``ModelCheckpoint``,
``EarlyStopping``) run on the client, and the server follows what they decide. Each training batch runs through
``torch.distributed.pipelining`` in ``chunks`` micro-batches; the LightningModule's own
``training_step`` computes the loss of each micro-batch on the client (its ``self(...)`` call returns
the pipeline's output for that micro-batch), so the same module trains unsplit under any other strategy.
"""

from __future__ import annotations

import copy
import itertools
import logging
import os
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.trainer.states import RunningStage
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from lightning_utilities.core.rank_zero import rank_zero_only as utils_rank_zero_only
from torch import Tensor, nn
from typing_extensions import override

from splitlit.batchnorm import DeferredBatchNorm, convert_deferred
from splitlit.checkpoints import SplitCheckpoints, check_share
from splitlit.clients import PARADIGMS, TURNS, Federation
from splitlit.following import BROADCAST, DECIDE, follow_client_resume, lead_or_follow
from splitlit.microbatch import _head_inputs, _LogsPerBatch, _returning, _slice_batch
from splitlit.pipeline import PeerLostError, SplitPipeline, link_errors
from splitlit.placement import (_disable_metric_sync, _keep_data_off_server, _keep_own_params, _meta_limitation,
                                _owned_tensors, _split_of, _tensor_names, _to_meta_except)
from splitlit.resume import ResumableLoader, ServerBatches, seed_rank_apart
from splitlit.meter import LinkMeter
from splitlit.schedule import ORDERS
from splitlit.serving import ManyClients
from splitlit.split import CLIENT_RANK, SERVER_RANK, Split, SplitError
from splitlit.transport import Channel, Ledger, authenticate, resolve_secret
from splitlit.wire import WirePlan

__all__ = ["SplitPipelineStrategy"]

log = logging.getLogger(__name__)


class SplitPipelineStrategy(SplitCheckpoints, DDPStrategy):
    """Two ranks, one U-shaped model: client (rank 0) = head + tail, server (rank 1) = body.

    Args:
        chunks: micro-batches per batch. A training batch must be a multiple of it (checked at setup);
            a shorter last batch runs with the largest divisor of its size.
        order: ``"1f1b"`` (default, less memory), ``"gpipe"`` (fill-drain) or ``"zb"`` (1f1b with the server's and
            the tail's weight gradients computed while the input gradient crosses the link; see splitlit.schedule).
        warmup: micro-batches 1f1b and zb send forward before their first backward (2 by default). More keeps a
            link with a long round trip busy (each micro-batch crosses it four times) at the cost of the client's
            head holding ``warmup + 2`` micro-batches' activations and the server ``warmup``.
        timeout: seconds either rank waits for the other before failing with a clear error.
        setup_timeout: seconds the server waits for the client's setup, where the client may work alone for
            minutes (codec calibration); a client that dies meanwhile still ends the wait at once.
        wire: wire codecs applied by the transport, per cut and direction, e.g.
            ``{"up.activation": "int8", "down.gradient": "fp16"}`` (see :mod:`splitlit.wire`); the model is
            untouched and the link meter records the encoded bytes.
        clients: data owners, each its own rank with its own data, labels, head and tail; the server is rank
            ``clients``. 1 (default) is the two-rank split; more runs ``paradigm`` (see :mod:`splitlit.clients`).
        paradigm: with many clients, ``"splitfed"`` (SplitFed v1: a body per client, averaged each round),
            ``"splitfed2"`` (one body updated client after client) or ``"sequential"`` (vanilla split learning:
            the clients take turns and hand their head and tail on). A round is an epoch.
        turn: sequential's turns: ``"batch"`` (each client one batch, round-robin) or ``"epoch"`` (each client its
            whole round, then the next).
        deferred_batchnorm: BatchNorm's running statistics updated once per batch from the whole batch (as
            torchgpipe's ``deferred_batch_norm``), not once per micro-batch; see :mod:`splitlit.batchnorm`.
        process_group_backend: ``"gloo"`` by default (CPU, or a CPU client with a GPU server);
            ``"nccl"`` when both ranks are on CUDA.
        **kwargs: passed to :class:`~lightning.pytorch.strategies.DDPStrategy` (cluster environment,
            checkpoint IO, ...).

    The LightningModule provides ``configure_split() -> Split`` and, when its batches are not
    ``(inputs, target)`` tuples, ``split_inputs(batch) -> tuple[Tensor, ...]`` naming the head's inputs.
    ``training_step``/``validation_step``/``test_step`` must call ``self(...)`` once for the model output.
    """

    strategy_name = "split_pipeline"

    def __init__(self, chunks: int = 1, order: str = "1f1b", warmup: int = 2, timeout: float = 300.0,
                 process_group_backend: str | None = "gloo",
                 wire: dict[str, str | dict[str, Any]] | None = None, setup_timeout: float = 3600.0,
                 clients: int = 1, paradigm: str = "splitfed", turn: str = "batch", deferred_batchnorm: bool = False,
                 **kwargs: Any) -> None:
        if not isinstance(chunks, int) or chunks < 1:
            raise ValueError(f"SplitPipelineStrategy(chunks={chunks!r}): chunks must be a positive integer "
                             f"(micro-batches per batch), e.g. 1, 4 or 8.")
        if not isinstance(clients, int) or isinstance(clients, bool) or clients < 1:
            raise ValueError(f"SplitPipelineStrategy(clients={clients!r}): give the number of clients (data owners), "
                             f"a positive integer; the job then runs clients + 1 processes.")
        if paradigm not in PARADIGMS:
            raise ValueError(f"SplitPipelineStrategy(paradigm={paradigm!r}): choose one of {PARADIGMS}.")
        if turn not in TURNS or (turn == "epoch" and paradigm != "sequential"):
            raise ValueError(f"SplitPipelineStrategy(turn={turn!r}, paradigm={paradigm!r}): turn is one of {TURNS}, "
                             f"and 'epoch' (one client's whole round at a time) is for paradigm='sequential' "
                             f"(SplitFed's clients train in parallel).")
        if order not in ORDERS:
            raise ValueError(f"SplitPipelineStrategy(order={order!r}): choose one of {ORDERS}.")
        if not isinstance(warmup, int) or isinstance(warmup, bool) or warmup < 1:
            raise ValueError(f"SplitPipelineStrategy(warmup={warmup!r}): give the micro-batches 1f1b and zb send "
                             f"forward before their first backward, a positive integer (2 by default; 3-4 on a "
                             f"link with a round trip of tens of milliseconds).")
        if not timeout or timeout <= 0:
            raise ValueError(f"SplitPipelineStrategy(timeout={timeout!r}): give the seconds a rank waits for "
                             f"the other, e.g. 300.")
        if not setup_timeout or setup_timeout <= 0:
            raise ValueError(f"SplitPipelineStrategy(setup_timeout={setup_timeout!r}): give the seconds the server "
                             f"waits for the client's setup (codec calibration), e.g. 3600.")
        self.wire = WirePlan.parse(wire)  # checked here: a bad key or codec name fails before any process starts
        super().__init__(process_group_backend=process_group_backend, timeout=timedelta(seconds=timeout),
                         **kwargs)
        self.chunks = chunks
        self.order = order
        self.warmup = warmup
        self.clients = clients
        self.paradigm = paradigm
        self.turn = turn
        self.deferred_batchnorm = bool(deferred_batchnorm)
        self._deferred: list[DeferredBatchNorm] = []
        self.timeout_s = float(timeout)
        self.setup_timeout_s = float(setup_timeout)
        self.meter = LinkMeter()
        self.ledger = Ledger()  # what this rank received outside the pipeline, by name
        self._channel: Channel | None = None  # to every rank: decisions, lengths
        self._links: list[Channel] = []  # per client link (one on a client: its own)
        self._many: ManyClients | None = None  # many clients: the serving plan, turns and rounds (splitlit.serving)
        self._pipelines: list[SplitPipeline] = []
        self._protocol = False  # inside a client-led callback hook (see _lead_or_follow)
        self._in_setup = False  # from setup_environment until the loops start: names the phase in errors
        self.pipeline: SplitPipeline | None = None
        self.split: Split | None = None
        self._owned: list[nn.Parameter] = []
        self._fresh_grads: list[Tensor | None] | None = None
        self._composes_checked = False

    # -- who is who ---------------------------------------------------------------------------------------------
    @property
    def server_rank(self) -> int:
        return self.clients

    @property
    def is_client(self) -> bool:
        return self.global_rank != self.server_rank

    @property
    def many(self) -> bool:
        """More than one client: the server serves several links (splitlit.clients)."""
        return self.clients > 1

    @property
    def role(self) -> str:
        if not self.is_client:
            return "server"
        return f"client {self.global_rank}" if self.many else "client"

    @property
    @override
    def is_global_zero(self) -> bool:
        # Each client writes its own run folder and checkpoints; the server writes nothing.
        return self.is_client if self.many else super().is_global_zero

    @override
    def set_world_ranks(self) -> None:
        super().set_world_ranks()
        if self.many and self.is_client:  # every client logs its own run (rank_zero_only guards the loggers)
            rank_zero_only.rank = utils_rank_zero_only.rank = 0

    @property
    @override
    def restore_checkpoint_after_setup(self) -> bool:
        return True  # weights load after each rank knows which part it owns

    # -- set-up -------------------------------------------------------------------------------------------------
    @override
    def _configure_launcher(self) -> None:
        super()._configure_launcher()
        if not self.cluster_environment.creates_processes_externally and self.num_nodes == 1:
            resolve_secret(multi_host=False)  # generated here, inherited by the processes the launcher starts

    @override
    def setup_environment(self) -> None:
        self._in_setup = True
        secret = resolve_secret(multi_host=self.num_nodes > 1,
                                local_key=f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}")
        super().setup_environment()
        if self.world_size != self.clients + 1:
            raise MisconfigurationException(
                f"SplitPipelineStrategy(clients={self.clients}) runs on clients + 1 = {self.clients + 1} processes "
                f"(the clients and the server), got world size {self.world_size}. Use Trainer(devices="
                f"{self.clients + 1}) on one machine, num_nodes={self.clients + 1}, devices=1 on as many hosts, or "
                f"set clients to the world size minus one."
            )
        # Before anything else crosses: each rank proves it holds the job's secret.
        authenticate(dist.distributed_c10d._get_default_store(), rank=self.global_rank, secret=secret,
                     timeout=self.timeout_s, run_id=str(next(_AUTH_ROUNDS)),  # a fresh round per fit in this job
                     world_size=self.world_size)
        log.info("rank %d is the %s", self.global_rank, self.role)
        seed_rank_apart(self.global_rank)
        comm = torch.device("cpu") if dist.get_backend() == "gloo" else self.root_device
        self._channel = Channel(self.global_rank, comm, self.ledger)
        if self.many:
            federation = Federation(clients=self.clients, paradigm=self.paradigm, rank=self.global_rank,
                                    timeout=self.timeout_s, turn=self.turn)
            self._many = ManyClients(self, federation)
            links = federation.links
            self._links = ([self._channel.on(links[self.global_rank])] if self.is_client
                           else [self._channel.on(g) for g in links])
        else:
            self._links = [self._channel]
        trainer = self.lightning_module.trainer
        # Only the client reads data, and it reads all of it with the user's own loader and sampler: Lightning
        # would otherwise swap in a shuffling DistributedSampler for this DDP subclass.
        trainer._accelerator_connector.use_distributed_sampler = False
        if not self.is_client:
            _keep_data_off_server(trainer)
        follow_client_resume(trainer, self)

    @override
    def setup(self, trainer: Trainer) -> None:
        assert self.accelerator is not None and self.lightning_module is not None
        self.accelerator.setup(trainer)
        module = self.lightning_module
        # 1. The split, checked before anything moves (BatchNorm first made deferred, if asked: new parameters).
        if self.deferred_batchnorm:
            split = _split_of(module)  # a module may cache its split: its containers hold the same layers
            convert_deferred(module, *(p for p in (split.head, split.body, split.tail, split.up, split.down)
                                       if p is not None))
            self._deferred = [m for m in module.modules() if isinstance(m, DeferredBatchNorm)]
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
        # 4. The pipeline over this rank's stages: one per link (the server of many clients has many).
        self._pipelines = [SplitPipeline(self.split, rank=CLIENT_RANK if self.is_client else SERVER_RANK,
                                         device=self.root_device, chunks=self.chunks, order=self.order,
                                         warmup=self.warmup, timeout=self.timeout_s, meter=self.meter, wire=self.wire,
                                         ledger=self.ledger, group=link.group) for link in self._links]
        self.pipeline = self._pipelines[0]
        # 5. Optimisers see only this rank's parameters; clipping uses the norm over both ranks.
        if trainer.state.fn == "fit":
            self.setup_optimizers(trainer)
            _keep_own_params(self.optimizers, self._owned, self.role)
            if self._many is not None and not self.is_client and self.paradigm == "splitfed":
                owned = {**dict(module.named_parameters()), **dict(module.named_buffers())}
                self._many.keep_bodies({k: t for k, t in owned.items() if not t.is_meta}, self.optimizers)
        self.setup_precision_plugin()
        self.precision_plugin.clip_grad_by_norm = self._clip_grad_by_global_norm  # type: ignore[method-assign]
        # 6. Callbacks that read metrics decide on the client; the server follows their decisions.
        for callback in trainer.callbacks:
            if isinstance(callback, (ModelCheckpoint, EarlyStopping)):
                lead_or_follow(callback, self)
        # 7. Many clients: the checks that need the Trainer, and the end of each round after the last step.
        if self._many is not None:
            self._many.check(trainer)
            if self._many not in trainer.callbacks:
                trainer.callbacks.append(self._many)  # last: see ManyClients.on_train_batch_end

    def _check_precision(self) -> None:
        plugin = self.precision_plugin
        if isinstance(plugin, MixedPrecision) and plugin.scaler is not None:
            raise MisconfigurationException(
                "SplitPipelineStrategy does not support precision='16-mixed': its gradient scaler would have to "
                "scale the loss inside the pipeline. Use precision='bf16-mixed' (CPU and recent GPUs) or '32-true'."
            )

    def _sync_server_weights(self, module: LightningModule) -> None:
        """Give the server the client's initial body weights, so only the client needs to load pretrained files.

        With many clients, client 0's: it also gives the other clients its head and tail (one initial model).
        """
        assert self.split is not None and self._channel is not None
        server_names = _tensor_names(module, _owned_tensors(self.split, module, is_client=False))
        state = module.state_dict()
        fresh = self.global_rank == 0 and not any(state[k].is_meta for k in server_names)  # first setup
        if self._many is not None and self.is_client:
            self._many.sync_clients(module, _tensor_names(module, _owned_tensors(self.split, module, is_client=True)))
        if self.global_rank not in (0, self.server_rank):
            return  # the other clients: not on client 0's link
        with link_errors("set-up (sending the server its initial weights)", rank=self._link_role,
                         timeout=self.timeout_s):
            weights = self._links[0].broadcast({k: state[k] for k in server_names} if fresh else None,
                                               src=0, what="server weights")
        if not self.is_client and weights is not None:
            check_share(weights, server_names, "initial weights")
            module.load_state_dict(weights, strict=False)

    @property
    def _link_role(self) -> int:
        return CLIENT_RANK if self.is_client else SERVER_RANK

    def _peer_name(self) -> str | None:
        if not self.many:
            return None
        if self.is_client:
            return f"server (rank {self.server_rank})"
        serving = self._many.serving if self._many is not None else None
        return f"client (rank {serving})" if serving is not None else "clients"

    # -- data ---------------------------------------------------------------------------------------------------
    @override
    def process_dataloader(self, dataloader: object) -> object:
        assert self._channel is not None
        length, error = self._describe_loader(dataloader) if self.is_client else (0, None)
        if self._many is not None:
            length = self._many.plan(self._channel, self.lightning_module.trainer, length, error)
        else:
            length, failed = self._channel.broadcast_numbers(
                [length, int(error is not None)] if self.is_client else None, length=2, src=CLIENT_RANK,
                what="loader length")
            if failed:
                raise MisconfigurationException(error or "The client rejected its data loader; its error says why.")
        if self.lightning_module.trainer.state.stage != RunningStage.TRAINING:
            return dataloader if self.is_client else ServerBatches(length)
        # Training loaders resume mid-epoch exactly: position and random state on each rank (splitlit.resume).
        progress = self._batches_done
        return ResumableLoader(dataloader, progress) if self.is_client else ServerBatches(length, progress)

    def _serve(self, stage: str, index: int) -> None:
        """On the server: run step ``index`` of ``stage`` on the link of the client it serves."""
        self.pipeline = self._pipelines[self._many.serve(stage, index) if self._many is not None else 0]

    def logs_now(self, trainer: Trainer) -> bool:
        """Whether this training step's figures are logged (the link monitors ask: see ManyClients.logs_now)."""
        return self._many.logs_now(trainer) if self._many is not None else trainer._logger_connector.should_update_logs

    def _own_checkpoint_path(self, name: str) -> str:
        """Where a client that follows client 0's save writes: the same file name in its own checkpoint folder."""
        callback = self.lightning_module.trainer.checkpoint_callback
        folder = getattr(callback, "dirpath", None) or os.path.join(self.lightning_module.trainer.default_root_dir,
                                                                     f"client{self.global_rank}")
        return os.path.join(folder, name)

    def _batches_done(self) -> int:
        return self.lightning_module.trainer.fit_loop.epoch_loop.batch_progress.current.processed

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
                self._serve("train", int(args[0]))
                self.pipeline.train_step()
                self._commit_batchnorm()
                return torch.zeros((), device=self.root_device)  # Lightning steps the optimiser only on a tensor
            batch, batch_idx, rest = args[0], args[1] if len(args) > 1 else 0, args[2:]
            if self._many is not None and self.paradigm == "sequential":
                self._many.take_turn(batch_idx)
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
            self._commit_batchnorm()
        return torch.stack([loss.detach().float() for loss in losses]).mean()

    def _commit_batchnorm(self) -> None:
        # Deferred BatchNorm: the running statistics of this rank's layers, once per batch (whole-batch statistics).
        for bn in self._deferred:
            bn.commit()

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
            trainer = self.lightning_module.trainer
            stage = "sanity" if trainer.sanity_checking else trainer.state.stage.dataloader_prefix
            self._serve(stage, int(args[1]) if len(args) > 1 else int(args[0]))
            self.pipeline.eval_step()
            return None
        module = self.lightning_module
        output = self.pipeline.eval_step(*self._client_inputs(args[0]))
        with _returning(module, output):
            return getattr(module, hook)(*args, **kwargs)

    # -- collectives: the client is the only rank with data, labels and metrics ---------------------------------
    @override
    def reduce(self, tensor: Any, group: Any = None, reduce_op: Any = "mean") -> Any:
        return tensor  # logged values exist on the client only; there is nothing to reduce them with

    @override
    def all_gather(self, tensor: Tensor, group: Any = None, sync_grads: bool = False) -> Tensor:
        raise MisconfigurationException(
            "SplitPipelineStrategy has no all_gather: it would hand the client's values to the server. Compute on "
            "the client, or use strategy.gather_to_client(tensor) to bring the server's values to the client."
        )

    def gather_to_client(self, tensor: Tensor) -> Tensor | None:
        """Both ranks call it with same-shaped tensors; the client gets ``[client's, server's]``, the server None.

        With many clients, over the link of the client the server serves now; between rounds' steps (an epoch's
        end) the server sends its value to every client in turn.
        """
        assert self._channel is not None
        local = tensor.detach().to(self._channel.device)
        if self.is_client:
            rows = [torch.empty_like(local) for _ in range(2)]
            dist.gather(local, rows, dst=self.global_rank, group=self._links[0].group)
            return torch.stack(rows).to(tensor.device)
        serving = self._many.serving if self._many is not None else 0
        clients = range(self.clients) if serving is None else [serving]
        for client in clients:
            dist.gather(local, None, dst=client, group=self._links[client].group)
        return None

    @override
    def broadcast(self, obj: Any, src: int = 0) -> Any:
        """Lightning's broadcasts (paths, flags) as tensors, never pickles; inside a client-led hook, announced."""
        assert self._channel is not None
        with self._link_errors("a broadcast"):
            self._announce(BROADCAST)
            if self.many and self.global_rank not in (0, self.server_rank):
                return obj  # paths and flags are each client's own; the server follows client 0
            return self._links[0].broadcast(obj, src=src, what="decision")

    @override
    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
        assert self._channel is not None
        with self._link_errors("a decision"):
            self._announce(DECIDE)
            (value,) = self._channel.broadcast_numbers([int(bool(decision))] if self.global_rank == 0 else None,
                                                       length=1, src=0, what="decision")
        return bool(value)

    def _link_errors(self, what: str) -> Any:
        """A lost peer during one of Lightning's collectives, reported with the phase it happened in."""
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        stage = getattr(getattr(trainer, "state", None), "stage", None)
        phase = {RunningStage.TRAINING: "training", RunningStage.SANITY_CHECKING: "the sanity check",
                 RunningStage.VALIDATING: "validation", RunningStage.TESTING: "testing",
                 RunningStage.PREDICTING: "prediction"}.get(stage, "set-up")
        if self._in_setup:
            phase = "set-up"
        if self._protocol:
            phase = f"{phase}, in a checkpoint or early-stopping decision"
        return link_errors(f"{what} ({phase})", rank=self._link_role, timeout=self.timeout_s, peer=self._peer_name())

    @override
    def barrier(self, name: str | None = None, *args: Any, **kwargs: Any) -> None:
        if self._protocol:
            return  # inside a client-led hook only the client touches files: nothing to wait for
        if name == "post_setup" and dist.is_initialized() and dist.get_backend() == "gloo":
            # The client may work alone in setup (codec calibration: minutes at 224 px). The server waits for it
            # knowingly, up to setup_timeout; a client that dies meanwhile still ends the wait at once.
            with link_errors("set-up (waiting for the client's setup, e.g. codec calibration)",
                             rank=self._link_role, timeout=self.setup_timeout_s, peer=self._peer_name()):
                dist.monitored_barrier(timeout=timedelta(seconds=self.setup_timeout_s))
            return
        with self._link_errors(f"a barrier ({name})" if name else "a barrier"):
            super().barrier(name, *args, **kwargs)

    def _announce(self, op: int, arg: int = 0) -> None:
        """Inside a client-led hook, tell the following server which collective comes next."""
        if self._protocol and self.global_rank == 0:
            assert self._channel is not None
            with self._link_errors("a checkpoint or early-stopping decision"):
                self._channel.broadcast_numbers([op, arg], length=2, src=0, what="decision")

    def _clip_grad_by_global_norm(self, optimizer: Any, clip_val: float) -> None:
        """Clip both ranks by the norm of the whole model's gradient.

        The server sends its squared norm up; the client answers with the scale both apply, ``min(1, clip /
        norm)``: the server learns the scale (1 when nothing is clipped), never the client's norm.
        """
        assert self._channel is not None
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        local = torch.nn.utils.get_total_norm([p.grad for p in params]) if params else torch.zeros(())
        squared = self.gather_to_client((local.double() ** 2).reshape(1))
        scale = None
        if squared is not None:
            total = float(squared.sum().sqrt())
            scale = [min(1.0, clip_val / (total + 1e-6))]  # torch's clip_grads_with_norm_ formula
        serving = (self._many.serving if self._many is not None else 0) or 0
        link = self._links[0] if self.is_client else self._links[serving]
        (scale,) = link.broadcast_numbers(scale, length=1, src=self.global_rank if self.is_client else serving,
                                          what="clip scale", dtype=torch.float64)
        if params and scale < 1.0:
            torch._foreach_mul_([p.grad for p in params], scale)

    @override
    def on_train_start(self) -> None:
        self._in_setup = False
        super().on_train_start()

    @override
    def on_validation_start(self) -> None:
        self._in_setup = False
        super().on_validation_start()

    @override
    def on_test_start(self) -> None:
        self._in_setup = False
        super().on_test_start()

    @override
    def on_predict_start(self) -> None:
        self._in_setup = False
        super().on_predict_start()

    # -- failures -----------------------------------------------------------------------------------------------
    @override
    def on_exception(self, exception: BaseException) -> None:
        if isinstance(exception, PeerLostError):
            exception.add_note(self._resume_advice())
        super().on_exception(exception)

    def _resume_advice(self) -> str:
        """Which checkpoint a restart can resume from, or that none exists and how to get one next time."""
        if not self.is_client:
            return ("The client holds the checkpoints: restart both ranks with the same --ckpt_path (e.g. last); "
                    "the server reads nothing itself.")
        trainer = self.lightning_module.trainer
        paths = {getattr(cb, attr, "") for cb in trainer.checkpoint_callbacks
                 for attr in ("last_model_path", "_last_checkpoint_saved", "best_model_path")}
        existing = [p for p in paths if p and os.path.isfile(p)]
        if existing:
            newest = max(existing, key=os.path.getmtime)
            return (f"Newest checkpoint: {newest}. Restart both ranks with --ckpt_path {newest} (fit(ckpt_path=...) "
                    f"in Python), or with --ckpt_path last and the same --run.name.")
        return ("No checkpoint has been written in this run, so a restart begins from the start. Turn periodic "
                "checkpoints on: the experiments' --run.checkpoint_minutes N, or in Python "
                "ModelCheckpoint(train_time_interval=timedelta(minutes=N), save_last=True).")

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


# ---------------------------------------------------------------------------------------------------------------------
_AUTH_ROUNDS = itertools.count()
