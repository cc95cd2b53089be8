"""A two-rank run through the experiments' CLI writes every callback key to the CSV log and the offline W&B run."""

from __future__ import annotations

import csv
import json
import math

import pytest

from tests.fixtures.wandb_records import read_offline_run
from tests.twoproc import REPO, run_fit_script

# Step keys of the two monitors (each also logged with _epoch and summarised with _run) and BestMetric's keys.
TRAFFIC = ["link/up_activation_bytes_per_chunk", "link/up_gradient_bytes_per_chunk",
           "link/down_activation_bytes_per_chunk", "link/down_gradient_bytes_per_chunk", "link/bytes_per_batch",
           "link/compress_rate", "link/bandwidth_avg_MBps", "link/bandwidth_peak_client_MBps",
           "link/bandwidth_peak_server_MBps"]
TIMING = ["time/batch_s", "time/compute_client_s", "time/compute_server_s", "time/compute_s",
          "time/pipeline_client_s", "time/wait_client_s", "time/wait_server_s", "time/outside_client_s",
          "time/bound_ratio", "time/bubble"]
BEST = ["val/acc_best", "val/acc_best_epoch", "val/acc_best_step", "val/acc_final"]
LINK = {"rate_mbit": 100, "peer": "10.0.0.2"}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """One two-rank fit of the tiny CNN (chunks 2, batch 8, 2 epochs of 4 batches), default loggers, offline W&B."""
    root = tmp_path_factory.mktemp("runs")
    result = run_fit_script(REPO / "tests" / "scripts" / "metrics_fit.py",
                            ["fit", "--trainer.default_root_dir", str(root)], timeout=240,
                            env={"SPLITLIT_LINK_JSON": json.dumps(LINK), "WANDB_API_KEY": ""})
    assert result.returncode == 0, result.output[-6000:]
    runs = [p for p in root.iterdir() if p.is_dir()]
    assert len(runs) == 1, runs
    return runs[0]


@pytest.mark.slow
def test_csv_has_every_key_with_exact_bytes(run_dir):
    """metrics.csv holds every step and epoch key; bytes per chunk are the cut tensors' sizes exactly."""
    with open(run_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    columns = set(rows[0])
    expected = {k + s for k in TRAFFIC + TIMING for s in ("", "_epoch")} | set(BEST)
    assert expected <= columns, sorted(expected - columns)
    step = next(r for r in rows if r["link/bytes_per_batch"])
    # micro-batch of 4 images: up cut [4, 8, 8, 8] float32, down cut [4, 16, 2, 2] float32, both ways
    assert float(step["link/up_activation_bytes_per_chunk"]) == 4 * 8 * 8 * 8 * 4
    assert float(step["link/up_gradient_bytes_per_chunk"]) == 4 * 8 * 8 * 8 * 4
    assert float(step["link/down_activation_bytes_per_chunk"]) == 4 * 16 * 2 * 2 * 4
    assert float(step["link/bytes_per_batch"]) == 2 * 2 * (8192 + 1024)
    assert float(step["link/compress_rate"]) == 1.0
    timing = next(r for r in rows if r["time/batch_s"])
    assert 0 < float(timing["time/compute_s"]) < float(timing["time/batch_s"])
    assert 0 <= float(timing["time/bubble"]) <= 1


@pytest.mark.slow
def test_run_folder_has_summary_and_run_config(run_dir):
    """summary.json holds the _run figures and the best metric; run.json the split, chunks, codec and link."""
    summary = json.loads((run_dir / "summary.json").read_text())
    assert {k + "_run" for k in TRAFFIC + TIMING} | set(BEST) <= set(summary)
    assert summary["val/acc_best_epoch"] in (0, 1)
    run = json.loads((run_dir / "run.json").read_text())
    assert (run["chunks"], run["order"], run["codec"], run["link"]) == (2, "1f1b", "none", LINK)
    assert run["split"]["head"] == "Conv2d" and run["split"]["server_params"] == 8 * 16 * 9 + 16 + 16 * 16 * 9 + 16
    assert run["model"]["lr"] == 0.05 and run["data"]["batch_size"] == 8


@pytest.mark.slow
def test_offline_wandb_run_holds_config_history_and_summary(run_dir):
    """Without an API key the W&B run is offline, grouped and tagged, with the config, the keys and the summary."""
    files = list(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 1, list(run_dir.rglob("*"))
    run = read_offline_run(files[0])
    assert run.group == "splitlit_metrics_fit"
    assert run.tags == ["codec=none", "chunks=2", "preset=splitlit_metrics_fit"]
    assert (run.config["chunks"], run.config["order"], run.config["link"]) == (2, "1f1b", LINK)
    assert run.config["trainer"]["strategy"]["init_args"]["chunks"] == 2
    logged = set().union(*run.history)
    assert {k + s for k in TRAFFIC + TIMING for s in ("", "_epoch")} | set(BEST) <= logged
    assert {k + "_run" for k in TRAFFIC + TIMING} | set(BEST) <= set(run.summary)
    assert not math.isnan(run.summary["link/bandwidth_avg_MBps_run"])
