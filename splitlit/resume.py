"""Resume mid-epoch exactly: each rank's loader position and random state, saved with the checkpoint.

Lightning resumes a loader mid-epoch only if it is stateful (``state_dict`` / ``load_state_dict``). The
strategy wraps the client's training loader in :class:`ResumableLoader` and gives the server's placeholder
batches the same interface (:class:`ServerBatches`), so a checkpoint written after batch ``n`` resumes at batch
``n + 1`` with the same data order and the same random state on each rank (augmentation, dropout) as the run
that was not interrupted::

    loader = ResumableLoader(DataLoader(train, shuffle=True), progress=lambda: trainer_batches_done)
    state = loader.state_dict()           # in a checkpoint
    loader.load_state_dict(state)         # on resume: the next iter() skips what was trained on

The states hold only tensors, ints and lists (no numpy arrays), so checkpoints load with ``weights_only=True``
and the server's share crosses as plain tensors.
"""

from __future__ import annotations

import hashlib
import os
import random
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import torch

__all__ = ["ResumableLoader", "ServerBatches", "rank_seed", "rng_state", "seed_rank_apart", "set_rng_state"]


def rank_seed(seed: int, rank: int) -> int:
    """A seed of its own for ``rank``, derived from the run's ``seed`` (so each rank draws its own dropout)."""
    return int.from_bytes(hashlib.sha256(f"splitlit:{seed}:{rank}".encode()).digest()[:4], "little")


def seed_rank_apart(rank: int) -> None:
    """In a seeded run, the server draws its own random stream (its dropout), derived from the run's seed.

    Both ranks start from the same seed; left alike, the server's dropout masks would repeat the client's draws
    (as torchtitan does, each pipeline rank is seeded apart). The client keeps the run's stream, so its data
    order and augmentation are those of the unsplit run.
    """
    seed = os.environ.get("PL_GLOBAL_SEED")
    if rank == 0 or seed is None:  # the client keeps the run's stream
        return
    derived = rank_seed(int(seed), rank)
    torch.manual_seed(derived)
    random.seed(derived)
    try:
        import numpy as np

        np.random.seed(derived)
    except ImportError:  # pragma: no cover
        pass


def rng_state() -> dict[str, Any]:
    """This process's torch, Python and numpy random states, as tensors and lists."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    version, internal, gauss = random.getstate()
    state["python"] = [version, list(internal), gauss]
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy comes with torch's users
        return state
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state["numpy"] = [kind, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss), float(cached)]
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "numpy" in state:
        import numpy as np

        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class ResumableLoader:
    """The client's training loader, able to continue mid-epoch where a checkpoint left it.

    ``progress()`` returns how many of this epoch's batches training has completed; Lightning fetches one batch
    ahead, so the loader remembers the random state before each fetch and replays the pending one exactly.
    """

    def __init__(self, loader: Any, progress: Callable[[], int]) -> None:
        self.loader = loader
        self.progress = progress
        self._epoch_rng: dict[str, Any] | None = None
        self._before_fetch: deque[tuple[int, dict[str, Any]]] = deque(maxlen=4)  # (batch index, state before)
        self._fetched = 0
        self._resume: dict[str, Any] | None = None

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str) -> Any:  # batch_size, dataset, sampler, ... as the user's loader has them
        if name == "loader":
            raise AttributeError(name)
        return getattr(self.loader, name)

    def state_dict(self) -> dict[str, Any]:
        done = int(self.progress())
        pending = [state for index, state in self._before_fetch if index >= done]
        return {"done": done, "epoch_rng": self._epoch_rng, "pending_rng": pending, "rng": rng_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._resume = state

    def __iter__(self) -> Iterator[Any]:
        resume, self._resume = self._resume, None
        if resume is not None and resume["done"] >= len(self.loader):  # saved at an epoch's end: a new epoch
            set_rng_state(resume["rng"])
            resume = None
        if resume is not None and resume.get("epoch_rng") is not None:
            set_rng_state(resume["epoch_rng"])  # the same shuffle as the interrupted epoch
        self._epoch_rng = rng_state()  # before iter(): the loader draws its seeds there and at the first batch
        self._before_fetch.clear()
        batches = iter(self.loader)
        index = 0
        if resume is not None:
            for _ in range(resume["done"]):  # trained on before the checkpoint: fetched, not yielded
                next(batches)
            index = resume["done"]
            for state in resume["pending_rng"]:  # fetched ahead before the checkpoint: fetched again alike
                set_rng_state(state)
                self._before_fetch.append((index, state))
                batch = next(batches)
                index += 1
                yield batch
            set_rng_state(resume["rng"])
        while True:
            before = rng_state()
            try:
                batch = next(batches)
            except StopIteration:
                return
            self._before_fetch.append((index, before))
            index += 1
            yield batch


class ServerBatches:
    """What the server's loops iterate: as many placeholder steps as the client has batches, and no data.

    For training it is resumable like the client's loader: it skips the steps done and restores the server's
    random state (the body's dropout) as it was at the checkpoint.
    """

    def __init__(self, length: int, progress: Callable[[], int] | None = None) -> None:
        self.length = length
        self.progress = progress
        self._resume: dict[str, Any] | None = None

    def __len__(self) -> int:
        return self.length

    def state_dict(self) -> dict[str, Any]:
        return {"done": int(self.progress()) if self.progress else 0, "rng": rng_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._resume = state

    def __iter__(self) -> Iterator[int]:
        resume, self._resume = self._resume, None
        start = 0
        if resume is not None:
            start = resume["done"] if resume["done"] < self.length else 0  # at an epoch's end: a new epoch
            set_rng_state(resume["rng"])
        return iter(range(start, self.length))
