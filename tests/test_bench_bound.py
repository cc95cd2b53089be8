"""``experiments.bench_bound``: each run is the preset's own command, its summary is read, and the table is the
median over repeats with the goal checked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from experiments.bench_bound import FIGURES, command, markdown, read_run, rows


def _run(preset: str, order: str, ratio: float, batch_s: float = 1.0) -> dict:
    return {"preset": preset, "order": order, "chunks": 4, "batch_s": batch_s, "compute_client_s": 0.2,
            "compute_server_s": batch_s / ratio, "outside_client_s": 0.05, "bound_ratio": ratio}


def test_rows_take_the_median_over_repeats_and_check_the_goal():
    runs = [_run("cola_small", "1f1b", r, b) for r, b in ((1.20, 0.97), (1.17, 0.91), (1.21, 0.98))]
    runs += [_run("cola_small", "zb", r) for r in (1.05, 1.02, 1.12)]
    one, zb = rows(runs)
    assert (one["order"], one["n"], one["bound_ratio"], one["batch_s"]) == ("1f1b", 3, 1.20, 0.97)
    assert (one["ratio_min"], one["ratio_max"], one["met"]) == (1.17, 1.21, False)
    assert (zb["bound_ratio"], zb["met"]) == (1.05, True)  # a repeat above 1.10 does not fail the median
    text = markdown([one, zb])
    assert "| cola_small | zb | 4 | 3 | 1.000 | 0.200 | 0.952 | 0.050 | 1.050 [1.020, 1.120] | yes |" in text
    assert "- cola_small: lowest time / bound 1.050 (zb, chunks 4); within 1.10x: zb c4." in text


def test_each_run_is_the_presets_own_command(tmp_path):
    cola = command("cola_small", "zb", 4, 30, tmp_path)
    assert cola[1:4] == ["-m", "experiments.cola_roberta", "fit"] and cola[5].endswith("configs/cola_small.yaml")
    for flag, value in (("--trainer.strategy.init_args.order", "zb"), ("--trainer.limit_train_batches", "30"),
                        ("--trainer.strategy.init_args.chunks", "4"), ("--trainer.limit_val_batches", "0")):
        assert cola[cola.index(flag) + 1] == value
    assert command("cifar10_small", "1f1b", 8, 30, tmp_path)[2] == "experiments.cifar10_mobilenet"
    with pytest.raises(ValueError, match="'mnist_small' is neither a cola_\\* nor a cifar10_\\* preset"):
        command("mnist_small", "zb", 4, 30, tmp_path)
    with pytest.raises(ValueError, match="no preset 'cola_tiny'"):
        command("cola_tiny", "zb", 4, 30, tmp_path)


def test_a_runs_figures_come_from_its_summary(tmp_path):
    run = tmp_path / "cola_small-none-c4-e1-x"
    run.mkdir()
    summary = {f"time/{f}_run": 0.5 + i for i, f in enumerate(FIGURES)} | {"val/mcc_best": 0.1}
    (run / "summary.json").write_text(json.dumps(summary))
    assert read_run(tmp_path) == {f: 0.5 + i for i, f in enumerate(FIGURES)}
    (run / "summary.json").write_text(json.dumps({"time/batch_s_run": 1.0}))  # an unsplit run has only batch_s
    with pytest.raises(RuntimeError, match="lacks.*was the run split"):
        read_run(tmp_path)
    with pytest.raises(RuntimeError, match="expected one summary.json"):
        read_run(tmp_path / "nothing")


def test_merge_rebuilds_the_table_from_several_sittings(tmp_path, capsys):
    from experiments.bench_bound import main

    first, second = tmp_path / "a.json", tmp_path / "b.json"
    first.write_text(json.dumps([_run("cola_small", "zb", 1.02), _run("cifar10_small", "gpipe", 1.05)]))
    second.write_text(json.dumps([_run("cola_small", "zb", 1.08)]))
    main(["--merge", str(first), str(second), "--out", str(tmp_path / "out")])
    table = (tmp_path / "out" / "results.md").read_text()
    assert "| cola_small | zb | 4 | 2 |" in table and "1.050 [1.020, 1.080] | yes |" in table
    assert "| cifar10_small | gpipe | 4 | 1 |" in table and table in capsys.readouterr().out
    assert len(json.loads((tmp_path / "out" / "runs.json").read_text())) == 3
    with pytest.raises(SystemExit):
        main(["--merge", str(tmp_path / "nope.json"), "--out", str(tmp_path / "out")])
    assert "nope.json: no such file" in capsys.readouterr().err


def test_each_run_is_kept_as_it_ends_and_a_second_sitting_replaces_its_folders(tmp_path, monkeypatch, capsys):
    """runs.json is written after every run (a stopped benchmark keeps its runs); rerun into the same --out, each
    setting's folder is replaced instead of holding two summaries."""
    from experiments import bench_bound

    seen = []

    def fake_run(cmd, env, stdout, stderr):  # one run: a summary.json where the preset's CLI would write it
        root = Path(cmd[cmd.index("--trainer.default_root_dir") + 1])
        (root / "run-name").mkdir()
        ratio = 1.0 + 0.01 * len(seen)
        (root / "run-name" / "summary.json").write_text(json.dumps({f"time/{f}_run": ratio for f in FIGURES}))
        seen.append(json.loads((tmp_path / "runs.json").read_text()) if (tmp_path / "runs.json").exists() else [])
        return 0

    monkeypatch.setattr(bench_bound.subprocess, "call", fake_run)
    args = ["--presets", "cola_small", "--orders", "1f1b", "zb", "--repeats", "1", "--out", str(tmp_path)]
    bench_bound.main(args)
    assert [len(runs) for runs in seen] == [0, 1]  # the first run was on disk before the second started
    bench_bound.main(args)  # the same folders again
    runs = json.loads((tmp_path / "runs.json").read_text())
    assert [(r["order"], r["bound_ratio"]) for r in runs] == [("1f1b", 1.02), ("zb", 1.03)]
    assert "| cola_small | zb | 4 | 1 |" in capsys.readouterr().out
