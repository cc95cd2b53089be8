"""``CodecCalibration``: fits the model's codecs to the activations they will carry, on the client, before fitting."""

from __future__ import annotations

from lightning.pytorch import Callback, LightningModule, Trainer
from typing_extensions import override

from splitlit.calibration import calibrate
from splitlit.checks import check_count

__all__ = ["CodecCalibration"]


class CodecCalibration(Callback):
    """Calibrates the model's codecs (see :func:`splitlit.calibration.calibrate`) on the first training batches.

    Usage::

        trainer = Trainer(callbacks=[CodecCalibration(batches=16, adapt_steps=50)], strategy=...)

    It runs in ``setup`` on rank 0 only, on the whole unsplit module: under
    :class:`~splitlit.SplitPipelineStrategy` that is the client, which holds the data and, until the strategy's
    own setup, every weight; the strategy then ships the server-side halves (up decoder, down encoder) to the
    server with the rest of the server's initial weights. So no activation from the down cut needs to leave the
    server, and the run is the same split or unsplit. Skipped when fitting resumes from a checkpoint.

    Args:
        batches: training batches to calibrate on (16 of 64 give the 1280-channel down cut of MobileNetV2 a
            well-estimated covariance; calibration is forward-only and costs a fraction of a training step each).
        pca: initialise learned codecs from the principal components of their activations.
        warmup_steps / warmup_lr: reconstruction warm-up of each codec alone (0 steps: none).
        distill_steps / distill_lr: distillation of the codecs on what the tail receives, with the network
            frozen (:func:`splitlit.calibration.distill`; 0 steps: none). Each step costs about a training step.
        adapt_steps / adapt_lr: then distillation of the head, the body and the codecs together towards what the
            tail received before calibration (``distill(..., network=True)``): the network adapts to its codecs
            before fine-tuning, which is what closes the accuracy gap of a parameter-free codec. Each step costs
            about a training step, on the client (which holds every weight until the strategy's setup; the
            strategy then ships the adapted server part). 0 steps: none. Its effect on accuracy: the README's
            "Accuracy over seeds" (``python -m experiments.bench_codecs --seeds 0-4``).
        batch_stats: calibrate with BatchNorm on batch statistics, as the codecs will see while fine-tuning.

    Logs nothing to the logger; the relative errors are in :attr:`report` and the log.
    """

    def __init__(self, batches: int = 16, pca: bool = True, warmup_steps: int = 0, warmup_lr: float = 1e-3,
                 distill_steps: int = 0, distill_lr: float = 1e-4, adapt_steps: int = 50, adapt_lr: float = 5e-4,
                 batch_stats: bool = True) -> None:
        check_count("CodecCalibration", "batches", batches, fix="give at least 1 batch.")
        for name, steps in (("warmup_steps", warmup_steps), ("distill_steps", distill_steps),
                            ("adapt_steps", adapt_steps)):
            check_count("CodecCalibration", name, steps, at_least=0, fix="give a number of steps >= 0 (0: none).")
        self.batches, self.pca, self.batch_stats = batches, pca, batch_stats
        self.warmup_steps, self.warmup_lr = warmup_steps, warmup_lr
        self.distill_steps, self.distill_lr = distill_steps, distill_lr
        self.adapt_steps, self.adapt_lr = adapt_steps, adapt_lr
        self.report: dict[str, dict[str, float]] = {}

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit" or trainer.global_rank != 0 or trainer.ckpt_path:
            return
        hook = getattr(pl_module, "configure_split", None)
        if hook is None:
            raise ValueError(f"CodecCalibration needs {type(pl_module).__name__}.configure_split() to find the "
                             f"codecs; add it or remove the callback.")
        # The training loader as fit() will use it: from fit(train_dataloaders=...), the datamodule or the module.
        loader = trainer.fit_loop._data_source.dataloader()
        split_inputs = getattr(pl_module, "split_inputs", None)
        batches = []
        for batch in loader:
            batches.append(split_inputs(batch) if split_inputs is not None else batch[0])
            if len(batches) == self.batches:
                break
        self.report = calibrate(hook(), batches, pca=self.pca, warmup_steps=self.warmup_steps,
                                warmup_lr=self.warmup_lr, distill_steps=self.distill_steps,
                                distill_lr=self.distill_lr, adapt_steps=self.adapt_steps, adapt_lr=self.adapt_lr,
                                batch_stats=self.batch_stats)
