"""``splitlit.placement``: how the strategy finds the split of a LightningModule, and refuses a foreign one."""

from __future__ import annotations

import pytest
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from splitlit import Split, SplitError
from splitlit.placement import _split_of
from tests.scripts.toy import Toy


def test_split_hook_missing_is_a_clear_error():
    """A LightningModule without configure_split() is told how to add it."""
    with pytest.raises(MisconfigurationException, match="has no configure_split"):
        _split_of(Toy(split_hook=False))


def test_split_of_foreign_module_is_rejected():
    """Split parts must belong to the LightningModule, or they would not be saved or moved."""
    model = Toy()
    model.configure_split = lambda: Split(model.head, nn.Linear(12, 10), model.tail)
    with pytest.raises(SplitError, match="Split.body .* not part of Toy"):
        _split_of(model)
