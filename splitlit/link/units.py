"""Reading the link's settings as netem and tc users write them: rates, durations, percentages, sizes.

Each parser names the option and the value it refused, and says how to write it.
"""

from __future__ import annotations

import re

from splitlit.link.errors import LinkError

__all__ = ["parse_delay", "parse_percent", "parse_rate", "parse_size", "per_client", "rate_text"]

_RATE_UNITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9, "tbit": 10**12}
_TIME_UNITS = {"us": 1e-6, "usec": 1e-6, "ms": 1e-3, "msec": 1e-3, "s": 1.0, "sec": 1.0}
_SIZE_UNITS = {"b": 1, "k": 1024, "kb": 1024, "kib": 1024, "m": 1024**2, "mb": 1024**2, "mib": 1024**2}
_NUMBER = re.compile(r"\s*([+-]?[0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-zA-Z%]*)\s*")


def _split(option: str, text: object, example: str) -> tuple[float, str]:
    match = _NUMBER.fullmatch(str(text))
    if not match:
        raise LinkError(f"{option} {text!r} is not a number with a unit: write it like {example}.")
    return float(match.group(1)), match.group(2)


def parse_rate(text: str, option: str = "--bandwidth") -> int:
    """``"100mbit"`` -> 100_000_000 bits per second (tc's decimal units: bit, kbit, mbit, gbit, tbit)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]+)\s*", str(text))
    unit = match.group(2).lower() if match else ""
    if not match or unit not in _RATE_UNITS:
        raise LinkError(f"{option} {text!r}: give a rate in bits per second with tc's units "
                        f"{'/'.join(_RATE_UNITS)}, e.g. 100mbit or 1gbit (tc's 'mbps' means megaBYTES per second, "
                        f"so it is refused here to avoid an 8x mistake).")
    bps = int(float(match.group(1)) * _RATE_UNITS[unit])
    if bps < 8_000:
        raise LinkError(f"{option} {text!r} is {bps} bit/s: give at least 8kbit.")
    return bps


def parse_delay(text: str | None, option: str = "--delay") -> float:
    """``"20ms"`` -> 0.02 seconds (us, ms or s, as netem); None, "" or "0" -> 0."""
    if text is None or str(text).strip() in ("", "0"):
        return 0.0
    value, unit = _split(option, text, "25ms, 500us or 0.1s")
    if not unit:
        raise LinkError(f"{option} {text!r} has no unit: write {value:g}ms (or {value:g}us, {value:g}s).")
    if unit.lower() not in _TIME_UNITS:
        raise LinkError(f"{option} {text!r}: unknown unit {unit!r}; use us, ms or s (e.g. 25ms).")
    if value < 0:
        raise LinkError(f"{option} {text!r} is negative: a delay is 0 or more, e.g. 25ms.")
    return value * _TIME_UNITS[unit.lower()]


def per_client(text: str | None, clients: int, option: str) -> list[str | None]:
    """``"5ms,80ms"`` -> ``["5ms", "80ms"]``: one value per client link (``--clients``); one value is every
    client's. Each value is read by its option's parser afterwards."""
    parts = [part.strip() for part in str(text).split(",")] if text is not None else [None]
    if len(parts) == 1:
        return parts * clients
    if len(parts) != clients:
        raise LinkError(f"{option} {text!r} gives {len(parts)} values for {clients} client link"
                        f"{'s' if clients != 1 else ''}: give one value for every client, or exactly one per "
                        f"client ({clients}, as --clients {clients}), separated by commas.")
    return parts


def parse_percent(text: str | None, option: str = "--loss") -> float:
    """``"0.1%"`` -> 0.001, a probability in [0, 1); None or "0" -> 0."""
    if text is None or str(text).strip() in ("", "0"):
        return 0.0
    value, unit = _split(option, text, "0.1% or 2%")
    if unit != "%":
        raise LinkError(f"{option} {text!r}: write it as a percentage with %, e.g. {value:g}% "
                        f"(netem's loss is in percent; a bare number is ambiguous).")
    if not 0 <= value < 100:
        raise LinkError(f"{option} {text!r} is outside [0, 100%): give e.g. 0.1% or 5%.")
    return value / 100


def parse_size(text: str | None, option: str = "--limit") -> int | None:
    """``"64kb"`` -> 65536 bytes (tc's units: b, kb = 1024 b, mb); None -> None (the default)."""
    if text is None or str(text).strip() == "":
        return None
    value, unit = _split(option, text, "64kb, 1mb or 100000b")
    unit = unit.lower() or "b"
    if unit not in _SIZE_UNITS:
        raise LinkError(f"{option} {text!r}: unknown unit {unit!r}; give bytes with b, kb or mb "
                        f"(1024-based, as tc), e.g. 256kb.")
    if value <= 0:
        raise LinkError(f"{option} {text!r}: the queue must hold at least one packet, e.g. 256kb.")
    return int(value * _SIZE_UNITS[unit])


def rate_text(bps: int) -> str:
    """100_000_000 -> ``"100mbit"``: the largest tc unit that writes the rate exactly."""
    for unit, scale in sorted(_RATE_UNITS.items(), key=lambda kv: -kv[1]):
        if bps % scale == 0:
            return f"{bps // scale}{unit}"
    return f"{bps}bit"
