"""The toy U model (tests/scripts/toy.py) trained by several clients and one server.

    python tests/scripts/clients_toy.py --out DIR --clients 3 --paradigm sequential [--epochs 2] [--identical]
    python tests/scripts/clients_toy.py --out DIR --clients 3 --reference     # one process, the same batches

Client ``i`` holds the ``i``-th of ``clients`` equal shards of the toy data (``--identical``: every client the
whole set; ``--uneven``: client ``i`` has ``i + 1`` batches). Each rank dumps its final state to DIR/rank{r}.pt,
and the clients their validation logits to DIR/val_logits{r}.pt. ``--reference`` trains the unsplit module on one
process on the clients' batches in the order the server serves them (round-robin), which is what sequential split
learning computes.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from splitlit import SplitPipelineStrategy  # noqa: E402
from splitlit.clients import services  # noqa: E402
from tests.scripts.toy import KillAt, Toy  # noqa: E402


class SGDToy(Toy):
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)  # no momentum: a client's optimiser holds no state


def shards(clients: int, batch_size: int, *, identical: bool, uneven: bool) -> list[list[tuple]]:
    """Every client's training batches, in order."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(96, 6, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] > 1).long()
    batches = [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(x), batch_size)]
    if identical:
        return [batches for _ in range(clients)]
    if uneven:
        return [batches[c * (c + 1) // 2: c * (c + 1) // 2 + c + 1] for c in range(clients)]
    return [batches[c::clients] for c in range(clients)]


def val_loader(batch_size: int) -> DataLoader:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(20, 6, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long()
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--clients", type=int, default=2)
    p.add_argument("--paradigm", default="sequential")
    p.add_argument("--turn", default="batch")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--chunks", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--identical", action="store_true")
    p.add_argument("--uneven", action="store_true")
    p.add_argument("--reference", action="store_true")
    p.add_argument("--devices", type=int, default=None, help="processes (default clients + 1)")
    p.add_argument("--hosts", action="store_true", help="num_nodes=clients + 1, devices=1 (splitlit.link --clients)")
    p.add_argument("--kill-rank", type=int, default=None, help="this rank dies (os._exit) at --kill-step")
    p.add_argument("--kill-step", type=int, default=1)
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--ckpt", type=Path, default=None, help="checkpoint each round into DIR/client<i>")
    p.add_argument("--resume", action="store_true", help="fit(ckpt_path='last') from --ckpt")
    args = p.parse_args()
    L.seed_everything(0, verbose=False)
    model = SGDToy()
    per_client = shards(args.clients, args.batch_size, identical=args.identical, uneven=args.uneven)
    callbacks = [KillAt(args.kill_rank, args.kill_step)] if args.kill_rank is not None else []
    rank_env = int(os.environ.get("NODE_RANK" if args.hosts else "LOCAL_RANK", 0))
    if args.ckpt is not None:
        callbacks.append(ModelCheckpoint(dirpath=args.ckpt / f"client{rank_env}", save_last=True))
    common = dict(accelerator="cpu", max_epochs=args.epochs, logger=False, enable_checkpointing=args.ckpt is not None,
                  enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=1, callbacks=callbacks)
    if args.reference:
        order = services([len(b) for b in per_client], args.turn)
        turns = [per_client[c][sum(1 for d in order[:k] if d == c)] for k, c in enumerate(order)]
        trainer = L.Trainer(devices=1, **common)
        trainer.fit(model, DataLoader(turns, batch_size=None), val_loader(args.batch_size))
        rank = "reference"
    else:
        strategy = SplitPipelineStrategy(chunks=args.chunks, clients=args.clients, paradigm=args.paradigm,
                                         timeout=args.timeout, turn=args.turn)
        hosts = dict(num_nodes=args.clients + 1, devices=1) if args.hosts else dict(devices=args.devices or
                                                                                       args.clients + 1)
        trainer = L.Trainer(strategy=strategy, **hosts, **common)
        mine = int(os.environ.get("NODE_RANK" if args.hosts else "LOCAL_RANK", 0))  # this process's rank
        train = DataLoader(per_client[mine] if mine < args.clients else [], batch_size=None)
        trainer.fit(model, train, val_loader(args.batch_size), ckpt_path="last" if args.resume else None)
        rank = trainer.global_rank
    args.out.mkdir(parents=True, exist_ok=True)
    state = {k: v for k, v in model.state_dict().items() if not v.is_meta}
    torch.save({"state": state, "ledger": getattr(trainer.strategy, "ledger", None) and
                list(trainer.strategy.ledger.received)}, args.out / f"rank{rank}.pt")
    if model.val_logits:
        torch.save(torch.cat(model.val_logits[-3:]), args.out / f"val_logits{rank}.pt")


if __name__ == "__main__":
    main()
