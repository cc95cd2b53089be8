"""The CLI's logging defaults in one process: W&B mode, run folder, run config, and ``--trainer.logger false``."""

from __future__ import annotations

import csv
import json
import warnings

import pytest
from torch import nn

import experiments.cli as cli
from splitlit import Split
from splitlit.codecs import ConvInsert, PowerIteration
from splitlit.wire import WirePlan
from tests.scripts.metrics_fit import BASE, RandomImages, TinyNet

UNSPLIT = ["--trainer.devices", "1", "--trainer.strategy", "auto", "--trainer.max_epochs", "1",
           "--data.train_batches", "2", "--data.val_batches", "1"]


@pytest.fixture
def base_config(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(BASE)
    return str(path)


def run(base_config: str, *args: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "both args and command line arguments", the unsplit traffic warning
        return cli.run_cli(TinyNet, RandomImages, default_config=base_config, args=["fit", *UNSPLIT, *args])


@pytest.mark.parametrize(("setting", "env", "expected"), [
    ("auto", {}, "offline"),
    ("auto", {"WANDB_API_KEY": "k" * 40}, "online"),
    ("auto", {"WANDB_MODE": "disabled", "WANDB_API_KEY": "k" * 40}, "disabled"),
    ("online", {"WANDB_MODE": "offline"}, "online"),
    ("offline", {"WANDB_API_KEY": "k" * 40}, "offline"),
])
def test_wandb_mode_is_offline_without_a_key(monkeypatch, tmp_path, setting, env, expected):
    """auto: WANDB_MODE if set, else online only with an API key; an explicit setting wins."""
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc from `wandb login`
    for key in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert cli.wandb_mode(setting) == expected


def test_wandb_mode_finds_a_netrc_key(monkeypatch, tmp_path):
    """A key stored by `wandb login` in ~/.netrc counts as configured."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    (tmp_path / ".netrc").chmod(0o600)
    assert cli.wandb_mode() == "online"


def test_codec_labels_name_codecs_by_their_non_default_arguments():
    """Model codecs by registered name and changed arguments, wire codecs by cut and name, else 'none'."""
    head, body, tail = nn.Identity(), nn.Identity(), nn.Identity()
    split = Split(head, body, tail, up=PowerIteration(3), down=ConvInsert(1280, 320))
    wire = WirePlan.parse({"up.gradient": "fp16"})
    assert cli.codec_label(split, wire) == ("up:poweriter(rank=3) down:convinsert(in_channels=1280,code_channels=320,"
                                            "stride=1) wire:up.gradient=fp16")
    assert cli.codec_label(Split(head, body, tail), None) == "none"


def test_codec_labels_follow_the_report_for_one_kind_at_both_cuts():
    """Power iteration at both cuts reads poweriter(3,7); conv inserts list channels and kernel."""
    head, body, tail = nn.Identity(), nn.Identity(), nn.Identity()
    assert cli.codec_label(Split(head, body, tail, up=PowerIteration(3), down=PowerIteration(7)), None) \
        == "poweriter(3,7)"
    split = Split(head, body, tail, up=ConvInsert(32, 20, kernel_size=4), down=ConvInsert(1280, 320))
    assert cli.codec_label(split, None) == "convinsert(32>20k4,1280>320)"


def test_link_settings_from_the_environment(monkeypatch, tmp_path):
    """SPLITLIT_LINK_JSON takes JSON text or a file; anything else is refused with the variable named."""
    monkeypatch.setenv(cli.LINK_ENV, '{"rate_mbit": 100}')
    assert cli.link_from_env() == {"rate_mbit": 100}
    (tmp_path / "link.json").write_text('{"rate_mbit": 10}')
    monkeypatch.setenv(cli.LINK_ENV, str(tmp_path / "link.json"))
    assert cli.link_from_env() == {"rate_mbit": 10}
    monkeypatch.setenv(cli.LINK_ENV, "100mbit")
    with pytest.raises(ValueError, match="SPLITLIT_LINK_JSON='100mbit' is neither JSON"):
        cli.link_from_env()


def test_default_run_folder_without_wandb(base_config, tmp_path):
    """--run.wandb disabled: a CSV run folder with run.json, summary.json and time/batch_s (unsplit: no link keys)."""
    root = tmp_path / "runs"
    result = run(base_config, "--trainer.default_root_dir", str(root), "--run.wandb", "disabled",
                 "--run.name", "tiny", "--run.group", "g")
    folder = root / "tiny"
    assert [type(lg).__name__ for lg in result.trainer.loggers] == ["CSVLogger"]
    with open(folder / "metrics.csv") as f:
        columns = set(next(csv.reader(f)))
    assert {"time/batch_s", "time/batch_s_epoch", "val/acc_best"} <= columns
    assert not any(c.startswith("link/") for c in columns)
    run_config = json.loads((folder / "run.json").read_text())
    assert (run_config["name"], run_config["group"], run_config["chunks"], run_config["split"]) == ("tiny", "g",
                                                                                                   None, None)
    assert "val/acc_best_epoch" in json.loads((folder / "summary.json").read_text())


def test_logger_false_turns_the_loggers_off(base_config, tmp_path):
    """--trainer.logger false: no logger and no run folder; the callbacks are still there and harmless."""
    root = tmp_path / "runs"
    result = run(base_config, "--trainer.default_root_dir", str(root), "--trainer.logger", "false")
    assert result.trainer.loggers == []
    assert {"LinkTrafficMonitor", "PipelineTimingMonitor", "BestMetric"} <= {
        type(cb).__name__ for cb in result.trainer.callbacks}
    assert not root.exists() or not any(root.rglob("run.json"))


def test_periodic_checkpoints_by_default(base_config, tmp_path):
    """Every run writes last.ckpt every --run.checkpoint_minutes and at each epoch end, unless told otherwise."""
    root = tmp_path / "runs"
    result = run(base_config, "--trainer.default_root_dir", str(root), "--run.wandb", "disabled",
                 "--run.name", "ck", "--run.checkpoint_minutes", "0.5")
    periodic = [cb for cb in result.trainer.checkpoint_callbacks if cb._train_time_interval is not None]
    assert len(periodic) == 1 and periodic[0]._train_time_interval.total_seconds() == 30 and periodic[0].save_last
    assert (root / "ck" / "checkpoints" / "last.ckpt").is_file()  # the epoch-end one wrote it


def test_checkpoint_minutes_must_be_positive(base_config, tmp_path):
    with pytest.raises(ValueError, match=r"--run.checkpoint_minutes -1.0: give the minutes between two checkpoints"):
        run(base_config, "--trainer.default_root_dir", str(tmp_path), "--run.checkpoint_minutes", "-1")


def test_runs_differing_only_by_seed_are_one_setting_of_the_report(base_config, tmp_path):
    """Two CLI runs with --seed_everything 0 and 1 (as experiments.sweep --seeds starts them) write run configs that
    the report pools as one setting; another learning rate is another setting."""
    from experiments import report

    root = tmp_path / "runs"
    for name, extra in (("s0", ["--seed_everything", "0"]), ("s1", ["--seed_everything", "1"]),
                        ("lr", ["--seed_everything", "0", "--model.lr", "0.5"])):
        run(base_config, "--trainer.default_root_dir", str(root), "--run.wandb", "disabled", "--run.name", name,
            "--run.group", "g", *extra)
    runs = {r.name: r for r in report.load_runs([root])}
    assert runs["s0"].config["seed_everything"] == 0 and runs["s1"].config["seed_everything"] == 1
    assert [[r.name for r in rs] for rs in report.by_setting(runs[n] for n in ("s0", "s1", "lr"))] == [
        ["s0", "s1"], ["lr"]]
