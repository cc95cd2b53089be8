"""Wire codecs: round trips, exact sizes, the stage-side swap of P2P ops, plans and their errors, rates."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from splitlit import SplitPipelineStrategy
from splitlit.codecs import PowerIteration
from splitlit.meter import LinkMeter
from splitlit.traffic import analytic_link_bytes, compress_rates, link_bytes
from splitlit.wire import (
    Cast,
    Int8,
    TopK,
    WireEndpoint,
    WirePlan,
    make_wire_codec,
)

CODECS = [Cast("fp16"), Cast("bf16"), Int8("channel"), Int8("block", block_size=64), Int8("block", block_size=7),
          TopK(0.1), TopK(1.0)]
SHAPES = [(4, 8, 6, 6), (2, 5, 12), (3, 10)]


def sample(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 3


@pytest.mark.parametrize("codec", CODECS, ids=repr)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_encoded_parts_match_the_spec_and_the_analytic_bytes(codec, shape):
    """Every encoding has the shapes and dtypes its spec promises, so nbytes is exactly what is sent."""
    parts = codec.encode(sample(shape))
    assert [(tuple(p.shape), p.dtype) for p in parts] == codec.spec(shape, torch.float32)
    assert sum(p.numel() * p.element_size() for p in parts) == codec.nbytes(shape)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_round_trip_errors_are_bounded(shape):
    """fp16/bf16 keep 3/2 significant digits; int8 errs by at most half a step of its scale; top-k keeps the largest."""
    x = sample(shape)
    for codec, rel in ((Cast("fp16"), 1e-3), (Cast("bf16"), 8e-3)):
        y = codec.decode(codec.encode(x), shape, x.dtype)
        assert y.dtype == x.dtype and ((y - x).abs() <= rel * x.abs()).all()
    codec = Int8("channel")
    rows = x.reshape(math.prod(shape[:2]) if len(shape) > 2 else shape[0], -1)
    y = codec.decode(codec.encode(x), shape, x.dtype).reshape(rows.shape)
    assert ((y - rows).abs() <= rows.abs().amax(1, keepdim=True) / 127 / 2 + 1e-6).all()
    codec = Int8("block", block_size=7)
    assert (codec.decode(codec.encode(x), shape, x.dtype) - x).abs().max() <= x.abs().max() / 254 + 1e-6
    codec = TopK(0.25)
    y = codec.decode(codec.encode(x), shape, x.dtype).reshape(shape[0], -1)
    flat = x.reshape(shape[0], -1)
    k = math.ceil(0.25 * flat.shape[1])
    kept = y != 0
    assert (kept.sum(1) == k).all() and torch.equal(y[kept], flat[kept])
    assert (flat.abs()[~kept].reshape(shape[0], -1).amax(1) <= flat.abs()[kept].reshape(shape[0], -1).amin(1)).all()
    assert torch.equal(TopK(1.0).decode(TopK(1.0).encode(x), shape, x.dtype), x)


def test_int8_zero_tensor_and_index_width():
    """An all-zero tensor quantises without NaN; top-k indices are int16 up to 32,768 values per sample, else int32."""
    z = torch.zeros(2, 3, 4)
    assert torch.equal(Int8().decode(Int8().encode(z), (2, 3, 4), z.dtype), z)
    assert TopK(0.1).spec((2, 32768), torch.float32)[1][1] == torch.int16
    assert TopK(0.1).spec((2, 32769), torch.float32)[1][1] == torch.int32


@pytest.fixture
def one_rank_group():
    """P2POp needs a default process group to exist (it resolves ranks); a world of one, never used to send."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _simulated_link(plan, cut, kind, tensors):
    """Sender and receiver endpoints joined by a copy: what the receiver's stage sees, and what both meters saw."""
    sender, receiver = WireEndpoint(plan), WireEndpoint(plan)
    sent_meter, recv_meter = LinkMeter(timed=False), LinkMeter(timed=False)
    send_ops = sender.send([dist.P2POp(dist.isend, t, 0) for t in tensors], cut=cut, kind=kind)
    buffers = [torch.empty_like(t) for t in tensors]
    recv_ops = receiver.recv([dist.P2POp(dist.irecv, b, 0) for b in buffers], cut=cut, kind=kind, chunk=3)
    sent_meter.record(send_ops, cut=cut, kind=kind, role="sent", microbatch=3)
    recv_meter.record(recv_ops, cut=cut, kind=kind, role="received", microbatch=3)
    assert len(send_ops) == len(recv_ops)
    for s, r in zip(send_ops, recv_ops):  # the transport: same shapes and dtypes on both sides
        assert (s.tensor.shape, s.tensor.dtype) == (r.tensor.shape, r.tensor.dtype)
        r.tensor.copy_(s.tensor)
    receiver.decode(kind=kind, chunk=3)
    return buffers, sent_meter, recv_meter


@pytest.mark.parametrize("spec", ["fp16", "bf16", "int8", "int8-block", {"name": "topk", "fraction": 0.05}], ids=str)
def test_endpoint_sends_encoded_tensors_and_decodes_into_the_stage_buffers(spec, one_rank_group):
    """The stage's receive buffer gets decode(encode(x)); both meters count the encoded bytes, an int64 mask as is."""
    plan = WirePlan.parse({"down.gradient": spec})
    x, mask = sample((4, 16, 3, 3)), torch.arange(8, dtype=torch.int64).view(4, 2)
    (got, got_mask), sent, received = _simulated_link(plan, "down", "gradient", [x, mask])
    codec = plan.get("down", "gradient")
    assert torch.equal(got, codec.decode(codec.encode(x), tuple(x.shape), x.dtype)) and torch.equal(got_mask, mask)
    expected = codec.nbytes(tuple(x.shape)) + mask.numel() * 8
    assert sent.bytes(cut="down", kind="gradient") == received.bytes(cut="down", kind="gradient") == expected


def test_endpoint_without_a_codec_for_the_flow_leaves_ops_alone(one_rank_group):
    """A (cut, kind) the plan does not name keeps the stage's own ops and buffers."""
    endpoint = WireEndpoint({"up.activation": "int8"})
    ops = [dist.P2POp(dist.isend, torch.ones(3), 0)]
    assert endpoint.send(ops, cut="down", kind="activation") is ops
    assert endpoint.recv(ops, cut="up", kind="gradient", chunk=0) is ops


def test_plan_accepts_names_mappings_and_instances():
    """A plan takes names, {name: ..., options} and WireCodec objects; 'none' is the same as leaving a key out."""
    plan = WirePlan.parse({"up.activation": "int8-block", "up.gradient": {"name": "topk", "fraction": 0.2},
                           "down.activation": Cast("bf16"), "down.gradient": "none"})
    assert plan.describe() == {"up.activation": "int8-block64", "up.gradient": "topk0.2", "down.activation": "bf16"}
    assert not WirePlan.parse(None) and not WirePlan.parse({})


@pytest.mark.parametrize("wire,error,match", [
    ({"sideways.activation": "int8"}, ValueError, r"unknown key 'sideways.activation'; use <cut>.<kind>"),
    ({"up.activation": "zip"}, ValueError, r"wire\['up.activation'\]: unknown wire codec 'zip'; choose one of"),
    ({"up.gradient": {"name": "topk", "fraction": 2}}, ValueError, r"TopK\(fraction=2\)"),
    ({"up.gradient": {"name": "topk", "k": 3}}, ValueError, r"bad options \{'k': 3\} for wire codec 'topk'"),
    ({"up.gradient": {"fraction": 0.1}}, TypeError, r"a mapping with 'name'"),
    ({"up.gradient": {"name": "int8-block", "block_size": 0}}, ValueError, r"Int8\(block_size=0\)"),
    (["int8"], TypeError, r"give a mapping such as"),
])
def test_bad_wire_options_fail_in_the_strategy_constructor(wire, error, match):
    """SplitPipelineStrategy(wire=...) rejects bad keys, names and options before any process starts."""
    with pytest.raises(error, match=match):
        SplitPipelineStrategy(wire=wire)


def test_wire_option_from_yaml():
    """The strategy's wire option parses from YAML (dotted keys, nested mappings) as LightningCLI reads it."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(SplitPipelineStrategy, "strategy")
    cfg = parser.parse_string("strategy:\n  chunks: 4\n  wire:\n    up.activation: int8\n"
                              "    down.gradient: {name: topk, fraction: 0.05}\n")
    strategy = parser.instantiate_classes(cfg).strategy
    assert strategy.wire.describe() == {"up.activation": "int8", "down.gradient": "topk0.05"}


def test_make_wire_codec_names():
    """Each registered name builds its codec."""
    assert [repr(make_wire_codec(n)) for n in ("fp16", "bf16", "int8", "int8-channel", "int8-block", "topk")] == \
        ["fp16", "bf16", "int8", "int8", "int8-block64", "topk0.1"]


def test_analytic_rate_of_poweriter_3_7_with_and_without_a_wire_codec():
    """Poweriter(3,7) at 224/batch 64 is 0.101 in every flow-total; fp16 on top halves it; chunks do not change it."""
    up, down = PowerIteration(rank=3), PowerIteration(rank=7)  # the report's row poweriter3_7
    shapes = (64, 32, 112, 112), (64, 1280, 7, 7)
    base = analytic_link_bytes(*shapes)
    for chunks in (1, 4, 8):
        rates = compress_rates(analytic_link_bytes(*shapes, chunks=chunks, up=up, down=down), base)
        assert abs(rates["total"] - 0.101) <= 0.005 and rates["up.activation"] == rates["up.gradient"]
    half = analytic_link_bytes(*shapes, up=up, down=down,
                               wire={f"{c}.{k}": "fp16" for c in ("up", "down") for k in ("activation", "gradient")})
    assert half["total"] * 2 == analytic_link_bytes(*shapes, up=up, down=down)["total"]
    assert analytic_link_bytes(*shapes, train=False)["up.gradient"] == 0


def test_link_bytes_sums_a_meter_per_flow_cut_and_total(one_rank_group):
    """link_bytes() groups a meter's transfers by flow, by cut and in total, counting one role."""
    meter = LinkMeter(timed=False)
    meter.record([dist.P2POp(dist.isend, torch.ones(10), 0)], cut="up", kind="activation", role="sent", microbatch=0)
    meter.record([dist.P2POp(dist.irecv, torch.ones(5), 0)], cut="up", kind="gradient", role="received", microbatch=0)
    meter.record([dist.P2POp(dist.isend, torch.ones(2), 0)], cut="down", kind="gradient", role="sent", microbatch=0)
    counted = link_bytes(meter)
    assert counted["up.activation"] == 40 and counted["up"] == 40 and counted["down"] == 8 and counted["total"] == 48
    assert link_bytes(meter, role="received")["up.gradient"] == 20
