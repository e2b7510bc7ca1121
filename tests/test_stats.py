"""Interval and test code against published values and against SciPy (an independent implementation)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from weightedit.evaluation.stats import (
    bootstrap_mean,
    clopper_pearson_interval,
    mcnemar_test,
    perplexity_ratio_ci,
    wilson_interval,
)

# Newcombe (1998), "Two-sided confidence intervals for the single proportion", Statistics in Medicine 17,
# Table I, method 3 (Wilson score interval without continuity correction).
NEWCOMBE_WILSON = [
    (81, 263, 0.2553, 0.3662),
    (15, 148, 0.0624, 0.1605),
    (0, 20, 0.0, 0.1611),
    (1, 29, 0.0061, 0.1718),
]


@pytest.mark.parametrize(("k", "n", "lo", "hi"), NEWCOMBE_WILSON)
def test_wilson_matches_published_values(k, n, lo, hi):
    got = wilson_interval(k, n)
    assert got == pytest.approx((lo, hi), abs=1e-4)


@pytest.mark.parametrize(("k", "n"), [(0, 1), (1, 1), (9, 12), (0, 12), (12, 12), (3, 7), (50, 100), (1, 1000)])
def test_wilson_matches_scipy(k, n):
    ref = sps.binomtest(k, n).proportion_ci(method="wilson")
    assert wilson_interval(k, n) == pytest.approx((ref.low, ref.high), abs=1e-9)


def test_the_issues_examples():
    # "75% → 0%" in English was 9/12 → 0/12. The issue quotes [0.43, 0.95] and [0, 0.26]: those are the exact
    # Clopper–Pearson bounds; the Wilson interval weightedit reports is narrower.
    assert clopper_pearson_interval(9, 12) == pytest.approx((0.428, 0.945), abs=1e-3)
    assert clopper_pearson_interval(0, 12) == pytest.approx((0.0, 0.265), abs=1e-3)
    assert wilson_interval(9, 12) == pytest.approx((0.468, 0.911), abs=1e-3)
    assert wilson_interval(0, 12) == pytest.approx((0.0, 0.2425), abs=1e-3)
    assert wilson_interval(0, 0) is None


@pytest.mark.parametrize(("k", "n"), [(0, 5), (2, 5), (5, 5), (9, 12), (17, 40)])
def test_clopper_pearson_matches_scipy(k, n):
    ref = sps.binomtest(k, n).proportion_ci(method="exact")
    assert clopper_pearson_interval(k, n) == pytest.approx((ref.low, ref.high), abs=1e-9)


def test_bad_counts_are_rejected():
    with pytest.raises(ValueError):
        wilson_interval(5, 4)


@pytest.mark.parametrize(("b", "c"), [(9, 0), (3, 1), (5, 5), (0, 7), (12, 2), (20, 30)])
def test_exact_mcnemar_is_the_binomial_test_on_discordant_pairs(b, c):
    # b prompts refused only before, c only after, plus 4 refused by both and 3 by neither.
    before = [True] * b + [False] * c + [True] * 4 + [False] * 3
    after = [False] * b + [True] * c + [True] * 4 + [False] * 3
    result = mcnemar_test(before, after)
    assert result.method == "exact" and (result.only_before, result.only_after, result.n) == (b, c, b + c + 7)
    assert result.p_value == pytest.approx(sps.binomtest(b, b + c, 0.5).pvalue, rel=1e-9)


def test_mcnemar_large_counts_use_chi_square():
    before = [True] * 60 + [False] * 20
    after = [False] * 60 + [True] * 20
    result = mcnemar_test(before, after)
    assert result.method == "chi2-cc"
    statistic = (abs(60 - 20) - 1) ** 2 / 80
    assert result.p_value == pytest.approx(sps.chi2.sf(statistic, 1), rel=1e-9)


def test_mcnemar_known_value_and_edge_cases():
    # 9 of 12 refused before, none after, no prompt refused only after: p = 2 / 2^9.
    assert mcnemar_test([True] * 9 + [False] * 3, [False] * 12).p_value == pytest.approx(2 / 512)
    assert mcnemar_test([True, False], [True, False]).p_value == 1.0
    assert mcnemar_test([], []) is None
    with pytest.raises(ValueError):
        mcnemar_test([True], [True, False])


def test_bootstrap_mean_is_seeded_and_covers_the_mean():
    rng = np.random.default_rng(1)
    values = rng.exponential(0.1, size=40).tolist()
    a = bootstrap_mean(values, seed=3)
    assert a == bootstrap_mean(values, seed=3)  # reproducible
    assert a != bootstrap_mean(values, seed=4)
    assert a[0] < float(np.mean(values)) < a[1]
    # The percentile interval of a mean is close to mean ± 1.96 standard errors for n = 40.
    se = float(np.std(values, ddof=1)) / math.sqrt(len(values))
    assert a[1] - a[0] == pytest.approx(2 * 1.96 * se, rel=0.25)
    assert bootstrap_mean([], seed=0) is None
    assert bootstrap_mean([0.5]) == (0.5, 0.5)


def test_bootstrap_mean_matches_scipy_percentile_bootstrap():
    rng = np.random.default_rng(7)
    values = rng.normal(1.0, 0.3, size=60)
    ours = bootstrap_mean(values.tolist(), seed=0, resamples=4000)
    ref = sps.bootstrap((values,), np.mean, n_resamples=4000, method="percentile", random_state=0).confidence_interval
    assert ours == pytest.approx((ref.low, ref.high), abs=0.02)


def test_perplexity_ratio_interval():
    rng = np.random.default_rng(2)
    tokens = rng.integers(10, 30, size=50)
    base = tokens * rng.normal(2.0, 0.2, size=50)
    edited = base + tokens * 0.05  # 0.05 nats per token worse: ratio e^0.05
    lo, hi = perplexity_ratio_ci(edited.tolist(), base.tolist(), tokens.tolist(), seed=0)
    assert lo == pytest.approx(math.exp(0.05), rel=1e-9) and hi == pytest.approx(math.exp(0.05), rel=1e-9)
    noisy = base + tokens * rng.normal(0.05, 0.1, size=50)
    point = math.exp((noisy.sum() - base.sum()) / tokens.sum())
    lo, hi = perplexity_ratio_ci(noisy.tolist(), base.tolist(), tokens.tolist(), seed=0)
    assert lo < point < hi and hi - lo > 0.01
