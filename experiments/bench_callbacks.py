"""Benchmark of the measurement callbacks: their overhead per batch, and their bytes against the network interface's.

    python -m experiments.bench_callbacks                 # both parts, about 2-3 minutes on 2 CPU cores
    python -m experiments.bench_callbacks --part overhead --batches 60 --repeats 3

1. Overhead: MobileNetV2 (random weights, 32x32 images, batch 32, chunks 4) split on two local ranks, fitted
   ``--repeats`` times with and without LinkTrafficMonitor + PipelineTimingMonitor + BestMetric, alternately,
   in one pair of processes, with a CSVLogger and ``log_every_n_steps=10`` in both. Time per batch is the
   client's start-to-start time of consecutive training batches (everything: data, step, hooks, logging),
   the first 5 batches of each fit left out. The callbacks' own hook time (collectives included) is also
   summed directly on each rank.
2. Bytes: the same fit with the callbacks, the client and the server in two network namespaces joined by a
   veth pair (root only; otherwise loopback, which other processes may share), no validation. The client's
   interface counters (``/proc/net/dev``, received + transmitted) over ``on_train_start`` .. ``on_train_end``
   against the callbacks' count of the four flows over the same batches.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
NETNS = ("slbench0", "slbench1")
ADDRS = ("10.213.0.1", "10.213.0.2")
VETH = ("slbench0v", "slbench1v")
HOOKS = ("setup", "on_fit_start", "on_train_batch_start", "on_train_batch_end", "on_train_epoch_end",
         "on_validation_end")


def _fit(*, batches: int, callbacks: bool, num_nodes: int, devices: int, root: str, probe: Any = None,
         image: int = 32, batch: int = 32, chunks: int = 4) -> dict[str, Any]:
    import lightning as L
    import torch
    from lightning.pytorch.loggers import CSVLogger
    from torch.utils.data import DataLoader, TensorDataset

    from callbacks import BestMetric, LinkTrafficMonitor, PipelineTimingMonitor
    from experiments.cifar10_mobilenet import MobileNetV2Classifier
    from splitlit import SplitPipelineStrategy

    L.seed_everything(0, verbose=False)
    x = torch.randn(batches * batch, 3, image, image)
    y = torch.randint(0, 10, (len(x),))
    clock = _BatchClock()
    measured = [LinkTrafficMonitor(warmup_batches=0), PipelineTimingMonitor(), BestMetric("val/acc")] \
        if callbacks else []
    hook_time = _time_hooks(measured)
    trainer = L.Trainer(accelerator="cpu", devices=devices, num_nodes=num_nodes,
                        strategy=SplitPipelineStrategy(chunks=chunks, timeout=120), max_epochs=1,
                        limit_val_batches=0, num_sanity_val_steps=0, log_every_n_steps=10,
                        logger=CSVLogger(root), enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[clock, *measured, *([probe] if probe else [])])
    trainer.fit(MobileNetV2Classifier(pretrained=None), DataLoader(TensorDataset(x, y), batch_size=batch))
    cycles = [b - a for a, b in zip(clock.starts, clock.starts[1:])][5:]
    return {"rank": trainer.global_rank, "callbacks": callbacks, "batch_s": statistics.fmean(cycles),
            "batch_s_median": statistics.median(cycles), "hook_s_per_batch": hook_time[0] / max(len(clock.starts), 1),
            "bytes_per_batch": float(trainer.logged_metrics.get("link/bytes_per_batch_epoch", float("nan"))),
            "batches": len(clock.starts)}


class _BatchClock:
    """Start times of the training batches (a minimal callback, present in every fit)."""

    def __new__(cls):
        from lightning.pytorch import Callback

        class Clock(Callback):
            def __init__(self) -> None:
                self.starts: list[float] = []

            def on_train_batch_start(self, *args: Any) -> None:
                self.starts.append(time.perf_counter())

        return Clock()


def _time_hooks(callbacks: list) -> list[float]:
    total = [0.0]
    for cb in callbacks:
        for name in HOOKS:
            hook = getattr(cb, name)

            def timed(*args, _hook=hook, **kwargs):
                start = time.perf_counter()
                try:
                    return _hook(*args, **kwargs)
                finally:
                    total[0] += time.perf_counter() - start

            setattr(cb, name, timed)
    return total


def _interface_bytes() -> dict[str, int]:
    counters = {}
    for line in Path("/proc/net/dev").read_text().splitlines()[2:]:
        name, values = line.split(":", 1)
        fields = values.split()
        counters[name.strip()] = int(fields[0]) + int(fields[8])  # received + transmitted bytes
    return counters


class _InterfaceProbe:
    def __new__(cls, interface: str):
        from lightning.pytorch import Callback

        class Probe(Callback):
            def __init__(self) -> None:
                self.interface, self.before, self.after = interface, 0, 0

            def on_train_start(self, *args: Any) -> None:
                self.before = _interface_bytes()[self.interface]

            def on_train_end(self, *args: Any) -> None:
                self.after = _interface_bytes()[self.interface]

        return Probe()


# -- workers (run inside the ranks) -------------------------------------------------------------------------------
def _overhead_worker(args: argparse.Namespace) -> None:
    for repeat in range(args.repeats):
        for callbacks in (False, True) if repeat % 2 == 0 else (True, False):
            result = _fit(batches=args.batches, callbacks=callbacks, num_nodes=1, devices=2, root=args.root)
            if result["rank"] == 0:  # both ranks share the pipe: one writer keeps the lines whole
                print("RESULT " + json.dumps(result), flush=True)


def _bytes_worker(args: argparse.Namespace) -> None:
    probe = _InterfaceProbe(args.interface)
    result = _fit(batches=args.batches, callbacks=True, num_nodes=args.nodes, devices=3 - args.nodes,
                  root=args.root, probe=probe)
    result["wire_bytes"] = probe.after - probe.before
    if result["rank"] == 0:
        print("RESULT " + json.dumps(result), flush=True)


# -- the driver ---------------------------------------------------------------------------------------------------
def _free_port() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


def _results(output: str) -> list[dict[str, Any]]:
    return [json.loads(line[len("RESULT "):]) for line in output.splitlines() if line.startswith("RESULT ")]


def _run(cmds: list[list[str]], envs: list[dict[str, str]], timeout: float) -> list[str]:
    procs = [subprocess.Popen(c, env=e, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for c, e in zip(cmds, envs)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=timeout)[0])
    except subprocess.TimeoutExpired:
        raise RuntimeError("the benchmark's ranks did not finish in time:\n" + "\n----\n".join(outs)) from None
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, out in zip(procs, outs):
        if p.returncode:
            raise RuntimeError(f"a rank failed (exit {p.returncode}):\n{out[-4000:]}")
    return outs


def overhead(batches: int, repeats: int, root: str) -> None:
    cmd = [sys.executable, "-m", "experiments.bench_callbacks", "--worker", "overhead", "--batches", str(batches),
           "--repeats", str(repeats), "--root", root]
    results = [r for r in _results(_run([cmd], [_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=_free_port())], 900)[0])
               if r["rank"] == 0]
    without = [r["batch_s"] for r in results if not r["callbacks"]]
    with_cb = [r["batch_s"] for r in results if r["callbacks"]]
    hooks = statistics.fmean(r["hook_s_per_batch"] for r in results if r["callbacks"])
    base = statistics.fmean(without)
    print(f"Overhead ({batches} batches x {repeats} fits each, MobileNetV2 32x32, batch 32, chunks 4, 2 ranks):")
    print(f"  time per batch without callbacks: {base * 1e3:.2f} ms  (fits: "
          f"{', '.join(f'{t * 1e3:.2f}' for t in without)})")
    print(f"  time per batch with callbacks:    {statistics.fmean(with_cb) * 1e3:.2f} ms  (fits: "
          f"{', '.join(f'{t * 1e3:.2f}' for t in with_cb)})")
    print(f"  difference: {(statistics.fmean(with_cb) / base - 1) * 100:+.2f} %")
    print(f"  the callbacks' own hooks on the client: {hooks * 1e3:.3f} ms per batch = {hooks / base * 100:.2f} %")


def _setup_netns() -> bool:
    steps = [["ip", "netns", "add", NETNS[0]], ["ip", "netns", "add", NETNS[1]],
             ["ip", "link", "add", VETH[0], "type", "veth", "peer", "name", VETH[1]]]
    for ns, veth, addr in zip(NETNS, VETH, ADDRS):
        steps += [["ip", "link", "set", veth, "netns", ns], ["ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", veth],
                  ["ip", "-n", ns, "link", "set", veth, "up"], ["ip", "-n", ns, "link", "set", "lo", "up"]]
    for step in steps:
        if subprocess.run(step, capture_output=True).returncode:
            _teardown_netns()
            return False
    return True


def _teardown_netns() -> None:
    for ns in NETNS:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def wire_bytes(batches: int, root: str, use_netns: bool, timeout: float = 300) -> None:
    worker = [sys.executable, "-m", "experiments.bench_callbacks", "--worker", "bytes", "--batches", str(batches),
              "--root", root]
    if use_netns and _setup_netns():
        try:
            cmds = [["ip", "netns", "exec", ns, *worker, "--interface", veth, "--nodes", "2"]
                    for ns, veth in zip(NETNS, VETH)]
            # gloo binds to the address of the host name unless told which interface: the namespace's veth
            envs = [_env(MASTER_ADDR=ADDRS[0], MASTER_PORT="29612", NODE_RANK=str(r), LOCAL_RANK="0",
                         WORLD_SIZE="2", GLOO_SOCKET_IFNAME=veth) for r, veth in enumerate(VETH)]
            outs = _run(cmds, envs, timeout)
            where = f"veth {VETH[0]} between network namespaces {NETNS[0]} (client) and {NETNS[1]} (server)"
        finally:
            _teardown_netns()
    else:
        outs = _run([worker + ["--interface", "lo", "--nodes", "1"]], [_env(MASTER_ADDR="127.0.0.1",
                                                                           MASTER_PORT=_free_port())], timeout)
        where = "loopback (shared with any other process using it)"
    result = next(r for out in outs for r in _results(out) if r["rank"] == 0)
    counted = result["bytes_per_batch"] * result["batches"]
    print(f"Bytes ({result['batches']} training batches, no validation) on {where}:")
    print(f"  counted by LinkTrafficMonitor: {counted:,.0f} bytes ({result['bytes_per_batch']:,.0f} per batch)")
    print(f"  seen by the interface:         {result['wire_bytes']:,} bytes (received + transmitted)")
    print(f"  interface / counted: {result['wire_bytes'] / counted:.4f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.bench_callbacks", description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=("overhead", "bytes", "both"), default="both")
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-netns", action="store_true", help="measure bytes on loopback")
    parser.add_argument("--root", default="/tmp/splitlit_bench_callbacks")
    parser.add_argument("--worker", choices=("overhead", "bytes"), help=argparse.SUPPRESS)
    parser.add_argument("--interface", default="lo", help=argparse.SUPPRESS)
    parser.add_argument("--nodes", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker == "overhead":
        return _overhead_worker(args)
    if args.worker == "bytes":
        return _bytes_worker(args)
    if args.part in ("overhead", "both"):
        overhead(args.batches, args.repeats, args.root)
    if args.part in ("bytes", "both"):
        wire_bytes(args.batches, args.root, use_netns=not args.no_netns and os.geteuid() == 0)


if __name__ == "__main__":
    main()
