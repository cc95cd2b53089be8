"""``splitlit.microbatch``: how a batch is cut into micro-batches."""

from __future__ import annotations

import torch

from splitlit.microbatch import _slice_batch


def test_slice_batch_cuts_every_batch_sized_entry():
    """Micro-batch slicing cuts tensors and lists sized like the batch and keeps everything else."""
    batch = {"x": torch.arange(8).view(4, 2), "y": torch.arange(4), "names": list("abcd"), "k": 3}
    mb = _slice_batch(batch, 1, 3, 4)
    assert torch.equal(mb["x"], torch.tensor([[2, 3], [4, 5]]))
    assert torch.equal(mb["y"], torch.tensor([1, 2])) and mb["names"] == ["b", "c"] and mb["k"] == 3
