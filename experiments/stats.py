"""Statistics over seeds: the mean and spread of a score, and the paired difference between two settings.

    seeds = parse_seeds("0-4")                                # [0, 1, 2, 3, 4]; "0,1,2" and "0-2,7" work too
    none = summarize([76.8, 77.7, 75.2, 78.2, 77.6])          # Summary(mean=77.1, std=1.17, n=5, ...)
    diff = paired_difference({0: 76.3, 1: 76.2}, {0: 76.8, 1: 77.7})   # Difference(mean=-1.0, low=-7.35, ...)
    print(f"{none}  {diff}")                                  # 77.10 ± 1.17 (n=5)  -1.00 [-7.35, +5.35] (n=2)

The spread is the sample standard deviation (n - 1 in the denominator). The difference is paired: both settings
ran with the same seeds (same classifier start, batch order and flips), so seed-to-seed noise common to both
cancels, and the 95% interval is Student's t on the per-seed differences: mean ± t(0.975, n-1) · std / sqrt(n).
No SciPy needed: t's quantiles are tabulated below (exact to 6 decimals; interpolated in 1/df beyond 30).
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

__all__ = ["Difference", "Summary", "format_difference", "format_mean", "over_seeds", "paired_difference",
           "paired_seeds_argument", "parse_seeds", "seeds_argument", "summarize", "t95", "verdict"]

# t(0.975, df), Student's t: df 1-30, then 40, 60, 120 and the normal limit (scipy.stats.t.ppf, 6 decimals).
_T975 = {1: 12.706205, 2: 4.302653, 3: 3.182446, 4: 2.776445, 5: 2.570582, 6: 2.446912, 7: 2.364624, 8: 2.306004,
         9: 2.262157, 10: 2.228139, 11: 2.200985, 12: 2.178813, 13: 2.160369, 14: 2.144787, 15: 2.131450,
         16: 2.119905, 17: 2.109816, 18: 2.100922, 19: 2.093024, 20: 2.085963, 21: 2.079614, 22: 2.073873,
         23: 2.068658, 24: 2.063899, 25: 2.059539, 26: 2.055529, 27: 2.051831, 28: 2.048407, 29: 2.045230,
         30: 2.042272, 40: 2.021075, 60: 2.000298, 120: 1.979930}
_Z975 = 1.959964
_SEED_EXAMPLES = "a range such as 0-4, a list such as 0,1,2, or both: 0-4,7"


def t95(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (the half-width factor of a 95% interval)."""
    if df < 1:
        raise ValueError(f"t95: df={df}; a t interval needs at least 1 degree of freedom (2 values).")
    if df in _T975:
        return _T975[df]
    # Beyond the table the quantile is nearly linear in 1/df: interpolate between the bracketing entries.
    known = sorted(_T975) + [math.inf]
    hi = next(k for k in known if k > df)
    lo = max(k for k in known if k < df)
    t_lo, t_hi = _T975[lo], _T975.get(hi, _Z975)
    w = (1 / lo - 1 / df) / (1 / lo - (0 if hi == math.inf else 1 / hi))
    return t_lo + w * (t_hi - t_lo)


@dataclass(frozen=True)
class Summary:
    """Mean and sample standard deviation of ``n`` values (``std`` is NaN for a single value)."""

    mean: float
    std: float
    n: int
    min: float
    max: float

    def __str__(self) -> str:
        spread = f"{self.std:.2f}" if self.n > 1 else "-"
        return f"{self.mean:.2f} ± {spread} (n={self.n})"


@dataclass(frozen=True)
class Difference:
    """Mean paired difference (setting minus baseline) with its 95% t interval ``[low, high]``, over ``n`` seeds."""

    mean: float
    low: float
    high: float
    std: float
    n: int
    per_seed: dict[int, float]

    def within(self, margin: float) -> bool:
        """True when the whole interval lies inside ``±margin``: the data rule out a difference larger than it."""
        return -margin <= self.low and self.high <= margin

    def __str__(self) -> str:
        return f"{self.mean:+.2f} [{self.low:+.2f}, {self.high:+.2f}] (n={self.n})"


def summarize(values: Iterable[float]) -> Summary:
    """Mean, sample standard deviation (n - 1), min and max; refuses an empty list."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("summarize: no values. Give the score of at least one seed.")
    n = len(values)
    mean = math.fsum(values) / n
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else math.nan
    return Summary(mean=mean, std=std, n=n, min=min(values), max=max(values))


def paired_difference(values: Mapping[int, float], baseline: Mapping[int, float]) -> Difference:
    """``values - baseline`` seed by seed, its mean and 95% t interval; both must hold the same two or more seeds."""
    _check_paired(values, baseline)
    seeds = sorted(values)
    if len(seeds) < 2:
        raise ValueError(
            f"paired_difference: {len(seeds)} seed ({seeds}) gives no 95% interval: it needs the spread of at least "
            f"2 paired differences. Run with two or more seeds, e.g. --seeds 0-4.")
    per_seed = {s: float(values[s]) - float(baseline[s]) for s in seeds}
    d = summarize(per_seed.values())
    half = t95(d.n - 1) * d.std / math.sqrt(d.n)
    return Difference(mean=d.mean, low=d.mean - half, high=d.mean + half, std=d.std, n=d.n, per_seed=per_seed)


def _check_paired(values: Mapping[int, float], baseline: Mapping[int, float]) -> None:
    if set(values) != set(baseline):
        raise ValueError(
            f"paired_difference: the seeds differ: {sorted(values)} vs the baseline's {sorted(baseline)}. A paired "
            f"difference needs both settings run with the same seeds; run the missing ones or pass the same --seeds.")


def parse_seeds(text: str) -> list[int]:
    """``"0-4"`` -> [0, 1, 2, 3, 4]; ``"0,1,2"``; ``"0-2,7"``. Refuses empty, reversed, negative or repeated seeds."""
    items = [part.strip() for part in str(text).split(",")]
    if not text or not str(text).strip() or any(not part for part in items):
        raise ValueError(f"--seeds {text!r}: empty seed list (or an empty item). Give {_SEED_EXAMPLES}.")
    seeds: list[int] = []
    for part in items:
        match = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", part)
        if match is None:
            raise ValueError(f"--seeds {text!r}: {part!r} is not a seed (a whole number >= 0) or a range a-b. "
                             f"Give {_SEED_EXAMPLES}.")
        first, last = int(match[1]), int(match[2] if match[2] is not None else match[1])
        if last < first:
            raise ValueError(f"--seeds {text!r}: the range {part!r} runs backwards. Write it low-high, "
                             f"e.g. {last}-{first}.")
        seeds += range(first, last + 1)
    repeated = sorted({s for s in seeds if seeds.count(s) > 1})
    if repeated:
        raise ValueError(f"--seeds {text!r}: seed(s) {repeated} given twice; each seed is one run. Give each once.")
    return seeds


def seeds_argument(text: str) -> list[int]:
    """:func:`parse_seeds` for argparse's ``type=``: its message reaches the user as ``error: argument --seeds``."""
    try:
        return parse_seeds(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def paired_seeds_argument(text: str) -> list[int]:
    """:func:`seeds_argument` for a comparison over seeds: refuses a single seed, which gives no interval."""
    seeds = seeds_argument(text)
    if len(seeds) < 2:
        raise argparse.ArgumentTypeError(
            f"--seeds {text!r}: one seed gives no standard deviation and no 95% interval for the difference to the "
            f"baseline. Give two or more (e.g. --seeds 0-4), or --seed {seeds[0]} for a single run.")
    return seeds


def over_seeds(values: Mapping[int, float], baseline: Mapping[int, float] | None = None) -> dict:
    """One benchmark row over seeds, ready for JSON: the per-seed values, mean, std, n, min, max and (with a
    baseline of the same seeds) the paired difference with its 95% interval (``None`` with a single seed)."""
    s = summarize(values.values())
    row = {"per_seed": {str(k): float(v) for k, v in sorted(values.items())}, "mean": s.mean,
           "std": None if s.n < 2 else s.std, "n": s.n, "min": s.min, "max": s.max, "difference": None}
    if baseline is None:
        return row
    _check_paired(values, baseline)
    if s.n >= 2:
        d = paired_difference(values, baseline)
        row["difference"] = {"mean": d.mean, "low": d.low, "high": d.high, "std": d.std, "n": d.n,
                             "per_seed": {str(k): v for k, v in d.per_seed.items()}}
    else:
        ((seed, value),) = values.items()
        delta = float(value) - float(baseline[seed])
        row["difference"] = {"mean": delta, "low": None, "high": None, "std": None, "n": 1,
                             "per_seed": {str(seed): delta}}
    return row


def verdict(row: dict, margin: float = 1.0) -> str:
    """What the paired interval of an :func:`over_seeds` row says against ``margin`` points: ``within ±1`` (the
    whole interval inside ±margin), ``no worse than -1`` (its low end above -margin, its high end above +margin:
    not inferior, possibly better), ``worse by > 1`` (its high end below -margin), ``better by > 1``, or
    ``not settled`` (the interval reaches beyond -margin: more seeds needed)."""
    d = row.get("difference")
    if d is None or d["low"] is None:
        return "n/a"
    m = f"{margin:g}"
    if -margin <= d["low"] and d["high"] <= margin:
        return f"within ±{m}"
    if d["high"] < -margin:
        return f"worse by > {m}"
    if d["low"] > margin:
        return f"better by > {m}"
    return f"no worse than -{m}" if d["low"] >= -margin else "not settled"


def format_mean(row: dict) -> str:
    """``77.10 ± 1.17`` from :func:`over_seeds` (the value alone for one seed)."""
    return f"{row['mean']:.2f}" + (f" ± {row['std']:.2f}" if row["std"] is not None else "")


def format_difference(row: dict) -> str:
    """``-0.55 [-1.20, +0.10]``: the paired difference and its 95% interval (the difference alone for one seed)."""
    d = row.get("difference")
    if d is None:
        return "n/a"
    return f"{d['mean']:+.2f}" + (f" [{d['low']:+.2f}, {d['high']:+.2f}]" if d["low"] is not None else "")
