"""Statistics for the comparison, from scipy: intervals over seeds and McNemar's exact test."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
from scipy import stats


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float

    @property
    def half_width(self) -> float:
        """Return half the interval's width (nan when it is undefined)."""
        return (self.high - self.low) / 2


def mean_interval(samples: list[float], confidence: float = 0.95) -> Interval:
    """Return the mean with its Student-t confidence interval (nan bounds for one sample)."""
    values = np.asarray(samples, dtype=float)
    mean = float(values.mean())
    if len(values) < 2:
        return Interval(mean, math.nan, math.nan)
    scale = float(stats.sem(values))
    if not scale > 0:  # zero spread: every seed gave the same value
        return Interval(mean, mean, mean)
    low, high = stats.t.interval(confidence, len(values) - 1, loc=mean, scale=scale)
    if not (np.isfinite(low) and np.isfinite(high)):  # a spread too small for float64
        return Interval(mean, mean, mean)
    return Interval(mean, float(low), float(high))


@dataclass(frozen=True)
class Difference:
    interval: Interval  # of mean(a) - mean(b)
    p_value: float
    significant: bool


def difference(a: list[float], b: list[float], confidence: float = 0.95) -> Difference:
    """Return mean(a) - mean(b) with Welch's interval and p-value; significant if 0 is outside."""
    a_values, b_values = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    delta = float(a_values.mean() - b_values.mean())
    if len(a_values) < 2 or len(b_values) < 2:
        return Difference(Interval(delta, math.nan, math.nan), math.nan, False)
    if np.ptp(a_values) == 0 and np.ptp(b_values) == 0:  # exact, unlike a float std of ~1e-17
        return Difference(Interval(delta, delta, delta), 0.0 if delta else 1.0, delta != 0)
    with warnings.catch_warnings():  # one side without spread is fine for Welch: say nothing
        warnings.filterwarnings("ignore", "Precision loss occurred", RuntimeWarning)
        result = stats.ttest_ind(a_values, b_values, equal_var=False)
    ci = result.confidence_interval(confidence)
    low, high = float(ci.low), float(ci.high)
    return Difference(Interval(delta, low, high), float(result.pvalue), not low <= 0.0 <= high)


@dataclass(frozen=True)
class McNemar:
    only_a_right: int
    only_b_right: int
    p_value: float


def mcnemar_exact(correct_a: np.ndarray, correct_b: np.ndarray) -> McNemar:
    """Return McNemar's exact test on paired correctness: a binomial test on the discordant pairs."""
    only_a = int(np.sum(correct_a & ~correct_b))
    only_b = int(np.sum(~correct_a & correct_b))
    discordant = only_a + only_b
    p_value = 1.0 if discordant == 0 else stats.binomtest(only_a, discordant, 0.5).pvalue
    return McNemar(only_a, only_b, float(p_value))


@dataclass(frozen=True)
class Equivalence:
    margin: float
    interval: Interval  # the (1 - 2 alpha) interval of mean(a) - mean(b): 90% for alpha 0.05
    p_value: float  # TOST's: the larger of its two one-sided p-values
    equivalent: bool


def equivalence(a: list[float], b: list[float], margin: float, alpha: float = 0.05) -> Equivalence:
    """Return Welch's two one-sided tests (TOST) of -margin < mean(a) - mean(b) < margin."""
    a_values, b_values = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    delta = float(a_values.mean() - b_values.mean())
    if len(a_values) < 2 or len(b_values) < 2:
        return Equivalence(margin, Interval(delta, math.nan, math.nan), math.nan, False)
    if np.ptp(a_values) == 0 and np.ptp(b_values) == 0:  # no spread: the answer is exact
        inside = abs(delta) < margin
        return Equivalence(margin, Interval(delta, delta, delta), 0.0 if inside else 1.0, inside)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Precision loss occurred", RuntimeWarning)
        above = stats.ttest_ind(a_values + margin, b_values, equal_var=False, alternative="greater")
        below = stats.ttest_ind(a_values - margin, b_values, equal_var=False, alternative="less")
        both = stats.ttest_ind(a_values, b_values, equal_var=False)
    ci = both.confidence_interval(1 - 2 * alpha)
    p_value = float(max(above.pvalue, below.pvalue))
    return Equivalence(
        margin, Interval(delta, float(ci.low), float(ci.high)), p_value, p_value < alpha
    )


def seeds_to_decide(
    a: list[float], b: list[float], margin: float, alpha: float = 0.05, limit: int = 10_000
) -> int | None:
    """Return the fewest seeds per framework at which the observed difference and spreads would
    decide: equivalence within `margin` (TOST at `alpha`) or a difference (Welch at 1 - alpha);
    None without spread or beyond `limit`."""
    a_values, b_values = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a_values) < 2 or len(b_values) < 2:
        return None
    var_a, var_b = float(np.var(a_values, ddof=1)), float(np.var(b_values, ddof=1))
    if var_a + var_b == 0:
        return None
    delta = abs(float(a_values.mean() - b_values.mean()))

    def decides(n: int) -> bool:
        se = math.sqrt((var_a + var_b) / n)
        df = (var_a + var_b) ** 2 * (n - 1) / (var_a**2 + var_b**2)  # Welch-Satterthwaite
        equivalent = delta + stats.t.ppf(1 - alpha, df) * se < margin
        different = delta - stats.t.ppf(1 - alpha / 2, df) * se > 0
        return bool(equivalent or different)

    if not decides(limit):
        return None
    low, high = 2, limit  # decides() only gets easier with more seeds: bisect
    while low < high:
        middle = (low + high) // 2
        low, high = (low, middle) if decides(middle) else (middle + 1, high)
    return low
