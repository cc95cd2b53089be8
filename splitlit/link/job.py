"""Running the job: the command once on each host, its output prefixed, both stopped together."""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import TextIO

from splitlit.link.shaped import ShapedLink
from splitlit.link.spec import ROLES

__all__ = ["CLI_SUBCOMMANDS", "Interrupted", "JobResult", "run_two_hosts", "with_trainer_args"]

CLI_SUBCOMMANDS = ("fit", "validate", "test", "predict")


@dataclass
class JobResult:
    """Exit codes (negative: killed by that signal) and what happened."""

    client: int | None = None
    server: int | None = None
    seconds: float = 0.0
    note: str = ""

    @property
    def returncode(self) -> int:
        for code in (self.client, self.server):
            if code:
                return code if code > 0 else 128 - code
        return 0 if self.client == 0 and self.server == 0 else 1


class Interrupted(Exception):
    """Raised by the launcher's signal handler: the job is stopped and the link removed."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def with_trainer_args(command: list[str], hosts: int = 2) -> list[str]:
    """A LightningCLI command gets ``--trainer.num_nodes <hosts> --trainer.devices 1``; others are unchanged."""
    if not any(arg in CLI_SUBCOMMANDS for arg in command) or any(
            a.startswith(("--trainer.num_nodes", "--trainer.devices")) for a in command):
        return command
    return [*command, "--trainer.num_nodes", str(hosts), "--trainer.devices", "1"]


def run_two_hosts(link: ShapedLink, command: list[str], *, grace: float = 900.0, out: TextIO | None = None,
                  env: dict[str, str] | None = None) -> JobResult:
    """Run ``command`` on both hosts of ``link`` (client first); stop both if interrupted.

    When one rank exits with an error the other is given ``grace`` seconds to notice (the strategy's timeout
    makes it fail with a clear error) before it is stopped.
    """
    out = out or sys.stdout
    # Both "hosts" are this machine's: they share a secret made here unless the caller gave one.
    env = dict(os.environ if env is None else env)
    if "SPLITLIT_SECRET" not in env and "SPLITLIT_SECRET_FILE" not in env:
        env["SPLITLIT_SECRET"] = secrets.token_hex(32)
    result = JobResult()
    start = time.monotonic()
    procs: dict[str, subprocess.Popen] = {}
    pumps = []
    roles = getattr(link, "roles", ROLES)  # a StarLink: every client and the server
    try:
        for role in roles:  # all started before any thread: the pre-exec step runs in a single-threaded parent
            procs[role] = subprocess.Popen(link.exec_prefix(role) + command, env=link.env(role, env),
                                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                           errors="replace", start_new_session=True, preexec_fn=_die_with_parent)
        for role in roles:
            pump = threading.Thread(target=_pump, args=(procs[role].stdout, f"[{role}] ", out), daemon=True)
            pump.start()
            pumps.append(pump)
        deadline = None
        while any(p.poll() is None for p in procs.values()):
            failed = [r for r, p in procs.items() if p.returncode not in (None, 0)]
            if failed and deadline is None:
                deadline = time.monotonic() + grace
            if deadline is not None and time.monotonic() > deadline:
                late = [r for r, p in procs.items() if p.poll() is None]
                result.note = (f"the {failed[0]} exited {procs[failed[0]].returncode}; the {late[0]} was still "
                               f"running {grace:g} s later and was stopped")
                _stop(procs)
            time.sleep(0.1)
    except Interrupted as err:
        result.note = f"interrupted by {err}: both ranks stopped"
        _stop(procs)
        raise
    except BaseException:
        _stop(procs)
        raise
    finally:
        for pump in pumps:
            pump.join(5)
        clients = [procs[r].returncode for r in roles if r != "server" and r in procs]
        result.client = next((code for code in clients if code), clients[0] if clients else None)
        result.server = procs["server"].returncode if "server" in procs else None
        result.seconds = time.monotonic() - start
    return result


_prctl = ctypes.CDLL(None, use_errno=True).prctl
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the rank's process, before exec: SIGTERM when the launcher dies, even by ``kill -9`` (kept across exec;
    ``ip netns exec`` execs the command itself)."""
    _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _pump(stream: TextIO, prefix: str, out: TextIO) -> None:
    for line in stream:
        out.write(prefix + line if line.endswith("\n") else prefix + line + "\n")
        out.flush()


def _stop(procs: dict[str, subprocess.Popen]) -> None:
    """SIGTERM to each rank's process group, SIGKILL to what is left 10 s later."""
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        running = [p for p in procs.values() if p.poll() is None]
        for p in running:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, sig)
        deadline = time.monotonic() + wait
        while any(p.poll() is None for p in running) and time.monotonic() < deadline:
            time.sleep(0.05)
