"""experiments.partition: shards that are disjoint, complete, seeded, label-skewed on demand; errors name the fix."""

from __future__ import annotations

import numpy as np
import pytest

from experiments.partition import client_shard, partition

LABELS = [i % 10 for i in range(1000)]


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_shards_are_disjoint_complete_and_seeded(scheme):
    """Every sample lands in exactly one shard, and the same seed gives every client the same partition."""
    shards = partition(LABELS, clients=4, scheme=scheme, alpha=0.5, seed=3)
    flat = sorted(i for s in shards for i in s)
    assert flat == list(range(len(LABELS)))
    assert shards == partition(LABELS, clients=4, scheme=scheme, alpha=0.5, seed=3)
    assert shards != partition(LABELS, clients=4, scheme=scheme, alpha=0.5, seed=4)


def test_small_alpha_skews_labels_and_large_alpha_does_not():
    """Dirichlet(0.1) gives each client few classes; Dirichlet(1000) is close to IID."""
    def top_class_share(alpha: float) -> float:
        shards = partition(LABELS, clients=4, scheme="dirichlet", alpha=alpha, seed=0)
        return float(np.mean([np.bincount([LABELS[i] for i in s], minlength=10).max() / len(s) for s in shards]))

    assert top_class_share(0.1) > 0.25  # IID: 0.1 (ten balanced classes)
    assert top_class_share(1000.0) < 0.15


@pytest.mark.parametrize("kwargs, match", [
    ({"scheme": "shards"}, r"partition='shards'.*iid.*dirichlet"),
    ({"scheme": "dirichlet", "alpha": 0.0}, r"alpha=0.0.*> 0.*--data.alpha"),
])
def test_bad_partition_names_the_value(kwargs, match):
    """An unknown scheme or a non-positive alpha fails naming the value and the flag to change."""
    with pytest.raises(ValueError, match=match):
        partition(LABELS, clients=2, **{"alpha": 0.5, **kwargs})


def test_a_client_without_a_full_batch_is_named():
    """A skewed partition that leaves a client short of one batch names the client, the sizes and the fixes."""
    with pytest.raises(ValueError, match=r"client\(s\) \[.*fewer samples than one batch of 200.*Raise --data.alpha"):
        client_shard(LABELS, client=0, clients=8, scheme="dirichlet", alpha=0.05, seed=0, batch_size=200)
