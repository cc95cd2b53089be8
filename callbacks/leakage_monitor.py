"""``LeakageMonitor``: what an honest-but-curious server could learn from what crosses the cuts, beside traffic."""

from __future__ import annotations

import inspect
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from splitlit.leakage import (ATTACKS, distance_correlation, down_cut_module, image_grid, label_auc_cosine,
                              label_auc_norm, per_sample, received_view, reconstruction_scores, server_decoded,
                              token_candidates, token_recovery, train_decoder, up_cut_module)
from splitlit.split import Split

__all__ = ["LeakageMonitor", "PublicImages"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GRID_FILE = "leak_recon.png"


class PublicImages(Protocol):
    """The server's public images (for the reconstruction attack): disjoint from the client's data."""

    def images(self) -> Tensor: ...

    def check_disjoint(self, trainer: Trainer) -> None: ...


class LeakageMonitor(Callback):
    r"""Scores the server's attacks on what the client sends, every few training steps, on the client.

    Usage::

        monitor = LeakageMonitor(every_n_steps=8, max_samples=32, attacks=("label_auc", "dcor", "recon"),
                                 public_images=PublicCIFAR10("../shared/data/cifar10"))
        trainer = Trainer(strategy=SplitPipelineStrategy(chunks=4), callbacks=[monitor])  # or unsplit

    The server's view is rebuilt on the client from the tensors the client itself hands to the transport (a
    forward hook on the module whose output crosses the up cut, a gradient hook on the input of the module whose
    input gradient crosses the down cut; the same modules run unsplit, which is the simulation mode), passed
    through the strategy's wire codecs as the server decodes them. Scoring needs the labels and the inputs, which
    are on the client, so nothing crosses the link for it: the link carries exactly the same bytes with and
    without the monitor. On the server (rank 1) it does nothing.

    Every ``every_n_steps`` training steps, the first ``max_samples`` samples of the batch (in micro-batch order)
    are scored and these keys are logged at that step:

    - ``leak/label_auc_norm``: AUC of the labels from the norm of each sample's down-cut gradient (Li et al.
      2022; macro one-vs-rest over classes, in the attacker's better orientation: 0.5 = nothing, 1 = all).
    - ``leak/label_auc_cosine``: the same from the gradients' direction (cosine with one known sample per class).
    - ``leak/label_auc_norm_logits`` / ``leak/label_auc_cosine_logits``: the same attacks on the gradient of the
      logits, which a server holding the classifier (a two-part split, no U) would receive: the gap to the two
      keys above is what the client's tail protects.
    - ``leak/dcor``: distance correlation between the head's inputs and the up-cut activations (NoPeek's measure).
    - ``leak/recon_psnr`` / ``leak/recon_ssim``: PSNR (dB) and SSIM of the (first ``recon_samples``) images the
      server reconstructs with a decoder trained on public images through the public, un-fine-tuned head (attack
      ``"recon"``); a grid of true (top) and reconstructed (bottom) images goes to W&B (``leak/recon_grid``) and
      to ``leak_recon.png`` in the run folder, at each epoch end.
    - ``leak/token_recovery``: share of non-padding tokens the server names from the up-cut hidden states by the
      nearest public word embedding (attack ``"tokens"``).
    - ``leak/seconds``: the monitor's own time on that step (hooks and attacks), for its overhead.

    The public model (architecture + public weights) is, by default, a fresh instance of the LightningModule's
    class built from its saved hyperparameters, i.e. before any fine-tuning; ``public_head`` overrides it.

    Args:
        every_n_steps: score one training step in this many (the first measured step of a split fit is the second
            step: the first also infers the pipeline's shapes).
        max_samples: samples scored per measured step (the AUCs and dCor are computed on them).
        attacks: any of ``"label_auc"``, ``"dcor"``, ``"recon"`` (images; needs ``public_images``), ``"tokens"``.
        public_images: the server's public images for ``"recon"`` (e.g.
            :class:`experiments.leakage_public.PublicCIFAR10`); checked disjoint from the client's data.
        public_head: the server's copy of the head with public weights (default: see above).
        recon_steps: training steps of the reconstruction decoder, at the start of the fit (one-time cost).
        recon_samples: images of the sample reconstructed and scored (PSNR, SSIM) and shown in the grid.
        image_mean / image_std: the inputs' normalisation, undone before PSNR/SSIM (default ImageNet's).
    """

    def __init__(self, every_n_steps: int = 8, max_samples: int = 32,
                 attacks: Sequence[str] = ("label_auc", "dcor"), public_images: PublicImages | None = None,
                 public_head: nn.Module | None = None, recon_steps: int = 150, recon_samples: int = 8,
                 image_mean: Sequence[float] | None = IMAGENET_MEAN,
                 image_std: Sequence[float] | None = IMAGENET_STD) -> None:
        for name, value, low in (("every_n_steps", every_n_steps, 1), ("max_samples", max_samples, 4),
                                 ("recon_steps", recon_steps, 0), ("recon_samples", recon_samples, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"LeakageMonitor({name}={value!r}): give an integer >= {low}.")
        attacks = (attacks,) if isinstance(attacks, str) else tuple(attacks)
        unknown = [a for a in attacks if a not in ATTACKS]
        if unknown or not attacks:
            raise ValueError(f"LeakageMonitor(attacks={list(attacks)!r}): unknown attack(s) {unknown}; choose from "
                             f"{sorted(ATTACKS)}, e.g. attacks=['label_auc', 'dcor', 'recon'].")
        if "recon" in attacks and public_images is None:
            raise ValueError("LeakageMonitor(attacks=[..., 'recon']) needs public_images: the server's public "
                             "images to train its decoder on, e.g. experiments.leakage_public.PublicCIFAR10.")
        self.every_n_steps, self.max_samples, self.attacks = every_n_steps, max_samples, attacks
        self.public_images, self.public_head, self.recon_steps = public_images, public_head, recon_steps
        self.recon_samples = recon_samples
        self.mean = tuple(image_mean) if image_mean is not None else None
        self.std = tuple(image_std) if image_std is not None else None
        self.history: list[dict[str, float]] = []  # every measurement: {"step": ..., "leak/...": ...}
        self.setup_seconds = 0.0  # the one-time cost: public model, decoder training
        self._split: Split | None = None
        self._plan: Any = None
        self._hooks: list[RemovableHandle] = []
        self._decoder: nn.Module | None = None
        self._candidates: Tensor | None = None
        self._armed = False
        self._reset()

    def _reset(self) -> None:
        self._inputs: list[tuple[Tensor, ...]] = []
        self._sent: list[tuple[Tensor, ...]] = []
        self._grads: dict[int, list[Tensor]] = {}
        self._waiting: set[int] = set()  # micro-batches whose down-cut gradient is still to come
        self._logit_grads: dict[int, Tensor] = {}
        self._offsets: dict[int, int] = {}  # first row of each scored micro-batch
        self._head_calls = self._tail_calls = self._tail_rows = 0
        self._seconds = 0.0

    # -- set-up ---------------------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit" and self.public_images is not None and _is_client(trainer):
            self.public_images.check_disjoint(trainer)  # a bad public split fails before any training

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Installed after every on_fit_start (callbacks.Defences), so the hooks see what the defences send.
        if not _is_client(trainer):
            return
        start = time.perf_counter()
        configure = getattr(pl_module, "configure_split", None)
        if configure is None:
            raise ValueError(f"LeakageMonitor needs {type(pl_module).__name__}.configure_split() to find the cuts.")
        self._split = configure()
        self._plan = getattr(trainer.strategy, "wire", None)  # None unsplit: no transport, nothing re-encoded
        needs_public = "recon" in self.attacks or "tokens" in self.attacks
        head = self.public_head if self.public_head is not None or not needs_public else _public_head(pl_module)
        if "recon" in self.attacks:
            images = self.public_images.images()  # type: ignore[union-attr]
            self._decoder = train_decoder(head, images, steps=self.recon_steps)
        if "tokens" in self.attacks:
            self._candidates = token_candidates(head)
        self._hooks = [self._split.head.register_forward_pre_hook(self._keep_inputs),
                       up_cut_module(self._split).register_forward_hook(self._keep_sent),
                       down_cut_module(self._split).register_forward_pre_hook(self._watch_gradient),
                       self._split.tail.register_forward_hook(self._watch_logits)]
        self.setup_seconds = time.perf_counter() - start

    # -- capture --------------------------------------------------------------------------------------------------
    def _room(self, have: list[tuple[Tensor, ...]]) -> int:
        return self.max_samples - sum(t[0].shape[0] for t in have)

    def _keep_inputs(self, module: Any, args: tuple) -> None:
        if self._armed and torch.is_grad_enabled() and not args[0].is_meta:
            start = time.perf_counter()
            self._head_calls += 1
            self._inputs.append(tuple(a.detach()[: max(self._room(self._inputs), 0)].clone() for a in args
                                      if isinstance(a, Tensor)))
            self._seconds += time.perf_counter() - start

    def _keep_sent(self, module: Any, args: tuple, output: Any) -> None:
        outs = output if isinstance(output, tuple) else (output,)
        if self._armed and torch.is_grad_enabled() and not outs[0].is_meta:
            start = time.perf_counter()
            self._sent.append(tuple(t.detach()[: max(self._room(self._sent), 0)].clone() for t in outs))
            self._seconds += time.perf_counter() - start

    def _watch_gradient(self, module: Any, args: tuple) -> None:
        if not self._armed or not torch.is_grad_enabled():
            return
        sent_back = [t for t in args if isinstance(t, Tensor) and t.is_floating_point() and t.requires_grad]
        if not sent_back or sent_back[0].is_meta:
            return
        index, offset = self._tail_calls, self._tail_rows
        self._tail_calls, self._tail_rows = index + 1, offset + sent_back[0].shape[0]
        if offset >= self.max_samples:
            return
        # Backward order may differ from forward order: each gradient is keyed by micro-batch and position.
        parts: list[Tensor | None] = [None] * len(sent_back)
        self._grads[index] = parts  # type: ignore[assignment]
        self._offsets[index] = offset
        self._waiting.add(index)

        def keeper(j: int) -> Any:
            def keep(grad: Tensor) -> None:
                start = time.perf_counter()
                parts[j] = grad.detach()[: self.max_samples - offset].clone()
                if all(p is not None for p in parts):
                    self._waiting.discard(index)
                self._seconds += time.perf_counter() - start
            return keep

        for j, t in enumerate(sent_back):
            t.register_hook(keeper(j))

    def _watch_logits(self, module: Any, args: tuple, output: Any) -> None:
        """The gradient of the logits: what a server holding the classifier (no U) would receive."""
        logits = output[0] if isinstance(output, tuple) else output
        if not self._armed or not torch.is_grad_enabled() or not isinstance(logits, Tensor) or logits.is_meta \
                or not logits.requires_grad:
            return
        index = self._tail_calls - 1  # the tail's pre-hook above numbered this micro-batch
        if index not in self._offsets:
            return
        offset = self._offsets[index]
        logits.register_hook(lambda g: self._logit_grads.__setitem__(index, g.detach()[: self.max_samples - offset]))

    # -- each step ------------------------------------------------------------------------------------------------
    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self._split is None:
            return
        if not self._armed:
            self._armed = trainer.global_step % self.every_n_steps == 0
        self._reset()

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._split is None or not self._armed:
            return
        start = time.perf_counter()
        labels = _labels(batch)
        n = min(self.max_samples, len(labels))
        # One head and one tail call per micro-batch, covering the batch, every gradient back: else (the first
        # split step also runs the stages to infer shapes) this step is not scored and the next one is.
        if self._head_calls != self._tail_calls or self._tail_rows != len(labels) or self._waiting:
            self._reset()
            return
        self._armed = False
        # The server decodes the gradients it receives through the down cut's wire codec, if any.
        grads = [per_sample(*received_view(tuple(self._grads[k]), self._plan, cut="down", kind="gradient"))
                 for k in sorted(self._grads)]
        metrics = self._score(labels[:n], grads, n)
        if "label_auc" in self.attacks and sorted(self._logit_grads) == sorted(self._grads):
            logit_grads = torch.cat([self._logit_grads[k].reshape(len(self._logit_grads[k]), -1)
                                     for k in sorted(self._logit_grads)])[:n]
            metrics["leak/label_auc_norm_logits"] = label_auc_norm(logit_grads, labels[:n])
            metrics["leak/label_auc_cosine_logits"] = label_auc_cosine(logit_grads, labels[:n])
        metrics["leak/seconds"] = self._seconds + time.perf_counter() - start
        self.history.append({"step": float(trainer.global_step), **metrics})
        trainer._logger_connector.log_metrics(metrics)
        self._reset()

    def _score(self, labels: Tensor, grads: list[Tensor], n: int) -> dict[str, float]:
        assert self._split is not None
        inputs = tuple(torch.cat(parts)[:n] for parts in zip(*self._inputs))
        sent = tuple(torch.cat(parts)[:n] for parts in zip(*self._sent))
        received = received_view(sent, self._plan, cut="up", kind="activation")
        metrics: dict[str, float] = {}
        if "label_auc" in self.attacks and grads:
            g = torch.cat(grads)[:n]  # the gradients of all the tensors the down cut carries, per sample
            metrics["leak/label_auc_norm"] = label_auc_norm(g, labels)
            metrics["leak/label_auc_cosine"] = label_auc_cosine(g, labels)
        if "dcor" in self.attacks:
            metrics["leak/dcor"] = float(distance_correlation(inputs[0], per_sample(*received)))
        if "recon" in self.attacks or "tokens" in self.attacks:
            decoded = server_decoded(self._split, received)
            if decoded is None:
                rank_zero_warn("LeakageMonitor: the up decoder's weights are only on the server, so its view cannot "
                               "be rebuilt on the client; 'recon'/'tokens' are skipped (run unsplit to score them).")
            elif "recon" in self.attacks:
                assert self._decoder is not None
                k = self.recon_samples  # SSIM is the monitor's dearest step (0.035 s per 96 px image on one core)
                with torch.no_grad():
                    fake = self._decoder(decoded[:k].float())
                metrics["leak/recon_psnr"], metrics["leak/recon_ssim"] = reconstruction_scores(
                    fake, inputs[0][:k], mean=self.mean, std=self.std)
                self._grid = image_grid(inputs[0][:k], fake, mean=self.mean, std=self.std)
            if decoded is not None and "tokens" in self.attacks:
                assert self._candidates is not None
                mask = inputs[1] if len(inputs) > 1 else torch.ones_like(inputs[0])
                metrics["leak/token_recovery"] = token_recovery(decoded, inputs[0], mask, self._candidates)
        return metrics

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        grid = getattr(self, "_grid", None)
        if grid is None or not _is_client(trainer):
            return
        from torchvision.utils import save_image

        folder = _run_folder(trainer)
        folder.mkdir(parents=True, exist_ok=True)
        save_image(grid, folder / GRID_FILE)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key="leak/recon_grid", images=[grid], caption=["top: true; bottom: reconstructed"])

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks, self._split, self._armed = [], None, False


def _run_folder(trainer: Trainer) -> Path:
    """The first logger's folder (the run folder), else ``default_root_dir``. Not ``trainer.log_dir``: it
    broadcasts, and only the client runs this."""
    for logger in trainer.loggers:
        folder = getattr(logger, "log_dir", None) or getattr(logger, "save_dir", None)
        if folder:
            return Path(folder)
    return Path(trainer.default_root_dir)


def _is_client(trainer: Trainer) -> bool:
    return bool(getattr(trainer.strategy, "is_client", True))


def _labels(batch: Any) -> Tensor:
    if isinstance(batch, dict):
        for key in ("labels", "label", "target", "y"):
            if key in batch:
                return batch[key]
        raise ValueError(f"LeakageMonitor: the batch is a dict without labels (keys {sorted(batch)}); name them "
                         f"'labels'.")
    if isinstance(batch, (tuple, list)) and len(batch) >= 2 and isinstance(batch[-1], Tensor):
        return batch[-1]
    raise ValueError(f"LeakageMonitor: cannot find the labels in a batch of type {type(batch).__name__}; give "
                     f"(inputs, labels) tuples or dicts with 'labels'.")


def _public_head(pl_module: LightningModule) -> nn.Module:
    """The head the server can build: the same class and hyperparameters, before any fine-tuning."""
    accepted = inspect.signature(type(pl_module).__init__).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
    # LightningCLI adds entries of its own (``_instantiator``) to the saved hyperparameters.
    hparams = {k: v for k, v in pl_module.hparams.items() if takes_any or k in accepted}
    try:
        fresh = type(pl_module)(**hparams)
    except Exception as err:  # noqa: BLE001 - re-raised with the fix
        raise ValueError(f"LeakageMonitor: cannot rebuild {type(pl_module).__name__} from its hyperparameters for the "
                         f"server's public head ({err}); pass public_head=... explicitly.") from err
    return fresh.configure_split().head.eval()
