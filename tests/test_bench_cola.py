"""``experiments.bench_cola --seeds``: the summary over seeds from the per-run files, paired against unsplit."""

from __future__ import annotations

import json

import pytest

from experiments import bench_cola


def write(out, variant, seed, mccs):
    epochs = [{"epoch": e, "val/mcc": m, "train_s": 1.0, "val_s": 1.0} for e, m in enumerate(mccs)]
    bench_cola.result_file(out, variant, seed).write_text(json.dumps({"epochs": epochs}))


def test_summary_pairs_the_variants_by_seed(tmp_path):
    """Final MCC per seed, mean ± std, the paired difference to unsplit with its interval; best MCC beside it.
    A seed that one variant lacks is left out of every variant (the comparison stays paired)."""
    for seed, base in zip((0, 1, 2), (0.40, 0.44, 0.42)):
        write(tmp_path, "unsplit", seed, [0.30, base])
        write(tmp_path, "split_poweriter16", seed, [base + 0.05, base - 0.01])
    write(tmp_path, "unsplit", 3, [0.1, 0.5])  # no split_poweriter16 for seed 3
    result = bench_cola.summary(tmp_path, ["unsplit", "split_poweriter16"], [0, 1, 2, 3])
    assert result["paired_seeds"] == [0, 1, 2]
    power = result["variants"]["split_poweriter16"]
    assert power["final_mcc"]["per_seed"] == pytest.approx({"0": 39.0, "1": 43.0, "2": 41.0})
    assert power["final_mcc"]["mean"] == pytest.approx(41.0) and power["final_mcc"]["std"] == pytest.approx(2.0)
    d = power["final_mcc"]["difference"]
    assert d["mean"] == pytest.approx(-1.0) and d["high"] - d["low"] == pytest.approx(0.0, abs=1e-9)
    assert power["best_mcc"]["mean"] == pytest.approx(47.0)
    markdown = bench_cola.summary_markdown(result)
    assert "| split_poweriter16 | 3 | 41.00 ± 2.00 | -1.00 [-1.00, -1.00] | 47.00 ± 2.00 |" in markdown


def test_a_single_seed_list_is_refused(capsys):
    """--seeds with one seed asks for an interval it cannot give: the error names the value and the fix."""
    with pytest.raises(SystemExit):
        bench_cola.main(["--seeds", "2"])
    assert "--seeds '2': one seed gives no standard deviation" in capsys.readouterr().err
