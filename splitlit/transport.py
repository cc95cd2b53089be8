"""What crosses between the client and the server outside the pipeline: tensors only, never a pickle.

The server is the party the client does not trust, so nothing either rank receives may run code when it is
decoded. Values that are not plain tensors (a loader's length, a checkpoint path, the server's share of a
checkpoint) are packed with :func:`pack`: their tensors as safetensors, their structure as JSON in the
safetensors metadata. Decoding is ``json.loads`` plus safetensors' reader; an object of any other type is
refused when it is packed, with its place in the structure named::

    data = pack({"state_dict": {"body.0.weight": w}, "epoch": 3})
    unpack(data)   # {'state_dict': {'body.0.weight': tensor(...)}, 'epoch': 3}

A :class:`Channel` moves such payloads (and small integer vectors) with ``torch.distributed`` tensor
collectives and point-to-point calls, and books every payload a rank receives in its :class:`Ledger` under
the name of what it carries, so a test can check that the server receives nothing else.
:func:`authenticate` makes each rank prove, before anything else crosses, that it holds the job's secret.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import struct
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load as _load_tensors
from safetensors.torch import save as _save_tensors

__all__ = ["Channel", "Ledger", "PeerAuthError", "SECRET_ENV", "authenticate", "pack", "resolve_secret",
           "unpack"]

SECRET_ENV = "SPLITLIT_SECRET"
SECRET_FILE_ENV = "SPLITLIT_SECRET_FILE"
MIN_SECRET_LEN = 16
_META_KEY = "splitlit"


# -- packing -----------------------------------------------------------------------------------------------------
def pack(obj: Any) -> bytes:
    """``obj`` (tensors, dicts, lists, tuples, str, int, float, bool, None, paths) as safetensors bytes."""
    tensors: dict[str, torch.Tensor] = {}
    tree = _encode(obj, tensors, "obj")
    return _save_tensors(tensors, metadata={_META_KEY: json.dumps(tree)})


def unpack(data: bytes) -> Any:
    """The object :func:`pack` wrote; reading it runs no code from the sender."""
    if len(data) < 8:
        raise ValueError(f"A packed payload has at least 8 bytes, got {len(data)}: the peer sent something else.")
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + header_len])
    tree = json.loads(header.get("__metadata__", {}).get(_META_KEY, "null"))
    tensors = _load_tensors(data) if len(header) > 1 else {}
    return _decode(tree, tensors)


def _encode(obj: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    # Scalars stay JSON scalars; every container is a one-key object naming its kind, so nothing is ambiguous.
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, torch.Tensor):
        name = str(len(tensors))
        tensors[name] = obj.detach().to("cpu", copy=True).contiguous()  # safetensors refuses shared storage
        return {"t": name}
    if isinstance(obj, PurePath):
        return str(obj)
    if isinstance(obj, dict):
        return {"d": [[_encode(k, tensors, f"{where} key"), _encode(v, tensors, f"{where}[{k!r}]")]
                      for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"u": [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return {"l": [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(obj)]}
    raise TypeError(
        f"{where} is a {type(obj).__name__}, which splitlit does not send between the ranks: only tensors, dicts, "
        f"lists, tuples, str, int, float, bool and None cross (never a pickle). Convert it to one of those."
    )


def _decode(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if not isinstance(tree, dict):
        return tree
    (kind, value), = tree.items()
    if kind == "t":
        return tensors[value]
    if kind == "d":
        return {_decode(k, tensors): _decode(v, tensors) for k, v in value}
    if kind == "u":
        return tuple(_decode(v, tensors) for v in value)
    if kind == "l":
        return [_decode(v, tensors) for v in value]
    raise ValueError(f"Unknown node {kind!r} in a packed payload: the peer runs another splitlit version.")


# -- moving payloads -------------------------------------------------------------------------------------------
@dataclass
class Ledger:
    """What this rank received outside the pipeline: ``(what, nbytes)`` per payload, in order."""

    received: list[tuple[str, int]] = field(default_factory=list)

    def book(self, what: str, nbytes: int) -> None:
        self.received.append((what, nbytes))

    def bytes(self, what: str | None = None) -> int:
        return sum(n for w, n in self.received if what is None or w == what)


class Channel:
    """Tensor-only messages between ranks (gloo needs CPU tensors: give ``device="cpu"`` then).

    ``rank`` is this process's global rank; ``src`` and ``dst`` are global ranks too. With ``group`` the
    collectives reach that group's ranks only (one client-server link, or the clients among themselves).
    """

    def __init__(self, rank: int, device: torch.device | str = "cpu", ledger: Ledger | None = None,
                 group: dist.ProcessGroup | None = None) -> None:
        self.rank = rank
        self.device = torch.device(device)
        self.ledger = ledger if ledger is not None else Ledger()
        self.group = group

    def on(self, group: dist.ProcessGroup | None) -> Channel:
        """The same endpoint and ledger over another group."""
        return Channel(self.rank, self.device, self.ledger, group)

    def broadcast_numbers(self, values: Sequence[float] | None, *, length: int, src: int, what: str,
                          dtype: torch.dtype = torch.int64) -> list:
        """``length`` numbers from ``src`` (its ``values``, as one ``dtype`` tensor); the others get them."""
        words = torch.zeros(length, dtype=dtype, device=self.device)
        if self.rank == src:
            assert values is not None and len(values) == length, (values, length)
            words.copy_(torch.tensor(list(values), dtype=dtype))
        dist.broadcast(words, src=src, group=self.group)
        if self.rank != src:
            self.ledger.book(what, words.numel() * words.element_size())
        return words.tolist()

    def broadcast(self, obj: Any, *, src: int, what: str) -> Any:
        """``obj`` packed on ``src`` (see :func:`pack`) and unpacked on the other rank."""
        data = pack(obj) if self.rank == src else b""
        (size,) = self.broadcast_numbers([len(data)], length=1, src=src, what=f"{what} (size)")
        payload = (torch.frombuffer(bytearray(data), dtype=torch.uint8).to(self.device) if self.rank == src
                   else torch.empty(size, dtype=torch.uint8, device=self.device))
        dist.broadcast(payload, src=src, group=self.group)
        if self.rank == src:
            return obj
        self.ledger.book(what, size)
        return unpack(payload.cpu().numpy().tobytes())

    def all_numbers(self, values: Sequence[float], *, what: str, dtype: torch.dtype = torch.int64) -> list[list]:
        """Every rank's ``values`` (the same length everywhere), in rank order of the group."""
        mine = torch.tensor(list(values), dtype=dtype, device=self.device)
        rows = [torch.empty_like(mine) for _ in range(dist.get_world_size(self.group))]
        dist.all_gather(rows, mine, group=self.group)
        self.ledger.book(what, (len(rows) - 1) * mine.numel() * mine.element_size())
        return [row.tolist() for row in rows]

    def send(self, obj: Any, *, dst: int) -> None:
        data = pack(obj)
        dist.send(torch.tensor([len(data)], dtype=torch.int64, device=self.device), dst=dst, group=self.group)
        dist.send(torch.frombuffer(bytearray(data), dtype=torch.uint8).to(self.device), dst=dst, group=self.group)

    def recv(self, *, src: int, what: str) -> Any:
        size = torch.zeros(1, dtype=torch.int64, device=self.device)
        dist.recv(size, src=src, group=self.group)
        payload = torch.empty(int(size), dtype=torch.uint8, device=self.device)
        dist.recv(payload, src=src, group=self.group)
        self.ledger.book(what, int(size) + size.element_size())
        return unpack(payload.cpu().numpy().tobytes())


# -- who may join ----------------------------------------------------------------------------------------------
class PeerAuthError(RuntimeError):
    """The other rank could not prove that it holds the job's secret."""


def resolve_secret(*, multi_host: bool, local_key: str | None = None) -> bytes:
    """The job's shared secret: ``$SPLITLIT_SECRET``, or the file named by ``$SPLITLIT_SECRET_FILE``.

    On one machine without either, one is generated: put in ``$SPLITLIT_SECRET`` when this process starts the
    others (Lightning's launcher), or, when they start apart (torchrun), in a file only this user can read,
    named after ``local_key`` (the store's address), which the first process writes and the others read.
    Across hosts one must be given.
    """
    value = os.environ.get(SECRET_ENV)
    source = f"${SECRET_ENV}"
    if value is None and os.environ.get(SECRET_FILE_ENV):
        path = os.environ[SECRET_FILE_ENV]
        value, source = _read_secret_file(path), f"the file {path!r} (${SECRET_FILE_ENV})"
    if value is None:
        if multi_host:
            raise PeerAuthError(
                f"A run across hosts needs a shared secret so no other process can join it: set {SECRET_ENV} to "
                f"the same value (at least {MIN_SECRET_LEN} characters) on both hosts, e.g. "
                f"`export {SECRET_ENV}=$(python -c 'import secrets; print(secrets.token_hex(32))')`, or "
                f"{SECRET_FILE_ENV} to a file holding it."
            )
        value = _local_secret(local_key) if local_key else secrets.token_hex(32)
        os.environ[SECRET_ENV] = value
    if len(value) < MIN_SECRET_LEN:
        raise PeerAuthError(f"The secret in {source} has {len(value)} characters; use at least {MIN_SECRET_LEN}, "
                            f"e.g. `python -c 'import secrets; print(secrets.token_hex(32))'`.")
    return value.encode()


def _read_secret_file(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError as err:
        raise PeerAuthError(f"${SECRET_FILE_ENV}={path!r} cannot be read ({err}). Point it at a file holding the "
                            f"job's secret on both hosts, or set ${SECRET_ENV} instead.") from err


def _local_secret(key: str) -> str:
    folder = os.path.join(tempfile.gettempdir(), f"splitlit-{os.getuid()}")
    os.makedirs(folder, mode=0o700, exist_ok=True)
    path = os.path.join(folder, hashlib.sha256(key.encode()).hexdigest()[:16] + ".secret")
    fd, tmp = tempfile.mkstemp(dir=folder)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    try:
        os.link(tmp, path)  # atomic and exclusive: the first process's secret wins, complete
    except FileExistsError:
        pass
    finally:
        os.unlink(tmp)
    return _read_secret_file(path)


def authenticate(store: dist.Store, *, rank: int, secret: bytes, timeout: float, run_id: str = "",
                 world_size: int = 2) -> None:
    """Each rank proves to every other that it holds ``secret``: an HMAC of the other's fresh challenge.

    Every rank writes a random challenge to the store, answers the others', and checks their answers to its
    own; the secret itself never crosses. Whoever sees a wrong answer raises, and so does the other rank, since
    its own check fails alike. Call it right after the process group exists, before anything else crosses.
    """
    peers = [r for r in range(world_size) if r != rank]
    prefix = f"splitlit/auth/{run_id}"
    nonce = secrets.token_hex(16)
    store.set(f"{prefix}/challenge/{rank}", nonce)
    store.wait([f"{prefix}/challenge/{peer}" for peer in peers])
    for peer in peers:
        peer_nonce = store.get(f"{prefix}/challenge/{peer}").decode()
        store.set(f"{prefix}/answer/{rank}/{peer}", _answer(secret, peer_nonce, rank))
    store.wait([f"{prefix}/answer/{peer}/{rank}" for peer in peers])
    for peer in peers:
        answer = store.get(f"{prefix}/answer/{peer}/{rank}").decode()
        if not hmac.compare_digest(answer, _answer(secret, nonce, peer)):
            who = f"rank {peer}" if world_size > 2 else ("server (rank 1)" if rank == 0 else "client (rank 0)")
            raise PeerAuthError(
                f"The {who} does not hold this job's secret, so nothing was sent to it. Give every rank the same "
                f"{SECRET_ENV} (or {SECRET_FILE_ENV}); if you did, another process may be trying to join this job."
            )


def _answer(secret: bytes, nonce: str, rank: int) -> str:
    return hmac.new(secret, f"{nonce}:{rank}".encode(), hashlib.sha256).hexdigest()
