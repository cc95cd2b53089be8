"""Reading the link's settings as users write them for ``tc``: rates in bits per second, durations."""

from __future__ import annotations

import re

from splitlit.link.errors import LinkError

__all__ = ["parse_delay", "parse_rate", "rate_text"]

_RATE_UNITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9, "tbit": 10**12}
_TIME_UNITS = {"us": 1e-6, "usec": 1e-6, "ms": 1e-3, "msec": 1e-3, "s": 1.0, "sec": 1.0}


def parse_rate(text: str) -> int:
    """``"100mbit"`` -> 100_000_000 bits per second (tc's decimal units: bit, kbit, mbit, gbit, tbit)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]+)\s*", str(text))
    unit = match.group(2).lower() if match else ""
    if not match or unit not in _RATE_UNITS:
        raise LinkError(f"--bandwidth {text!r}: give a rate in bits per second with tc's units "
                        f"{'/'.join(_RATE_UNITS)}, e.g. 100mbit or 1gbit (tc's 'mbps' means megaBYTES per second, "
                        f"so it is refused here to avoid an 8x mistake).")
    bps = int(float(match.group(1)) * _RATE_UNITS[unit])
    if bps < 8_000:
        raise LinkError(f"--bandwidth {text!r} is {bps} bit/s: give at least 8kbit.")
    return bps


def parse_delay(text: str | None) -> float:
    """``"20ms"`` -> 0.02 seconds (us, ms or s); None or "0" -> 0."""
    if text in (None, "", "0"):
        return 0.0
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-z]+)\s*", str(text))
    if not match or match.group(2) not in _TIME_UNITS:
        raise LinkError(f"--delay {text!r}: give a duration such as 20ms, 500us or 0.1s.")
    return float(match.group(1)) * _TIME_UNITS[match.group(2)]


def rate_text(bps: int) -> str:
    """100_000_000 -> ``"100mbit"``: the largest tc unit that writes the rate exactly."""
    for unit, scale in sorted(_RATE_UNITS.items(), key=lambda kv: -kv[1]):
        if bps % scale == 0:
            return f"{bps // scale}{unit}"
    return f"{bps}bit"
