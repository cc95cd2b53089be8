"""``Defences``: the client's defences against what the server can learn (NoPeek, Gaussian noise), off by default."""

from __future__ import annotations

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from splitlit.leakage import activation_noise, gradient_noise, nopeek

__all__ = ["Defences"]


class Defences(Callback):
    """Installs the chosen defences as hooks on the client's modules at the cuts, at the start of the fit.

    Usage::

        trainer = Trainer(strategy=SplitPipelineStrategy(chunks=4), callbacks=[Defences(nopeek=0.1)])

    or in YAML (``trainer.callbacks``)::

        - class_path: callbacks.Defences
          init_args: {nopeek: 0.1, activation_noise: 0.0, gradient_noise: 0.0}

    Hooks rather than codec modules: a defence changes the client's computation, not what the link carries (a
    NoPeek penalty and the noise add no tensor and no byte), it must compose with any codec at the same cut, and
    it must stay out of checkpoints and of the server's weights; a hook on the module that sends does all three
    (:mod:`splitlit.leakage.defences`). Installed in ``on_fit_start``, after codec calibration (which must see
    the clean network), on the client only; unsplit, in the one process. Logs nothing.

    Args:
        nopeek: weight ``alpha`` of NoPeek's distance-correlation penalty between the head's inputs and the up-cut
            activations (Vepakomma et al. 2020; the paper uses 0.1-0.5 per batch); 0 = off.
        activation_noise: standard deviation of Gaussian noise added to the up-cut activations sent; 0 = off.
        gradient_noise: standard deviation of Gaussian noise added to the down-cut gradients sent back; 0 = off.
    """

    def __init__(self, nopeek: float = 0.0, activation_noise: float = 0.0, gradient_noise: float = 0.0) -> None:
        for name, value, fix in (("nopeek", nopeek, "a weight alpha >= 0, e.g. 0.1 (0 turns NoPeek off)"),
                                 ("activation_noise", activation_noise, "a standard deviation >= 0 (0 = off)"),
                                 ("gradient_noise", gradient_noise, "a standard deviation >= 0 (0 = off)")):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"Defences({name}={value!r}): give {fix}.")
        self.nopeek, self.activation_noise, self.gradient_noise = float(nopeek), float(activation_noise), \
            float(gradient_noise)
        self._hooks: list[RemovableHandle] = []

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not getattr(trainer.strategy, "is_client", True):
            return  # the server runs the body only: every defence lives on the client
        configure = getattr(pl_module, "configure_split", None)
        if configure is None:
            raise ValueError(f"Defences needs {type(pl_module).__name__}.configure_split() to find the cuts.")
        split = configure()
        if self.nopeek:
            self._hooks += nopeek(split, self.nopeek)
        if self.activation_noise:
            self._hooks += activation_noise(split, self.activation_noise)
        if self.gradient_noise:
            self._hooks += gradient_noise(split, self.gradient_noise)
        if self._hooks:
            rank_zero_info(f"Defences: nopeek={self.nopeek:g}, activation_noise={self.activation_noise:g}, "
                           f"gradient_noise={self.gradient_noise:g}")

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
