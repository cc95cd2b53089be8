"""``splitlit.link``: the settings, the shaped link itself, its cleanup, and training over it when things fail.

The slow tests need root and iproute2 (as in CI); each runs the link command in a subprocess with a timeout and
removes the namespaces that command made, even when the test fails.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from splitlit.link import netns, probe
from splitlit.link import LINK_ENV, LinkError, LinkSpec, ShapedLink, parse_delay, parse_rate, with_trainer_args
from tests.twoproc import REPO, SHARED_DATA, Result

CIFAR_WEIGHTS = SHARED_DATA / "weights" / "mobilenet_v2-b0353104.pth"


# -- fast: settings and requirements ----------------------------------------------------------------------------
@pytest.mark.parametrize("text, bps", [("100mbit", 10**8), ("1gbit", 10**9), ("2.5Mbit", 2_500_000),
                                       ("500kbit", 500_000)])
def test_rates_use_tc_units(text, bps):
    """Rates are read in tc's decimal bit units."""
    assert parse_rate(text) == bps


@pytest.mark.parametrize("text", ["100mbps", "100", "fast", "1bit"])
def test_bad_rates_are_refused(text):
    """Byte units, missing units, nonsense and rates below 8 kbit/s are refused with the accepted form."""
    with pytest.raises(LinkError, match=r"--bandwidth .*(e\.g\. 100mbit|at least 8kbit)"):
        parse_rate(text)


def test_delays_parse_and_bad_ones_are_refused():
    """--delay takes us, ms or s; anything else says how to write it."""
    assert parse_delay("20ms") == pytest.approx(0.02)
    assert parse_delay(None) == 0.0
    with pytest.raises(LinkError, match="give a duration such as 20ms"):
        parse_delay("20 parsecs")


def test_without_root_the_error_says_so(monkeypatch):
    """A non-root user is told root (or the capabilities) is needed, and how to run it."""
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(LinkError, match=r"needs root .* running as uid 1000\. Run it with sudo"):
        netns.check_requirements()


def test_without_ip_or_tc_the_error_names_them(monkeypatch):
    """Missing iproute2 tools are named, with the package to install."""
    monkeypatch.setattr(netns.shutil, "which", lambda tool: None if tool == "tc" else "/sbin/ip")
    with pytest.raises(LinkError, match=r"not found on PATH: tc\. Install iproute2"):
        netns.check_requirements()


def test_lightning_cli_commands_become_two_node_commands():
    """A LightningCLI command gets num_nodes=2, devices=1; other commands and explicit settings are left alone."""
    cli = ["python", "-m", "experiments.cifar10_mobilenet", "fit", "--config", "x.yaml"]
    assert with_trainer_args(cli)[-4:] == ["--trainer.num_nodes", "2", "--trainer.devices", "1"]
    assert with_trainer_args(["python", "train.py"]) == ["python", "train.py"]
    explicit = [*cli, "--trainer.devices=1"]
    assert with_trainer_args(explicit) == explicit


def test_link_settings_describe_what_was_emulated():
    """The run config names the rate, the qdisc, the addresses, and that latency is not emulated."""
    settings = LinkSpec(bandwidth_bps=10**8).describe()
    assert settings["bandwidth"] == "100mbit" and settings["rate_mbit"] == 100.0 and settings["qdisc"] == "tbf"
    assert settings["latency"].startswith("not emulated")
    assert (settings["client_addr"], settings["server_addr"]) == ("10.77.0.1", "10.77.0.2")


def test_probe_measures_a_stalled_direction_again_and_keeps_the_best(monkeypatch):
    """A stream under 90% of the nominal rate is repeated (up to ``tries``); one at the rate ends the tries."""
    measured = {("client", "server"): [11.0, 19.1, 5.0], ("server", "client"): [12.4, 8.0, 15.5]}
    calls = []

    def stream(link, sender, receiver, nbytes, seconds):
        calls.append((sender, receiver, nbytes))
        return measured[(sender, receiver)].pop(0)

    monkeypatch.setattr(probe, "stream_rate", stream)
    shaped = ShapedLink(LinkSpec(bandwidth_bps=20 * 10**6))  # nothing is made before ``with``
    assert shaped.probe(seconds=0.5) == {"up_mbit": 19.1, "down_mbit": 15.5, "bytes": 1_250_000}
    assert calls == [("client", "server", 1_250_000)] * 2 + [("server", "client", 1_250_000)] * 3
    assert shaped.describe()["probe_down_mbit"] == 15.5
    with pytest.raises(ValueError, match=r"probe\(tries=0\): give at least 1 try"):
        shaped.probe(tries=0)


@pytest.mark.parametrize("order", ["1f1b", "gpipe", None])
def test_receives_are_posted_before_the_sends_they_would_queue_behind(order):
    """No receive follows a send directly, and the receives and the sends each keep their order (gloo matches so)."""
    from torch.distributed.pipelining.schedules import _add_send_recv, _ComputationType as C

    from splitlit.schedule import _receives_first, u_order

    lowered = _add_send_recv(u_order(order, 4), stage_to_rank={0: 0, 1: 1, 2: 0}.__getitem__, num_stages=3)
    for actions in lowered.values():
        moved = _receives_first(actions)
        kinds = [a.computation_type for a in moved]
        assert sorted(map(str, moved)) == sorted(map(str, actions))
        for comm in ((C.RECV_F, C.RECV_B), (C.SEND_F, C.SEND_B)):
            kept = [a for a in moved if a.computation_type in comm]
            assert kept == [a for a in actions if a.computation_type in comm]
        assert not any(k in (C.RECV_F, C.RECV_B) and p in (C.SEND_F, C.SEND_B) for p, k in zip(kinds, kinds[1:]))


# -- slow: the link itself ----------------------------------------------------------------------------------------
def _namespaces(owner: int | None = None) -> list[str]:
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout.split("\n")
    prefix = f"{netns.NS_PREFIX}{owner}-" if owner is not None else netns.NS_PREFIX
    return [n.split(" ")[0] for n in names if n.startswith(prefix)]


@contextmanager
def _link_command(args: list[str], *, env: dict[str, str] | None = None):
    """``python -m splitlit.link ARGS`` started in its own session; whatever it leaves behind is removed after."""
    full_env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1",
                    WANDB_MODE="offline", WANDB_SILENT="true", **(env or {}))
    for key in ("NODE_RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", LINK_ENV):
        full_env.pop(key, None)
    proc = subprocess.Popen([sys.executable, "-m", "splitlit.link", *args], cwd=REPO, env=full_env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
        for name in _namespaces(proc.pid):  # only if the command itself failed to clean up
            netns.remove_netns(name)


def _finish(proc: subprocess.Popen, timeout: float) -> Result:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        pytest.fail(f"splitlit.link did not finish in {timeout} s:\n{out[-4000:]}")
    return Result(proc.returncode, out)


@pytest.mark.slow
def test_link_is_shaped_and_removed_even_when_the_block_fails():
    """The probe measures about the rate asked for each way, and an exception inside the block still removes all.

    The probe keeps the best of up to 3 streams per direction, so one stalled stream does not fail this; the
    shaper caps every stream, so the upper bound holds for each.
    """
    spec = LinkSpec(bandwidth_bps=20 * 10**6)
    with pytest.raises(RuntimeError, match="boom"):
        with ShapedLink(spec) as shaped:
            made = list(shaped.netns.values())
            assert sorted(_namespaces(os.getpid())) == sorted(made)
            probed = shaped.probe(seconds=0.5)
            raise RuntimeError("boom")
    # TCP/IP headers take ~4.4% of 1500-byte frames: ~19.1 Mbit/s of payload at 20 Mbit/s.
    assert 17.0 < probed["up_mbit"] < 20.5 and 17.0 < probed["down_mbit"] < 20.5, probed
    assert not set(made) & set(_namespaces())


@pytest.mark.slow
def test_each_rank_runs_on_its_own_host_and_a_failure_is_passed_on(tmp_path):
    """Each rank sees the multi-host variables and its own interface; the job's exit code is the client's."""
    script = ('echo "$NODE_RANK $MASTER_ADDR $GLOO_SOCKET_IFNAME $WORLD_SIZE $LOCAL_RANK"; ip -o -4 addr show dev '
              '$GLOO_SOCKET_IFNAME; test "$NODE_RANK" = 1 || exit 3')
    stats = tmp_path / "stats.json"
    with _link_command(["--bandwidth", "50mbit", "--probe-seconds", "0.2", "--stats", str(stats), "--",
                        "sh", "-c", script]) as proc:
        result = _finish(proc, 60)
        assert not _namespaces(proc.pid)
    assert result.returncode == 3, result.output
    assert "[client] 0 10.77.0.1 sl-client 2 0" in result.output
    assert "[server] 1 10.77.0.1 sl-server 2 0" in result.output
    assert "inet 10.77.0.2/30" in result.output and "client exited 3, server exited 0" in result.output
    record = json.loads(stats.read_text())
    assert record["exit"] == {"client": 3, "server": 0} and record["link"]["bandwidth"] == "50mbit"
    assert record["link"]["probe_up_mbit"] > 30


@pytest.mark.slow
def test_sigterm_stops_both_ranks_and_removes_the_link():
    """SIGTERM to the link command stops both ranks and removes the namespaces (and so the veth and qdiscs)."""
    with _link_command(["--bandwidth", "10mbit", "--probe-seconds", "0", "--", "sleep", "120"]) as proc:
        deadline = time.monotonic() + 30
        pids: list[int] = []
        while len(pids) < 2 and time.monotonic() < deadline:
            pids = [int(p) for ns in _namespaces(proc.pid) for p in subprocess.run(
                ["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()]
            time.sleep(0.2)
        assert len(pids) == 2, "the two ranks never started"
        os.kill(proc.pid, signal.SIGTERM)
        result = _finish(proc, 60)
        assert result.returncode == 128 + signal.SIGTERM, result.output
        assert "interrupted by SIGTERM" in result.output
        assert not _namespaces(proc.pid)
        assert not [p for p in pids if Path(f"/proc/{p}").exists()], "a rank survived"


@pytest.mark.slow
def test_cleanup_removes_what_a_killed_run_left():
    """--cleanup removes the namespaces of a run whose process is gone, and only those."""
    gone = subprocess.Popen(["true"])
    gone.wait()
    stale = f"{netns.NS_PREFIX}{gone.pid}-0-client"
    subprocess.run(["ip", "netns", "add", stale], check=True)
    try:
        with _link_command(["--cleanup"]) as proc:
            result = _finish(proc, 60)
        assert result.returncode == 0 and stale in result.output, result.output
        assert stale not in _namespaces()
    finally:
        if stale in _namespaces():
            netns.remove_netns(stale)


@pytest.mark.slow
def test_delay_needs_netem_and_says_so():
    """--delay works where the kernel has netem; where it has not (this kernel) it fails clearly, leaving nothing."""
    with _link_command(["--bandwidth", "10mbit", "--delay", "5ms", "--probe-seconds", "0", "--", "true"]) as proc:
        result = _finish(proc, 60)
        assert not _namespaces(proc.pid)
    if result.returncode == 0:
        assert "client exited 0, server exited 0" in result.output
    else:
        assert result.returncode == 2
        assert "--delay needs tc's netem qdisc" in result.output and "Latency cannot be emulated" in result.output


# -- slow: training over the link ----------------------------------------------------------------------------------
def _cifar(root: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "experiments.cifar10_mobilenet", "fit",
            "--config", "experiments/configs/cifar10_small.yaml", "--model.pretrained", str(CIFAR_WEIGHTS),
            "--data.data_dir", str(SHARED_DATA / "cifar10"), "--data.image_size", "32", "--data.batch_size", "16",
            "--data.train_subset", "128", "--data.val_subset", "16", "--trainer.max_epochs", "1",
            "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false",
            "--trainer.num_sanity_val_steps", "0", "--trainer.strategy.init_args.timeout", "30",
            "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
            "--trainer.callbacks.every_n_train_steps=2", "--trainer.callbacks.save_last=true", *extra]


@pytest.mark.slow
def test_killed_server_then_resume_over_the_link(tmp_path):
    """Server killed mid-epoch: the client fails clearly within the timeout; fit(ckpt_path=last) then completes."""
    stamp = tmp_path / "killed_at"
    killed = _cifar(tmp_path / "runs", "--run.name", "killed", "--trainer.callbacks+=tests.scripts.link_kill.KillRank",
                    "--trainer.callbacks.rank=1", "--trainer.callbacks.step=5", f"--trainer.callbacks.stamp={stamp}")
    with _link_command(["--bandwidth", "100mbit", "--probe-seconds", "0.3", "--", *killed]) as proc:
        result = _finish(proc, 300)
        ended = time.time()
    assert result.returncode != 0, result.output[-4000:]
    assert "server exited -9" in result.output, result.output[-4000:]
    assert "[client] splitlit.pipeline.PeerLostError: The server (rank 1) stopped answering" in result.output, \
        result.output[-4000:]
    assert "resume from the last checkpoint" in result.output
    assert ended - float(stamp.read_text()) < 30  # the strategy's timeout; the client notices the closed link at once
    run = tmp_path / "runs" / "killed"
    settings = json.loads((run / "run.json").read_text())["link"]  # the run config W&B gets, beside metrics.csv
    assert settings["bandwidth"] == "100mbit" and 80 < settings["probe_up_mbit"] < 101
    last = run / "checkpoints" / "last.ckpt"
    assert last.is_file(), sorted(p.name for p in run.rglob("*"))

    resumed = _cifar(tmp_path / "runs", "--run.name", "resumed", "--ckpt_path", str(last))
    with _link_command(["--bandwidth", "100mbit", "--probe-seconds", "0", "--", *resumed]) as proc:
        result = _finish(proc, 300)
    assert result.returncode == 0, result.output[-4000:]
    assert "Restored all states from the checkpoint" in result.output
    import torch

    final = torch.load(tmp_path / "runs" / "resumed" / "checkpoints" / "last.ckpt", map_location="cpu",
                       weights_only=False)
    assert final["global_step"] == 8  # 128 images / 16: the whole epoch, steps 4-7 on the resumed run


@pytest.mark.slow
def test_a_link_too_slow_for_the_timeout_fails_clearly():
    """A step that cannot cross a 500 kbit/s link in 3 s fails with the timeout and how to raise it."""
    with _link_command(["--bandwidth", "500kbit", "--probe-seconds", "0.2", "--",
                        sys.executable, "tests/scripts/link_wide.py", "--timeout", "3"]) as proc:
        start = time.monotonic()
        result = _finish(proc, 240)
        elapsed = time.monotonic() - start
    assert result.returncode != 0, result.output[-4000:]
    assert "finished" not in result.output
    assert "took longer than the timeout of 3 s" in result.output, result.output[-4000:]
    assert "raise SplitPipelineStrategy(timeout=...)" in result.output
    assert elapsed < 120
