"""Many clients, one server: who serves whom, and how the parts are combined after each round.

A job with ``N`` clients has ``N + 1`` ranks: clients ``0 .. N-1`` and the server ``N``. Each client-server pair
is a link with its own process group, over which the two-rank U pipeline runs unchanged; the clients also share a
group of their own for combining their parts (the server is not in it, so it never holds a client part)::

    federation = Federation(clients=4, paradigm="splitfed", rank=dist.get_rank())
    federation.links[i]         # the process group of client i and the server
    services(lengths)           # the order in which the server serves the clients' steps

The server serves one client step at a time, round-robin over the clients that still have a batch in the round
(a round is one epoch: every client runs through its own shard once). Paradigms:

* ``"sequential"``: vanilla split learning (Gupta & Raskar, "Distributed learning of deep neural network over
  multiple agents", J. Netw. Comput. Appl. 2018). One body; the clients take turns, one batch each (or one whole
  round each: ``turn="epoch"``), and the next client starts from the previous client's head and tail, handed
  client to client (never through the server).
* ``"splitfed"``: SplitFed v1 (Thapa et al., "SplitFed: When Federated Learning Meets Split Learning", AAAI 2022).
  The server keeps one body per client and averages them at the end of each round; the clients average their
  heads and tails among themselves (FedAvg, weighted by their numbers of samples).
* ``"splitfed2"``: SplitFed v2 (same paper): one body, updated client after client; the clients' parts are
  averaged each round as in v1.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["PARADIGMS", "TURNS", "BodySlots", "Federation", "fedavg_", "services"]

log = logging.getLogger(__name__)

PARADIGMS = ("sequential", "splitfed", "splitfed2")
TURNS = ("batch", "epoch")


def services(lengths: Sequence[int], turn: str = "batch") -> list[int]:
    """The clients in the order the server serves their steps: round-robin over those with batches left
    (``turn="batch"``), or each client's whole round in turn (``turn="epoch"``).

    ``lengths[i]`` is client ``i``'s number of steps; client ``i`` appears ``lengths[i]`` times.
    """
    if turn == "epoch":
        return [client for client, length in enumerate(lengths) for _ in range(length)]
    order: list[int] = []
    for step in range(max(lengths, default=0)):
        order += [client for client, length in enumerate(lengths) if length > step]
    return order


class Federation:
    """The ranks and process groups of a job with ``clients`` clients and one server (see the module docstring).

    Every rank must create it, at the same point, since each process group is created by all ranks.
    """

    def __init__(self, *, clients: int, paradigm: str, rank: int, timeout: float, turn: str = "batch") -> None:
        self.clients = clients
        self.paradigm = paradigm
        self.turn = turn
        self.rank = rank
        self.server_rank = clients
        self.links = [dist.new_group([client, self.server_rank], timeout=timedelta(seconds=timeout))
                      for client in range(clients)]
        # Clients wait for each other at a round's end while the slower ones still train: a long timeout.
        self.among_clients = dist.new_group(list(range(clients)), timeout=timedelta(seconds=max(timeout, 3600.0)))
        log.info("rank %d: %d clients (%s), server rank %d", rank, clients, paradigm, self.server_rank)

    @property
    def is_client(self) -> bool:
        return self.rank != self.server_rank


def fedavg_(tensors: Sequence[Tensor], *, weight: float, group: dist.ProcessGroup) -> int:
    """FedAvg in place over ``group``: every rank ends with ``sum_r weight_r * tensors_r / sum_r weight_r``.

    Floating tensors only (integer buffers such as BatchNorm's step count stay local). One flat all-reduce, in
    float64; returns the bytes it reduced (the averaging's traffic, as the clients' ledgers book it).
    """
    floats = [t for t in tensors if t.is_floating_point()]
    if not floats:
        return 0
    total = torch.tensor([float(weight)], dtype=torch.float64)
    dist.all_reduce(total, group=group)
    flat = torch.cat([t.detach().reshape(-1).double() for t in floats]) * (float(weight) / float(total))
    dist.all_reduce(flat, group=group)
    offset = 0
    for t in floats:
        n = t.numel()
        t.data.copy_(flat[offset:offset + n].view_as(t))
        offset += n
    return flat.numel() * flat.element_size()


class BodySlots:
    """SplitFed v1's bodies, one per client, on the server: the live parameters are swapped, not copied.

    The body's parameters stay the same ``nn.Parameter`` objects (the pipeline's stages and the optimiser hold
    them); serving client ``c`` points their ``.data`` at client ``c``'s tensors and the optimiser's state at
    client ``c``'s state. :meth:`average` ends a round: every body becomes the weighted mean of all of them.
    """

    def __init__(self, tensors: dict[str, Tensor], optimizers: Sequence, clients: int) -> None:
        self.names = list(tensors)
        self.tensors = list(tensors.values())  # the live parameters and buffers
        self.optimizers = list(optimizers)
        live = [t.data for t in self.tensors]
        self.data = [live] + [[t.clone() for t in live] for _ in range(clients - 1)]
        self._opt_params = [[p for group in opt.param_groups for p in group["params"]] for opt in self.optimizers]
        # state[client][optimizer][param]: each client's own optimiser state (momenta), never averaged
        self.state = [[[{} for _ in ps] for ps in self._opt_params] for _ in range(clients)]
        self.current = 0

    def use(self, client: int) -> None:
        """Make client ``client``'s body (weights and optimiser state) the live one."""
        if client == self.current:
            return
        self._store()
        for t, data in zip(self.tensors, self.data[client]):
            t.data = data
        for optimizer, params, states in zip(self.optimizers, self._opt_params, self.state[client]):
            for p, state in zip(params, states):
                optimizer.state[p] = state
        self.current = client

    def _store(self) -> None:
        self.data[self.current] = [t.data for t in self.tensors]
        self.state[self.current] = [[optimizer.state[p] for p in params]
                                    for optimizer, params in zip(self.optimizers, self._opt_params)]

    def average(self, weights: Sequence[float]) -> None:
        """FedAvg of the bodies, weighted (by each client's samples in the round); optimiser states stay apart."""
        self._store()
        total = float(sum(weights))
        for index in range(len(self.tensors)):
            tensors = [slot[index] for slot in self.data]
            if not tensors[0].is_floating_point():
                continue
            mean = sum(t.double() * (w / total) for t, w in zip(tensors, weights)).to(tensors[0].dtype)
            for t in tensors:
                t.copy_(mean)

    def state_dict(self, client: int, live: dict[str, Tensor]) -> dict[str, Tensor]:
        """``live`` (the server's state dict) with client ``client``'s body in place of the live one."""
        self._store()
        return {**live, **dict(zip(self.names, self.data[client]))}

    def load(self, states: Sequence[dict[str, Tensor]]) -> None:
        """Every client's body from its checkpoint share (in client order)."""
        for client, state in enumerate(states):
            for t, name in zip(self.data[client], self.names):
                t.copy_(state[name])
