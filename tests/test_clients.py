"""Many clients, one server (splitlit.clients): the plan, the averaging, and whole jobs against references."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from splitlit import SplitPipelineStrategy
from splitlit.clients import BodySlots, services
from tests.twoproc import REPO, run_fit_script

SCRIPT = REPO / "tests" / "scripts" / "clients_toy.py"


def test_services_round_robin_over_clients_with_batches_left():
    """The server serves one step per client per round, skipping clients whose shard is used up."""
    assert services([2, 3, 1]) == [0, 1, 2, 0, 1, 1]
    assert services([1]) == [0]
    assert services([0, 2]) == [1, 1]
    assert services([2, 3, 1], "epoch") == [0, 0, 1, 1, 1, 2]  # sequential's turn="epoch"


def test_body_slots_swap_and_average():
    """SplitFed v1 keeps one body per client behind the same Parameters, and a round's end averages them."""
    body = nn.Linear(2, 1, bias=False)
    opt = torch.optim.SGD(body.parameters(), lr=1.0, momentum=0.9)
    slots = BodySlots(dict(body.named_parameters()), [opt], clients=2)
    start = body.weight.detach().clone()
    for client, grad in ((0, 1.0), (1, 3.0)):
        slots.use(client)
        body.weight.grad = torch.full_like(body.weight, grad)
        opt.step()
    slots.use(0)
    assert torch.allclose(body.weight, start - 1.0)  # client 0's body saw only client 0's step
    assert torch.allclose(opt.state[body.weight]["momentum_buffer"], torch.ones(1, 2))  # and its own momentum
    slots.average([1, 3])
    assert torch.allclose(body.weight, start - (1.0 * 1 + 3.0 * 3) / 4)
    slots.use(1)
    assert torch.allclose(body.weight, start - (1.0 * 1 + 3.0 * 3) / 4)


@pytest.mark.parametrize("kwargs, match", [
    ({"clients": 0}, r"clients=0.*positive integer"),
    ({"clients": 2, "paradigm": "fedsgd"}, r"paradigm='fedsgd'.*sequential"),
    ({"clients": 2, "paradigm": "splitfed", "turn": "epoch"}, r"turn='epoch'.*for paradigm='sequential'"),
])
def test_bad_arguments_name_the_value(kwargs, match):
    """Unknown paradigms and client counts fail at construction, naming the value and the choices."""
    with pytest.raises(ValueError, match=match):
        SplitPipelineStrategy(**kwargs)


def _fit(tmp_path, name: str, *args: str, timeout: float = 240) -> dict:
    out = tmp_path / name
    result = run_fit_script(SCRIPT, ["--out", str(out), *args], timeout=timeout)
    assert result.returncode == 0, result.output[-6000:]
    return {p.stem.removeprefix("rank"): torch.load(p) for p in out.glob("rank*.pt")}


def _max_diff(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("turn", ["batch", "epoch"])
def test_sequential_equals_unsplit_in_turn_order(tmp_path, turn):
    """Sequential split learning with 2 clients == the unsplit module trained on their batches in turn order."""
    split = _fit(tmp_path, "split", "--clients", "2", "--paradigm", "sequential", "--epochs", "2", "--turn", turn)
    ref = _fit(tmp_path, "ref", "--clients", "2", "--reference", "--epochs", "2", "--turn", turn)["reference"]["state"]
    for rank in ("0", "1", "2"):  # every client ends with the last turn's head and tail; the server's body
        assert _max_diff(split[rank]["state"], ref) < 1e-5, rank
    server = dict(split["2"]["ledger"])
    assert "client part (sequential)" not in server and "initial client part" not in server
    assert set(server) <= {"decision", "decision (size)", "server weights", "server weights (size)", "loader length",
                           "header", "stage metadata"}, server


@pytest.mark.slow
def test_splitfed_of_identical_clients_equals_one_client(tmp_path):
    """SplitFed v1 with two clients on identical shards == the two-rank split of one client (FedAvg of equals)."""
    many = _fit(tmp_path, "many", "--clients", "2", "--paradigm", "splitfed", "--identical", "--epochs", "1")
    one = _fit(tmp_path, "one", "--clients", "1", "--identical", "--epochs", "1")
    whole = {**one["0"]["state"], **one["1"]["state"]}
    for rank in ("0", "1", "2"):
        assert _max_diff(many[rank]["state"], whole) < 1e-6, rank


@pytest.mark.slow
@pytest.mark.parametrize("paradigm", ["splitfed2"])  # v1's weighted body average: test_body_slots_swap_and_average
def test_uneven_shards_end_rounds_with_one_client_model(tmp_path, paradigm):
    """With shards of 1, 2 and 3 batches every client ends each round with the same averaged head and tail."""
    runs = _fit(tmp_path, paradigm, "--clients", "3", "--paradigm", paradigm, "--uneven")
    assert _max_diff(runs["0"]["state"], runs["1"]["state"]) == 0.0
    assert _max_diff(runs["0"]["state"], runs["2"]["state"]) == 0.0
    clients = {what for rank in ("0", "1", "2") for what, _ in runs[rank]["ledger"]}
    assert "client part (sequential)" not in clients  # SplitFed averages; nothing is handed client to client
    assert not {what for what, _ in runs["3"]["ledger"]} & {"initial client part"}


@pytest.mark.slow
def test_a_dead_client_stops_the_job_and_is_named(tmp_path):
    """Client 1 dies mid-round: the job ends (no hang) and the server's error names that client."""
    result = run_fit_script(SCRIPT, ["--out", str(tmp_path), "--clients", "3", "--paradigm", "splitfed",
                                     "--kill-rank", "1", "--kill-step", "2", "--timeout", "45"], timeout=200)
    assert result.returncode != 0
    assert "The client (rank 1) stopped answering" in result.output, result.output[-4000:]


@pytest.mark.slow
def test_a_stopped_job_resumes_every_client_and_body_exactly(tmp_path):
    """SplitFed v1 on uneven shards: one round, checkpoint, resume to two == two rounds straight (each client's part
    and the server's bodies come back from the clients' files)."""
    common = ["--clients", "2", "--paradigm", "splitfed", "--uneven"]
    straight = _fit(tmp_path, "straight", *common, "--epochs", "2")
    _fit(tmp_path, "first", *common, "--epochs", "1", "--ckpt", str(tmp_path / "ckpt"))
    assert sorted(p.name for p in (tmp_path / "ckpt" / "client1").glob("*.ckpt")) == ["epoch=0-step=1.ckpt",
                                                                                    "last.ckpt"]
    resumed = _fit(tmp_path, "resumed", *common, "--epochs", "2", "--ckpt", str(tmp_path / "ckpt"), "--resume")
    for rank in ("0", "1", "2"):
        assert _max_diff(resumed[rank]["state"], straight[rank]["state"]) == 0.0, rank
