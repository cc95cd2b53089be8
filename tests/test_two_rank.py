"""Two-rank integration tests of SplitPipelineStrategy: each runs real processes with a timeout."""

from __future__ import annotations

import copy
import json
import re
import time
from functools import lru_cache
from pathlib import Path

import pandas as pd
import pytest
import torch

from splitlit.batchnorm import commit_deferred, convert_deferred
from tests.scripts import toy
from tests.twoproc import REPO, SHARED_DATA, free_port, run_fit_script, run_two_hosts

pytestmark = pytest.mark.slow
TOY = REPO / "tests" / "scripts" / "toy.py"


@lru_cache
def _reference(tmp_root: str, extra: tuple[str, ...]) -> dict:
    """The same module trained on one process with Lightning's default strategy."""
    return toy.main(["--out", f"{tmp_root}/ref{hash(extra)}", "--unsplit", *extra])


def _max_diff(a: dict, b: dict) -> float:
    return max((a[k] - v).abs().max().item() for k, v in b.items())


@pytest.mark.parametrize("orders, extra", [
    (("1f1b", "zb"), ("--chunks", "1")),
    (("gpipe", "zb"), ("--chunks", "4", "--steps", "2", "--accumulate", "2", "--clip", "0.05")),
    (("1f1b", "zb"), ("--chunks", "8", "--steps", "2", "--accumulate", "2", "--clip", "0.05")),
    (("1f1b", "zb"), ("--chunks", "8", "--warmup", "4")),  # a deeper warm-up (a far link's): the same weights
])
def test_pipeline_is_transparent(tmp_path, orders, extra):
    """Loss, every gradient, the weights after training and the validation logits equal the unsplit run's, in
    every order (one pair of processes trains once per order)."""
    result = run_fit_script(TOY, ["--out", str(tmp_path / "split"), "--order", ",".join(orders), *extra], timeout=240)
    assert result.returncode == 0, result.output
    ref = _reference(str(tmp_path), tuple(extra[2:]))  # the reference has no chunks and no order
    ref_logits = torch.load(next(tmp_path.glob("ref*/val_logits.pt")))
    for order in orders:
        client, server = (torch.load(tmp_path / "split" / order / f"rank{r}.pt") for r in (0, 1))
        # float32 sums over micro-batches in another order than over the batch: ~1e-8, well inside 1e-5
        assert abs(client["loss"] - ref["loss"]) <= 1e-5, order
        assert abs(client["logged"]["train/loss"] - ref["logged"]["train/loss"]) <= 1e-5  # what the user sees
        assert set(client["grads"]) == {"head.0.weight", "head.0.bias", "tail.weight", "tail.bias"}
        assert set(server["grads"]) == {"body.0.weight", "body.0.bias", "body.2.weight", "body.2.bias"}
        for part in (client, server):
            assert _max_diff(ref["grads"], part["grads"]) <= 1e-5, order
            assert _max_diff(ref["state"], part["state"]) <= 1e-5, order
        logits = torch.load(tmp_path / "split" / order / "val_logits.pt")
        assert logits.shape == (37, 3)  # 37 = 4 full batches of 8 and a short one of 5, all scored
        assert (logits - ref_logits).abs().max() <= 1e-5, order


def test_bf16_mixed_trains_on_cpu(tmp_path):
    """precision='bf16-mixed' runs split on CPU and matches the unsplit bf16 run to bf16 precision."""
    extra = ("--precision", "bf16-mixed", "--steps", "2")
    result = run_fit_script(TOY, ["--out", str(tmp_path / "split"), *extra], timeout=180)
    assert result.returncode == 0, result.output
    ref = _reference(str(tmp_path), extra)
    client, server = (torch.load(tmp_path / "split" / f"rank{r}.pt") for r in (0, 1))
    # bf16 keeps ~3 significant digits; micro-batches round differently from the whole batch
    assert abs(float(client["loss"]) - float(ref["loss"])) <= 1e-2
    for part in (client, server):
        assert _max_diff(ref["state"], part["state"]) <= 1e-3


@pytest.mark.parametrize("args, message", [
    (["--devices", "1"], r"runs on clients \+ 1 = 2 processes .* got world size 1\. Use Trainer\(devices=2\)"),
    (["--batch-size", "6", "--chunks", "4"], "training batch size 6 is not a multiple of chunks=4"),
    (["--broken"], r"The split does not compose: the server .* failed on inputs of shapes \[\(8, 12\)\]"),
    (["--no-split-hook"], "Toy has no configure_split"),
])
def test_bad_setups_fail_clearly(tmp_path, args, message):
    """Wrong world size, a batch the chunks do not divide, parts that do not compose, no split hook."""
    result = run_fit_script(TOY, ["--out", str(tmp_path), "--timeout", "20", *args], timeout=120)
    assert result.returncode != 0
    assert re.search(message, result.output), result.output[-3000:]


@pytest.mark.parametrize("dead, survivor, peer", [(1, 0, "server"), (0, 1, "client")])
def test_a_dead_peer_stops_the_other_rank(tmp_path, dead, survivor, peer):
    """When one rank dies mid-epoch the other exits non-zero within the timeout, saying what happened."""
    cmd = [str(TOY), "--out", str(tmp_path), "--two-hosts", "--steps", "8", "--timeout", "15",
           "--kill-rank", str(dead), "--kill-step", "3"]
    start = time.monotonic()
    results = run_two_hosts(cmd, cmd, timeout=150)
    assert time.monotonic() - start < 90
    assert results[dead].returncode == 3  # the crash we caused
    assert results[survivor].returncode != 0
    assert f"The {peer} (rank {dead}) stopped answering" in results[survivor].output, results[survivor].output[-3000:]
    assert "resume from the last checkpoint" in results[survivor].output
    # What there is to resume from: the client knows (none in this run); the server says where to look.
    advice = "No checkpoint has been written in this run" if survivor == 0 else "The client holds the checkpoints"
    assert advice in results[survivor].output


def test_ranks_given_different_orders_stop_at_the_first_header(tmp_path):
    """Two hosts started with different pipeline orders (or warm-ups) would lower different action lists and
    misroute tensors: the server compares the client's order and warm-up in the step header and says so."""
    cmd = [str(TOY), "--out", str(tmp_path), "--two-hosts", "--steps", "2", "--timeout", "15", "--chunks", "4"]
    client, server = run_two_hosts(cmd + ["--order", "1f1b"], cmd + ["--order", "zb", "--warmup", "3"], timeout=150)
    assert server.returncode != 0 and client.returncode != 0
    assert ("the client order='1f1b', warmup=2; this server order='zb', warmup=3. Give both ranks the same "
            "--trainer.strategy.init_args.order") in server.output, server.output[-3000:]


def test_a_genuine_error_in_a_stage_is_reported_as_itself(tmp_path):
    """A bug in the server's body surfaces there as that exception, naming the stage and rank, not as a lost
    peer; the client, whose peer did die, says so."""
    cmd = [str(TOY), "--out", str(tmp_path), "--two-hosts", "--steps", "4", "--timeout", "15", "--fail-call", "3"]
    client, server = run_two_hosts(cmd, cmd, timeout=150)
    assert server.returncode != 0 and client.returncode != 0
    assert "ValueError: a bug in the body (raised on purpose)" in server.output, server.output[-3000:]
    assert "raised by the body (pipeline stage 1) in its forward" in server.output
    assert "on rank 1" in server.output
    assert "PeerLostError" not in server.output
    assert "The server (rank 1) stopped answering" in client.output


def _cifar_args(root: Path, probe: Path, data_dir: Path = SHARED_DATA / "cifar10") -> list[str]:
    return ["-m", "experiments.cifar10_mobilenet", "fit", "--config", "experiments/configs/cifar10_small.yaml",
            "--model.pretrained", str(SHARED_DATA / "weights" / "mobilenet_v2-b0353104.pth"),
            "--data.data_dir", str(data_dir), "--data.image_size", "32", "--data.batch_size", "16",
            "--data.train_subset", "64", "--data.val_subset", "70", "--trainer.max_epochs", "1",
            "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false",
            "--trainer.callbacks+=tests.probes.StateProbe", f"--trainer.callbacks.out_dir={probe}"]


def test_mobilenet_two_hosts_checkpoint_and_resume(tmp_path):
    """Real CIFAR-10 on two 'hosts': the server never reads data; the checkpoint loads unsplit; resume is exact."""
    from experiments.cifar10_mobilenet import CIFAR10DataModule, MobileNetV2Classifier

    client_cmd = _cifar_args(tmp_path / "run", tmp_path / "probe1") + ["--trainer.num_nodes", "2",
                                                                       "--trainer.devices", "1"]
    # The server is pointed at a folder that does not exist: it must never need the data.
    server_cmd = _cifar_args(tmp_path / "run", tmp_path / "probe1", tmp_path / "no-such-data") + [
        "--trainer.num_nodes", "2", "--trainer.devices", "1"]
    client, server = run_two_hosts(client_cmd, server_cmd, timeout=300)
    assert client.returncode == 0, client.output[-4000:]
    assert server.returncode == 0, server.output[-4000:]

    # What reached the server: cut activations and gradients only, never images or labels.
    seen = json.loads((tmp_path / "probe1" / "rank1_transfers.json").read_text())
    kinds = {(t["cut"], t["kind"], t["role"], tuple(t["shape"][1:]), t["dtype"]) for t in seen}
    assert kinds == {("up", "activation", "received", (32, 16, 16), "float32"),
                     ("up", "gradient", "sent", (32, 16, 16), "float32"),
                     ("down", "activation", "sent", (1280, 1, 1), "float32"),
                     ("down", "gradient", "received", (1280, 1, 1), "float32")}
    assert {t["shape"][0] for t in seen} <= {4, 2, 1}  # micro-batches of 16/4, and 6/3 for the short val batch

    # One checkpoint file with the whole model: loads strictly into the unsplit module and scores the same.
    ckpt = next((tmp_path / "run").rglob("*.ckpt"))
    model = MobileNetV2Classifier.load_from_checkpoint(ckpt, map_location="cpu", strict=True).eval()
    data = CIFAR10DataModule(data_dir=str(SHARED_DATA / "cifar10"), image_size=32, batch_size=16, val_subset=70)
    data.setup("validate")
    correct = sum((model(x).argmax(1) == y).sum().item() for x, y in data.val_dataloader())
    metrics = pd.read_csv(next((tmp_path / "run").rglob("metrics.csv")))
    assert correct / 70 == pytest.approx(metrics["val/acc"].dropna().iloc[-1], abs=1e-6)

    # Resume on two hosts with --ckpt_path last: only the client finds and reads the file (the server's folder
    # is empty, as on another machine) and tells the server to resume; each rank starts from the checkpoint.
    ckpt = next((tmp_path / "run").rglob("last.ckpt"))
    run_name = ckpt.parent.parent.name
    resume = ["--ckpt_path", "last", "--trainer.max_epochs", "2", "--run.name", run_name]
    client_cmd = _cifar_args(tmp_path / "run", tmp_path / "probe2") + resume + ["--trainer.num_nodes", "2",
                                                                                 "--trainer.devices", "1"]
    server_cmd = _cifar_args(tmp_path / "elsewhere", tmp_path / "probe2", tmp_path / "no-such-data") + resume + [
        "--trainer.num_nodes", "2", "--trainer.devices", "1"]
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]  # before the resume rewrites it
    client, server = run_two_hosts(client_cmd, server_cmd, timeout=300)
    assert client.returncode == 0, client.output[-4000:]
    assert server.returncode == 0, server.output[-4000:]
    for rank in (0, 1):
        start = torch.load(tmp_path / "probe2" / f"rank{rank}_start.pt")
        assert start and all(torch.equal(v, state[k]) for k, v in start.items())
    # The resumed run's metrics.csv keeps the rows of the first epoch (Lightning's CSVLogger would delete them)
    resumed = pd.read_csv(ckpt.parent.parent / "metrics.csv")
    assert list(resumed["val/acc"].dropna().index.map(resumed["epoch"].get)) == [0, 1]
    assert resumed["val/acc"].dropna().iloc[0] == pytest.approx(metrics["val/acc"].dropna().iloc[-1])


def test_torchrun_launch_trains_the_same(tmp_path):
    """Under `torchrun --nproc-per-node 2` the split run matches the unsplit reference too."""
    args = ["-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()), str(TOY),
            "--out", str(tmp_path / "split"), "--chunks", "2", "--steps", "2"]
    result = run_fit_script(args[0], args[1:], timeout=180)
    assert result.returncode == 0, result.output[-3000:]
    ref = _reference(str(tmp_path), ("--steps", "2"))
    for rank in (0, 1):
        assert _max_diff(ref["state"], torch.load(tmp_path / "split" / f"rank{rank}.pt")["state"]) <= 1e-5


DROPOUT_DRAWS = REPO / "tests" / "scripts" / "dropout_draws.py"


def test_each_rank_draws_its_dropout_from_its_own_stream(tmp_path):
    """In a seeded run the server's dropout never draws from a random state the client also draws from (both ranks
    start from the run's seed; left alike, the body's masks would repeat the head's draws), and no state repeats
    within a rank across micro-batches and steps. The one repeat on each rank is torch's shape inference at the
    first step, which runs each stage once under a forked stream (so it draws nothing from the run's): the first
    real forward then starts from the same state."""
    result = run_fit_script(DROPOUT_DRAWS, ["--out", str(tmp_path)], timeout=120)
    assert result.returncode == 0, result.output
    client, server = (json.loads((tmp_path / f"draws.rank{r}.json").read_text()) for r in (0, 1))
    assert client["start"] != server["start"]  # seeded alike, both ranks would start the fit in the same state
    client, server = client["draws"], server["draws"]
    micro_batches = 6 * 2  # 6 batches of 8 in 2 chunks; the head's dropout on the client, the body's on the server
    for draws in (client, server):
        assert len(draws) == micro_batches + 1 and draws[0] == draws[1]  # shape inference, then micro-batch 0
        assert len(set(draws)) == micro_batches
    assert not set(client) & set(server)


RESUME_TOY = REPO / "tests" / "scripts" / "resume_toy.py"


def test_resume_mid_epoch_equals_the_uninterrupted_run(tmp_path):
    """Resumed from a checkpoint mid-epoch (with a batch fetched ahead) or at an epoch's end, the run ends with the
    uninterrupted run's weights on both ranks, exactly: shuffled data, dropout on both ranks, momentum and an LR
    schedule included."""
    full = run_fit_script(RESUME_TOY, ["--out", str(tmp_path / "full")], timeout=180)
    assert full.returncode == 0, full.output
    for step in (6, 12):  # mid-epoch (12 batches an epoch), then an epoch's end
        out = tmp_path / f"from{step}"
        ckpt = tmp_path / "full" / "ckpt" / f"epoch=0-step={step}.ckpt"
        resumed = run_fit_script(RESUME_TOY, ["--out", str(out), "--ckpt-path", str(ckpt)], timeout=180)
        assert resumed.returncode == 0, resumed.output
        for rank in (0, 1):
            a, b = (torch.load(d / f"final.rank{rank}.pt") for d in (tmp_path / "full", out))
            assert a["global_step"] == b["global_step"] == 24 and a["lr"] == b["lr"]
            for name, value in a["state"].items():
                torch.testing.assert_close(b["state"][name], value, rtol=0, atol=1e-6, msg=f"{step}: {name}")


def test_a_checkpoint_of_another_model_stops_both_ranks_clearly(tmp_path):
    """The client names the file and the missing tensors; the server stops too instead of waiting for its share."""
    other = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"encoder.weight": torch.zeros(2)}, "epoch": 0, "global_step": 0,
                "pytorch-lightning_version": "2.6.0"}, other)
    result = run_fit_script(RESUME_TOY, ["--out", str(tmp_path), "--ckpt-path", str(other)], timeout=120)
    assert result.returncode != 0
    assert re.search(r"KeyError: .*other.ckpt lacks \d+ of the server's tensors.*written for another model",
                     result.output), result.output[-3000:]
    assert "[rank1]: RuntimeError: the client could not resume from its checkpoint" in result.output


def test_deferred_batchnorm_keeps_the_running_statistics_of_the_whole_batch(tmp_path):
    """With ``deferred_batchnorm``, chunks 4, one step: the head's (client) and the body's (server) running
    statistics are one update from the whole batch, as the same model run on the four micro-batches in one process
    with every BatchNorm deferred gives; the head's, whose input is the data, equal plain BatchNorm's on the whole
    batch. Neither has folded in torch's shape-inference run (the body's runs on uninitialised memory)."""
    extra = ["--batchnorm", "--steps", "1", "--batch-size", "16"]
    result = run_fit_script(TOY, ["--out", str(tmp_path / "split"), "--chunks", "4", "--deferred-bn", *extra],
                            timeout=240)
    assert result.returncode == 0, result.output
    client, server = (torch.load(tmp_path / "split" / f"rank{r}.pt")["state"] for r in (0, 1))
    torch.manual_seed(0)
    model = toy.Toy(batchnorm=True)
    x, _ = next(iter(toy.data(16)[0]))
    plain = copy.deepcopy(model.head).train()
    plain(x)  # plain BatchNorm on the whole batch
    assert convert_deferred(model) == 2
    model.train()
    for mb in x.chunk(4):
        model(mb)
    assert commit_deferred(model) == 2
    ref = model.state_dict()
    for part, layer in ((client, "head.2"), (server, "body.4")):
        assert int(part[f"{layer}.num_batches_tracked"]) == 1
        for stat in ("running_mean", "running_var"):
            torch.testing.assert_close(part[f"{layer}.{stat}"], ref[f"{layer}.{stat}"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(client["head.2.running_var"], plain[2].running_var, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(client["head.2.running_mean"], plain[2].running_mean, rtol=1e-5, atol=1e-6)
