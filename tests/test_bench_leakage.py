"""``experiments.bench_leakage --quick``: every column filled for a plain row, a wire row and a defence row."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch

from experiments import bench_leakage

DATA = Path(bench_leakage.SHARED)
needs_data = pytest.mark.skipif(not (DATA / "cifar10" / "cifar-10-batches-py").is_dir()
                                or not (DATA / "weights" / "mobilenet_v2-b0353104.pth").is_file(),
                                reason="needs ../shared/data (CIFAR-10 and the MobileNetV2 weights)")


@needs_data
def test_the_quick_bench_writes_the_trade_off_table(tmp_path, capsys):
    """Three CIFAR-10 rows: JSON and CSV hold a finite compress rate, accuracy, label AUCs, dCor, PSNR/SSIM and
    overhead for each; int8 on the wire compresses; the markdown table prints one line per row; the report draws it."""
    threads = torch.get_num_threads()
    try:
        results = bench_leakage.main(["--quick", "--tasks", "cifar10", "--only", "none", "wire int8", "nopeek 0.1",
                                      "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    assert [r["row"] for r in results] == ["none", "wire int8", "nopeek 0.1"]
    for r in results:
        for key in ("compress_rate", "accuracy", "label_auc_norm", "label_auc_cosine", "dcor", "recon_psnr",
                    "recon_ssim", "overhead_pct"):
            assert math.isfinite(r[key]), (r["row"], key, r[key])
    assert results[0]["compress_rate"] == 1.0 and results[1]["compress_rate"] < 0.7
    assert json.dumps(json.loads((tmp_path / "leakage.json").read_text())) == json.dumps(results)  # NaN != NaN
    with open(tmp_path / "leakage.csv") as f:
        assert len(list(csv.DictReader(f))) == 3
    table = capsys.readouterr().out
    assert table.count("| cifar10 |") >= 3 and "label AUC norm" in table
    # experiments.report --leakage draws the trade-off from the same file.
    from PIL import Image

    from experiments.report import FIGURE_PIXELS, write_leakage_report

    written = write_leakage_report(tmp_path / "leakage.json", tmp_path / "report", log=lambda _: None)
    assert [p.name for p in written] == ["leakage.md", "leakage_cifar10.png"]
    assert Image.open(written[1]).size == FIGURE_PIXELS
