"""One dataset split across simulated clients: IID, or label skew drawn from a Dirichlet distribution.

    shards = partition(labels, clients=4, scheme="dirichlet", alpha=0.5, seed=0)
    mine = Subset(train_set, shards[client])

``"dirichlet"`` is the label-skew partition of Hsu et al., "Measuring the Effects of Non-Identical Data
Distribution for Federated Visual Classification" (2019), as FedML and SLPerf use it: for each class, the
shares of the clients are drawn from ``Dir(alpha)``; small ``alpha`` gives each client few classes, large ``alpha``
approaches IID. The same ``seed`` gives every client the same partition, so each can build only its own shard.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from torch.utils.data import Subset

__all__ = ["SCHEMES", "check", "client_shard", "own_shard", "partition"]

SCHEMES = ("iid", "dirichlet")


def check(scheme: str, alpha: float) -> None:
    """Errors for a bad scheme or alpha, before any data is read."""
    if scheme not in SCHEMES:
        raise ValueError(f"partition={scheme!r}: choose one of {SCHEMES} (--data.partition).")
    if scheme == "dirichlet" and not alpha > 0:
        raise ValueError(f"alpha={alpha!r}: the Dirichlet concentration must be > 0 (small: few classes per client, "
                         f"e.g. 0.1; large: near IID, e.g. 100). Set --data.alpha.")


def partition(labels: Sequence[int], *, clients: int, scheme: str = "iid", alpha: float = 0.5,
              seed: int = 0) -> list[list[int]]:
    """The indices of each client's shard (disjoint, together all of ``labels``)."""
    check(scheme, alpha)
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    if scheme == "iid":
        return [sorted(part.tolist()) for part in np.array_split(rng.permutation(len(labels)), clients)]
    shards: list[list[int]] = [[] for _ in range(clients)]
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        shares = rng.dirichlet(np.full(clients, float(alpha)))
        cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
        for client, part in enumerate(np.split(members, cuts)):
            shards[client] += part.tolist()
    return [sorted(s) for s in shards]


def client_shard(labels: Sequence[int], *, client: int, clients: int, scheme: str, alpha: float, seed: int,
                 batch_size: int) -> list[int]:
    """Client ``client``'s indices; an error that names the client and the fix when it cannot fill a batch."""
    shards = partition(labels, clients=clients, scheme=scheme, alpha=alpha, seed=seed)
    sizes = [len(s) for s in shards]
    short = [c for c, n in enumerate(sizes) if n < batch_size]
    if short:
        raise ValueError(
            f"The {scheme} partition (alpha={alpha}, seed={seed}) leaves client(s) {short} with fewer samples than "
            f"one batch of {batch_size} (shard sizes {sizes}). Raise --data.alpha, use fewer clients, a smaller "
            f"--data.batch_size, more data, or another --data.partition_seed."
        )
    return shards[client]


def own_shard(dataset: Any, trainer: Any, *, label: Callable[[int], int], scheme: str | None, alpha: float, seed: int,
              batch_size: int) -> Any:
    """This process's shard of ``dataset`` when the Trainer's strategy has many clients (else ``dataset``).

    ``label(i)`` is the label of ``dataset[i]``; the client's rank comes from the strategy, which every client
    knows by the time the data module's ``setup`` runs.
    """
    strategy = getattr(trainer, "strategy", None)
    clients = getattr(strategy, "clients", 1)
    if clients == 1 or scheme is None:
        return dataset  # one client, or each client pointed at its own data folder
    labels = [label(i) for i in range(len(dataset))]
    mine = client_shard(labels, client=strategy.global_rank, clients=clients, scheme=scheme, alpha=alpha, seed=seed,
                        batch_size=batch_size)
    return Subset(dataset, mine)
