"""The description of a U-shaped split: which modules run on the client and which on the server.

A LightningModule that can be split returns a :class:`Split` from ``configure_split()``::

    def configure_split(self) -> Split:
        return Split(head=self.stem, body=self.backbone, tail=self.classifier, up=self.up_codec)

    def forward(self, x):
        return self.configure_split()(x)  # the same composition, unsplit

The client (rank 0) runs ``head`` and ``tail`` and keeps inputs and labels; the server (rank 1) runs
``body``. What crosses the "up" cut (client -> server) and the "down" cut (server -> client) can be
changed by a codec (see :mod:`splitlit.codecs`): its encoder runs at the end of the sending side and
its decoder at the start of the receiving side, so the pipeline carries the small representation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["BODY", "CLIENT_RANK", "HEAD", "SERVER_RANK", "TAIL", "Split", "SplitError", "as_tuple"]

# Who is who, in one vocabulary: the stages of a U split, and the two roles on a client-server link (the ranks
# of a two-rank job, or of one link's process group when many clients share the server).
HEAD, BODY, TAIL = 0, 1, 2
CLIENT_RANK, SERVER_RANK = 0, 1


class SplitError(ValueError):
    """A split that cannot run: the message names the part, the value seen and the fix."""


def as_tuple(value: Any) -> tuple:
    return value if isinstance(value, tuple) else (value,)


class _Chain(nn.Module):
    """Runs modules one after another; a tuple output is unpacked into the next module's arguments.

    Extra tensors that ride along with the activation (an attention mask) pass through a codec
    untouched: see :class:`splitlit.codecs.Codec`.
    """

    def __init__(self, *parts: nn.Module | None, receives: bool = False) -> None:
        super().__init__()
        self.parts = nn.ModuleList(p for p in parts if p is not None)
        self.receives = receives

    def forward(self, *args: Any) -> Any:
        if self.receives:
            # A received activation is a leaf that requires grad; an in-place first layer (ReLU(inplace=True))
            # would fail on it, so such a stage works on a copy.
            args = tuple(a.clone() if isinstance(a, torch.Tensor) and a.is_leaf and a.requires_grad else a
                         for a in args)
        out: Any = args
        for part in self.parts:
            out = part(*as_tuple(out))
        return out


@dataclass(eq=False)
class Split:
    """Head, body and tail of a U-shaped model, and the codecs at its two cuts.

    Args:
        head: client, first layers; takes the model inputs.
        body: server, the middle; takes what the head returns.
        tail: client, the last layers (classifier); returns the logits.
        up: codec at the client -> server cut, or ``None`` to send the head's output as it is.
        down: codec at the server -> client cut, or ``None``.
    """

    head: nn.Module
    body: nn.Module
    tail: nn.Module
    up: nn.Module | None = None
    down: nn.Module | None = None

    def __post_init__(self) -> None:
        for name in ("head", "body", "tail"):
            value = getattr(self, name)
            if not isinstance(value, nn.Module):
                raise SplitError(
                    f"Split.{name} must be a torch.nn.Module, got {type(value).__name__}. "
                    f"Wrap a function in a module (e.g. nn.Sequential or a small nn.Module subclass)."
                )
        for name in ("up", "down"):
            value = getattr(self, name)
            if value is not None and not (hasattr(value, "encoder") and hasattr(value, "decoder")):
                raise SplitError(
                    f"Split.{name} must be a codec with .encoder and .decoder modules "
                    f"(see splitlit.codecs), got {type(value).__name__}."
                )

    # The three pipeline stages of the U: client, server, client.
    def client_head_stage(self) -> nn.Module:
        return _Chain(self.head, self.up.encoder if self.up is not None else None)

    def server_stage(self) -> nn.Module:
        return _Chain(
            self.up.decoder if self.up is not None else None,
            self.body,
            self.down.encoder if self.down is not None else None,
            receives=True,
        )

    def client_tail_stage(self) -> nn.Module:
        return _Chain(self.down.decoder if self.down is not None else None, self.tail, receives=True)

    def stages(self) -> tuple[nn.Module, nn.Module, nn.Module]:
        return self.client_head_stage(), self.server_stage(), self.client_tail_stage()

    def client_modules(self) -> list[nn.Module]:
        """Modules whose parameters live on the client: head, tail and the client halves of the codecs."""
        mods = [self.head, self.tail]
        if self.up is not None:
            mods.append(self.up.encoder)
        if self.down is not None:
            mods.append(self.down.decoder)
        return mods

    def server_modules(self) -> list[nn.Module]:
        mods = [self.body]
        if self.up is not None:
            mods.append(self.up.decoder)
        if self.down is not None:
            mods.append(self.down.encoder)
        return mods

    def __call__(self, *inputs: Any) -> Any:
        """The unsplit composition: tail(down(body(up(head(inputs))))), the same maths as the pipeline."""
        out: Any = inputs
        for stage in self.stages():
            out = stage(*as_tuple(out))
        return out

    def check_composes(self, *example_inputs: Any) -> None:
        """Run the three stages once on ``example_inputs`` (no grad) and raise a clear error where they do not fit."""
        out: Any = example_inputs
        names = ("client head (head + up encoder)", "server (up decoder + body + down encoder)",
                 "client tail (down decoder + tail)")
        with torch.no_grad():
            for name, stage in zip(names, self.stages()):
                try:
                    out = stage(*as_tuple(out))
                except Exception as err:  # noqa: BLE001 - re-raised with the stage named
                    shapes = [tuple(t.shape) for t in as_tuple(out) if isinstance(t, torch.Tensor)]
                    raise SplitError(
                        f"The split does not compose: the {name} failed on inputs of shapes {shapes}: {err}. "
                        f"Check that each part's output is what the next part takes."
                    ) from err
                for t in as_tuple(out):
                    if not isinstance(t, torch.Tensor):
                        raise SplitError(
                            f"The {name} returned a {type(t).__name__}; only tensors (or tuples of tensors) "
                            f"can cross a cut. Return the tensor itself (e.g. outputs.logits, not outputs)."
                        )
