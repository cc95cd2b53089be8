"""``splitlit.pipeline``: micro-batch counts of short batches, and a lost peer told from a stage's error."""

from __future__ import annotations

import pytest

from splitlit.pipeline import _is_link_failure, microbatch_count


@pytest.mark.parametrize("batch, chunks, expected", [(64, 4, 4), (64, 8, 8), (6, 4, 3), (7, 4, 1), (3, 8, 3)])
def test_short_batches_use_the_largest_divisor(batch, chunks, expected):
    """A batch the chunk count does not divide runs with the largest divisor below chunks."""
    assert microbatch_count(batch, chunks) == expected


def test_link_failures_are_told_from_genuine_errors():
    """The transport's own words mark a lost peer; a stage's error, or one that merely says "peer", does not."""
    assert _is_link_failure(RuntimeError("[gloo/transport/tcp/pair.cc:561] Connection closed by peer [127.0.0.1]"))
    assert _is_link_failure(RuntimeError("Socket Timeout"))
    assert not _is_link_failure(RuntimeError("nothing received from the peer may be unpickled"))
    staged = RuntimeError("Connection closed by peer")  # even so: raised inside a stage's computation
    staged.splitlit_stage = 1
    assert not _is_link_failure(staged)
