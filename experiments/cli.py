"""The LightningCLI shared by the experiments: YAML presets from ``experiments/configs``, loggers, defaults."""

from __future__ import annotations

import sys
from pathlib import Path

from lightning.pytorch.cli import LightningCLI

__all__ = ["CONFIG_DIR", "run_cli"]

CONFIG_DIR = Path(__file__).parent / "configs"
SUBCOMMANDS = ("fit", "validate", "test", "predict")


def run_cli(model_class: type, datamodule_class: type, *, default_config: str,
            args: list[str] | None = None) -> LightningCLI:
    """Run LightningCLI with ``configs/<default_config>`` as the base every ``--config`` preset overrides."""
    default = str(CONFIG_DIR / default_config)
    parser_kwargs = {cmd: {"default_config_files": [default]} for cmd in SUBCOMMANDS}
    return LightningCLI(model_class, datamodule_class, parser_kwargs=parser_kwargs,
                        save_config_kwargs={"overwrite": True}, args=args if args is not None else sys.argv[1:])
