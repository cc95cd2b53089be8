"""Fast, single-process tests of the split description, the pipeline orders and the strategy's checks."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from splitlit import Split, SplitError, SplitPipelineStrategy
from splitlit.pipeline import microbatch_count
from splitlit.schedule import u_order
from splitlit.strategy import _slice_batch, _split_of
from tests.scripts.toy import Toy


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


@pytest.mark.parametrize("kwargs, match", [
    ({"chunks": 0}, "chunks must be a positive integer"),
    ({"order": "zigzag"}, r"order='zigzag'.*choose one of \('gpipe', '1f1b', 'zb'\)"),
    ({"timeout": -1}, "timeout=-1"),
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


@pytest.mark.parametrize("batch, chunks, expected", [(64, 4, 4), (64, 8, 8), (6, 4, 3), (7, 4, 1), (3, 8, 3)])
def test_short_batches_use_the_largest_divisor(batch, chunks, expected):
    """A batch the chunk count does not divide runs with the largest divisor below chunks."""
    assert microbatch_count(batch, chunks) == expected


@pytest.mark.parametrize("order", ["gpipe", "1f1b", "zb", None])
@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_orders_run_every_microbatch_once_per_stage(order, n):
    """Per stage and micro-batch: one forward, then (training) one backward or an input then a weight gradient."""
    actions = u_order(order, n)
    assert {a.stage_index for a in actions[0]} == {0, 2} and {a.stage_index for a in actions[1]} == {1}
    for stage in range(3):
        rank = 1 if stage == 1 else 0
        for mb in range(n):
            kinds = [a.computation_type.name for a in actions[rank]
                     if (a.stage_index, a.microbatch_index) == (stage, mb)]
            assert kinds in (["FORWARD"], ["FORWARD", "FULL_BACKWARD"],
                             ["FORWARD", "BACKWARD_INPUT", "BACKWARD_WEIGHT"])
            assert (len(kinds) > 1) == (order is not None)


def test_zb_splits_the_backward_where_a_gradient_crosses_the_link():
    """Under zb the server and the tail send their input gradient before computing their weight gradient; the head
    (nothing to send) keeps one backward."""
    actions = u_order("zb", 4)
    kinds = lambda rank, stage: {a.computation_type.name for a in actions[rank] if a.stage_index == stage}  # noqa: E731
    assert kinds(1, 1) == kinds(0, 2) == {"FORWARD", "BACKWARD_INPUT", "BACKWARD_WEIGHT"}
    assert kinds(0, 0) == {"FORWARD", "FULL_BACKWARD"}


def _peak_live(order: str, n: int, stage: int) -> int:
    """Micro-batches whose activations ``stage`` holds at once: a forward, until its whole or weight backward."""
    live = peak = 0
    for a in u_order(order, n)[1 if stage == 1 else 0]:
        if a.stage_index == stage:
            kind = a.computation_type.name
            live += {"FORWARD": 1, "FULL_BACKWARD": -1, "BACKWARD_WEIGHT": -1}.get(kind, 0)
            peak = max(peak, live)
    return peak


def test_1f1b_bounds_microbatches_in_flight():
    """Under 1f1b the client holds at most three head activations whatever the chunk count; gpipe holds all."""
    assert [_peak_live("1f1b", n, 0) for n in (1, 2, 4, 8, 16)] == [1, 2, 3, 3, 3]
    assert _peak_live("gpipe", 8, 0) == 8


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_zb_holds_as_many_microbatches_as_1f1b(stage):
    """zb's activation memory is 1F1B's: per stage the same number of live micro-batches, whatever the chunk count."""
    counts = [_peak_live("zb", n, stage) for n in (1, 2, 4, 8, 16)]
    assert counts == [_peak_live("1f1b", n, stage) for n in (1, 2, 4, 8, 16)]
    assert counts[2:] == [{0: 3, 1: 2, 2: 1}[stage]] * 3


def test_slice_batch_cuts_every_batch_sized_entry():
    """Micro-batch slicing cuts tensors and lists sized like the batch and keeps everything else."""
    batch = {"x": torch.arange(8).view(4, 2), "y": torch.arange(4), "names": list("abcd"), "k": 3}
    mb = _slice_batch(batch, 1, 3, 4)
    assert torch.equal(mb["x"], torch.tensor([[2, 3], [4, 5]]))
    assert torch.equal(mb["y"], torch.tensor([1, 2])) and mb["names"] == ["b", "c"] and mb["k"] == 3


def test_link_failures_are_told_from_genuine_errors():
    """The transport's own words mark a lost peer; a stage's error, or one that merely says "peer", does not."""
    from splitlit.pipeline import _is_link_failure

    assert _is_link_failure(RuntimeError("[gloo/transport/tcp/pair.cc:561] Connection closed by peer [127.0.0.1]"))
    assert _is_link_failure(RuntimeError("Socket Timeout"))
    assert not _is_link_failure(RuntimeError("nothing received from the peer may be unpickled"))
    staged = RuntimeError("Connection closed by peer")  # even so: raised inside a stage's computation
    staged.splitlit_stage = 1
    assert not _is_link_failure(staged)


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
