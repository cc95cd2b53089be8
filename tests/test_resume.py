"""Resumable loaders in one process: the same batches and the same random draws after a resume, on each rank."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset

from splitlit.resume import ResumableLoader, ServerBatches, rank_seed


class Noisy(Dataset):
    """Each sample draws from the global RNG when fetched, as a random augmentation does."""

    def __len__(self) -> int:
        return 40

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.tensor([float(i)]) + torch.rand(1)


def _run(loader: ResumableLoader, done: list[int], stop: int | None = None, prefetch: int = 1):
    """Iterate as Lightning does (one batch fetched ahead), drawing 'dropout' after each step; stop after ``stop``
    steps and return the loader's state there, else return every batch and draw."""
    seen, draws = [], []
    it = iter(loader)
    buffer = [next(it) for _ in range(prefetch)]
    while buffer:
        batch = buffer.pop(0)
        try:
            buffer.append(next(it))
        except StopIteration:
            pass
        seen.append(batch)
        draws.append(torch.rand(1))  # the step's own random use (dropout)
        done[0] += 1
        if stop is not None and done[0] == stop:
            return loader.state_dict(), seen, draws
    return None, seen, draws


def test_a_resumed_epoch_yields_the_same_batches_and_draws_as_the_uninterrupted_one():
    for stop in (1, 3, 9):  # mid-epoch, each time with one batch fetched ahead
        torch.manual_seed(0)
        done = [0]
        _, full, full_draws = _run(ResumableLoader(DataLoader(Noisy(), batch_size=4, shuffle=True),
                                                   lambda: done[0]), done)
        torch.manual_seed(0)
        done = [0]
        state, first, first_draws = _run(ResumableLoader(DataLoader(Noisy(), batch_size=4, shuffle=True),
                                                         lambda: done[0]), done, stop=stop)
        torch.manual_seed(123)  # a new process: another random state until the checkpoint is loaded
        resumed_loader = ResumableLoader(DataLoader(Noisy(), batch_size=4, shuffle=True), lambda: done[0])
        resumed_loader.load_state_dict(state)
        done = [stop]
        _, rest, rest_draws = _run(resumed_loader, done)
        assert len(first) + len(rest) == len(full) == 10
        for a, b in zip(full, first + rest):
            assert torch.equal(a, b)
        for a, b in zip(full_draws, first_draws + rest_draws):
            assert torch.equal(a, b)


def test_the_server_skips_the_steps_done_and_restores_its_random_state():
    done = [0]
    server = ServerBatches(10, lambda: done[0])
    torch.manual_seed(5)
    done[0] = 4
    state = server.state_dict()
    expected = torch.rand(3)
    torch.manual_seed(99)
    again = ServerBatches(10, lambda: 0)
    again.load_state_dict(state)
    assert list(again) == [4, 5, 6, 7, 8, 9]
    assert torch.equal(torch.rand(3), expected)
    assert list(again) == list(range(10))  # the next epoch starts from its beginning


def test_each_rank_draws_its_own_stream_from_the_run_seed():
    assert rank_seed(0, 1) != rank_seed(0, 0) != rank_seed(1, 1)
    assert rank_seed(7, 1) == rank_seed(7, 1)
