"""The statistics behind the verdict, against numbers worked independently of stages/stats.py,
and the properties they must keep whatever the data (Hypothesis)."""

import math
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats as scipy_stats

from stages.core.stats import (
    Equivalence,
    Interval,
    difference,
    equivalence,
    mcnemar_exact,
    mean_interval,
    seeds_to_decide,
)


def test_welch_not_student_on_unequal_spreads_and_sizes():
    # a: n 4, mean 2.5, variance 5/3; b: n 3, mean 6, variance 16 (deviations -4, 0, 4).
    # Welch: se^2 = (5/3)/4 + 16/3 = 5.75; df = 5.75^2 / ((5/12)^2/3 + (16/3)^2/2) = 2.31529...
    a, b = [1.0, 2.0, 3.0, 4.0], [2.0, 6.0, 10.0]
    se = math.sqrt(5.75)
    df = 5.75**2 / ((5 / 12) ** 2 / 3 + (16 / 3) ** 2 / 2)
    assert df == pytest.approx(2.31529, rel=1e-5)
    t = -3.5 / se
    p_welch = 2 * scipy_stats.t.cdf(t, df)
    half = scipy_stats.t.ppf(0.975, df) * se
    result = difference(a, b)
    assert result.interval.mean == pytest.approx(-3.5)
    assert result.p_value == pytest.approx(p_welch, rel=1e-9)
    assert (result.interval.low, result.interval.high) == pytest.approx((-3.5 - half, -3.5 + half))
    # Student's pooled test gives another answer on these samples: df 5, se sqrt(7.4 * 7/12)
    p_student = 2 * scipy_stats.t.cdf(-3.5 / math.sqrt(7.4 * 7 / 12), 5)
    assert abs(p_student - p_welch) > 0.02
    assert not result.significant  # the interval [-14.4, +7.4] contains zero


def test_difference_is_first_minus_second():
    result = difference([0.95, 0.96, 0.97], [0.85, 0.86, 0.88])
    assert result.interval.mean == pytest.approx(0.0967, abs=1e-4) and result.significant
    assert result.interval.low > 0


def test_mcnemar_counts_each_side_and_the_exact_p():
    # 12 images only A gets right, 3 only B: p = 2 * P(X <= 3 | n 15, 1/2) = 2 * 576 / 32768
    a = np.array([True] * 12 + [False] * 3 + [True] * 50 + [False] * 5)
    b = np.array([False] * 12 + [True] * 3 + [True] * 50 + [False] * 5)
    result = mcnemar_exact(a, b)
    assert (result.only_a_right, result.only_b_right) == (12, 3)
    assert result.p_value == pytest.approx(2 * (1 + 15 + 105 + 455) / 2**15)


samples = st.lists(
    st.integers(0, 10_000).map(lambda k: k / 10_000),
    min_size=2,
    max_size=12,  # accuracies
)


@given(samples)
@settings(max_examples=60, deadline=None)
def test_the_interval_contains_the_mean(values):
    interval = mean_interval(values)
    assert interval.low <= interval.mean + 1e-12 and interval.mean <= interval.high + 1e-12
    assert interval.mean == pytest.approx(float(np.mean(values)))


@given(
    st.lists(st.tuples(st.booleans(), st.booleans()), min_size=1, max_size=200),
)
@settings(max_examples=60, deadline=None)
def test_mcnemar_is_symmetric_under_swapping_the_frameworks(pairs):
    a = np.array([p[0] for p in pairs])
    b = np.array([p[1] for p in pairs])
    forward, backward = mcnemar_exact(a, b), mcnemar_exact(b, a)
    assert (forward.only_a_right, forward.only_b_right) == (
        backward.only_b_right,
        backward.only_a_right,
    )
    assert forward.p_value == pytest.approx(backward.p_value)
    assert forward.only_a_right == int(np.sum(a & ~b))


@given(samples, samples)
@settings(max_examples=60, deadline=None)
@pytest.mark.filterwarnings("ignore:Precision loss occurred in moment calculation")  # ties
def test_difference_flips_sign_when_the_arguments_swap(a, b):
    forward, backward = difference(a, b), difference(b, a)
    assert forward.interval.mean == pytest.approx(-backward.interval.mean, abs=1e-12)
    assert forward.significant == backward.significant


def test_one_seed_on_either_side_gives_no_interval_and_no_verdict():
    for a, b in (([0.9], [0.80, 0.82]), ([0.80, 0.82], [0.9])):
        result = difference(a, b)
        assert math.isnan(result.interval.low) and math.isnan(result.interval.high)
        assert math.isnan(result.p_value)
        assert result.significant is False


def test_seeds_without_spread_on_both_sides():
    apart = difference([0.9, 0.9, 0.9], [0.8, 0.8, 0.8])
    assert apart.interval == Interval(pytest.approx(0.1), pytest.approx(0.1), pytest.approx(0.1))
    assert (apart.p_value, apart.significant) == (0.0, True)
    same = difference([0.9, 0.9, 0.9], [0.9, 0.9, 0.9])
    assert (same.interval.low, same.p_value, same.significant) == (0.0, 1.0, False)


def test_welch_when_only_one_side_has_spread():
    # a has no spread, so Welch's standard error is b's alone: s_b / sqrt(3) = 0.125 / sqrt(3),
    # on n_b - 1 = 2 degrees of freedom. t(0.975, 2) = 4.302653; t = 0.125 / se = sqrt(3); with
    # 2 degrees of freedom the two-sided p is 1 - |t| / sqrt(t^2 + 2) = 1 - sqrt(3 / 5).
    result = difference([0.75, 0.75, 0.75], [0.5, 0.625, 0.75])  # exact in binary
    half = 4.302653 * 0.125 / math.sqrt(3)
    assert result.interval.mean == pytest.approx(0.125)
    assert result.interval.low == pytest.approx(0.125 - half, rel=1e-5)
    assert result.interval.high == pytest.approx(0.125 + half, rel=1e-5)
    assert result.p_value == pytest.approx(1 - math.sqrt(3 / 5), rel=1e-5)
    assert not result.significant


def test_two_seeds_a_side_are_enough_for_an_interval():
    result = difference([0.90, 0.92], [0.80, 0.81])
    assert math.isfinite(result.interval.low) and math.isfinite(result.interval.high)
    assert result.interval.low < 0.105 < result.interval.high


def test_seeds_agreeing_to_the_last_bit_on_one_side_raise_no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # scipy's "Precision loss occurred" would fail here
        result = difference([0.9, 0.9, 0.9], [0.80, 0.85, 0.90])  # 0.9 is not exact in binary
    assert result.interval.mean == pytest.approx(0.05)


# ---------------------------------------------------------------------------------------------
# Equivalence: two one-sided tests (TOST) against a margin


def test_tost_worked_by_hand():
    # a: mean 2.5, variance 5/3, n 4; b: mean 2.0, variance 1, n 3 (1, 2, 3).
    # se^2 = (5/3)/4 + 1/3 = 0.75; df = 0.75^2 / ((5/12)^2/3 + (1/3)^2/2) = 4.7647...
    a, b = [1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0]
    se, df = math.sqrt(0.75), 0.75**2 / ((5 / 12) ** 2 / 3 + (1 / 3) ** 2 / 2)
    margin = 3.0
    p_lower = scipy_stats.t.sf((0.5 + margin) / se, df)  # H0: difference <= -3
    p_upper = scipy_stats.t.cdf((0.5 - margin) / se, df)  # H0: difference >= +3
    half = scipy_stats.t.ppf(0.95, df) * se  # the 90% interval
    result = equivalence(a, b, margin)
    assert result.p_value == pytest.approx(max(p_lower, p_upper), rel=1e-9)
    assert result.p_value == pytest.approx(p_upper, rel=1e-9)  # the nearer bound decides
    assert (result.interval.low, result.interval.high) == pytest.approx((0.5 - half, 0.5 + half))
    assert result.equivalent and result.p_value < 0.05
    assert result.interval.high < margin  # equivalent exactly when the 90% CI is inside
    narrow = equivalence(a, b, 0.5 + half - 1e-6)
    assert not narrow.equivalent and narrow.p_value > 0.05


def test_tost_equivalent_different_and_undecided_samples():
    close = equivalence([0.900, 0.901, 0.902, 0.901], [0.901, 0.900, 0.902, 0.902], 0.002)
    assert close.equivalent
    apart = equivalence([0.90, 0.91, 0.92], [0.80, 0.81, 0.82], 0.002)
    assert not apart.equivalent and apart.p_value > 0.5
    noisy = equivalence([0.90, 0.88, 0.92], [0.91, 0.87, 0.93], 0.002)
    assert (
        not noisy.equivalent and not difference([0.90, 0.88, 0.92], [0.91, 0.87, 0.93]).significant
    )


def test_tost_without_spread_or_with_one_seed():
    assert equivalence([0.9, 0.9], [0.9, 0.9], 0.002) == Equivalence(
        0.002, Interval(0.0, 0.0, 0.0), 0.0, True
    )
    far = equivalence([0.9, 0.9], [0.8, 0.8], 0.002)
    assert (far.equivalent, far.p_value) == (False, 1.0)
    one = equivalence([0.9], [0.9, 0.91], 0.002)
    assert not one.equivalent and math.isnan(one.p_value) and math.isnan(one.interval.low)


def _decides_by_brute_force(a, b, margin, limit=2000):
    var = np.var(a, ddof=1) + np.var(b, ddof=1)
    delta = abs(np.mean(a) - np.mean(b))
    for n in range(2, limit + 1):
        se = math.sqrt(var / n)
        df = var**2 * (n - 1) / (np.var(a, ddof=1) ** 2 + np.var(b, ddof=1) ** 2)
        if delta + scipy_stats.t.ppf(0.95, df) * se < margin:
            return n
        if delta - scipy_stats.t.ppf(0.975, df) * se > 0:
            return n
    return None


@pytest.mark.parametrize(
    ("a", "b", "margin"),
    [
        ([0.866, 0.870, 0.871, 0.868], [0.866, 0.874, 0.872, 0.868], 0.002),  # toward a difference
        ([0.900, 0.902, 0.898], [0.9005, 0.899, 0.901], 0.002),  # toward equivalence
        ([0.90, 0.88, 0.92], [0.91, 0.87, 0.93], 0.002),
    ],
)
def test_seeds_to_decide_is_the_first_seed_count_that_decides(a, b, margin):
    assert seeds_to_decide(a, b, margin) == _decides_by_brute_force(a, b, margin)


def test_seeds_to_decide_without_spread_or_beyond_the_limit():
    assert seeds_to_decide([0.9, 0.9], [0.9, 0.9], 0.002) is None
    assert seeds_to_decide([0.9], [0.9, 0.8], 0.002) is None
    # a difference exactly at the margin with a huge spread: not within 50 seeds
    assert seeds_to_decide([0.5, 0.9], [0.498, 0.898], 0.002, limit=50) is None
