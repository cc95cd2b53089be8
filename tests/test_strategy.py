"""``splitlit.strategy``: the strategy's argument, precision and checkpoint checks, without a process group."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from splitlit import SplitPipelineStrategy


@pytest.mark.parametrize("kwargs, match", [
    ({"chunks": 0}, "chunks must be a positive integer"),
    ({"order": "zigzag"}, r"order='zigzag'.*choose one of \('gpipe', '1f1b', 'zb'\)"),
    ({"timeout": -1}, "timeout=-1"),
    ({"warmup": 0}, r"warmup=0.*a positive integer \(2 by default"),
    ({"warmup": 2.5}, r"warmup=2.5"),
])
def test_strategy_arguments_are_checked(kwargs, match):
    """Bad strategy arguments fail at construction, naming the value."""
    with pytest.raises(ValueError, match=match):
        SplitPipelineStrategy(**kwargs)


def test_fp16_mixed_precision_is_refused_clearly():
    """'16-mixed' (a gradient scaler) is refused with the alternatives named."""
    strategy = SplitPipelineStrategy()
    strategy.precision_plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    with pytest.raises(MisconfigurationException, match="bf16-mixed"):
        strategy._check_precision()


def test_setup_timeout_must_be_positive():
    with pytest.raises(ValueError, match=r"setup_timeout=0.*seconds the server waits for the client's setup"):
        SplitPipelineStrategy(setup_timeout=0)


def test_a_missing_or_truncated_checkpoint_is_named_with_the_fix(tmp_path):
    strategy = SplitPipelineStrategy()
    with pytest.raises(FileNotFoundError, match=r"missing.ckpt does not exist. Give --ckpt_path an existing file"):
        strategy._read_checkpoint(tmp_path / "missing.ckpt")
    whole = tmp_path / "whole.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1000)}, "epoch": 0}, whole)
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(whole.read_bytes()[:2000])
    with pytest.raises(ValueError, match=r"cut.ckpt cannot be read .* truncated"):
        strategy._read_checkpoint(cut)
