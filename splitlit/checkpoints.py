"""Checkpoints of a split model: the client writes one file, loadable into the unsplit module.

The server sends the client its share when a checkpoint is saved (its weights, optimiser and loop states, its
random state); the client merges it into one file: ``state_dict`` holds every tensor, ``optimizer_states`` each
optimiser's ``{"split_ranks": [client's, server's]}``, and ``split_server`` the server's loops and schedulers. On
resume the client reads the file (``weights_only=True``: nothing in it can run code) and sends the server its
share, so the server never reads a file and may be another machine. With many clients each client writes the file
client 0 writes, by the same name, in its own folder, holding the server's body for its link.

:class:`SplitCheckpoints` is the part of :class:`~splitlit.strategy.SplitPipelineStrategy` that does it (a mixin
over Lightning's ``DDPStrategy`` checkpoint hooks).
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping
from typing import Any

from torch import Tensor
from typing_extensions import override

from splitlit.following import SAVE
from splitlit.pipeline import link_errors
from splitlit.resume import rng_state, set_rng_state
from splitlit.split import SERVER_RANK

__all__ = ["SplitCheckpoints", "check_share"]


class SplitCheckpoints:
    """``SplitPipelineStrategy``'s checkpoint hooks (see the module docstring)."""

    # -- checkpoints: gathered to the client, one file loadable into the unsplit module -------------------------
    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.lightning_module.state_dict().items()
                if not (isinstance(v, Tensor) and v.is_meta)}  # this rank's own tensors: nothing crosses here

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        """The server sends the client its share; the client merges it and writes the file."""
        assert self._channel is not None
        self._announce(SAVE, int(_is_weights_only(checkpoint)))
        checkpoint[_RNG_KEY] = rng_state()  # each rank's own random state, restored on resume
        with link_errors("checkpointing (the server's share)", rank=self._link_role, timeout=self.timeout_s,
                         peer=self._peer_name()):
            if not self.is_client:
                for client, link in enumerate(self._links):  # each client's file holds the body it trains with
                    share = {k: checkpoint[k] for k in _SERVER_SHARE if k in checkpoint}
                    if self._many is not None and self._many.slots is not None:
                        share["state_dict"] = self._many.slots.state_dict(client, checkpoint["state_dict"])
                    link.send(share, dst=client)
                return
            share = self._links[0].recv(src=self.server_rank, what="server checkpoint share")
        if self._many is not None:  # every client writes the file client 0 writes, by that name, in its own folder
            name = self._many.checkpoint_name(filepath)
            if self.global_rank != 0:
                filepath = self._own_checkpoint_path(name)
        checkpoint = {**checkpoint, "state_dict": {**share.pop("state_dict"), **checkpoint["state_dict"]}}
        if "optimizer_states" in checkpoint:
            checkpoint["optimizer_states"] = [{"split_ranks": [own, server]} for own, server in
                                              zip(checkpoint["optimizer_states"], share.pop("optimizer_states"))]
        checkpoint[_SERVER_KEY] = share
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    @override
    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """The client reads the file and sends the server its share: the server may be another machine."""
        assert self._channel is not None
        share, error = None, None
        if self.is_client:
            try:
                checkpoint = self._read_checkpoint(checkpoint_path)
                share = self._server_share(checkpoint, checkpoint_path)
            except (OSError, KeyError, ValueError, RuntimeError) as err:
                error = err
                share = {"error": f"the client could not resume from its checkpoint: {err}"}
        with link_errors("resuming (sending the server its share)", rank=self._link_role, timeout=self.timeout_s,
                         peer=self._peer_name()):
            if self.is_client:
                self._links[0].broadcast(share, src=self.global_rank, what="server checkpoint share")
                shares = [share]
            else:
                shares = [link.broadcast(None, src=client, what="server checkpoint share")
                          for client, link in enumerate(self._links)]
        if error is not None:
            raise error
        for client, one in enumerate(shares):
            if "error" in one:
                raise RuntimeError(one["error"] if not self.many else f"client {client}: {one['error']}")
        if self._many is not None and self._many.slots is not None:
            self._many.slots.load([one["state_dict"] for one in shares])
        share = shares[0]
        own = checkpoint if self.is_client else share
        if _RNG_KEY in own:  # a checkpoint at an epoch's end; mid-epoch, the loaders restore it (splitlit.resume)
            set_rng_state(own[_RNG_KEY])
        return own

    def _read_checkpoint(self, path: Any) -> dict[str, Any]:
        if not os.path.isfile(str(path)) and "://" not in str(path):
            raise FileNotFoundError(f"The checkpoint {path} does not exist. Give --ckpt_path an existing file, or "
                                    f"--ckpt_path last to resume from this run's newest checkpoint.")
        try:
            return super().load_checkpoint(path, weights_only=True)
        except (RuntimeError, EOFError, pickle.UnpicklingError) as err:
            raise ValueError(f"The checkpoint {path} cannot be read ({type(err).__name__}: {str(err)[:200]}): it is "
                             f"truncated, or not a checkpoint written by this project. Resume from an earlier "
                             f"checkpoint in the same folder.") from err

    def _server_share(self, checkpoint: dict[str, Any], path: Any) -> dict[str, Any]:
        server_keys = [k for k, v in self.lightning_module.state_dict().items() if v.is_meta]
        missing = [k for k in server_keys if k not in checkpoint.get("state_dict", {})]
        if missing:
            raise KeyError(f"The checkpoint {path} lacks {len(missing)} of the server's tensors, e.g. {missing[:3]}: "
                           f"it was written for another model or split. Resume from a checkpoint of this model.")
        share = {k: v for k, v in checkpoint.get(_SERVER_KEY, {}).items()}
        share["state_dict"] = {k: checkpoint["state_dict"][k] for k in server_keys}
        if "optimizer_states" in checkpoint:
            share["optimizer_states"] = [{"split_ranks": [{}, _rank_state(s, SERVER_RANK, path)]}
                                         for s in checkpoint["optimizer_states"]]
        for key in ("epoch", "global_step", "pytorch-lightning_version"):
            share.setdefault(key, checkpoint.get(key))
        return share

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
            optimizer.load_state_dict(_rank_state(state, self._link_role, "this checkpoint"))



_SERVER_KEY = "split_server"  # the server's loops, schedulers and precision state in the client's file
_RNG_KEY = "split_rng"
_SERVER_SHARE = ("state_dict", "optimizer_states", "lr_schedulers", "loops", "epoch", "global_step",
                 "pytorch-lightning_version", "MixedPrecision", _RNG_KEY)


def _is_weights_only(checkpoint: Mapping[str, Any]) -> bool:
    return "optimizer_states" not in checkpoint


def _rank_state(state: Mapping[str, Any], rank: int, path: Any) -> Any:
    if "split_ranks" not in state:
        raise KeyError(f"The optimiser states in {path} were not written by SplitPipelineStrategy; resume it without "
                       f"the split, or load its weights only.")
    return state["split_ranks"][rank]




def check_share(weights: Mapping[str, Any], expected: list[str], what: str) -> None:
    unexpected = sorted(set(weights) - set(expected))
    if unexpected:
        raise KeyError(f"The client sent the server {what} it does not own: {unexpected[:5]}. Both ranks must run "
                       f"the same model and split.")
