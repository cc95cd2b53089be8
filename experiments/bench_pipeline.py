"""Benchmark: time per batch of MobileNetV2 unsplit vs split across two ranks, per order and chunk count.

    python -m experiments.bench_pipeline --image-size 96 --batch-size 64 --steps 6 [--orders gpipe 1f1b zb]

For each order (default: all of :data:`splitlit.schedule.ORDERS`) and chunk count (1, 4, 8) it prints the wall
time per training batch (the later of the two ranks), each rank's computation time per batch (stage forward and
backward, no waiting), and the ratio of the split time to the bound max(client compute, server compute) — what a
perfect pipeline over two ranks would take. Each rank runs one
thread (two ranks share this machine's two cores); the unsplit baseline is shown with one and two threads.
The pipeline runs through ``SplitPipeline`` (the strategy's engine) without Lightning's loop around it.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from experiments.cifar10_mobilenet import MobileNetV2Classifier
from splitlit.pipeline import SplitPipeline
from splitlit.schedule import ORDERS


def _model(seed: int = 0) -> MobileNetV2Classifier:
    torch.manual_seed(seed)
    return MobileNetV2Classifier(pretrained=None)


def _batch(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=g)
    return x, torch.randint(0, 10, (args.batch_size,), generator=g)


def unsplit(args: argparse.Namespace, threads: int) -> float:
    torch.set_num_threads(threads)
    model = _model().train()
    x, y = _batch(args)
    times = []
    for step in range(args.warmup + args.steps):
        start = time.perf_counter()
        F.cross_entropy(model(x), y).backward()
        model.zero_grad(set_to_none=True)
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def _rank(rank: int, args: argparse.Namespace, port: int, order: str, chunks: int, queue: mp.Queue) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    model = _model().train()
    pipeline = SplitPipeline(model.configure_split(), rank=rank, device=torch.device("cpu"), chunks=chunks,
                             order=order)
    x, y = _batch(args)
    walls, computes = [], []
    for step in range(args.warmup + args.steps):
        pipeline.meter.reset()
        dist.barrier()
        start = time.perf_counter()
        if rank == 0:
            pipeline.train_step(x, target=y, loss_fn=F.cross_entropy)
        else:
            pipeline.train_step()
        wall = time.perf_counter() - start
        model.zero_grad(set_to_none=True)
        if step >= args.warmup:
            walls.append(wall)
            computes.append(pipeline.meter.compute_seconds())
    queue.put((rank, statistics.median(walls), statistics.median(computes)))
    dist.destroy_process_group()


def split(args: argparse.Namespace, order: str, chunks: int) -> dict[str, float]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, args, port, order, chunks, queue)) for r in (0, 1)]
    for p in procs:
        p.start()
    results = {}
    for _ in procs:
        rank, wall, compute = queue.get(timeout=1800)
        results[rank] = (wall, compute)
    for p in procs:
        p.join(timeout=60)
    # A batch is over when both ranks are: under zb the server's last weight gradient runs after the client is done.
    wall = max(results[0][0], results[1][0])
    bound = max(results[0][1], results[1][1])
    return {"wall": wall, "client": results[0][1], "server": results[1][1], "ratio": wall / bound}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--orders", nargs="+", default=list(ORDERS), choices=ORDERS)
    parser.add_argument("--chunks", type=int, nargs="+", default=[1, 4, 8])
    args = parser.parse_args()

    print(f"MobileNetV2, batch {args.batch_size} at {args.image_size} px, "
          f"median of {args.steps} steps after {args.warmup} warm-up")
    base1, base2 = unsplit(args, 1), unsplit(args, 2)
    print(f"{'run':<20}{'time/batch s':>14}{'client comp s':>15}{'server comp s':>15}{'time/bound':>12}")
    print(f"{'unsplit 1 thr':<20}{base1:>14.3f}{'':>15}{'':>15}{'':>12}")
    print(f"{'unsplit 2 thr':<20}{base2:>14.3f}{'':>15}{'':>15}{'':>12}")
    for order in args.orders:
        for chunks in args.chunks:
            r = split(args, order, chunks)
            print(f"{f'{order} chunks {chunks}':<20}{r['wall']:>14.3f}{r['client']:>15.3f}{r['server']:>15.3f}"
                  f"{r['ratio']:>12.2f}", flush=True)


if __name__ == "__main__":
    main()
