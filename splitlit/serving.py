"""Many clients inside the strategy: which client each server step serves, the turns, and the end of each round.

:class:`ManyClients` is the part of ``SplitPipelineStrategy(clients=N)`` that a two-rank job does not have. It is
also the callback (appended last) that ends each client step and each round::

    many = ManyClients(strategy, federation)     # in setup_environment, on every rank
    length = many.plan(length, error)            # in process_dataloader: the server's steps for this loader
    client = many.serve("train", index)          # on the server, before each step
    trainer.callbacks.append(many)               # hands parts on, averages them at each round's end

The server's loops run one step per client step (each client's own limits applied), so Lightning's counts agree
on every rank: the server's step ``k`` of a stage serves client ``served[stage][k]`` (round-robin, see
:func:`splitlit.clients.services`). The algorithms themselves are in :mod:`splitlit.clients`.
"""

from __future__ import annotations

import functools
import os
from typing import TYPE_CHECKING, Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.trainer.connectors.data_connector import _parse_num_batches
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException
from torch import Tensor
from typing_extensions import override

from splitlit.clients import BodySlots, Federation, fedavg_, services
from splitlit.transport import Channel

if TYPE_CHECKING:
    from splitlit.strategy import SplitPipelineStrategy

__all__ = ["ManyClients"]


class ManyClients(Callback):
    """The many-client bookkeeping of one rank (see the module docstring)."""

    def __init__(self, strategy: SplitPipelineStrategy, federation: Federation) -> None:
        self.strategy = strategy
        self.federation = federation
        self.served: dict[str, list[int]] = {}  # per stage ("train", "val", "sanity", ...): the client of each step
        self.steps: dict[str, list[int]] = {}  # per stage: each client's steps
        self.serving: int | None = None  # on the server: the client whose step runs now; None between rounds
        self.slots: BodySlots | None = None  # SplitFed v1's bodies, on the server
        self._limits: dict[str, Any] = {}  # the Trainer's own limits, before the server replaced them
        self._stepped: list[int] = []  # each client's training steps so far (its Lightning _batches_that_stepped)

    @property
    def is_client(self) -> bool:
        return self.federation.is_client

    @property
    def rank(self) -> int:
        return self.federation.rank

    # -- set-up ----------------------------------------------------------------------------------------------------
    def check(self, trainer: Trainer) -> None:
        """What many clients cannot do, said before the first step rather than as a hang."""
        clients = self.federation.clients
        if trainer.max_steps not in (-1, None):
            raise MisconfigurationException(
                f"SplitPipelineStrategy(clients={clients}) counts steps per client, so max_steps={trainer.max_steps} "
                f"would stop the clients and the server at different points. Use max_epochs (a round is an epoch).")
        if trainer.val_check_interval != 1.0:
            raise MisconfigurationException(
                f"SplitPipelineStrategy(clients={clients}) validates at the end of each round; val_check_interval="
                f"{trainer.val_check_interval!r} would validate mid-round at a different step on each client. Leave "
                f"val_check_interval at 1.0 (check_val_every_n_epoch works).")
        if trainer.accumulate_grad_batches != 1:
            raise MisconfigurationException(
                f"SplitPipelineStrategy(clients={clients}) steps the server once per client step; "
                f"accumulate_grad_batches={trainer.accumulate_grad_batches} is not supported with many clients.")
        # Lightning broadcasts a SIGTERM flag from rank 0 before every training step; the server takes more steps
        # than any client, so that broadcast would pair steps that differ. Each rank checks its own flag instead
        # (a SIGTERM'd rank stops, and its peers see it gone).
        trainer.fit_loop.epoch_loop._broadcast_sigterm_tensor = functools.partial(_local_sigterm, trainer)

    def keep_bodies(self, tensors: dict[str, Tensor], optimizers: list) -> None:
        """SplitFed v1, on the server: one body per client from now on."""
        self.slots = BodySlots(tensors, optimizers, self.federation.clients)

    def plan(self, channel: Channel, trainer: Trainer, length: int, error: str | None) -> int:
        """Every client's loader length reaches every rank; returns this rank's loader length (the server's: one
        step per client step)."""
        clients = self.federation.clients
        rows = channel.all_numbers([length, int(error is not None)], what="loader length")
        failed = [rank for rank, (_, bad) in enumerate(rows[:clients]) if bad]
        if failed:
            raise MisconfigurationException(error or f"Client(s) {failed} rejected their data loaders; their errors "
                                                     f"say why.")
        stage = trainer.state.stage
        prefix = stage.dataloader_prefix if stage is not None else "train"
        limit = self._limits.setdefault(prefix, getattr(trainer, f"limit_{prefix}_batches"))
        steps = [int(_parse_num_batches(stage, n, limit)) for n, _ in rows[:clients]]
        self.steps[prefix] = steps
        self.served[prefix] = services(steps, self.federation.turn if prefix == "train" else "batch")
        if prefix == "val":  # the sanity check runs min(num_sanity_val_steps, steps) of each client
            sanity = self._limits.setdefault("sanity", trainer.num_sanity_val_steps)
            self.served["sanity"] = services([int(min(sanity, n)) for n in steps])
            if not self.is_client:
                trainer.num_sanity_val_steps = len(self.served["sanity"])
        if self.is_client:
            return length
        setattr(trainer, f"limit_{prefix}_batches", 1.0)  # the clients' limits are in the plan already
        return len(self.served[prefix])

    # -- the server's steps ----------------------------------------------------------------------------------------
    def serve(self, stage: str, index: int) -> int:
        """On the server: make the client that step ``index`` serves the current one (its body, for SplitFed v1)."""
        client = self.served[stage][index]
        if stage == "train":
            self._stepped[client] += 1
        self.serving = client
        if self.slots is not None:
            self.slots.use(client)
        return client

    def logs_now(self, trainer: Trainer) -> bool:
        """Lightning's logging rule, on the server applied to the step count of the client it just served."""
        if self.is_client or self.serving is None:
            return trainer._logger_connector.should_update_logs
        every = trainer.log_every_n_steps
        return bool(every) and self._stepped[self.serving] % every == 0

    # -- the clients' turns and rounds -----------------------------------------------------------------------------
    def take_turn(self, batch_idx: int) -> None:
        """Sequential: start from the head and tail of the client served just before (client to client)."""
        before, _ = self._neighbours(batch_idx)
        if before is not None and before != self.rank:
            with self.strategy._link_errors(f"waiting for client {before}'s head and tail"):
                part = self._among().recv(src=before, what="client part (sequential)")
            self.strategy.lightning_module.load_state_dict(part, strict=False)

    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._stepped = [trainer.current_epoch * n for n in self.steps["train"]]  # rounds resume whole

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        """After a client step: hand the part on (sequential); after the round's last step: combine the parts.

        This callback comes last: the monitors gather from the server for this step first (a client waiting in
        the round's average would otherwise hold the server, and so the clients it has still to serve).
        """
        if self.is_client and self.federation.paradigm == "sequential":
            _, after = self._neighbours(batch_idx)
            if after is not None and after != self.rank:
                with self.strategy._link_errors(f"handing the head and tail to client {after}"):
                    self._among().send(self._client_part(), dst=after)
        if batch_idx + 1 < trainer.num_training_batches:
            return
        with self.strategy._link_errors("combining the clients' parts at the end of the round"):
            self._end_round()
        if self.is_client:  # the clients' own traffic is real traffic too: logged apart from the pipeline's link
            ledger = self.strategy.ledger
            received = ledger.bytes("client part (sequential)") + ledger.bytes("client average")
            for logger in trainer.loggers:
                logger.log_metrics({"clients/weights_received_MB": received / 1e6}, step=trainer.global_step)

    def _end_round(self) -> None:
        if self.is_client and self.federation.paradigm == "sequential":  # all continue from the last one served
            final = self.served["train"][-1]
            part = self._among().broadcast(self._client_part() if self.rank == final else None, src=final,
                                           what="client part (sequential)")
            if self.rank != final:
                self.strategy.lightning_module.load_state_dict(part, strict=False)
        elif self.is_client:
            nbytes = fedavg_(list(self._client_part().values()), weight=self.steps["train"][self.rank],
                             group=self.federation.among_clients)
            self.strategy.ledger.book("client average", nbytes)
        elif self.slots is not None:
            self.slots.average(self.steps["train"])

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.serving = None  # the monitors' epoch figures go to every client

    @override
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.serving = None

    # -- helpers ---------------------------------------------------------------------------------------------------
    def sync_clients(self, module: LightningModule, names: list[str]) -> None:
        """Every client starts from client 0's head and tail (over the clients' group: the server is not in it)."""
        state = module.state_dict()
        part = self._among().broadcast({k: state[k] for k in names} if self.rank == 0 else None, src=0,
                                       what="initial client part")
        if self.rank != 0:
            module.load_state_dict(part, strict=False)

    def checkpoint_name(self, filepath: Any) -> str:
        """Client 0's checkpoint file name, which every client uses in its own folder."""
        return self._among().broadcast(os.path.basename(str(filepath)) if self.rank == 0 else None, src=0,
                                       what="checkpoint name")

    def _client_part(self) -> dict[str, Tensor]:
        return {k: v for k, v in self.strategy.lightning_module.state_dict().items() if not v.is_meta}

    def _neighbours(self, batch_idx: int) -> tuple[int | None, int | None]:
        """Sequential split learning: the clients served just before and just after this client's step."""
        order = self.served["train"]
        position = [i for i, client in enumerate(order) if client == self.rank][batch_idx]
        before = order[position - 1] if position > 0 else None
        after = order[position + 1] if position + 1 < len(order) else None
        return before, after

    def _among(self) -> Channel:
        """The clients' own channel: the server is not in its group."""
        channel = self.strategy._channel
        assert channel is not None
        return channel.on(self.federation.among_clients)


def _local_sigterm(trainer: Trainer) -> None:
    if getattr(trainer, "received_sigterm", False):
        raise SIGTERMException()
