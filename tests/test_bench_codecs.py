"""``experiments.bench_codecs --seeds`` on tiny data: per-seed values in the JSON, paired statistics, reproducible."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest

from experiments import bench_codecs
from experiments.report import FIGURE_PIXELS

DATA = Path(bench_codecs.SHARED)
needs_data = pytest.mark.skipif(not (DATA / "cifar10" / "cifar-10-batches-py").is_dir()
                                or not (DATA / "weights" / "mobilenet_v2-b0353104.pth").is_file(),
                                reason="needs ../shared/data (CIFAR-10 and the MobileNetV2 weights)")
# 64 training and 64 test images at 96 px (the smallest side where power iteration's rank 7 fits the down cut,
# 3 x 3), 4 steps of batch 16; power iteration with a 2-batch calibration and 3 adaptation steps: every code path
# of a real row, in seconds.
TINY = ["--size", "96", "--train", "64", "--test", "64", "--epochs", "1", "--batch", "16", "--calib-batches", "2",
        "--adapt-steps", "3", "--only", "none", "poweriter3_7", "--default-only"]


@pytest.fixture
def one_thread():
    """One intra-op thread: about 12 CPU-seconds for the whole test, and no spinning threads on a busy machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@needs_data
def test_two_seed_bench_writes_per_seed_values_and_is_reproducible(tmp_path, capsys, one_thread):
    """Two seeds: each row's JSON holds both accuracies, their mean and std, the paired difference and its 95%
    interval; the table prints the same; and the same seed run again gives the same accuracy to the last digit."""
    out = tmp_path / "bench.json"
    rows = bench_codecs.main([*TINY, "--seeds", "0-1", "--json", str(out)])
    saved = json.loads(out.read_text())
    table = capsys.readouterr().out
    assert saved["settings"]["threads"] == 1 and "seeds 0,1, 1 thread(s)" in table
    assert saved["seeds"] == [0, 1] and [(r["codec"], r["initialisation"]) for r in saved["rows"]] == [
        ("none", "-"), ("none", "adapt (control)"), ("poweriter3_7", "iters=2, adapt (default)")]
    assert [r["baseline"] for r in saved["rows"]] == ["none / -", "none / -", "none / adapt (control)"]
    none, control, power = (r["acc"] for r in saved["rows"])
    assert control["per_seed"] != none["per_seed"]  # the control's adaptation trains the uncompressed network
    for row in (none, control, power):
        values = [row["per_seed"]["0"], row["per_seed"]["1"]]
        assert row["n"] == 2 and row["mean"] == pytest.approx(statistics.mean(values))
        assert row["std"] == pytest.approx(statistics.stdev(values))
    assert none["difference"]["mean"] == 0.0 and none["difference"]["low"] == 0.0 == none["difference"]["high"]
    d = power["difference"]
    diffs = [power["per_seed"][s] - control["per_seed"][s] for s in ("0", "1")]  # paired with the same adaptation
    assert d["mean"] == pytest.approx(statistics.mean(diffs))
    half = 12.706205 * statistics.stdev(diffs) / math.sqrt(2)  # t(0.975, 1 degree of freedom)
    assert (d["low"], d["high"]) == (pytest.approx(d["mean"] - half), pytest.approx(d["mean"] + half))
    assert rows[2]["acc"] == power
    assert (f"| {bench_codecs.format_mean(power):>18} |  2 | {'none / adapt (control)':<22} | "
            f"{bench_codecs.format_difference(power):>22} |") in table

    # Reproducibility: seed 1 of the power-iteration row, run again in this process, to the last digit.
    args = bench_codecs.parse_args([*TINY, "--seed", "1"])
    data = (bench_codecs.load_images(args.data, True, args.train),
            bench_codecs.load_images(args.data, False, args.test))
    _, options, calibration = bench_codecs.RUNS["poweriter3_7"][-1]
    again = bench_codecs.run("poweriter3_7", options, calibration, args, data, seed=1)
    assert again["acc"] == power["per_seed"]["1"]


def fake_run(acc: float) -> dict:
    return {"codec": "x", "acc": acc, "rate": 1.0, "rate224": 1.0, "up": 1, "down": 1, "err_up": None,
            "err_down": None, "err_tail": None, "seconds": 1.0, "calib_seconds": 0.0}


def test_rows_run_in_parallel_processes_merge_and_pair(tmp_path, capsys):
    """--merge: rows from separate --json files, each paired with none over the seeds both finished."""
    def save(name, row, label, accs):
        rows = bench_codecs._rows({(row, label): {s: fake_run(a) for s, a in accs.items()}})
        settings = {"train": 2000, "seeds": list(accs), "only": [row], "json": name}
        (tmp_path / name).write_text(json.dumps({"settings": settings, "rows": rows}))
        return tmp_path / name

    files = [save("none.json", "none", "-", {0: 70.0, 1: 75.0, 2: 72.0}),
             save("pi.json", "poweriter3_7", "adapt", {0: 69.0, 1: 74.5})]  # seed 2 not finished
    rows = bench_codecs.main(["--merge", *map(str, files), "--json", str(tmp_path / "all.json"),
                              "--figure", str(tmp_path / "codecs.png")])
    none, power = (r["acc"] for r in rows)
    assert none["n"] == 3 and power["n"] == 2 and power["difference"]["per_seed"] == {"0": -1.0, "1": -0.5}
    out = capsys.readouterr().out
    assert "-0.75 [-3.93, +2.43]" in out and "not settled" in out  # the interval reaches below -1
    from PIL import Image
    assert Image.open(tmp_path / "codecs.png").size == FIGURE_PIXELS
    assert json.loads((tmp_path / "all.json").read_text())["settings"]["train"] == 2000  # the runs', not a default
    other = save("other.json", "convinsert097", "adapt", {0: 70.0})
    saved = json.loads(other.read_text())
    saved["settings"]["train"] = 4000
    other.write_text(json.dumps(saved))
    with pytest.raises(SystemExit, match=r"other.json was run with other settings \(\['train'\]\)"):
        bench_codecs.main(["--merge", str(files[0]), str(other)])
