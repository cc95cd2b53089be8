"""The LightningCLI shared by the experiments: YAML presets from ``experiments/configs``, loggers, callbacks.

Unless the command line or a preset says otherwise, every run gets:

- a run folder ``<trainer.default_root_dir>/<run name>/`` holding ``metrics.csv`` and ``hparams.yaml``
  (``CSVLogger``), ``config.yaml`` (the CLI's), ``run.json`` (the run config below), ``summary.json`` (best and
  final metrics, the run's link and timing figures), ``checkpoints/`` and ``wandb/`` (the W&B run);
- a W&B run through Lightning's ``WandbLogger``: offline unless ``WANDB_API_KEY`` is set (or ``wandb login``
  stored a key) or ``--run.wandb online`` is given, so there is never a prompt. Its config is the run config:
  every hyperparameter of the CLI, the split, the codecs, the chunks, the order and the link; its group is
  the experiment (or ``--run.group``), its tags say the codec, the chunks and the preset;
- the measurement callbacks :class:`~callbacks.LinkTrafficMonitor`, :class:`~callbacks.PipelineTimingMonitor`
  and :class:`~callbacks.BestMetric` (``--run.monitor``), each unless one of its class is configured already;
- periodic checkpoints: ``checkpoints/last.ckpt`` every ``--run.checkpoint_minutes`` (10) of training and at
  each epoch end, unless a ``ModelCheckpoint`` is configured or checkpointing is off. A run that fails or is
  killed resumes from it with ``--ckpt_path last``.

``--trainer.logger false`` turns the loggers (and so the run folder) off; explicit ``--trainer.logger``
classes replace them. The link settings come from ``--run.link`` or the ``SPLITLIT_LINK_JSON`` environment
variable (JSON text, or the path of a JSON file).
"""

from __future__ import annotations

import csv
import inspect
import json
import netrc
import os
import re
import secrets
import sys
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from typing_extensions import override

from callbacks import BestMetric, LinkTrafficMonitor, PipelineTimingMonitor
from splitlit.link import LINK_ENV

__all__ = ["CONFIG_DIR", "LINK_ENV", "RUN_FILE", "ResumedCSVLogger", "RunSettings", "SplitCLI", "link_summary",
           "run_cli", "wandb_mode"]

CONFIG_DIR = Path(__file__).parent / "configs"
SUBCOMMANDS = ("fit", "validate", "test", "predict")
RUN_FILE = "run.json"
_RUN_NAME_ENV = "SPLITLIT_RUN_NAME"  # rank 0 hands its run name to the rank Lightning launches
_WANDB_MODES = ("auto", "online", "offline", "disabled")


@dataclass
class RunSettings:
    """How a run is named, grouped and logged (``--run.*``).

    Args:
        name: run name and folder name; default ``<preset>-<codec>-c<chunks>-e<max_epochs>-<time>-<random>``.
        group: W&B group; default the experiment (``cifar10_mobilenet``, ``cola_roberta``).
        tags: extra W&B tags, added to ``codec=...``, ``chunks=...`` and ``preset=...``.
        project: W&B project.
        wandb: ``auto`` (online with an API key, else offline; ``WANDB_MODE`` is respected), ``online``,
            ``offline`` or ``disabled`` (CSV only).
        codec: the compression's name in tables and tags; default derived from the model's codecs and the wire.
        link: the emulated link's settings, recorded in the run config; default from ``SPLITLIT_LINK_JSON``.
        monitor: validation metrics whose best epoch and value :class:`~callbacks.BestMetric` tracks.
        checkpoint_minutes: minutes of training between two writes of ``last.ckpt`` (also written at each
            epoch end); ``null`` for Lightning's default (each epoch end only).
    """

    name: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    project: str = "splitlit"
    wandb: str = "auto"
    codec: str | None = None
    link: dict[str, Any] | None = None
    monitor: list[str] = field(default_factory=lambda: ["val/mcc", "val/acc"])
    checkpoint_minutes: float | None = 10.0


class SplitCLI(LightningCLI):
    """LightningCLI with the run folder, the W&B and CSV loggers and the measurement callbacks by default."""

    def __init__(self, *args: Any, experiment: str = "splitlit", **kwargs: Any) -> None:
        self.experiment = experiment
        self.run_config: dict[str, Any] = {}
        super().__init__(*args, **kwargs)

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_class_arguments(RunSettings, "run", instantiate=False)

    @override
    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        config = self._get(self.config_init, "trainer", default={})
        settings = RunSettings(**_plain(self._get(self.config_init, "run", default={})))
        if settings.wandb not in _WANDB_MODES:
            raise ValueError(f"--run.wandb {settings.wandb!r}: choose one of {_WANDB_MODES}.")
        if settings.checkpoint_minutes is not None and settings.checkpoint_minutes <= 0:
            raise ValueError(f"--run.checkpoint_minutes {settings.checkpoint_minutes!r}: give the minutes between "
                             f"two checkpoints (e.g. 10), or null for one at each epoch end only.")
        # 1. What the run is: the values every logger and table needs, decided once here.
        self.run_config = self._describe_run(settings, config)
        # 1b. Many clients: one process per client and one for the server on this machine, unless told otherwise.
        clients = self.run_config["clients"]
        if clients > 1 and config.get("num_nodes") in (None, 1):
            kwargs["devices"] = clients + 1  # any other count could only fail: the world must be clients + 1
        # 2. Loggers, unless the user chose them (explicit classes) or turned them off (false).
        if config.get("logger") in (None, True) and "logger" not in kwargs:
            kwargs["logger"] = _default_loggers(settings, self.run_config, config.get("default_root_dir") or "runs")
        # 3. The measurement callbacks, unless one of the same class is configured.
        callbacks = list(kwargs.pop("callbacks", None) or config.get("callbacks") or [])
        defaults = [LinkTrafficMonitor(), PipelineTimingMonitor(), BestMetric(monitor=settings.monitor)]
        callbacks += [cb for cb in defaults if not any(type(c) is type(cb) for c in callbacks)]
        if (settings.checkpoint_minutes is not None and config.get("enable_checkpointing") is not False
                and not any(isinstance(c, ModelCheckpoint) for c in callbacks)):
            # One every N minutes of training, one at each epoch end; both write last.ckpt.
            callbacks += [ModelCheckpoint(save_last=True, save_top_k=0,
                                          train_time_interval=timedelta(minutes=settings.checkpoint_minutes)),
                          ModelCheckpoint(save_last=True)]
        callbacks.append(_SaveRunConfig(self.run_config))
        return super().instantiate_trainer(callbacks=callbacks, **kwargs)

    def _describe_run(self, settings: RunSettings, trainer_config: dict[str, Any]) -> dict[str, Any]:
        strategy = trainer_config.get("strategy")
        split = self.model.configure_split() if hasattr(self.model, "configure_split") else None
        chunks = getattr(strategy, "chunks", None)
        wire = getattr(strategy, "wire", None)
        codec = settings.codec or codec_label(split, wire)
        presets = [Path(str(p)).stem for p in (self._get(self.config, "config") or [])]
        preset = "+".join(presets) or self.experiment
        max_epochs = trainer_config.get("max_epochs")
        clients = getattr(strategy, "clients", 1)
        paradigm = getattr(strategy, "paradigm", None) if clients > 1 else None
        stem = f"{preset}-{codec}-c{chunks or 'unsplit'}-e{max_epochs}"
        name = _run_name(settings.name, stem + (f"-{paradigm}{clients}" if paradigm else ""))
        return {
            "experiment": self.experiment,
            "group": settings.group or self.experiment,
            "name": name,
            "preset": preset,
            "codec": codec,
            "chunks": chunks,
            "order": getattr(strategy, "order", None),
            "strategy": type(strategy).__name__ if not isinstance(strategy, str) else strategy,
            "split": describe_split(split) if chunks is not None else None,
            "codecs": {"up": _describe_codec(getattr(split, "up", None)),
                       "down": _describe_codec(getattr(split, "down", None)),
                       "wire": wire.describe() if wire else {}},
            "link": settings.link if settings.link is not None else link_from_env(),
            "max_epochs": max_epochs,
            "clients": clients,
            "paradigm": paradigm,
            "client": _process_rank(trainer_config) if clients > 1 else None,
            "tags": _tags(codec, chunks, preset, settings.tags) + ([f"{paradigm}", f"clients={clients}"]
                                                                   if paradigm else []),
            "command": " ".join(sys.argv),
            **{k: v for k, v in _plain(self.config.get(str(self.subcommand), self.config)).items()
               if k not in ("config", "run") and not k.startswith("_")},
        }


def run_cli(model_class: type, datamodule_class: type, *, default_config: str,
            args: list[str] | None = None) -> LightningCLI:
    """Run the CLI with ``configs/<default_config>`` as the base every ``--config`` preset overrides."""
    default = str(CONFIG_DIR / default_config)
    parser_kwargs = {cmd: {"default_config_files": [default]} for cmd in SUBCOMMANDS}
    return SplitCLI(model_class, datamodule_class, parser_kwargs=parser_kwargs, experiment=Path(default).stem,
                    save_config_kwargs={"overwrite": True}, args=args)  # None: LightningCLI reads sys.argv


# -- loggers ----------------------------------------------------------------------------------------------------
def wandb_mode(setting: str = "auto") -> str:
    """``online``, ``offline`` or ``disabled``: the setting when explicit, else ``WANDB_MODE``, else online only
    when an API key is configured (``WANDB_API_KEY`` or a ``wandb login`` entry in ``~/.netrc``)."""
    if setting != "auto":
        return setting
    env = os.environ.get("WANDB_MODE", "").lower()
    if env in ("online", "offline", "disabled"):
        return env
    if env == "dryrun":
        return "offline"
    return "online" if _wandb_key_configured() else "offline"


def _wandb_key_configured() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = re.sub(r"^https?://", "", os.environ.get("WANDB_BASE_URL", "api.wandb.ai")).split("/")[0]
    try:
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _default_loggers(settings: RunSettings, run: dict[str, Any], root: str) -> list[Logger]:
    # The CSVLogger comes first: Lightning puts config.yaml and checkpoints in the first logger's folder.
    # Many clients: each client is a run of its own (its folder, its checkpoints, its W&B run), grouped by the
    # job's name; no client's metrics reach another client or the server.
    client = run.get("client")
    version = run["name"] if client is None else f"{run['name']}/client{client}"
    resuming = run.get("ckpt_path") is not None
    csv_logger = (ResumedCSVLogger if resuming else CSVLogger)(save_dir=root, name="", version=version)
    loggers: list[Logger] = [csv_logger]
    mode = wandb_mode(settings.wandb)
    if mode != "disabled":
        extra = {} if client is None else {"job_type": f"client{client}"}
        loggers.append(WandbLogger(name=version.replace("/", "-"), save_dir=csv_logger.log_dir,
                                   project=settings.project, group=run["group"] if client is None else run["name"],
                                   tags=run["tags"], config=_json_safe(run), offline=mode == "offline", mode=mode,
                                   **extra))
    return loggers


def _process_rank(trainer_config: dict[str, Any]) -> int:
    """This process's global rank before the Trainer exists: torchrun's RANK, or Lightning's node and local rank."""
    if os.environ.get("RANK"):
        return int(os.environ["RANK"])
    devices = trainer_config.get("devices")
    per_node = int(devices) if isinstance(devices, int) or str(devices).isdigit() else 1
    node = int(os.environ.get("NODE_RANK", 0))
    return node * per_node + int(os.environ.get("LOCAL_RANK", 0))


class ResumedCSVLogger(CSVLogger):
    """Lightning's ``CSVLogger`` for a run that resumes in its own folder: it keeps the rows the run wrote before
    (Lightning's deletes an existing ``metrics.csv``), up to the step it resumes from (:meth:`resume_at`), so the
    curves of a run that was stopped and resumed hold every epoch."""

    @property
    def experiment(self) -> Any:
        if self._experiment is not None or rank_zero_only.rank != 0:
            return super().experiment
        path = Path(self.log_dir) / "metrics.csv"
        rows, keys = _read_metrics(path)
        writer = super().experiment  # deletes the file
        if rows:
            _write_metrics(path, rows, keys)
            writer.metrics_keys = keys  # appended to from here on, the header rewritten if new keys come
        return writer

    def resume_at(self, step: int) -> None:
        """Drop the rows logged after ``step`` (the resumed run logs them again)."""
        if rank_zero_only.rank != 0:
            return
        self.experiment.save()
        path = Path(self.log_dir) / "metrics.csv"
        rows, keys = _read_metrics(path)
        kept = [r for r in rows if not r.get("step") or float(r["step"]) <= step]
        if len(kept) < len(rows):
            _write_metrics(path, kept, keys)


def _read_metrics(path: Path) -> tuple[list[dict[str, str]], list[str]]:
    if not path.is_file():
        return [], []
    with path.open(newline="") as file:
        reader = csv.DictReader(file)
        return list(reader), list(reader.fieldnames or [])


def _write_metrics(path: Path, rows: list[dict[str, str]], keys: list[str]) -> None:
    with path.open("w", newline="") as file:
        out = csv.DictWriter(file, fieldnames=keys)
        out.writeheader()
        out.writerows(rows)


class _SaveRunConfig(Callback):
    """Writes ``run.json`` (the run config W&B gets) into the run folder, from the client only, and the emulated
    link as set and as measured (``emulated_link/up_mbit``, ``.../rtt_ms``, ``.../delay_ms``, ...) into
    ``summary.json``, so a figure can be read with the link it was made on."""

    def __init__(self, run: dict[str, Any]) -> None:
        self.run = run

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        csv = next((lg for lg in trainer.loggers if isinstance(lg, CSVLogger)), None)
        if not trainer.is_global_zero or csv is None:
            return  # (trainer.log_dir would be a collective: the CSV logger's folder is the run folder)
        folder = Path(csv.log_dir)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / RUN_FILE).write_text(json.dumps(_json_safe(self.run), indent=1) + "\n")
        measured = link_summary(self.run.get("link") or {})
        if measured:
            summary = folder / "summary.json"
            values = json.loads(summary.read_text()) if summary.is_file() else {}
            summary.write_text(json.dumps({**values, **measured}, indent=1, sort_keys=True) + "\n")

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        for logger in trainer.loggers:  # the checkpoint is restored by now: its step is the run's
            if isinstance(logger, ResumedCSVLogger):
                logger.resume_at(trainer.global_step)


# What of the link goes into summary.json: its settings and the probe's measurements (see splitlit.link).
_LINK_SUMMARY = ("up_mbit", "down_mbit", "delay_ms", "jitter_ms", "loss_pct", "probe_up_mbit", "probe_down_mbit",
                 "probe_rtt_ms", "probe_up_delay_ms", "probe_down_delay_ms")


def link_summary(link: dict[str, Any]) -> dict[str, Any]:
    """The summary's keys of an emulated link: ``emulated_link/<key>``, and with many clients (a link per client)
    ``emulated_link/client<i>/<key>`` for each client's link."""
    def keep(values: dict[str, Any], prefix: str) -> dict[str, Any]:
        return {f"{prefix}{k}": v for k, v in values.items() if k in _LINK_SUMMARY and v is not None}

    out = keep(link, "emulated_link/")
    for i, client in enumerate(link.get("clients") or []):
        out.update(keep(client, f"emulated_link/client{i}/"))
    return out


def _run_name(explicit: str | None, stem: str) -> str:
    if explicit:
        return explicit
    launched = int(os.environ.get("LOCAL_RANK", "0")) > 0  # the rank Lightning's launcher started: reuse rank 0's
    if launched and os.environ.get(_RUN_NAME_ENV):
        return os.environ[_RUN_NAME_ENV]
    name = f"{_slug(stem)}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
    os.environ[_RUN_NAME_ENV] = name
    return name


def _tags(codec: str, chunks: int | None, preset: str, extra: list[str]) -> list[str]:
    tags = [f"codec={codec}", f"chunks={chunks if chunks is not None else 'unsplit'}", f"preset={preset}", *extra]
    return [t[:64] for t in tags]  # W&B's limit


# -- describing the split and the codecs -------------------------------------------------------------------------
def codec_label(split: Any, wire: Any) -> str:
    """A short name of the compression, as the report names its rows: ``none``, ``poweriter(3,7)``,
    ``convinsert(32>32k4,1280>320)``, else ``up:<codec(args)> down:<codec(args)>``; then ``wire:...``."""
    up, down = getattr(split, "up", None), getattr(split, "down", None)
    compact = _compact_label(up, down)
    parts = [compact] if compact else [f"{cut}:{_describe_codec(codec)}" for cut, codec in (("up", up), ("down", down))
                                       if codec is not None]
    parts += [f"wire:{key}={name}" for key, name in (wire.describe() if wire else {}).items()]
    return " ".join(parts) or "none"


def _compact_label(up: Any, down: Any) -> str | None:
    """The report's style for a pair of codecs of one kind at both cuts (or one at a single cut)."""
    from splitlit.codecs import ConvInsert, PowerIteration

    codecs = [c for c in (up, down) if c is not None]
    if not codecs or len({type(c) for c in codecs}) != 1:
        return None
    if isinstance(codecs[0], PowerIteration):
        return f"poweriter({','.join(str(c.rank) if c is not None else '-' for c in (up, down))})"
    if isinstance(codecs[0], ConvInsert):
        one = lambda c: "-" if c is None else (  # noqa: E731
            f"{c.in_channels}>{c.code_channels}" + (f"k{c.kernel_size}" if c.kernel_size != 1 else ""))
        return f"convinsert({one(up)},{one(down)})"
    return None


def _describe_codec(codec: Any) -> str | None:
    """``poweriter(rank=3)``: the codec's registered name and the arguments that differ from their defaults."""
    if codec is None:
        return None
    from splitlit.codecs import CODECS

    name = next((k for k, v in CODECS.items() if type(codec) is v), type(codec).__name__.lower())
    defaults = {k: str(p.default) for k, p in inspect.signature(type(codec).__init__).parameters.items()
                if p.default is not inspect.Parameter.empty}
    args = [a.strip() for a in codec.extra_repr().split(",") if "=" in a]
    args = [a for a in args if defaults.get(a.split("=", 1)[0]) != a.split("=", 1)[1]]
    return f"{name}({','.join(args)})"


def describe_split(split: Any) -> dict[str, Any] | None:
    """Which layers each side runs, and how many parameters it holds."""
    if split is None:
        return None

    def part(module: Any) -> str:
        children = [type(c).__name__ for c in module.children()]
        inner = ", ".join(children[:6]) + (f", ... {len(children) - 6} more" if len(children) > 6 else "")
        return f"{type(module).__name__}({inner})" if children else type(module).__name__

    count = lambda modules: sum(p.numel() for m in modules for p in m.parameters())  # noqa: E731
    return {"head": part(split.head), "body": part(split.body), "tail": part(split.tail),
            "client_params": count(split.client_modules()), "server_params": count(split.server_modules())}


def link_from_env() -> dict[str, Any] | None:
    """The link settings in ``SPLITLIT_LINK_JSON``: JSON text, or the path of a JSON file; None when unset."""
    value = os.environ.get(LINK_ENV, "").strip()
    if not value:
        return None
    text = Path(value).read_text() if not value.startswith("{") and Path(value).is_file() else value
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{LINK_ENV}={value[:80]!r} is neither JSON text nor a JSON file: {err}. "
                         f"Give e.g. '{{\"rate_mbit\": 100}}'.") from err


# -- helpers --------------------------------------------------------------------------------------------------
def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=+-]+", "_", text).strip("_")[:120]


def _plain(value: Any) -> Any:
    """A jsonargparse Namespace (or anything holding one) as plain dicts and lists."""
    if hasattr(value, "as_dict"):
        value = value.as_dict()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _json_safe(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))
