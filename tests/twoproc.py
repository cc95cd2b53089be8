"""Run two-rank jobs from tests: subprocesses, a free port, a hard timeout, never a hang.

    result = run_fit_script(REPO / "tests/scripts/toy.py", ["--out", str(tmp_path), "--chunks", "4"], timeout=120)
    assert result.returncode == 0, result.output
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = (REPO.parent / "shared" / "data").resolve()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Result:
    returncode: int
    output: str


def _env(extra: dict[str, str] | None) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"PYTHONPATH": str(REPO), "WANDB_MODE": "offline", "WANDB_SILENT": "true",
                "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    for key in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK", "MASTER_PORT", "MASTER_ADDR", "SPLITLIT_SECRET",
                "SPLITLIT_SECRET_FILE"):
        env.pop(key, None)
    env["MASTER_ADDR"] = "127.0.0.1"
    env["MASTER_PORT"] = str(free_port())
    env.update(extra or {})
    return env


def _wait(procs: list[subprocess.Popen], timeout: float) -> list[Result]:
    results = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=timeout)
            results.append(Result(p.returncode, out))
    except subprocess.TimeoutExpired:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        outs = [p.communicate()[0] for p in procs]
        raise TimeoutError(f"two-rank job did not finish in {timeout} s; output:\n" + "\n----\n".join(outs))
    return results


def run_fit_script(script: str | Path, args: list[str], *, timeout: float, env: dict[str, str] | None = None,
                   cwd: str | Path | None = None) -> Result:
    """One command; Lightning's launcher starts rank 1 itself (Trainer(devices=2))."""
    proc = subprocess.Popen([sys.executable, str(script), *args], cwd=cwd or REPO, env=_env(env),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    return _wait([proc], timeout)[0]


def run_two_hosts(client: list[str], server: list[str], *, timeout: float, env: dict[str, str] | None = None,
                  server_env: dict[str, str] | None = None, cwd: str | Path | None = None) -> tuple[Result, Result]:
    """Two commands, one per "host" (num_nodes=2, devices=1): NODE_RANK 0 is the client, 1 the server.

    Both get the same fresh ``SPLITLIT_SECRET`` (runs across hosts need one) unless ``env`` gives one.
    """
    base = _env({"SPLITLIT_SECRET": secrets.token_hex(32), **(env or {})})
    procs = []
    for node_rank, cmd, extra in ((0, client, None), (1, server, server_env)):
        e = dict(base, NODE_RANK=str(node_rank), LOCAL_RANK="0", WORLD_SIZE="2", **(extra or {}))
        procs.append(subprocess.Popen([sys.executable, *cmd], cwd=cwd or REPO, env=e, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True, start_new_session=True))
    client_result, server_result = _wait(procs, timeout)
    return client_result, server_result
