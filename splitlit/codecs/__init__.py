"""Codecs that change the model at a cut: the sender runs ``codec.encoder``, the receiver ``codec.decoder``.

    up = PowerIteration(rank=3)                               # or make_codec("poweriter", rank=3)
    down = ConvInsert(in_channels=1280, code_channels=320)    # 1x1 conv 1280 -> 320 -> 1280
    split = Split(head, body, tail, up=up, down=down)

- :mod:`splitlit.codecs.base`: :class:`Codec`, what a codec is (encoder, decoder, analytic size).
- :mod:`splitlit.codecs.power_iteration`: :class:`PowerIteration`, low-rank factors, no parameters.
- :mod:`splitlit.codecs.conv_insert`: :class:`ConvInsert`, a learned convolution and its mirror.

A learned codec inserted into a pretrained network must start close to the identity on the activations it
carries: :func:`splitlit.calibration.calibrate` (or the ``callbacks.CodecCalibration`` callback) fits it to
a few batches before training.
"""

from __future__ import annotations

from typing import Any

from splitlit.codecs.base import Codec
from splitlit.codecs.conv_insert import ConvInsert
from splitlit.codecs.power_iteration import PowerIteration

__all__ = ["CODECS", "Codec", "ConvInsert", "PowerIteration", "make_codec"]

CODECS: dict[str, type[Codec]] = {"poweriter": PowerIteration, "convinsert": ConvInsert}


def make_codec(name: str, **kwargs: Any) -> Codec | None:
    """A codec by short name: ``make_codec("poweriter", rank=3)``; ``"none"`` gives ``None`` (no codec)."""
    key = str(name).lower().replace("_", "").replace("-", "")
    if key == "none":
        if kwargs:
            raise ValueError(f"make_codec('none') takes no arguments, got {sorted(kwargs)}.")
        return None
    if key not in CODECS:
        raise ValueError(f"Unknown codec {name!r}; choose one of {sorted(CODECS)} or 'none'.")
    return CODECS[key](**kwargs)
