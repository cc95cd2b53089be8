"""A small U-shaped model (BatchNorm only with ``--batchnorm``), for transparency and failure tests.

    python tests/scripts/toy.py --out DIR --chunks 4 [--order gpipe] [--steps 4] [--accumulate 2] [--clip 0.05]

Dumps, per rank, the first optimiser step's loss and gradients (before clipping) and the final weights
to DIR/rank{r}.pt, and the client's validation logits to DIR/val_logits.pt. ``--unsplit`` runs the same
module on one process with Lightning's default strategy, which is the reference. ``--order 1f1b,zb`` trains
once per order in the same two processes (fresh model and Trainer each time, no second start-up) and dumps
into DIR/<order>/.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from splitlit import Split, SplitPipelineStrategy  # noqa: E402


class Toy(L.LightningModule):
    """head: Linear+Tanh, body: two Linear+GELU, tail: Linear -> 3 classes."""

    def __init__(self, lr: float = 0.1, broken: bool = False, split_hook: bool = True, batchnorm: bool = False) -> None:
        super().__init__()
        norm = (lambda n: nn.BatchNorm1d(n)) if batchnorm else (lambda n: nn.Identity())  # noqa: E731
        self.head = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), norm(12))
        self.body = nn.Sequential(nn.Linear(12 if not broken else 7, 16), nn.GELU(), nn.Linear(16, 10), nn.GELU(),
                                  norm(10))
        self.tail = nn.Linear(10, 3)
        self.lr = lr
        self.first_grads: dict[str, torch.Tensor] | None = None
        self.first_loss: torch.Tensor | None = None
        self.val_logits: list[torch.Tensor] = []
        if not split_hook:
            self.configure_split = None  # type: ignore[assignment]

    def configure_split(self) -> Split:
        return Split(head=self.head, body=self.body, tail=self.tail)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(self.body(self.head(x)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.first_loss is None:
            self.first_loss = outputs["loss"].detach().clone() if isinstance(outputs, dict) else outputs.detach()

    def on_before_optimizer_step(self, optimizer):
        if self.first_grads is None:
            self.first_grads = {n: p.grad.detach().clone() for n, p in self.named_parameters()
                                if p.grad is not None}

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.val_logits.append(logits.detach().cpu())
        self.log("val/loss", F.cross_entropy(logits, y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def data(batch_size: int, n: int = 96, val: int = 37):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n + val, 6, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] > 1).long()
    train = DataLoader(TensorDataset(x[:n], y[:n]), batch_size=batch_size, shuffle=False, drop_last=True)
    valid = DataLoader(TensorDataset(x[n:], y[n:]), batch_size=batch_size)
    return train, valid


class KillAt(L.Callback):
    """Ends this process abruptly (as a crash would) at training batch ``step`` on rank ``rank``."""

    def __init__(self, rank: int, step: int) -> None:
        self.rank, self.step = rank, step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_rank == self.rank and batch_idx == self.step:
            os._exit(3)


class FailingBody(nn.Module):
    """The toy's body, raising a genuine error (not a link failure) in the forward of call ``at``."""

    def __init__(self, body: nn.Module, at: int) -> None:
        super().__init__()
        self.body, self.at, self.calls = body, at, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.at:
            raise ValueError("a bug in the body (raised on purpose)")
        return self.body(x)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--chunks", type=int, default=4)
    p.add_argument("--order", default="1f1b")
    p.add_argument("--warmup", type=int, default=2, help="SplitPipelineStrategy(warmup=...)")
    p.add_argument("--steps", type=int, default=1, help="optimizer steps")
    p.add_argument("--accumulate", type=int, default=1)
    p.add_argument("--clip", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--precision", default="32-true")
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--two-hosts", action="store_true", help="num_nodes=2, devices=1 (env from the launcher)")
    p.add_argument("--unsplit", action="store_true")
    p.add_argument("--batchnorm", action="store_true", help="a BatchNorm1d in the head and one in the body")
    p.add_argument("--deferred-bn", action="store_true", help="SplitPipelineStrategy(deferred_batchnorm=True)")
    p.add_argument("--broken", action="store_true", help="a body that does not take the head's output")
    p.add_argument("--no-split-hook", action="store_true")
    p.add_argument("--kill-rank", type=int, default=None)
    p.add_argument("--kill-step", type=int, default=2)
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--fail-call", type=int, default=None, help="the body raises ValueError at this forward call")
    args = p.parse_args(argv)
    orders = args.order.split(",")
    dumps = [_fit(args, order, args.out / order if len(orders) > 1 else args.out) for order in orders]
    return dumps[-1]


def _fit(args: argparse.Namespace, order: str, out: Path) -> dict:
    L.seed_everything(0, verbose=False)
    model = Toy(broken=args.broken, split_hook=not args.no_split_hook, batchnorm=args.batchnorm)
    if args.fail_call is not None:
        model.body = FailingBody(model.body, args.fail_call)
    train, valid = data(args.batch_size)
    callbacks = [KillAt(args.kill_rank, args.kill_step)] if args.kill_rank is not None else []
    if args.unsplit:
        kw = dict(accelerator="cpu", devices=1)
    else:
        strategy = SplitPipelineStrategy(chunks=args.chunks, order=order, warmup=args.warmup, timeout=args.timeout,
                                         deferred_batchnorm=args.deferred_bn)
        kw = dict(accelerator="cpu", strategy=strategy,
                  **(dict(num_nodes=2, devices=1) if args.two_hosts else dict(devices=args.devices)))
    trainer = L.Trainer(max_steps=args.steps, accumulate_grad_batches=args.accumulate,
                        gradient_clip_val=args.clip, precision=args.precision, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, callbacks=callbacks, **kw)
    trainer.fit(model, train)
    logged = {k: float(v) for k, v in trainer.callback_metrics.items()}
    trainer.validate(model, valid, verbose=False)
    state = {k: v for k, v in model.state_dict().items() if not v.is_meta}
    dump = {"loss": model.first_loss, "grads": model.first_grads, "state": state, "logged": logged}
    out.mkdir(parents=True, exist_ok=True)
    torch.save(dump, out / f"rank{trainer.global_rank}.pt")
    if trainer.global_rank == 0:
        torch.save(torch.cat(model.val_logits), out / "val_logits.pt")
    return dump


if __name__ == "__main__":
    main()
