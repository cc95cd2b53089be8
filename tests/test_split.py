"""``splitlit.split``: the description of a U-shaped split, its composition and its errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from splitlit import Split, SplitError


def test_split_call_equals_plain_composition():
    """Split(...)(x) computes tail(body(head(x))), the unsplit model."""
    torch.manual_seed(0)
    head, body, tail = nn.Linear(4, 5), nn.Linear(5, 6), nn.Linear(6, 2)
    x = torch.randn(3, 4)
    assert torch.equal(Split(head, body, tail)(x), tail(body(head(x))))


def test_split_passes_tuples_between_parts():
    """A head returning (activation, mask) feeds both to the body."""
    class Head(nn.Module):
        def forward(self, x):
            return x * 2, torch.ones(x.shape[0], dtype=torch.int64)

    class Body(nn.Module):
        def forward(self, h, mask):
            return h + mask[:, None]

    out = Split(Head(), Body(), nn.Identity())(torch.zeros(2, 3))
    assert torch.equal(out, torch.ones(2, 3))


def test_split_rejects_non_modules():
    """A part that is not an nn.Module is named in the error."""
    with pytest.raises(SplitError, match="Split.body must be a torch.nn.Module, got function"):
        Split(nn.Identity(), lambda x: x, nn.Identity())


def test_split_check_composes_names_the_failing_part():
    """Parts whose shapes do not fit fail with the part and the shapes named."""
    split = Split(nn.Linear(4, 5), nn.Linear(7, 2), nn.Identity())
    with pytest.raises(SplitError, match=r"the server .* failed on inputs of shapes \[\(3, 5\)\]"):
        split.check_composes(torch.zeros(3, 4))
