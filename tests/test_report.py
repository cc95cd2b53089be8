"""``experiments.report`` on fixture runs: the report's table, figures 6-9 and the epoch curves, as real PNGs."""

from __future__ import annotations

import dataclasses

import json
import struct

import pandas as pd
import pytest

from experiments import report
from tests.fixtures.report_runs import make_runs, make_seed_runs, split_summary, write_run

EXPECTED_PNGS = ["accuracy.png", "bandwidth_avg.png", "bandwidth_peak.png", "computation_time.png",
                 "time_per_batch.png", "val_acc_cifar10_mobilenet.png", "val_acc_cola_gpipe-sweep.png",
                 "val_mcc_cola_gpipe-sweep.png"]


def png_size(path) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk; fails on anything that is not a PNG."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", f"{path.name} is not a PNG"
    return struct.unpack(">II", data[16:24])


def test_report_writes_table_and_every_png(tmp_path, capsys):
    """Table in Markdown and CSV with one row per split run; every figure is an 800x500 PNG; runs are listed."""
    make_runs(tmp_path / "runs")
    assert report.main([str(tmp_path / "runs"), "--out", str(tmp_path / "out")]) == 0
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("*.png")) == EXPECTED_PNGS
    for png in out.glob("*.png"):
        assert png_size(png) == report.FIGURE_PIXELS == (800, 500)
    table = pd.read_csv(out / "table.csv")
    figures = ["compress_rate", "acc", "bandwidth_avg_MBps", "bandwidth_peak_client_MBps",
               "bandwidth_peak_server_MBps", "computation_time_s", "time_per_batch_s"]
    assert list(table.columns) == ["compress_method", "options", *figures, "chunks", "n", "run", "group",
                                   *(f"{c}_std" for c in figures)]
    assert len(table) == 6 and sorted(table["chunks"].unique()) == [1, 4, 8] and set(table["n"]) == {1}
    none4 = table[(table["compress_method"] == "none") & (table["chunks"] == 4)].iloc[0]
    assert none4["acc"] == pytest.approx(94.0) and none4["bandwidth_avg_MBps"] == pytest.approx(400.0)
    markdown = (out / "table.md").read_text().splitlines()
    assert markdown[0].startswith("| Compress Method | Compress Rate | Acc | Bandwidth(Avg)")
    assert markdown[0].endswith("| Chunk | n |")
    assert "| none | 1.000 | 94.00 | 400.00MB/s | 450MB/s | 440MB/s | 0.420s | 2.575s | 4 | 1 |" in markdown
    printed = capsys.readouterr().out
    assert "from 6 split runs" in printed and "cola-e10, cola-e20" in printed


def test_no_title_label_or_legend_entry_is_cut_at_the_figures_edges(tmp_path, monkeypatch):
    """Every text of every figure lies inside its 800x500 canvas, with long run, group and method names too."""
    cut: dict[str, list[str]] = {}
    save = report._save

    def checked(plt, fig, path):
        cut[path.name] = report.outside_the_canvas(fig)
        return save(plt, fig, path)

    monkeypatch.setattr(report, "_save", checked)
    runs = report.load_runs(make_runs(tmp_path / "runs"))
    for run in runs:
        run.config["group"] = f"{run.group}-a-sweep-with-a-rather-long-name-20261203-171137"
        run.config["codec"] = f"{run.config.get('codec', 'none')} with a long option list, order=zb"
        run.name = f"{run.name}-20261203-171137-a1b2"
    report.write_report(runs, tmp_path / "out", log=lambda *_: None)
    assert sorted(cut) == sorted({*report.FIGURES, *(p.name for p in (tmp_path / "out").glob("val_*.png"))})
    assert cut == {name: [] for name in cut}
    import matplotlib.pyplot as plt  # the check itself sees a cut text

    fig, ax = plt.subplots(figsize=report.FIGURE_SIZE, dpi=report.FIGURE_DPI)
    ax.set_title("x" * 200)
    assert report.outside_the_canvas(fig) == ["x" * 200]
    plt.close(fig)


def test_a_figure_whose_values_span_decades_gets_a_log_axis(tmp_path, monkeypatch):
    """The client's peak (sends into socket buffers, GB/s) beside the server's (the link's MB/s): log y axis."""
    scales = []
    monkeypatch.setattr(report, "_save", lambda plt, fig, path: scales.append(fig.axes[0].get_yscale()))
    table = report.build_table(report.load_runs(make_runs(tmp_path / "runs")))
    report.plot_against_chunks(table, "bandwidth_peak.png", tmp_path)  # 450 and 440 MB/s
    table["bandwidth_peak_client_MBps"], table["bandwidth_peak_server_MBps"] = 1500.0, 1.2
    report.plot_against_chunks(table, "bandwidth_peak.png", tmp_path)
    assert scales == ["linear", "log"]


def test_curves_mark_the_first_best_epoch(tmp_path):
    """The best epoch of a curve is the first epoch with the largest value."""
    runs = report.load_runs([p for p in make_runs(tmp_path) if p.name.startswith("cola")])
    values = report.curve(runs[0], "val/mcc")
    assert list(values["epoch"]) == list(range(len(values)))
    assert values["val/mcc"].iloc[3] == values["val/mcc"].iloc[4] == values["val/mcc"].max()
    assert int(values["val/mcc"].to_numpy().argmax()) == 3  # the tie at epochs 3 and 4 goes to the first


def test_the_loss_curve_marks_the_epoch_of_the_smallest_loss(tmp_path, monkeypatch):
    """val/loss is drawn too (overfitting shows in it first), its best epoch the first with the smallest loss."""
    rows = [{"epoch": e, "step": 10 * e, "val/mcc": 0.1 * e, "val/loss": loss}
            for e, loss in enumerate([0.62, 0.60, 0.60, 0.71, 0.99])]
    write_run(tmp_path, "cola-e5", {"group": "overfit", "codec": "none", "chunks": None, "max_epochs": 5}, {}, rows)
    labels = []
    monkeypatch.setattr(report, "_legend_outside", lambda fig, ax: labels.extend(ax.get_legend_handles_labels()[1]))
    written = report.write_report(report.load_runs([tmp_path]), tmp_path / "out", log=lambda *_: None)
    assert sorted(p.name for p in written) == ["val_loss_overfit.png", "val_mcc_overfit.png"]
    assert labels == ["5 epochs, 1 run", "best: epoch 5, 0.4000", "5 epochs, 1 run", "best: epoch 2, 0.6000"]


def test_report_refuses_a_split_run_without_link_figures(tmp_path, capsys):
    """A split run whose summary lacks the bandwidth is refused by name, with exit status 2."""
    make_runs(tmp_path / "runs")
    folder = write_run(tmp_path / "runs", "broken", {"group": "cifar10_mobilenet", "codec": "none", "chunks": 4},
                       {"val/acc_best": 0.9}, [{"epoch": 0, "val/acc": 0.9}])
    assert report.main([str(tmp_path / "runs"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"run {folder}: the table needs ['link/compress_rate_run', 'link/bandwidth_avg_MBps_run'" in err


def test_report_refuses_a_run_missing_its_groups_curve(tmp_path):
    """In a group where other runs logged val/mcc, a run without it cannot be drawn: the error names both."""
    make_runs(tmp_path)
    write_run(tmp_path, "no-mcc", {"group": "cola_gpipe-sweep", "codec": "none", "chunks": None, "max_epochs": 40},
              {}, [{"epoch": 0, "val/acc": 0.7}])
    with pytest.raises(report.ReportError, match=r"no-mcc: no 'val/mcc' per epoch.*group 'cola_gpipe-sweep'"):
        report.write_report(report.load_runs([tmp_path]), tmp_path / "out", log=lambda *_: None)


def test_report_without_runs_says_where_it_looked(tmp_path, capsys):
    """A missing folder is named in the error."""
    assert report.main([str(tmp_path / "nowhere")]) == 2
    assert "nowhere: no such folder" in capsys.readouterr().err


def test_run_json_round_trip(tmp_path):
    """load_runs reads the config, summary and metrics that the fixture (and the CLI) write."""
    folder = make_runs(tmp_path)[0]
    run = report.load_runs([folder])[0]
    assert run.config == json.loads((folder / "run.json").read_text())
    assert run.split and run.group == "cifar10_mobilenet"


def test_sweep_runs_each_epoch_count_in_one_group(capsys):
    """experiments.sweep: one fit per epoch count (x chunks), all with the same --run.group, extra args last."""
    from experiments import sweep

    assert sweep.main(["--experiment", "experiments.cola_roberta", "--config", "experiments/configs/cola_gpipe.yaml",
                       "--epochs", "10", "20", "40", "80", "--group", "g", "--dry-run", "--", "--data.batch_size",
                       "8"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[")]
    assert len(lines) == 4
    for line, epochs in zip(lines, (10, 20, 40, 80)):
        assert f"--trainer.max_epochs {epochs} --run.group g --run.name cola_gpipe-e{epochs}-" in line
        assert line.endswith("--data.batch_size 8") and "-m experiments.cola_roberta fit --config" in line


def test_runs_differing_only_by_seed_pool_into_mean_std_and_n(tmp_path, capsys):
    """Three seeds of one split setting are one table row, 92.00 ± 2.00 with n=3 (the CSV: mean, std, n, the
    runs); a fourth run with other chunks stays its own row (n=1, no spread)."""
    make_seed_runs(tmp_path / "runs")
    assert report.main([str(tmp_path / "runs"), "--out", str(tmp_path / "out"), "--group", "cifar10-seeds"]) == 0
    table = pd.read_csv(tmp_path / "out" / "table.csv")
    seeds = table[table["chunks"] == 4].iloc[0]
    assert seeds["n"] == 3 and seeds["acc"] == pytest.approx(92.0) and seeds["acc_std"] == pytest.approx(2.0)
    assert seeds["run"] == "cifar-s0, cifar-s1, cifar-s2" and seeds["compress_rate_std"] == pytest.approx(0.0)
    single = table[table["chunks"] == 8].iloc[0]
    assert single["n"] == 1 and pd.isna(single["acc_std"])
    markdown = (tmp_path / "out" / "table.md").read_text()
    assert "| none | 1.000 ± 0.000 | 92.00 ± 2.00 | 400.00 ± 0.00MB/s |" in markdown and "| 4 | 3 |" in markdown
    assert "| 8 | 1 |" in markdown
    assert "pooled as seeds of one setting (mean ± std, n=3): cifar-s0, cifar-s1, cifar-s2" in capsys.readouterr().out


def test_settings_differing_in_an_option_name_it_in_the_table(tmp_path):
    """Two settings of one group with the same chunks, differing only in a strategy option, are two rows, each
    naming the option's value (an Options column appears only then)."""
    for deferred in (False, True):
        for seed, acc in zip((0, 1), (0.90, 0.92) if deferred else (0.80, 0.84)):
            config = {"group": "bn", "codec": "none", "chunks": 8, "max_epochs": 1, "seed_everything": seed,
                      "trainer": {"strategy": {"init_args": {"chunks": 8, "deferred_batchnorm": deferred}}}}
            write_run(tmp_path / "runs", f"bn-{deferred}-s{seed}", config,
                      dict(split_summary(1.0, 8), **{"val/acc_best": acc}), [{"epoch": 0, "step": 9, "val/acc": acc}])
    assert report.main([str(tmp_path / "runs"), "--out", str(tmp_path / "out"), "--group", "bn"]) == 0
    markdown = (tmp_path / "out" / "table.md").read_text()
    assert "| Compress Method | Options | Compress Rate |" in markdown
    assert "| none | deferred_batchnorm=False | 1.000 ± 0.000 | 82.00 ± 2.83 |" in markdown
    assert "| none | deferred_batchnorm=True | 1.000 ± 0.000 | 91.00 ± 1.41 |" in markdown


def test_seeds_over_a_shaped_link_pool_although_each_probe_measured_another_link(tmp_path):
    """The link's settings are part of a setting; what its probe measured (``probe_*``) differs per run and is not;
    an option that only follows chunks (the preset's name) names nothing."""
    for chunks in (1, 8):
        for seed, rtt in ((0, 50.1), (1, 50.4)):
            config = {"group": "link", "codec": "none", "chunks": chunks, "max_epochs": 1, "seed_everything": seed,
                      "preset": f"cifar10_none_c{chunks}", "order": "1f1b",
                      "link": {"up_mbit": 10, "probe_rtt_ms": rtt + chunks, "clients": [{"probe_rtt_ms": rtt}]}}
            write_run(tmp_path / "runs", f"l-c{chunks}-s{seed}", config,
                      dict(split_summary(1.0, chunks), **{"val/acc_best": 0.5}), [{"epoch": 0, "val/acc": 0.5}])
    assert report.main([str(tmp_path / "runs"), "--out", str(tmp_path / "out"), "--group", "link"]) == 0
    table = pd.read_csv(tmp_path / "out" / "table.csv")
    assert list(table["n"]) == [2, 2] and "Options" not in (tmp_path / "out" / "table.md").read_text()


def test_overfitting_curve_of_seeds_is_the_mean_with_a_std_band(tmp_path, capsys, monkeypatch):
    """The MCC-against-epoch figure of a 3-seed setting draws the mean, a ± 1 std band and the mean's best epoch."""
    make_seed_runs(tmp_path)
    runs = [r for r in report.load_runs([tmp_path]) if r.group == "cola-seeds"]
    assert len(report.by_setting(runs)) == 1  # seed_everything and data.seed are the only differences
    written = [dataclasses.replace(r, config={**r.config, "trainer": {"default_root_dir": f"root{i}", "devices": 2},
                                              "ckpt_path": "last" if i else None}) for i, r in enumerate(runs)]
    assert len(report.by_setting(written)) == 1  # where a run was written, or that it resumed, is not its setting
    written[0].config["trainer"]["devices"] = 1
    assert len(report.by_setting(written)) == 2
    values = report.seed_curve(runs, "val/mcc")
    assert list(values["mean"]) == [0.5, 0.625, 0.75, 0.875, 0.75, 0.625] and set(values["n"]) == {3}
    assert values["std"].to_numpy() == pytest.approx([0.0625] * 6)
    assert (values["min"].iloc[3], values["max"].iloc[3]) == (0.8125, 0.9375)
    drawn = {}
    import matplotlib.axes

    for name in ("plot", "fill_between"):
        original = getattr(matplotlib.axes.Axes, name)

        def spy(self, *args, _name=name, _original=original, **kwargs):
            drawn.setdefault(_name, []).append((args, kwargs))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(matplotlib.axes.Axes, name, spy)
    path = report.plot_curves(runs, "val/mcc", tmp_path)
    assert png_size(path) == (800, 500)
    (band_args, _), = drawn["fill_between"]
    assert list(band_args[1]) == pytest.approx([0.4375, 0.5625, 0.6875, 0.8125, 0.6875, 0.5625])
    labels = [kwargs.get("label") for _, kwargs in drawn["plot"]]
    assert labels == ["6 epochs: mean ± std,\nn=3 seeds", "best of the mean: epoch 4,\n0.8750 ± 0.0625"]


def test_sweep_seeds_share_one_group():
    """experiments.sweep --seeds: one run per seed and setting, all in the one group, CoLA's data order seeded too."""
    from experiments import sweep

    runs = sweep.commands(experiment="experiments.cola_roberta", configs=["cola_small.yaml"], epochs=[3],
                          chunks=None, group="g", extra=[], stamp="t", seeds=[0, 1])
    assert [r[r.index("--run.group") + 1] for r in runs] == ["g", "g"]
    assert [r[r.index("--run.name") + 1] for r in runs] == ["cola_small-e3-s0-t", "cola_small-e3-s1-t"]
    assert runs[1][-4:] == ["--seed_everything", "1", "--data.seed", "1"]
    cifar = sweep.commands(experiment="experiments.cifar10_mobilenet", configs=[], epochs=[1], chunks=[4],
                           group="g", extra=["--x"], stamp="t", seeds=[5])
    assert cifar[0][-3:] == ["--seed_everything", "5", "--x"]


def test_sweep_refuses_a_malformed_seed_list(capsys):
    """The error names the value and shows the accepted forms."""
    from experiments import sweep

    with pytest.raises(SystemExit):
        sweep.main(["--experiment", "experiments.cola_roberta", "--epochs", "3", "--seeds", "4-0", "--dry-run"])
    assert "argument --seeds: --seeds '4-0': the range '4-0' runs backwards" in capsys.readouterr().err


def test_the_clients_of_one_job_pool_into_one_setting():
    """A many-client job's per-client runs (same config but "client") are one setting; paradigms stay apart."""
    base = {"group": "g", "paradigm": "splitfed", "clients": 2, "name": "job"}
    runs = [report.Run(f"job/client{c}", "fixture", {**base, "client": c}, {}, pd.DataFrame()) for c in (0, 1)]
    other = report.Run("seq/client0", "fixture", {**base, "paradigm": "sequential", "client": 0}, {}, pd.DataFrame())
    assert [len(s) for s in report.by_setting([*runs, other])] == [2, 1]
