"""The fault matrix: kill (SIGKILL) or stall (SIGSTOP) the client or the server at each phase of a split fit.

    python -m experiments.bench_faults [--timeout 20] [--phases setup,first_step] [--out runs/faults]

Each cell starts a small split fit (``tests/scripts/resume_toy.py``'s model through Lightning's launcher,
checkpoints every 3 steps) and ends one rank at the phase: set-up, a client-only calibration in set-up, the
first step, mid-epoch, validation, a checkpoint write; or stalls it (SIGSTOP) mid-epoch past the timeout. For
each it records how the survivor ended (exit code, seconds, whether its message names the phase and the fix),
whether the newest checkpoint on disk loads, and whether resuming from it completes the run. Prints a Markdown
table; writes it and the raw rows (JSON) under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "scripts" / "fault_fit.py"
PHASES = ("setup", "calibration", "first_step", "mid_epoch", "validation", "checkpoint", "stall")
# What the survivor must say: the phase (as the strategy words it) and the way out.
PHASE_WORDS = {"setup": ("set-up",), "calibration": ("set-up",), "first_step": ("training",),
               "mid_epoch": ("training",), "validation": ("evaluation", "validation"),
               "checkpoint": ("checkpoint", "training"), "stall": ("training", "timed out")}
# (a kill during a checkpoint write is seen by the survivor in the checkpoint's exchange, or, when the victim
# died after sending its share, at the next step: either names where it was.)


def _env(port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK")}
    env.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "PYTHONPATH": str(REPO),
                "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    return env


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cell(phase: str, victim: str, out: Path, timeout: float) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(SCRIPT), "--out", str(out), "--timeout", str(timeout), "--fault", phase,
           "--victim", victim, "--two-hosts"]
    # Two "hosts" (one process each), so each rank's exit code and output are its own.
    env = dict(_env(_free_port()), WORLD_SIZE="2", LOCAL_RANK="0", SPLITLIT_SECRET=secrets.token_hex(32))
    start = time.monotonic()
    procs = [subprocess.Popen(cmd, env=dict(env, NODE_RANK=str(r)), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True) for r in (0, 1)]
    outputs, codes = [], []
    for proc in procs:
        try:
            outputs.append(proc.communicate(timeout=timeout + 120)[0])
            codes.append(proc.returncode)
        except subprocess.TimeoutExpired:
            for q in procs:
                try:
                    os.killpg(q.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            outputs.append(proc.communicate()[0] + "\n<hung: killed by the bench>")
            codes.append(None)
    for rank, text in enumerate(outputs):
        (out / f"rank{rank}.log").write_text(text)
    output = "\n".join(outputs)
    code = codes[1 if victim == "client" else 0]
    survivor = "server" if victim == "client" else "client"
    fault_t = next((float(ln.split()[1]) for ln in output.splitlines() if ln.startswith("FAULT ")), None)
    exit_t = next((float(ln.split()[2]) for ln in output.splitlines()
                   if ln.startswith(f"RANK_EXIT {0 if survivor == 'client' else 1} ")), None)
    seconds = exit_t - fault_t if fault_t is not None and exit_t is not None else time.monotonic() - start
    said = outputs[1 if victim == "client" else 0]
    lines = [ln for ln in said.splitlines() if ("Error" in ln or "Newest checkpoint" in ln
                                                or "No checkpoint" in ln or "client holds" in ln)]
    text = "\n".join(lines)
    names_phase = any(word in text for word in PHASE_WORDS[phase])
    names_fix = ("--ckpt_path" in text or "checkpoint_minutes" in text or "ckpt_path" in text)
    ckpts = sorted((out / "ckpt").glob("*.ckpt"), key=os.path.getmtime) if (out / "ckpt").is_dir() else []
    loads, resumed = None, None
    if ckpts:
        try:
            torch.load(ckpts[-1], weights_only=True)
            loads = True
        except Exception:  # noqa: BLE001 - reported in the table
            loads = False
        # The resume is no fault: a generous timeout, so a slow start on a busy machine is not one.
        again = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out / "resume"), "--timeout",
                                str(max(timeout, 120)), "--ckpt-path", str(ckpts[-1])], env=_env(_free_port()),
                               capture_output=True, text=True, timeout=600)
        (out / "resume.log").write_text(again.stdout + again.stderr)
        resumed = again.returncode == 0
    return {"phase": phase, "victim": victim, "survivor": survivor, "exit": code, "seconds": round(seconds, 1),
            "bound_s": timeout + 30,
            "within_bound": code not in (0, None) and exit_t is not None and seconds <= timeout + 30,
            "names_phase": names_phase, "names_fix": names_fix, "newest_checkpoint": ckpts[-1].name if ckpts else None,
            "loads": loads, "resumes": resumed, "message": text[-400:]}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--timeout", type=float, default=20.0, help="the strategy's peer timeout, seconds")
    p.add_argument("--phases", default=",".join(PHASES))
    p.add_argument("--victims", default="client,server")
    p.add_argument("--out", type=Path, default=Path("runs/faults"))
    args = p.parse_args(argv)
    phases = [x for x in args.phases.split(",") if x]
    unknown = sorted(set(phases) - set(PHASES))
    if unknown:
        p.error(f"--phases: unknown {unknown}; choose from {','.join(PHASES)}")
    rows = []
    for phase in phases:
        for victim in args.victims.split(","):
            row = run_cell(phase, victim, args.out / f"{phase}-{victim}", args.timeout)
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "message"}), flush=True)
    table = ["| fault | phase | survivor exit | seconds (bound) | names phase | names fix | newest checkpoint "
             "| loads | resume completes |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        fault = ("SIGSTOP " if r["phase"] == "stall" else "SIGKILL ") + r["victim"]
        table.append(f"| {fault} | {r['phase']} | {r['exit']} | {r['seconds']} ({r['bound_s']:g}) | "
                     f"{'yes' if r['names_phase'] else 'no'} | {'yes' if r['names_fix'] else 'no'} | "
                     f"{r['newest_checkpoint'] or 'none'} | {r['loads']} | {r['resumes']} |")
    text = "\n".join(table)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "matrix.md").write_text(text + "\n")
    (args.out / "matrix.json").write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
