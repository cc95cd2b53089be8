"""The report's table and figures from finished runs.

    python -m experiments.report runs/ --out reports/            # local run folders (searched recursively)
    python -m experiments.report --wandb me/splitlit --group cifar10_mobilenet --out reports/   # W&B API (online)

Writes into ``--out``:

- ``table.md`` and ``table.csv``: one row per split setting (the report's section 2.2 table): compress method,
  compress rate, accuracy (best validation accuracy, %), bandwidth average, bandwidth peak client, bandwidth
  peak server (MB/s, MB = 10**6 bytes), computation time, total time per batch (s), chunks and ``n``, the
  number of runs; an ``Options`` column names what else tells settings apart (e.g. ``deferred_batchnorm=True``)
  when they differ in more than the method and chunks. Runs of one group that differ only by seed
  (``seed_everything``, CoLA's ``data.seed``; see :func:`setting`) are one row: each figure is their mean, the
  Markdown shows ``mean ± std`` (sample standard deviation) and the CSV has the std in ``<column>_std``; the
  CSV also names the runs and their group. The
  figures are the runs' ``_run`` summaries written by :class:`~callbacks.LinkTrafficMonitor`,
  :class:`~callbacks.PipelineTimingMonitor` and :class:`~callbacks.BestMetric`.
- ``bandwidth_peak.png``, ``bandwidth_avg.png``, ``time_per_batch.png``, ``computation_time.png``: those
  figures against chunks, one line per compress method (and options) (the report's figures 6-9; runs that share
  a group, a method, options and a chunk count are averaged, with a ± 1 std error bar over seeds; with several
  groups each line is one method of one group); ``accuracy.png``: the best validation accuracy the same way.
- ``val_mcc_<group>.png`` / ``val_acc_<group>.png``: the validation metric against epoch, one line per setting of
  the group (e.g. the 10, 20, 40, 80-epoch runs of ``experiments.sweep``), the best epoch marked (figures 1-4).
  A setting run with several seeds is drawn as the mean over seeds with a band of ± 1 sample standard deviation
  (over the epochs every seed reached), its best epoch the first maximum of the mean, labelled mean ± std and n.
  Epochs are counted from 1 here (``summary.json``'s ``*_best_epoch`` is Lightning's 0-based epoch). The
  clients of a many-client job (``SplitPipelineStrategy(clients=N)``, one run folder per client) pool like seeds,
  so each paradigm and client count is one line: accuracy against rounds, in aggregate over the clients.

- with ``--leakage runs/bench_leakage/leakage.json``: ``leakage.md`` and ``leakage_<task>.png``, the
  compression / leakage / accuracy trade-off (:func:`write_leakage_report`).

It prints which runs it used, and stops with an error naming the run and the missing figure when a run lacks
one it needs. Each PNG is 800 x 500 pixels.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import textwrap
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

__all__ = ["FIGURE_PIXELS", "ReportError", "Run", "build_table", "load_runs", "load_wandb_runs", "main",
           "seed_table", "setting", "write_report"]

RUN_FILE, SUMMARY_FILE, METRICS_FILE = "run.json", "summary.json", "metrics.csv"
FIGURE_SIZE, FIGURE_DPI = (8, 5), 100
LEGEND_WIDTH = 34  # characters per line of a legend entry (longer ones wrap)
LOG_SCALE_SPAN = 100  # a figure whose values span more than this factor gets a logarithmic y axis
FIGURE_PIXELS = (FIGURE_SIZE[0] * FIGURE_DPI, FIGURE_SIZE[1] * FIGURE_DPI)
CURVE_METRICS = ("val/mcc", "val/acc", "val/loss")  # the best epoch: the largest value; the smallest loss
# Run-config keys that differ between the seeds of one setting (or name one run, say where it was written or what
# it resumed from), ignored by setting(); a dotted key is one inside a section (CoLA's training order has its own
# seed, data.seed).
# The clients of one many-client job ("client": each is a run of its own) pool the same way: a row or a curve of
# such a job is the mean over its clients (and seeds), with the spread across them.
PER_RUN_KEYS = ("name", "command", "seed_everything", "data.seed", "client", "trainer.default_root_dir", "ckpt_path")

# table column -> (summary key, scale, Markdown format)
TABLE = {
    "compress_rate": ("link/compress_rate_run", 1.0, "{:.3f}"),
    "acc": ("val/acc_best", 100.0, "{:.2f}"),
    "bandwidth_avg_MBps": ("link/bandwidth_avg_MBps_run", 1.0, "{:.2f}MB/s"),
    "bandwidth_peak_client_MBps": ("link/bandwidth_peak_client_MBps_run", 1.0, "{:.0f}MB/s"),
    "bandwidth_peak_server_MBps": ("link/bandwidth_peak_server_MBps_run", 1.0, "{:.0f}MB/s"),
    "computation_time_s": ("time/compute_s_run", 1.0, "{:.3f}s"),
    "time_per_batch_s": ("time/batch_s_run", 1.0, "{:.3f}s"),
}
HEADERS = {"compress_method": "Compress Method", "compress_rate": "Compress Rate", "acc": "Acc",
           "bandwidth_avg_MBps": "Bandwidth(Avg)", "bandwidth_peak_client_MBps": "Bandwidth(Peak,Client)",
           "bandwidth_peak_server_MBps": "Bandwidth(Peak,Server)", "computation_time_s": "Computation Time",
           "time_per_batch_s": "Total Time per batch", "chunks": "Chunk"}
FIGURES = {  # file -> (title, y label, [(table column, line style label)])
    "bandwidth_peak.png": ("Peak bandwidth", "MB/s", [("bandwidth_peak_client_MBps", "client"),
                                                      ("bandwidth_peak_server_MBps", "server")]),
    "bandwidth_avg.png": ("Average bandwidth", "MB/s", [("bandwidth_avg_MBps", "")]),
    "time_per_batch.png": ("Time per batch", "s", [("time_per_batch_s", "")]),
    "computation_time.png": ("Computation time per batch", "s", [("computation_time_s", "")]),
    "accuracy.png": ("Best validation accuracy", "%", [("acc", "")]),
}


class ReportError(RuntimeError):
    """A run cannot give a figure the report needs: the message names the run and the figure."""


@dataclass
class Run:
    """One finished run: its config (``run.json``), its summary and its logged metrics (one row per log call)."""

    name: str
    source: str
    config: dict[str, Any]
    summary: dict[str, Any]
    metrics: pd.DataFrame = field(repr=False)

    @property
    def split(self) -> bool:
        return self.config.get("chunks") is not None

    @property
    def group(self) -> str:
        return str(self.config.get("group") or self.config.get("experiment") or "runs")


def setting(run: Run) -> str:
    """The run's config without what names it or seeds it (:data:`PER_RUN_KEYS`), as text: runs with the same
    setting differ only by seed, and the table and the curves pool them."""
    config = {k: v for k, v in run.config.items() if not k.startswith("_")}
    if isinstance(config.get("link"), dict):  # the link's settings stay; what its probe measured differs per run
        config["link"] = _unprobed(config["link"])
    for key in PER_RUN_KEYS:
        section, _, inner = key.rpartition(".")
        if not section:
            config.pop(key, None)
        elif isinstance(config.get(section), dict):
            config[section] = {k: v for k, v in config[section].items() if k != inner}
    return json.dumps(config, sort_keys=True, default=str)


def _unprobed(link: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in link.items() if not k.startswith("probe_")}
    if isinstance(out.get("clients"), list):
        out["clients"] = [_unprobed(c) if isinstance(c, dict) else c for c in out["clients"]]
    return out


def by_setting(runs: Iterable[Run]) -> list[list[Run]]:
    """The runs pooled by :func:`setting`, in the order each setting first appears."""
    settings: dict[str, list[Run]] = {}
    for run in runs:
        settings.setdefault(setting(run), []).append(run)
    return list(settings.values())


# -- reading runs -------------------------------------------------------------------------------------------------
def load_runs(paths: Iterable[str | Path]) -> list[Run]:
    """Run folders given directly, or found (by their ``run.json``) anywhere under the given folders."""
    folders: list[Path] = []
    for path in map(Path, paths):
        if not path.exists():
            raise ReportError(f"{path}: no such folder. Give run folders or a folder holding them (e.g. runs/).")
        folders += [path] if (path / RUN_FILE).is_file() else sorted(p.parent for p in path.rglob(RUN_FILE))
    runs = []
    for folder in dict.fromkeys(folders):
        metrics = folder / METRICS_FILE
        if not metrics.is_file():
            raise ReportError(f"run {folder}: no {METRICS_FILE}. Was it run with --trainer.logger false?")
        summary = folder / SUMMARY_FILE
        runs.append(Run(name=folder.name, source=str(folder), config=json.loads((folder / RUN_FILE).read_text()),
                        summary=json.loads(summary.read_text()) if summary.is_file() else {},
                        metrics=pd.read_csv(metrics)))
    return runs


def load_wandb_runs(path: str, group: str | None = None) -> list[Run]:  # pragma: no cover - needs W&B's servers
    """Finished runs of a W&B project ``entity/project`` (optionally one group), through the public API."""
    import wandb

    api = wandb.Api()
    runs = []
    for r in api.runs(path, filters={"group": group} if group else None):
        if r.state != "finished":
            continue
        summary = {k: r.summary[k] for k in r.summary.keys() if not k.startswith("_")}
        runs.append(Run(name=r.name, source=r.url, config=dict(r.config), summary=summary,
                        metrics=pd.DataFrame(list(r.scan_history()))))
    return runs


# -- the table ----------------------------------------------------------------------------------------------------
def build_table(runs: Sequence[Run]) -> pd.DataFrame:
    """One row per split run, columns as in the report plus ``run``; refuses a split run missing a figure."""
    rows = []
    for run in runs:
        if not run.split:
            continue
        missing = [key for key, _, _ in TABLE.values() if not _finite(run.summary.get(key))]
        if missing:
            raise ReportError(
                f"run {run.source}: the table needs {missing}, which its summary lacks. Run it with the default "
                f"callbacks (LinkTrafficMonitor, PipelineTimingMonitor, BestMetric monitoring val/acc) to the end "
                f"of at least one epoch, or leave it out."
            )
        row = {"compress_method": run.config.get("codec", "none")}
        row.update({col: float(run.summary[key]) * scale for col, (key, scale, _) in TABLE.items()})
        row.update(chunks=int(run.config["chunks"]), run=run.name, group=run.group, setting=setting(run))
        rows.append(row)
    columns = ["compress_method", *TABLE, "chunks", "run", "group", "setting"]
    table = pd.DataFrame(rows, columns=columns)
    labels = _option_labels(list(dict.fromkeys(table["setting"])))
    table.insert(1, "options", [labels.get(key, "") for key in table["setting"]])
    return table.sort_values(["compress_method", "chunks"], kind="stable")


def seed_table(table: pd.DataFrame) -> pd.DataFrame:
    """One row per setting of :func:`build_table`'s runs: each figure's mean over the runs that differ only by seed,
    its sample standard deviation in ``<column>_std`` (NaN for a single run), ``n`` and the runs' names."""
    rows = []
    for _, runs in table.groupby("setting", sort=False):
        row = {"compress_method": runs["compress_method"].iloc[0], "options": runs["options"].iloc[0]}
        row.update({col: runs[col].mean() for col in TABLE})
        row.update(chunks=int(runs["chunks"].iloc[0]), n=len(runs), run=", ".join(runs["run"]),
                   group=runs["group"].iloc[0])
        row.update({f"{col}_std": runs[col].std(ddof=1) if len(runs) > 1 else math.nan for col in TABLE})
        rows.append(row)
    columns = ["compress_method", "options", *TABLE, "chunks", "n", "run", "group",
               *(f"{col}_std" for col in TABLE)]
    return pd.DataFrame(rows, columns=columns).sort_values(["compress_method", "chunks"], kind="stable")


# Settings that the table shows in columns of their own, or that follow from them.
_SHOWN = ("chunks", "codec", "codecs", "tags", "split", "group")


def _option_labels(settings: list[str]) -> dict[str, str]:
    """Per setting (:func:`setting`'s text), what tells it apart from another setting with the same compress method
    and chunks, e.g. ``deferred_batchnorm=True`` or ``order=zb``: '' when nothing does."""
    flat = {key: _flatten(json.loads(key)) for key in settings}
    same: dict[tuple, list[dict[str, Any]]] = {}
    for f in flat.values():
        same.setdefault((json.dumps(f.get("codec")), json.dumps(f.get("chunks"))), []).append(f)
    keys = sorted({k for f in flat.values() for k in f})
    differ = [k for k in keys if not any(part in _SHOWN for part in k.split("."))
              and any(len({json.dumps(f.get(k), default=str) for f in group}) > 1 for group in same.values())]
    labels = {}
    for key, f in flat.items():
        items = dict.fromkeys(f"{k.rsplit('.', 1)[-1]}={f.get(k)}" for k in differ)  # "order" twice: once
        labels[key] = ", ".join(items)
    return labels


def _flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(config, dict) or not config:
        return {prefix: config}
    return {k: v for key, value in config.items() for k, v in _flatten(value, f"{prefix}.{key}".lstrip(".")).items()}


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def table_markdown(table: pd.DataFrame) -> str:
    """:func:`seed_table` in Markdown: ``mean ± std`` where a row pools several seeds, then chunks and n."""
    options = "options" in table and table["options"].astype(bool).any()  # a column only when settings differ
    columns = ["compress_method", *(["options"] if options else []), *list(HEADERS)[1:], "n"]
    names = {**HEADERS, "options": "Options"}
    lines = ["| " + " | ".join(names.get(c, c) for c in columns) + " |", "|" + "---|" * len(columns)]
    for _, row in table.iterrows():
        cells = [str(row["compress_method"])] + ([str(row["options"])] if options else [])
        for c in TABLE:
            number, unit = TABLE[c][2].split("}")  # "{:.2f}MB/s": the unit once, after the spread
            number += "}"
            spread = row.get(f"{c}_std", math.nan) if row.get("n", 1) > 1 else math.nan
            cells.append(number.format(row[c]) + (f" ± {number.format(spread)}" if _finite(spread) else "") + unit)
        cells += [str(int(row["chunks"])), str(int(row.get("n", 1)))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# -- figures ------------------------------------------------------------------------------------------------------
def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=FIGURE_SIZE, dpi=FIGURE_DPI, layout="constrained")
    return plt, fig, ax


def plot_against_chunks(table: pd.DataFrame, file: str, out: Path) -> Path:
    title, unit, series = FIGURES[file]
    plt, fig, ax = _figure()
    keys = ["group", "compress_method", "options", "chunks"]
    means = table.groupby(keys, as_index=False).mean(numeric_only=True)
    spreads = table.groupby(keys, as_index=False).std(numeric_only=True)  # over the runs pooled in each point
    several = means["group"].nunique() > 1  # then a line is one compress method of one experiment
    lines = means.groupby(["group", "compress_method", "options"], sort=True)
    for i, ((group, method, options), rows) in enumerate(lines):
        method = (f"{group}: {method}" if several else method) + (f", {options}" if options else "")
        spread = spreads.loc[rows.index]
        for (column, role), style in zip(series, ("-o", "--s")):
            ax.errorbar(rows["chunks"], rows[column], yerr=spread[column].fillna(0.0), fmt=style, color=f"C{i}",
                        capsize=3, label=f"{method} ({role})" if role else str(method))
    values = pd.concat([means[column] for column, _ in series]).dropna()
    wide = len(values) and (values > 0).all() and values.max() / values.min() > LOG_SCALE_SPAN
    if wide:  # e.g. the client's peak (a send into the socket buffers) beside the server's (what the link carried)
        ax.set_yscale("log")
    ax.set(xlabel="chunks", ylabel=f"{unit} (log scale)" if wide else unit)
    ax.set_title(f"{title} against chunks per compress method", fontsize="medium")
    ax.set_xticks(sorted(table["chunks"].unique()))
    ax.grid(alpha=0.3)
    _legend_outside(fig, ax)
    return _save(plt, fig, out / file)


def curve(run: Run, metric: str) -> pd.DataFrame:
    """The validation ``metric`` per epoch (its last value in each epoch); refuses a run that never logged it."""
    frame = run.metrics
    if metric not in frame or frame[metric].notna().sum() == 0 or "epoch" not in frame:
        raise ReportError(f"run {run.source}: no {metric!r} per epoch in its metrics, which the {metric} figure of "
                          f"group {run.group!r} needs. Logged: {sorted(c for c in frame.columns if c != 'step')}.")
    values = frame[["epoch", metric]].dropna().groupby("epoch", as_index=False).last()
    return values.sort_values("epoch")


def seed_curve(runs: Sequence[Run], metric: str) -> pd.DataFrame:
    """``metric`` per epoch over runs that differ only by seed: ``mean``, ``std`` (sample; NaN for one run),
    ``min``, ``max`` and ``n``, on the epochs every run reached."""
    values = pd.concat([curve(run, metric).set_index("epoch")[metric].rename(run.name) for run in runs], axis=1)
    values = values.dropna()
    return pd.DataFrame({"epoch": values.index, "mean": values.mean(axis=1).to_numpy(),
                         "std": values.std(axis=1, ddof=1).to_numpy() if len(runs) > 1 else math.nan,
                         "min": values.min(axis=1).to_numpy(), "max": values.max(axis=1).to_numpy(),
                         "n": len(runs)}).reset_index(drop=True)


def plot_curves(runs: Sequence[Run], metric: str, out: Path) -> Path:
    """One line per setting of the group; a setting with several seeds is their mean with a ± 1 std band."""
    plt, fig, ax = _figure()
    group = runs[0].group
    settings = sorted(by_setting(runs), key=lambda rs: (rs[0].config.get("max_epochs") or 0, rs[0].name))
    for i, members in enumerate(settings):
        values = seed_curve(members, metric)
        epochs, scores, n = values["epoch"] + 1, values["mean"], len(members)
        # the first epoch with the best value, as BestMetric keeps it: the largest, or the smallest loss
        best = int(scores.to_numpy().argmin() if metric.endswith("loss") else scores.to_numpy().argmax())
        epochs_label = f"{members[0].config.get('max_epochs', '?')} epochs"
        if n == 1:
            ax.plot(epochs, scores, "-", color=f"C{i}", label=f"{epochs_label}, 1 run")
            best_label = f"best: epoch {int(epochs.iloc[best])}, {scores.iloc[best]:.4f}"
        else:
            ax.plot(epochs, scores, "-", color=f"C{i}", label=f"{epochs_label}: mean ± std,\nn={n} seeds")
            ax.fill_between(epochs, scores - values["std"], scores + values["std"], color=f"C{i}", alpha=0.2,
                            linewidth=0)
            best_label = (f"best of the mean: epoch {int(epochs.iloc[best])},\n"
                          f"{scores.iloc[best]:.4f} ± {values['std'].iloc[best]:.4f}")
        ax.plot(epochs.iloc[best], scores.iloc[best], "*", color=f"C{i}", markersize=14, label=best_label)
    name = {"val/mcc": "Matthews correlation", "val/acc": "accuracy", "val/loss": "loss"}.get(metric, metric)
    ax.set(xlabel="epoch (1 = the first)", ylabel=metric)
    ax.set_title(f"Validation {name} against epoch\n{group}", fontsize="medium")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    _legend_outside(fig, ax)
    return _save(plt, fig, out / f"{metric.replace('/', '_')}_{_slug(group)}.png")


def _legend_outside(fig: Any, ax: Any) -> None:
    """The legend right of the axes, so long method names never cover the lines; the constrained layout narrows
    the axes to make room, so the figure keeps its size and nothing is cut at its edges."""
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, [textwrap.fill(label, LEGEND_WIDTH) if "\n" not in label else label for label in labels],
               fontsize="small", loc="outside right upper")


def outside_the_canvas(fig: Any) -> list[str]:
    """The titles, axis labels and legend entries that reach past the figure's edges, i.e. would be cut."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    width, height = fig.canvas.get_width_height()
    texts = [text for legend in fig.legends for text in legend.get_texts()]
    for ax in fig.axes:
        texts += [ax.title, ax._left_title, ax._right_title, ax.xaxis.label, ax.yaxis.label]
        texts += ax.get_legend().get_texts() if ax.get_legend() is not None else []
    cut = []
    for text in texts:
        if not text.get_visible() or not text.get_text():
            continue
        box = text.get_window_extent(renderer)
        if box.x0 < -0.5 or box.y0 < -0.5 or box.x1 > width + 0.5 or box.y1 > height + 0.5:
            cut.append(text.get_text())
    return cut


def _save(plt: Any, fig: Any, path: Path) -> Path:
    fig.savefig(path, dpi=FIGURE_DPI)  # no bbox_inches="tight": every figure keeps FIGURE_PIXELS
    plt.close(fig)
    return path


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


# -- the command --------------------------------------------------------------------------------------------------
def write_report(runs: Sequence[Run], out: Path, *, log=print) -> list[Path]:
    """Write the table, figures 6-9 (from split runs) and the epoch curves (per group); returns the files."""
    if not runs:
        raise ReportError("No runs found. Give run folders (with run.json and metrics.csv) or --wandb.")
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    table = build_table(runs)
    if len(table):
        log(f"Table and figures 6-9 from {len(table)} split runs:")
        for _, row in table.iterrows():
            log(f"  {row['run']}: {row['compress_method']}, chunks {row['chunks']}")
        pooled = seed_table(table)
        for _, row in pooled[pooled["n"] > 1].iterrows():
            log(f"  pooled as seeds of one setting (mean ± std, n={row['n']}): {row['run']}")
        pooled.to_csv(out / "table.csv", index=False)
        (out / "table.md").write_text(table_markdown(pooled))
        written += [out / "table.csv", out / "table.md"]
        written += [plot_against_chunks(table, file, out) for file in FIGURES]
    else:
        log("No split run (chunks set): no table and no figures 6-9.")
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(run.group, []).append(run)
    for group, members in sorted(groups.items()):
        metrics = [m for m in CURVE_METRICS if any(m in r.metrics and r.metrics[m].notna().any() for r in members)]
        for metric in metrics:
            path = plot_curves(members, metric, out)
            lines = [rs[0].name if len(rs) == 1 else f"[{', '.join(r.name for r in rs)}] (mean ± std, n={len(rs)})"
                     for rs in by_setting(members)]
            log(f"{path.name}: {metric} against epoch from {', '.join(lines)}")
            written.append(path)
    for path in written:
        log(f"wrote {path}")
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.report", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="*", default=[], help="run folders, or folders holding them (default: runs)")
    parser.add_argument("--out", default="reports", help="where to write the table and figures")
    parser.add_argument("--wandb", metavar="ENTITY/PROJECT", help="read finished runs from W&B's API instead")
    parser.add_argument("--group", help="only the runs of this group (W&B group / run.json group)")
    parser.add_argument("--leakage", metavar="JSON", help="also the leakage trade-off from experiments.bench_leakage's "
                        "leakage.json (alone when no run folder is given)")
    args = parser.parse_args(argv)
    try:
        if args.leakage:
            write_leakage_report(Path(args.leakage), Path(args.out))
            if not args.runs and not args.wandb:
                return 0
        runs = load_wandb_runs(args.wandb, args.group) if args.wandb else load_runs(args.runs or ["runs"])
        if args.group:
            runs = [r for r in runs if r.group == args.group]
        write_report(runs, Path(args.out))
    except ReportError as err:
        print(f"experiments.report: {err}", file=sys.stderr)
        return 2
    return 0



# -- the leakage trade-off (experiments.bench_leakage) ---------------------------------------------------------------
LEAKAGE_PANELS = (("label AUC (norm / cosine)", ("label_auc_norm", "label_auc_cosine")), ("dCor", ("dcor",)))


def write_leakage_report(results_file: Path, out: Path, *, log=print) -> list[Path]:
    """The compression / leakage / accuracy trade-off from ``experiments.bench_leakage``'s ``leakage.json``.

    Writes ``leakage.md`` (the bench's table) and, per task, ``leakage_<task>.png``: label AUC (norm: circles,
    cosine: crosses), dCor, and PSNR (CIFAR-10) or the share of tokens recovered (CoLA) against the compress rate,
    one point per row, coloured by accuracy (CIFAR-10, %) or MCC (CoLA) and labelled with the row's name.
    """
    from experiments.bench_leakage import table

    if not results_file.is_file():
        raise ReportError(f"--leakage {results_file}: no such file; run python -m experiments.bench_leakage first "
                          f"(it writes runs/bench_leakage/leakage.json).")
    results = json.loads(results_file.read_text())
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "leakage.md"]
    written[0].write_text(table(results) + "\n")
    for task in sorted({r["task"] for r in results}):
        written.append(_plot_leakage([r for r in results if r["task"] == task], task, out))
    for path in written:
        log(f"wrote {path}")
    return written


def _plot_leakage(rows: list[dict[str, Any]], task: str, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    input_panel = ("PSNR of the reconstruction (dB)", ("recon_psnr",)) if task == "cifar10" else \
        ("tokens recovered", ("token_recovery",))
    fig, axes = plt.subplots(1, 3, figsize=FIGURE_SIZE, dpi=FIGURE_DPI)
    rate = [r["compress_rate"] for r in rows]
    accuracy = [100 * r["accuracy"] if task == "cifar10" else r["accuracy"] for r in rows]
    for ax, (title, keys) in zip(axes, (*LEAKAGE_PANELS, input_panel)):
        for key, marker in zip(keys, ("o", "x")):
            points = ax.scatter(rate, [r[key] for r in rows], c=accuracy, marker=marker, cmap="viridis")
        for x, r in zip(rate, rows):
            ax.annotate(r["row"], (x, r[keys[0]]), fontsize=5, alpha=0.7)
        ax.set_xlim(0.0, 1.08)
        ax.set_xlabel("compress rate")
        ax.set_title(title, fontsize="small")
    fig.subplots_adjust(left=0.07, right=0.86, wspace=0.35, top=0.86)
    fig.colorbar(points, cax=fig.add_axes((0.89, 0.15, 0.02, 0.7)), label="accuracy %" if task == "cifar10" else "MCC")
    fig.suptitle(f"{task}: what the server learns against what crosses the link")
    return _save(plt, fig, out / f"leakage_{task}.png")


if __name__ == "__main__":
    sys.exit(main())
