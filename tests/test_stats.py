"""``experiments.stats``: mean, spread and paired 95% intervals on known numbers; seed lists and their errors."""

from __future__ import annotations

import argparse
import math

import pytest

from experiments.stats import over_seeds, paired_difference, parse_seeds, seeds_argument, summarize, t95, verdict


def test_summary_on_known_numbers():
    """Mean and sample standard deviation (n - 1) of 2, 4, 4, 4, 5, 5, 7, 9: 5 and sqrt(32 / 7)."""
    s = summarize([2, 4, 4, 4, 5, 5, 7, 9])
    assert s.mean == 5.0 and s.std == pytest.approx(math.sqrt(32 / 7), abs=1e-12) and s.n == 8
    assert (s.min, s.max) == (2.0, 9.0) and str(s) == "5.00 ± 2.14 (n=8)"
    one = summarize([77.7])
    assert one.mean == 77.7 and math.isnan(one.std) and str(one) == "77.70 ± - (n=1)"


def test_paired_interval_on_known_numbers():
    """Differences 0.5, 1, 0.5, 2: mean 1, std sqrt(0.5), 95% interval 1 ± 3.182446 * sqrt(0.5) / 2, which is
    SciPy's [-0.1252, 2.1252]."""
    d = paired_difference({0: 1.0, 1: 2.0, 2: 3.0, 3: 5.0}, {3: 3.0, 2: 2.5, 1: 1.0, 0: 0.5})
    assert d.mean == pytest.approx(1.0) and d.std == pytest.approx(math.sqrt(0.5)) and d.n == 4
    assert (d.low, d.high) == (pytest.approx(-0.12516468, abs=1e-6), pytest.approx(2.12516468, abs=1e-6))
    assert d.per_seed == {0: 0.5, 1: 1.0, 2: 0.5, 3: 2.0} and str(d) == "+1.00 [-0.13, +2.13] (n=4)"
    assert not d.within(1.0) and d.within(2.2)


def test_pairing_cancels_the_shared_seed_noise():
    """A constant offset on noisy seeds has a zero-width interval: the difference is per seed, not of the means."""
    base = {0: 76.8, 1: 77.7, 2: 60.0, 3: 78.2, 4: 77.6}
    d = paired_difference({s: v - 0.5 for s, v in base.items()}, base)
    assert d.mean == pytest.approx(-0.5) and d.high - d.low == pytest.approx(0.0, abs=1e-9) and d.within(1.0)


@pytest.mark.parametrize("offsets, expected", [
    ((-0.5, -0.4, -0.6), "within ±1"),        # tight around -0.5
    ((2.0, 2.5, 3.0), "better by > 1"),       # interval [+1.26, +3.74]
    ((0.5, 1.0, 1.5, 2.0), "no worse than -1"),  # [+0.43, +2.07]: not inferior, may be better
    ((-2.0, -2.5, -3.0), "worse by > 1"),
    ((-1.0, 1.0, -2.0, 2.0), "not settled"),  # wide: reaches below -1
])
def test_verdict_against_one_point(offsets, expected):
    base = {s: 60.0 + s for s in range(len(offsets))}
    row = over_seeds({s: v + o for (s, v), o in zip(base.items(), offsets)}, base)
    assert verdict(row) == expected
    assert verdict(over_seeds({0: 1.0, 1: 2.0})) == "n/a"  # no baseline, no verdict


@pytest.mark.parametrize("df, expected", [(1, 12.706205), (4, 2.776445), (9, 2.262157), (30, 2.042272),
                                          (50, 2.008559), (200, 1.971896), (10**6, 1.959966)])
def test_t_quantiles(df, expected):
    """t(0.975, df) from the table, and interpolated in 1/df beyond it (within 1e-4 of SciPy's)."""
    assert t95(df) == pytest.approx(expected, abs=1e-4)


def test_single_seed_interval_is_refused_with_the_fix():
    """One seed has no spread: the error names the seed and says to run two or more (--seeds 0-4)."""
    with pytest.raises(ValueError, match=r"1 seed \(\[3\]\) gives no 95% interval.*--seeds 0-4"):
        paired_difference({3: 70.0}, {3: 71.0})


def test_unpaired_seeds_are_refused():
    """Both settings must hold the same seeds; the error lists both."""
    with pytest.raises(ValueError, match=r"the seeds differ: \[0, 1\] vs the baseline's \[0, 2\]"):
        paired_difference({0: 1.0, 1: 2.0}, {0: 1.0, 2: 2.0})


def test_empty_summary_is_refused():
    with pytest.raises(ValueError, match="no values"):
        summarize([])


@pytest.mark.parametrize("text, seeds", [("0-4", [0, 1, 2, 3, 4]), ("0,1,2", [0, 1, 2]), ("0-2,7", [0, 1, 2, 7]),
                                         (" 5 ", [5]), ("3 - 4", [3, 4])])
def test_seed_lists(text, seeds):
    """A range, a list, or both."""
    assert parse_seeds(text) == seeds


@pytest.mark.parametrize("text, message", [
    ("", r"--seeds '': empty seed list.*0-4"),
    ("0,,2", r"--seeds '0,,2': empty seed list \(or an empty item\)"),
    ("0-x", r"--seeds '0-x': '0-x' is not a seed"),
    ("-1", r"'-1' is not a seed \(a whole number >= 0\)"),
    ("4-0", r"the range '4-0' runs backwards. Write it low-high, e.g. 0-4"),
    ("0-2,2", r"seed\(s\) \[2\] given twice"),
])
def test_malformed_seed_lists_are_refused(text, message):
    """Each error names the value given and shows the accepted forms or the fix."""
    with pytest.raises(ValueError, match=message):
        parse_seeds(text)


def test_seed_argument_reaches_argparse_with_its_message(capsys):
    """On a command line the same message follows argparse's 'argument --seeds:'."""
    parser = argparse.ArgumentParser(prog="bench")
    parser.add_argument("--seeds", type=seeds_argument)
    assert parser.parse_args(["--seeds", "0-2"]).seeds == [0, 1, 2]
    with pytest.raises(SystemExit):
        parser.parse_args(["--seeds", "1..3"])
    assert "argument --seeds: --seeds '1..3': '1..3' is not a seed" in capsys.readouterr().err
