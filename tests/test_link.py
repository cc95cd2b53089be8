"""``splitlit.link``: the settings, the delay line's model (fake clock), the shaped link and the delay line
themselves, their cleanup, and training over them, also when things fail.

The slow tests need root, iproute2 and /dev/net/tun (as in CI); each is bounded in time (a subprocess with a
timeout, or ``pytest.mark.timeout``) and removes the namespaces it made, even when it fails.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import re
import signal
import statistics
import struct
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import pytest

from experiments.cli import link_summary
from splitlit.link import (
    LINK_ENV,
    LinkError,
    LinkSpec,
    ShapedLink,
    netns,
    parse_delay,
    parse_rate,
    probe,
    with_trainer_args,
)
from splitlit.link.__main__ import main as link_main
from splitlit.link.delay import DelayQueue
from splitlit.link.delayline import wire_size
from splitlit.link.star import StarLink
from splitlit.link.units import parse_percent, parse_size, per_client
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


def test_delays_losses_and_limits_parse_as_netem_users_write_them():
    """--delay takes us, ms or s (a list: one per client link), --loss a percentage, --limit bytes in tc's units."""
    assert parse_delay("20ms") == pytest.approx(0.02) and parse_delay("500us") == pytest.approx(5e-4)
    assert parse_delay(None) == 0.0 and parse_delay("0") == 0.0
    assert per_client("5ms,80ms", 2, "--delay") == ["5ms", "80ms"] and per_client("5ms", 3, "--delay") == ["5ms"] * 3
    assert parse_percent("0.1%") == pytest.approx(0.001) and parse_percent(None) == 0.0
    assert parse_size("64kb") == 65536 and parse_size("100000") == 100000 and parse_size(None) is None


@pytest.mark.parametrize("args, message", [
    (["--delay", "-5ms"], r"--delay '-5ms' is negative: a delay is 0 or more, e\.g\. 25ms"),
    (["--delay", "25"], r"--delay '25' has no unit: write 25ms"),
    (["--delay", "20 parsecs"], r"--delay '20 parsecs': unknown unit 'parsecs'; use us, ms or s"),
    (["--loss", "150%"], r"--loss '150%' is outside \[0, 100%\): give e\.g\. 0\.1%"),
    (["--loss", "0.01"], r"--loss '0\.01': write it as a percentage with %, e\.g\. 0\.01%"),
    (["--delay", "25ms", "--jitter", "30ms"], r"--jitter 30ms is larger than --delay 25ms: .* at most the delay"),
    (["--delay", "5ms,80ms"], r"--delay '5ms,80ms' gives 2 values for 1 client link: .*exactly one per client"),
    (["--limit", "10kbit"], r"--limit '10kbit': unknown unit 'kbit'; give bytes with b, kb or mb"),
    (["--bandwidth", "10mbps"], r"--bandwidth '10mbps': .* refused here to avoid an 8x mistake"),
    (["--up", "5mbit"], r"give --bandwidth \(both directions\), or both --up and --down"),
    (["--sysctl", "foo"], r"--sysctl 'foo': give KEY=VALUE, e\.g\. net\.ipv4\.tcp_slow_start_after_idle=0"),
])
def test_bad_link_settings_name_the_value_and_the_fix(args, message, capsys):
    """Each bad setting exits 2 before anything is made, naming the option, the value and how to write it."""
    if "--bandwidth" not in args and "--up" not in args:
        args = ["--bandwidth", "10mbit", *args]
    assert link_main([*args, "--", "true"]) == 2
    assert re.search(message, capsys.readouterr().err)


def test_without_dev_net_tun_the_delay_line_says_what_to_do(monkeypatch):
    """The delay line needs /dev/net/tun: its absence is named with the two usual fixes."""
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(netns.shutil, "which", lambda tool: f"/sbin/{tool}")
    monkeypatch.setattr(netns.os.path, "exists", lambda path: path != "/dev/net/tun")
    netns.check_requirements()  # tbf does not need it
    with pytest.raises(LinkError, match=r"needs /dev/net/tun.*modprobe tun.*--device /dev/net/tun"):
        netns.check_requirements(tun=True)


def test_delay_jitter_or_loss_choose_the_delay_line_and_the_queue_defaults_to_the_bdp():
    """auto: tbf for a rate alone, the delay line with a delay, jitter or loss; queue = max(BDP, 50 ms) per way."""
    assert LinkSpec(bandwidth_bps=10**7).mode == "tbf"
    spec = LinkSpec(up_bps=5 * 10**6, down_bps=10**8, delay_s=0.025, loss=0.001)
    assert spec.mode == "delayline" and LinkSpec(bandwidth_bps=10**7, loss=0.01).mode == "delayline"
    assert spec.limit("up") == 5 * 10**6 // 8 * 0.05 and spec.limit("down") == 10**8 // 8 * 0.05  # BDP = 50 ms
    assert LinkSpec(bandwidth_bps=10**7, delay_s=0.1).limit("up") == 250_000  # 200 ms round trip
    settings = spec.describe()
    assert (settings["bandwidth"], settings["delay_ms"], settings["loss_pct"], settings["emulator"]) == (
        "5mbit up, 100mbit down", 25.0, 0.1, "delayline")
    assert LinkSpec(bandwidth_bps=10**7, sysctls=(("net.ipv4.tcp_slow_start_after_idle", "0"),)).describe()[
        "sysctls"] == {"net.ipv4.tcp_slow_start_after_idle": "0"}
    with pytest.raises(LinkError, match="--emulator tbf shapes the rate only"):
        LinkSpec(bandwidth_bps=10**7, delay_s=0.01, emulator="tbf")
    with pytest.raises(LinkError, match=r"--limit 1000 bytes is less than one packet \(--mtu 1500\)"):
        LinkSpec(bandwidth_bps=10**7, delay_s=0.01, limit_bytes=1000)


# -- fast: the delay line's model, on a fake clock -------------------------------------------------------------------
def test_a_packet_arrives_after_its_serialisation_plus_the_delay_and_waits_for_the_one_ahead():
    """8 Mbit/s is 1 byte/us: 1000-byte packets sent together leave 1 ms apart and arrive delay_s after that."""
    line = DelayQueue(rate_bps=8e6, delay_s=0.010, overhead=0)
    assert all(line.push(bytes(1000), now=0.0) for _ in range(3))
    assert line.next_due() == pytest.approx(0.011)
    assert line.pop_due(0.0109) == [] and len(line.pop_due(0.0111)) == 1
    assert len(line.pop_due(0.0131)) == 2 and line.next_due() is None
    line.push(bytes(1000), now=1.0)  # an idle line: no wait
    assert line.next_due() == pytest.approx(1.011)


def test_the_queue_limit_drops_at_the_tail_and_counts_only_what_waits_to_be_sent():
    """A full buffer drops the newcomer; packets already sent (in flight for the delay) do not fill it."""
    line = DelayQueue(rate_bps=8e6, delay_s=0.5, limit_bytes=2500, overhead=0)
    assert [line.push(bytes(1000), now=0.0) for _ in range(3)] == [True, True, False]
    assert line.backlog(0.0) == 2000 and line.stats.dropped == 1
    assert line.push(bytes(1000), now=0.0011)  # the first has left: 1000 + 1000 fit in 2500
    assert line.backlog(0.0031) == 0 and len(line) == 3  # all sent, all still in flight
    assert line.push(bytes(1000), now=0.0031) and line.push(bytes(1000), now=0.0031)


def test_jitter_spreads_spaced_packets_uniformly_and_never_reorders_a_burst():
    """Packets 20 ms apart see delay +- jitter uniformly; a burst keeps its order (arrivals never decrease)."""
    rng = random.Random(1)
    line = DelayQueue(rate_bps=1e9, delay_s=0.010, jitter_s=0.005, overhead=0, rng=rng)
    delays = []
    for i in range(2000):
        line.push(bytes(100), now=0.02 * i)
        delays.append(line.next_due() - 0.02 * i)
        line.pop_due(0.02 * i + 0.016)
    assert 0.005 <= min(delays) and max(delays) <= 0.0151
    assert statistics.mean(delays) == pytest.approx(0.010, abs=3e-4)
    assert statistics.pstdev(delays) == pytest.approx(0.005 / 3**0.5, rel=0.08)  # uniform: half-width / sqrt(3)
    burst = DelayQueue(rate_bps=1e8, delay_s=0.010, jitter_s=0.005, rng=rng)
    for i in range(1000):
        burst.push(i.to_bytes(4, "big") + bytes(96), now=1e-4 * i)
    arrivals = [t for t, _ in burst._in_flight]
    assert arrivals == sorted(arrivals) and all(t - 1e-4 * i >= 0.005 for i, t in enumerate(arrivals))
    assert [int.from_bytes(p[:4], "big") for p in burst.pop_due(10.0)] == list(range(1000))


def test_a_super_packet_takes_the_time_of_its_segments_on_the_wire():
    """A GSO super-packet of 10 segments (1448 bytes of payload + 52 of IP/TCP headers each) is 10 x 1500 bytes of
    IP plus 10 Ethernet headers on the wire: at 8 Mbit/s (1 byte/us) 15.14 ms, and the next packet waits for it."""
    line = DelayQueue(rate_bps=8e6, delay_s=0.010)
    assert line.push(bytes(14_532), now=0.0, size=15_000, segments=10)
    assert line.next_due() == pytest.approx(0.01514 + 0.010)
    assert line.push(bytes(100), now=0.0) and line.backlog(0.0) == 15_100
    assert [len(p) for p in line.pop_due(0.02514 + 0.000114 + 1e-9)] == [14_532, 100]
    assert (line.stats.packets, line.stats.segments, line.stats.bytes) == (2, 11, 15_100)


@pytest.mark.parametrize("version", [4, 6])
def test_a_super_packet_read_from_the_tun_device_counts_every_segment_and_its_headers(version):
    """``wire_size`` reads the virtio_net_hdr's gso_size and the IP and TCP header lengths: 9 full segments and a
    partial one of 1000 bytes, each with its own copy of the headers; a packet without GSO is itself."""
    ip = bytes([0x45]) + bytes(19) if version == 4 else bytes([0x60]) + bytes(39)
    tcp = bytes(12) + bytes([8 << 4]) + bytes(19)  # data offset 8: 32 bytes with options (timestamps)
    payload = bytes(9 * 1448 + 1000)
    gso = struct.pack("<BBHHHH", 1, 1 if version == 4 else 4, len(ip) + 32, 1448, len(ip), 16)
    headers = len(ip) + len(tcp)
    assert wire_size(gso + ip + tcp + payload) == (len(payload) + 10 * headers, 10)
    plain = struct.pack("<BBHHHH", 0, 0, 0, 0, 0, 0) + ip + tcp + bytes(100)
    assert wire_size(plain) == (headers + 100, 1)


def test_random_loss_drops_the_fraction_asked_for():
    """20,000 packets at 5% loss: the lost fraction within 4 binomial standard deviations (+-0.0062)."""
    line = DelayQueue(rate_bps=1e9, loss=0.05, rng=random.Random(7))
    kept = sum(line.push(bytes(100), now=1e-5 * i) for i in range(20_000))
    assert line.stats.lost == 20_000 - kept
    assert abs(line.stats.lost / 20_000 - 0.05) < 4 * (0.05 * 0.95 / 20_000) ** 0.5


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
    """The run config names the rate, the qdisc, the addresses, and that latency is not emulated (tbf)."""
    settings = LinkSpec(bandwidth_bps=10**8).describe()
    assert settings["bandwidth"] == "100mbit" and settings["rate_mbit"] == 100.0 and settings["qdisc"] == "tbf"
    assert settings["latency"].startswith("not emulated")
    assert (settings["client_addr"], settings["server_addr"]) == ("10.77.0.1", "10.77.0.2")


def test_the_run_summary_holds_each_client_links_settings_and_probe():
    """With many clients the run's summary.json names each client's link (delay, rate, probed round trip), so the
    straggler's link is read beside the figures; a two-host link keeps its unprefixed keys."""
    star = StarLink([LinkSpec(bandwidth_bps=10**8, delay_s=0.005), LinkSpec(bandwidth_bps=10**7, delay_s=0.08)])
    star.probed = [{"rtt_ms": 10.4, "up_mbit": 95.1}, {"rtt_ms": 160.9, "up_mbit": 9.5}]
    summary = link_summary(star.describe())
    assert (summary["emulated_link/client0/delay_ms"], summary["emulated_link/client1/delay_ms"]) == (5, 80)
    assert (summary["emulated_link/client1/up_mbit"], summary["emulated_link/client1/probe_rtt_ms"]) == (10, 160.9)
    assert summary["emulated_link/client0/probe_up_mbit"] == 95.1
    assert not any(key.count("/") == 1 for key in summary), summary  # no top-level value stands for every client
    two_host = link_summary({**LinkSpec(bandwidth_bps=10**7, delay_s=0.025).describe(), "probe_rtt_ms": 50.9})
    assert (two_host["emulated_link/delay_ms"], two_host["emulated_link/probe_rtt_ms"]) == (25, 50.9)


def test_probe_measures_a_stalled_direction_again_and_keeps_the_best(monkeypatch):
    """A stream under 90% of the nominal rate is repeated (up to ``tries``); one at the rate ends the tries."""
    measured = {("client", "server"): [11.0, 19.1, 5.0], ("server", "client"): [12.4, 8.0, 15.5]}
    calls = []

    def stream(link, sender, receiver, nbytes, seconds):
        calls.append((sender, receiver, nbytes))
        return measured[(sender, receiver)].pop(0)

    monkeypatch.setattr(probe, "stream_rate", stream)
    monkeypatch.setattr(probe, "ping", lambda link, count: {"rtt_ms": 50.2})
    shaped = ShapedLink(LinkSpec(bandwidth_bps=20 * 10**6))  # nothing is made before ``with``
    assert shaped.probe(seconds=0.5) == {"up_mbit": 19.1, "down_mbit": 15.5, "up_bytes": 1_250_000,
                                         "down_bytes": 1_250_000, "rtt_ms": 50.2}
    assert calls == [("client", "server", 1_250_000)] * 2 + [("server", "client", 1_250_000)] * 3
    assert shaped.describe()["probe_down_mbit"] == 15.5 and shaped.describe()["probe_rtt_ms"] == 50.2
    with pytest.raises(ValueError, match=r"probe\(tries=0\): give at least 1 try"):
        shaped.probe(tries=0)


def test_the_bound_of_a_batch_is_the_busiest_stage_plus_fill_plus_four_delays():
    """chunks 1: every stage in turn; many chunks: the busiest stage; both plus four one-way delays."""
    from experiments.bench_link import WIRE_PER_PAYLOAD, batch_bound, parse_delay_list

    stages = dict(client_s=1.0, server_s=2.0, up_bytes=1e6 / WIRE_PER_PAYLOAD, down_bytes=5e5 / WIRE_PER_PAYLOAD,
                  up_bps=8e6, down_bps=8e6, delay_s=0.025)  # links: 1 s up, 0.5 s down
    assert batch_bound(**stages, chunks=1) == pytest.approx(1 + 2 + 1 + 0.5 + 0.1)
    assert batch_bound(**stages, chunks=10) == pytest.approx(2 + 2.5 / 10 + 0.1)
    assert parse_delay_list("0,10,25,50ms") == [0, 10, 25, 50]


def test_the_delay_table_has_a_row_per_order_and_the_runs_of_each(tmp_path):
    """``--orders``: a run's name ends in its order (none for 1f1b); the delay table pairs each with its bound."""
    from experiments.bench_link import _delay_markdown, delay_rows

    for name, batch_s in (("10mbit_25ms-none-c8", 3.0), ("10mbit_25ms-none-c8-zb", 2.5)):
        run = tmp_path / "10mbit_25ms" / name
        run.mkdir(parents=True)
        (run / "summary.json").write_text(json.dumps({
            "time/batch_s_run": batch_s, "time/compute_client_s_run": 0.5, "time/compute_server_s_run": 1.0,
            "link/up_activation_bytes_per_chunk_run": 1e5, "link/down_gradient_bytes_per_chunk_run": 1e4,
            "link/up_gradient_bytes_per_chunk_run": 1e5, "link/down_activation_bytes_per_chunk_run": 1e4}))
        (run / "run.json").write_text(json.dumps({"link": {"up_mbit": 10, "down_mbit": 10, "probe_rtt_ms": 50.4}}))
    rows = delay_rows(tmp_path, [("10mbit", "10mbit_25ms", 25.0)], ["none"], [8], ["1f1b", "gpipe", "zb"])
    assert [(r["order"], r["time_per_batch_s"]) for r in rows] == [("1f1b", 3.0), ("zb", 2.5)]  # gpipe: no run
    assert rows[0]["bound_s"] == rows[1]["bound_s"] and rows[1]["ratio"] == pytest.approx(2.5 / rows[1]["bound_s"])
    assert "| 10mbit | 25 | 50.4 | none | zb | 8 | 2.500 |" in _delay_markdown(rows)


def test_every_row_of_the_timing_table_has_its_bound_and_the_pipelined_one_a_goal(tmp_path):
    """Without delays too, each run's time per batch is printed beside its bound (from its own computation, bytes
    and link rate), and the largest chunk count without a codec is checked against 1.10x of it."""
    from experiments.bench_link import batch_bound, check_goals, run_bound

    rows = []
    for chunks, batch_s in ((1, 17.0), (8, 11.0)):
        run = tmp_path / f"10mbit-none-c{chunks}"
        run.mkdir()
        per_chunk = 9.7e6 / chunks
        (run / "summary.json").write_text(json.dumps({
            "time/batch_s_run": batch_s, "time/compute_client_s_run": 0.2, "time/compute_server_s_run": 0.5,
            "link/up_activation_bytes_per_chunk_run": per_chunk, "link/down_activation_bytes_per_chunk_run": 0,
            "link/up_gradient_bytes_per_chunk_run": per_chunk, "link/down_gradient_bytes_per_chunk_run": 0}))
        (run / "run.json").write_text(json.dumps({"link": {"up_mbit": 10, "down_mbit": 10}}))
        rows.append({"run": run.name, "codec": "none", "order": "1f1b", "chunks": chunks,
                     "time_per_batch_s": batch_s, "bytes_per_batch": 1.94e7, **run_bound(run, chunks)})
    expected = batch_bound(client_s=0.2, server_s=0.5, up_bytes=9.7e6, down_bytes=9.7e6, up_bps=1e7, down_bps=1e7,
                           delay_s=0.0, chunks=8)
    assert rows[1]["bound_s"] == pytest.approx(expected) and rows[1]["ratio"] == pytest.approx(11.0 / expected)
    goals = check_goals({"10mbit": pd.DataFrame(rows)}, {})
    (bound_goal,) = [g for g in goals if "its bound" in g["goal"]]
    assert bound_goal["goal"] == "10mbit: none chunks 8 time per batch / its bound"
    assert bound_goal["value"] == pytest.approx(11.0 / expected) and bound_goal["met"] is False  # 1.19 > 1.10


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


@contextmanager
def _forked_launcher(args: list[str], log: Path):
    """``python -m splitlit.link ARGS`` run by a fork of this process (no second start of Python, torch and
    Lightning: seconds per test), its output in ``log``; killed, and whatever it left removed, after the block."""
    proc = multiprocessing.get_context("fork").Process(target=_launch, args=(args, str(log)))
    proc.start()
    try:
        yield proc
    finally:
        if proc.is_alive():
            os.kill(proc.pid, signal.SIGKILL)
            proc.join(30)
        for name in _namespaces(proc.pid):
            netns.remove_netns(name)


def _launch(args: list[str], log: str) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout = sys.stderr = open(1, "w", buffering=1, closefd=False)
    os.chdir(REPO)
    os.environ.update(PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", WANDB_MODE="offline",
                      WANDB_SILENT="true")
    for key in ("NODE_RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", LINK_ENV):
        os.environ.pop(key, None)
    code = link_main(args)
    sys.stdout.flush()
    os._exit(code)


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
@pytest.mark.timeout(60)
def test_netem_is_used_where_the_kernel_has_it_and_its_absence_is_explained():
    """--emulator netem works where the kernel has sch_netem; where not (this one) it fails clearly, leaving nothing."""
    try:
        with ShapedLink(LinkSpec(bandwidth_bps=10**7, delay_s=0.005, emulator="netem")) as shaped:
            made = list(shaped.netns.values())
    except LinkError as err:
        assert "--emulator netem needs tc's netem qdisc" in str(err) and "leave --emulator out" in str(err)
    else:
        assert not set(made) & set(_namespaces())
    assert not _namespaces(os.getpid())


# -- slow: the delay line ----------------------------------------------------------------------------------------
PAYLOAD = 1448 / 1514  # TCP payload per Ethernet frame at MTU 1500 (timestamps on): what the probe's streams carry


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_delay_line_round_trip_and_asymmetric_rates():
    """10 Mbit/s up, 100 Mbit/s down, 25 ms each way: round trip within 10% + 1 ms of 50 ms, each one-way delay within
    10% + 0.5 ms of 25 ms (3 ms), and each direction's TCP rate within 10% of its rate's payload.

    Each stream carries 1.5 s at its rate (1.9 MB up, 19 MB down) and is timed over its second half: slow start
    from 10 segments needs ~3 round trips (150 ms) to fill 10 Mbit/s x 50 ms, ~5 (250 ms) to fill 100 Mbit/s.
    """
    spec = LinkSpec(up_bps=10**7, down_bps=10**8, delay_s=0.025, seed=0)
    try:
        with ShapedLink(spec) as shaped:
            probed = shaped.probe(seconds=1.5)
        report = shaped.delayline_report
    finally:
        for name in _namespaces(os.getpid()):
            netns.remove_netns(name)
    assert abs(probed["rtt_ms"] - 50) <= 0.1 * 50 + 1, probed
    assert abs(probed["up_delay_ms"] - 25) <= 3 and abs(probed["down_delay_ms"] - 25) <= 3, probed
    assert abs(probed["up_mbit"] / (10 * PAYLOAD) - 1) <= 0.10, probed
    assert abs(probed["down_mbit"] / (100 * PAYLOAD) - 1) <= 0.10, probed
    assert report["links"][0]["up"]["lost"] == 0 and report["cpu_s"] > 0, report


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_delay_line_loses_the_fraction_asked_for_never_reorders_and_spreads_delays():
    """10% loss, 10 ms +- 5 ms: of 2,000 datagrams (one every 0.2 ms) the lost fraction is within 4 binomial
    standard deviations of 10% (+-2.7 points); none overtakes another; 150 datagrams 12 ms apart (more than twice
    the jitter: none is held back by the one ahead) are never early, and their delays spread as a uniform one over
    [5, 15] ms does: median 10 ms, 10th percentile under 7.5 ms (uniform: 6), 90th over 12.5 ms (uniform: 14).
    The upper bounds allow 1.5 ms of lateness: the delay line is a process a busy host may schedule late."""
    spec = LinkSpec(bandwidth_bps=10**8, delay_s=0.010, jitter_s=0.005, loss=0.10, seed=1)
    try:
        with ShapedLink(spec) as shaped:
            burst = probe.datagrams(shaped, "client", "server", 2000, interval=2e-4)
            spaced = probe.datagrams(shaped, "server", "client", 150, interval=0.012)
    finally:
        for name in _namespaces(os.getpid()):
            netns.remove_netns(name)
    lost = 1 - len(burst) / 2000
    assert abs(lost - 0.10) <= 4 * (0.1 * 0.9 / 2000) ** 0.5, lost
    order = [seq for seq, _ in burst]
    assert order == sorted(order), "a datagram overtook another"
    delays = sorted(d for _, d in spaced)
    assert [seq for seq, _ in spaced] == sorted(seq for seq, _ in spaced)
    tenth, median, ninetieth = (delays[int(q * (len(delays) - 1))] for q in (0.1, 0.5, 0.9))
    assert delays[0] >= 0.0049 and abs(median - 0.010) <= 0.0015, delays  # never early; late by scheduling only
    assert tenth <= 0.0075 and 0.0125 <= ninetieth <= 0.0165, delays  # uniform: 6 ms and 14 ms


@pytest.mark.slow
def test_a_killed_launcher_leaves_nothing_behind(tmp_path):
    """kill -9 of the launcher: the ranks and the delay line die with it, and the delay line removes the namespaces."""
    with _forked_launcher(["--bandwidth", "10mbit", "--delay", "10ms", "--probe-seconds", "0", "--",
                           "sleep", "60"], tmp_path / "log") as proc:
        deadline = time.monotonic() + 60
        children: list[str] = []
        while len(children) < 3 and time.monotonic() < deadline:  # the delay line and the two ranks
            children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
            time.sleep(0.2)
        assert len(children) == 3, "the delay line and both ranks never started"
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(30)
        deadline = time.monotonic() + 60  # seconds on a loaded host; an idle one needs about one
        while (_namespaces(proc.pid) or any(Path(f"/proc/{c}").exists() for c in children)) and \
                time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _namespaces(proc.pid), "the namespaces were left behind"
        assert not [c for c in children if Path(f"/proc/{c}").exists()], "a rank or the delay line survived"


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
    assert settings["probe_rtt_ms"] < 5  # tbf: the veth's round trip
    summary = json.loads((run / "summary.json").read_text())  # the measured link beside the run's figures
    assert summary["emulated_link/probe_up_mbit"] == settings["probe_up_mbit"]
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


@pytest.mark.slow
def test_training_over_a_25ms_link_reaches_the_weights_of_unsplit_training(tmp_path):
    """Delay changes time, never results: two ranks over 100 Mbit/s with 25 ms each way end with the weights a
    single process gets from the same seed and data (the same operations in the same order; the tolerance covers
    only float summation order, which the split does not change here)."""
    import lightning as L
    import torch
    import torch.nn.functional as F

    from tests.scripts.link_wide import Wide

    save, log = tmp_path / "w", tmp_path / "log"
    with _forked_launcher(["--bandwidth", "100mbit", "--delay", "25ms", "--probe-seconds", "0", "--",
                           sys.executable, "tests/scripts/link_wide.py", "--save", str(save)], log) as proc:
        proc.join(240)
        output = log.read_text()
        assert proc.exitcode == 0, output[-4000:]
    assert "25 ms one way (delay line)" in output and "delay line: " in output
    split = {**torch.load(f"{save}.rank0.pt"), **torch.load(f"{save}.rank1.pt")}

    L.seed_everything(0, verbose=False)  # as link_wide.main: seed, data, then the model
    x = torch.randn(16, 6)
    model = Wide()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for xb in x.split(8):
        opt.zero_grad()
        F.cross_entropy(model(xb), (xb[:, 0] > 0).long()).backward()
        opt.step()
    reference = model.state_dict()
    assert split.keys() == reference.keys()
    for key, value in reference.items():
        torch.testing.assert_close(split[key], value, rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.slow
def test_many_clients_each_on_a_link_of_its_own_rate(tmp_path):
    """--clients 2 --bandwidth 200mbit,20mbit: each client's link carries its own rate (the straggler), the job
    runs on three hosts (two clients and the server) and SplitFed trains over them."""
    stats = tmp_path / "stats.json"
    with _link_command(["--clients", "2", "--bandwidth", "200mbit,20mbit", "--probe-seconds", "0.3",
                        "--stats", str(stats), "--no-trainer-args", "--", sys.executable,
                        "tests/scripts/clients_toy.py", "--out", str(tmp_path / "out"), "--clients", "2",
                        "--paradigm", "splitfed", "--hosts", "--epochs", "1"]) as proc:
        result = _finish(proc, 240)
        assert not _namespaces(proc.pid)
    assert result.returncode == 0, result.output[-4000:]
    record = json.loads(stats.read_text())
    fast, slow = record["probe"]
    assert 150 < fast["up_mbit"] < 205 and 150 < fast["down_mbit"] < 205, fast
    assert 15 < slow["up_mbit"] < 20.5 and 15 < slow["down_mbit"] < 20.5, slow
    assert all(record["counters"][c]["tx_bytes"] > 10_000 for c in ("client0", "client1")), record["counters"]
    assert sorted(p.name for p in (tmp_path / "out").glob("rank*.pt")) == ["rank0.pt", "rank1.pt", "rank2.pt"]


@pytest.mark.slow
def test_many_clients_each_on_a_link_of_its_own_delay(tmp_path):
    """--clients 2 --delay 5ms,30ms: one delay line serves both client links; each client's probed round trip is
    within 10% (+1 ms) of twice its own delay, and the run record and each rank's SPLITLIT_LINK_JSON carry each
    client's link (its delay, the probe's round trip) and the delay line's counters per link."""
    stats = tmp_path / "stats.json"
    show = 'test "$NODE_RANK" != 0 || echo "$SPLITLIT_LINK_JSON"'
    with _link_command(["--clients", "2", "--bandwidth", "20mbit", "--delay", "5ms,30ms", "--probe-seconds", "0.2",
                        "--seed", "0", "--stats", str(stats), "--", "sh", "-c", show]) as proc:
        result = _finish(proc, 60)
        assert not _namespaces(proc.pid)
    assert result.returncode == 0, result.output[-4000:]
    record = json.loads(stats.read_text())
    for delay_ms, probed, settings in zip((5, 30), record["probe"], record["link"]["clients"]):
        assert abs(probed["rtt_ms"] - 2 * delay_ms) <= 0.1 * 2 * delay_ms + 1, record["probe"]
        assert (settings["delay_ms"], settings["emulator"], settings["probe_rtt_ms"]) == (
            delay_ms, "delayline", probed["rtt_ms"])
    assert [link["up"]["packets"] > 100 for link in record["delayline"]["links"]] == [True, True], record["delayline"]
    seen = json.loads(next(line for line in result.output.splitlines() if line.startswith("[client0] {"))[10:])
    assert [c["delay_ms"] for c in seen["clients"]] == [5, 30] and seen["clients"][1]["probe_rtt_ms"] > 50
    assert re.search(r"client 1 probe: .*round trip 6\d\.\d ms", result.output), result.output[-4000:]


@pytest.mark.parametrize("args, message", [
    (["--bandwidth", "10mbit,20mbit"], (r"--bandwidth '10mbit,20mbit' gives 2 values for 3 client links: give one "
                                       r"value for every client, or exactly one per client \(3, as --clients 3\)")),
    (["--bandwidth", "10mbit", "--delay", "5ms,80ms"], r"--delay '5ms,80ms' gives 2 values for 3 client links"),
    (["--bandwidth", "10mbit", "--delay", "5ms,-80ms,5ms"],
     r"client 1's link: --delay '-80ms' is negative: a delay is 0 or more, e\.g\. 25ms"),
    (["--bandwidth", "10mbit", "--delay", "5ms,5ms,5ms", "--jitter", "1ms,9ms,1ms"],
     r"client 1's link: --jitter 9ms is larger than --delay 5ms"),
])
def test_many_client_values_are_one_or_one_per_client(args, message, capsys):
    """A list whose length is neither 1 nor --clients, or a bad value in it, is refused before anything is made,
    naming the option, the value (and the client) and the fix."""
    assert link_main(["--clients", "3", *args, "--", "true"]) == 2
    assert re.search(message, capsys.readouterr().err)
