"""Deferred BatchNorm: running statistics over the whole batch while each micro-batch is normalised alone."""

import pytest
import torch
from torch import nn

from splitlit.batchnorm import DeferredBatchNorm, commit_deferred, convert_deferred


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("chunks", [1, 3, 4])
def test_running_statistics_equal_batchnorm_on_the_whole_batch(chunks, momentum):
    torch.manual_seed(0)
    plain = nn.BatchNorm2d(5, momentum=momentum)
    deferred = DeferredBatchNorm.from_batchnorm(plain)
    for step in range(3):
        batch = torch.randn(12, 5, 4, 4) * (step + 1) + 100.0  # a large mean: a naive sum of squares would lose it
        plain(batch)
        outs = [deferred(mb) for mb in batch.chunk(chunks)]
        for mb, out in zip(batch.chunk(chunks), outs):  # each micro-batch normalised by its own statistics
            torch.testing.assert_close(out, nn.functional.batch_norm(mb, None, None, deferred.weight, deferred.bias,
                                                                      True, 0.0, deferred.eps))
        assert deferred.commit() is True
        torch.testing.assert_close(deferred.running_mean, plain.running_mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(deferred.running_var, plain.running_var, rtol=1e-5, atol=1e-5)
        assert int(deferred.num_batches_tracked) == int(plain.num_batches_tracked) == step + 1
    assert deferred.commit() is False  # nothing pending: the statistics do not move


def test_plain_batchnorm_per_micro_batch_differs_which_is_what_deferring_fixes():
    torch.manual_seed(0)
    plain, per_chunk = nn.BatchNorm1d(3), nn.BatchNorm1d(3)
    batch = torch.randn(16, 3) + torch.arange(16.0)[:, None]  # micro-batches with different means
    plain(batch)
    for mb in batch.chunk(4):
        per_chunk(mb)
    assert not torch.allclose(plain.running_var, per_chunk.running_var, rtol=0.1)


def test_convert_keeps_the_state_dict_and_eval_output():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Sequential(nn.BatchNorm2d(4)),
                          nn.BatchNorm2d(4, track_running_stats=False))
    model.train()
    model(torch.randn(8, 3, 6, 6))  # running statistics away from their initial values
    model.eval()
    x = torch.randn(2, 3, 6, 6)
    before, state = model(x), {k: v.clone() for k, v in model.state_dict().items()}
    assert convert_deferred(model) == 2  # the layer without running statistics has nothing to defer
    assert isinstance(model[1], DeferredBatchNorm) and isinstance(model[3][0], DeferredBatchNorm)
    assert type(model[4]) is nn.BatchNorm2d
    assert model.state_dict().keys() == state.keys()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, state[k])
    torch.testing.assert_close(model(x), before)
    model.train()
    model(torch.randn(4, 3, 6, 6))
    assert commit_deferred(model) == 2


def test_a_scalar_input_is_refused_with_its_shape():
    with pytest.raises(ValueError, match=r"at least 2 dimensions.*\(4,\)"):
        DeferredBatchNorm(4)(torch.randn(4))


def test_a_layer_held_by_two_parents_becomes_one_deferred_layer_in_both():
    """A module that caches its split (MobileNetV2Classifier) holds its BatchNorm in the model and in the split's
    containers: both must see the same new layer, or the split would train a layer the model does not save."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    cached_head = nn.Sequential(model[0], model[1])  # not a submodule of the model
    assert convert_deferred(model, cached_head) == 1
    assert isinstance(model[1], DeferredBatchNorm) and cached_head[1] is model[1]
