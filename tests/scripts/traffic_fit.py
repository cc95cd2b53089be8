"""Everything the server receives during a split fit, booked tensor by tensor, with pickles forbidden.

    python tests/scripts/traffic_fit.py --out DIR --phase first    # DataModule, checkpoints, early stop
    python tests/scripts/traffic_fit.py --out DIR --phase resume   # loaders passed to fit(), --ckpt_path last

Every ``torch.distributed`` call that can deliver a tensor is wrapped, on both ranks, to record what this rank
received (function, shape, dtype, bytes); ``pickle.loads``, torch's collective unpickler and
``torch.load(weights_only=False)`` raise. Each rank writes DIR/<phase>.rank<r>.json with its records, its
transport ledger, its pipeline meter's received bytes, its own weights' bytes and its metrics' names.
The data raise on any rank but the client, so the server provably never iterates a loader.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pickle
import sys
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from splitlit import SplitPipelineStrategy  # noqa: E402
from tests.scripts.metrics_fit import TinyNet  # noqa: E402

RECEIVED: list[dict] = []
BATCH, TRAIN_BATCHES, VAL_BATCHES = 8, 6, 2


def _book(fn: str, tensors: list[torch.Tensor]) -> None:
    for t in tensors:
        RECEIVED.append({"fn": fn, "shape": list(t.shape), "dtype": str(t.dtype),
                         "nbytes": t.numel() * t.element_size()})


def _wrap(name: str, received) -> None:
    original = getattr(dist, name)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        out = original(*args, **kwargs)
        _book(name, received(*args, **kwargs))
        return out

    setattr(dist, name, wrapper)


def _forbid(what: str):
    def refuse(*args, **kwargs):
        raise RuntimeError(f"{what} was called: nothing received from the peer may be unpickled")
    return refuse


def record_everything() -> None:
    me = lambda: dist.get_rank()  # noqa: E731
    _wrap("broadcast", lambda tensor, src, *a, **k: [tensor] if me() != src else [])
    _wrap("recv", lambda tensor, *a, **k: [tensor])
    _wrap("all_reduce", lambda tensor, *a, **k: [tensor])
    _wrap("reduce", lambda tensor, dst, *a, **k: [tensor] if me() == dst else [])
    _wrap("all_gather", lambda tensors, tensor, *a, **k: [t for i, t in enumerate(tensors) if i != me()])
    _wrap("all_gather_into_tensor", lambda out, tensor, *a, **k: [out])
    _wrap("gather", lambda tensor, gather_list=None, dst=0, *a, **k:
          [t for i, t in enumerate(gather_list or []) if i != me()] if me() == dst else [])
    _wrap("scatter", lambda tensor, *a, **k: [tensor])
    _wrap("all_to_all", lambda outs, ins, *a, **k: list(outs))
    _wrap("batch_isend_irecv", lambda ops, *a, **k: [op.tensor for op in ops if "irecv" in op.op.__name__])
    # The pipeline posts all-receive batches itself (op.op(...)), past batch_isend_irecv: book them where posted.
    from torch.distributed.pipelining import schedules
    post = schedules._batch_p2p

    def batch_p2p(ops, *args, **kwargs):
        _book("pipeline", [op.tensor for op in ops if "irecv" in op.op.__name__ and len({o.op for o in ops}) == 1])
        return post(ops, *args, **kwargs)

    schedules._batch_p2p = batch_p2p
    for name in ("broadcast_object_list", "all_gather_object", "gather_object", "scatter_object_list",
                 "recv_object_list"):
        setattr(dist, name, _forbid(f"torch.distributed.{name}"))
    pickle.loads = _forbid("pickle.loads")
    dist.distributed_c10d._unpickler = _forbid("torch.distributed's unpickler")
    load = torch.load

    def safe_load(*args, weights_only=None, **kwargs):
        if weights_only is False:
            raise RuntimeError("torch.load(weights_only=False) was called")
        return load(*args, weights_only=True, **kwargs)

    torch.load = safe_load


class ClientOnly(TensorDataset):
    """Raises when any process but the client reads it."""

    def __getitem__(self, index):
        if os.environ.get("LOCAL_RANK", "0") != "0" or os.environ.get("NODE_RANK", "0") != "0":
            raise RuntimeError("the server read a sample")
        return super().__getitem__(index)


SIZE = 16  # image side; --size (the up cut carries [8, SIZE/2, SIZE/2] floats per image)


def images(batches: int, seed: int) -> ClientOnly:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batches * BATCH, 3, SIZE, SIZE, generator=g)
    x += torch.randn(len(x), 1, 1, 1, generator=g)
    return ClientOnly(x, (x.mean((1, 2, 3)) > 0).long())


class Images(L.LightningDataModule):
    def train_dataloader(self) -> DataLoader:
        return DataLoader(images(TRAIN_BATCHES, 0), batch_size=BATCH)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(images(VAL_BATCHES, 1), batch_size=BATCH)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--phase", choices=("first", "resume"), required=True)
    parser.add_argument("--two-hosts", action="store_true", help="num_nodes=2, devices=1 (splitlit.link sets env)")
    parser.add_argument("--size", type=int, default=16)
    args = parser.parse_args()
    global SIZE
    SIZE = args.size
    out = Path(args.out)
    record_everything()
    L.seed_everything(0, verbose=False)
    model = TinyNet(lr=0.05)
    callbacks = [ModelCheckpoint(dirpath=out / "ckpt", every_n_train_steps=2, save_last=True),
                 ModelCheckpoint(dirpath=out / "ckpt", monitor="val/acc", mode="max", filename="best")]
    if args.phase == "first":  # stops at its first check: val/loss is far below the threshold
        callbacks.append(EarlyStopping(monitor="val/loss", stopping_threshold=1e9))
    strategy = SplitPipelineStrategy(chunks=2, timeout=60)
    ranks = dict(num_nodes=2, devices=1) if args.two_hosts else dict(devices=2)
    trainer = L.Trainer(accelerator="cpu", strategy=strategy, max_epochs=3 if args.phase == "first" else 2, **ranks,
                        num_sanity_val_steps=0, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        gradient_clip_val=0.5, callbacks=callbacks)
    if args.phase == "first":
        trainer.fit(model, datamodule=Images())
    else:
        trainer.fit(model, DataLoader(images(TRAIN_BATCHES, 0), batch_size=BATCH),
                    DataLoader(images(VAL_BATCHES, 1), batch_size=BATCH), ckpt_path="last")
    own = sum(t.numel() * t.element_size() for t in model.state_dict().values() if not t.is_meta)
    meter_received = sum(t.nbytes for t in strategy.meter.transfers if t.role == "received")
    result = {"rank": trainer.global_rank, "received": RECEIVED, "ledger": strategy.ledger.received,
              "meter_received": meter_received, "own_weight_bytes": own, "metrics": sorted(trainer.callback_metrics),
              "global_step": trainer.global_step, "epoch": trainer.current_epoch,
              "should_stop": trainer.should_stop}
    (out / f"{args.phase}.rank{trainer.global_rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
