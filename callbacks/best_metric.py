"""``BestMetric``: the best epoch and value of validation metrics, and their final value, in the run summary."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from typing_extensions import override

from callbacks.run_summary import write_run_summary

__all__ = ["BestMetric"]

_MODES = ("max", "min")


class BestMetric(Callback):
    r"""Tracks the best value of monitored metrics over the validation runs of a fit, and the epoch it came at.

    Usage::

        trainer = Trainer(callbacks=[BestMetric(monitor=["val/mcc", "val/acc"], mode="max")])

    After every validation run (not the sanity check) it reads each monitored metric from
    ``trainer.callback_metrics``, as logged by the LightningModule (``val/acc`` for CIFAR-10, ``val/mcc`` and
    ``val/acc`` for CoLA). Monitored metrics that the module never logs are skipped; if none of them is logged,
    the first validation run raises an error naming the metrics that were logged.

    For each monitored metric ``<m>`` that is logged, these keys are logged to the loggers after each validation
    run, and written to the run summary (W&B ``run.summary`` and ``summary.json`` beside the CSV log):

    - ``<m>_best``: the best value so far (largest with ``mode="max"``, smallest with ``"min"``; on a tie the
      earlier epoch stays best).
    - ``<m>_best_epoch``: the epoch of that value, 0-based like Lightning's ``epoch`` column.
    - ``<m>_best_step``: the global step (optimiser steps so far) of that value.
    - ``<m>_final``: the value of the latest validation run, which after the fit is the final value.

    Args:
        monitor: one metric key or several.
        mode: ``"max"`` (accuracy, MCC) or ``"min"`` (a loss), for every monitored metric.
    """

    def __init__(self, monitor: str | Sequence[str] = ("val/mcc", "val/acc"), mode: str = "max") -> None:
        keys = [monitor] if isinstance(monitor, str) else list(monitor)
        if not keys or not all(isinstance(k, str) and k for k in keys):
            raise ValueError(f"BestMetric(monitor={monitor!r}): give a metric key such as 'val/acc', or a list.")
        if mode not in _MODES:
            raise ValueError(f"BestMetric(mode={mode!r}): choose one of {_MODES}.")
        self.monitor = keys
        self.mode = mode
        self.best: dict[str, tuple[float, int, int]] = {}  # key -> (value, epoch, step)
        self.final: dict[str, float] = {}

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(monitor=tuple(self.monitor), mode=self.mode)

    def _better(self, value: float, best: float) -> bool:
        return value > best if self.mode == "max" else value < best

    @override
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit" or not trainer.is_global_zero:
            return
        seen = {k: float(trainer.callback_metrics[k]) for k in self.monitor if k in trainer.callback_metrics}
        if not seen:
            raise MisconfigurationException(
                f"BestMetric(monitor={self.monitor}): none of these metrics was logged in validation. Logged: "
                f"{sorted(trainer.callback_metrics)}. Monitor a key that validation_step logs, e.g. 'val/acc'."
            )
        figures: dict[str, float] = {}
        for key, value in seen.items():
            best = self.best.get(key)
            if best is None or (not math.isnan(value) and (math.isnan(best[0]) or self._better(value, best[0]))):
                self.best[key] = (value, trainer.current_epoch, trainer.global_step)
            self.final[key] = value
            best_value, best_epoch, best_step = self.best[key]
            figures.update({f"{key}_best": best_value, f"{key}_best_epoch": best_epoch,
                            f"{key}_best_step": best_step, f"{key}_final": value})
        trainer._logger_connector.log_metrics(dict(figures))
        write_run_summary(trainer, figures)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"best": dict(self.best), "final": dict(self.final)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best = {k: tuple(v) for k, v in state_dict.get("best", {}).items()}  # type: ignore[misc]
        self.final = dict(state_dict.get("final", {}))
