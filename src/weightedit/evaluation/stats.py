"""Uncertainty for every number an evaluation reports.

- :func:`wilson_interval`: the Wilson score interval of a binomial rate (the interval every refusal rate
  carries). It keeps close to its nominal coverage for the small samples an evaluation has (12–100 prompts
  per language) and, unlike the normal approximation, never leaves [0, 1] or collapses to a point at 0/n.
- :func:`clopper_pearson_interval`: the exact (conservative) interval, for readers who want it.
- :func:`mcnemar_test`: a paired test of "refusal before" against "refusal after" on the same prompts:
  exact binomial on the discordant pairs when they are few, chi-square with continuity correction
  otherwise.
- :func:`bootstrap_mean`, :func:`bootstrap_paired` and :func:`perplexity_ratio_ci`: seeded percentile
  bootstrap intervals of a mean (KL) and of a statistic of paired items (the perplexity ratio, resampling
  sentences), reproducible from the seed.

Everything here is pure Python/NumPy so that evaluation does not need SciPy; the tests check it against
published values and against SciPy.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "Z95",
    "wilson_interval",
    "clopper_pearson_interval",
    "McNemar",
    "mcnemar_test",
    "bootstrap_mean",
    "bootstrap_paired",
    "perplexity_ratio_ci",
    "BOOTSTRAP_RESAMPLES",
    "EXACT_MCNEMAR_MAX",
]

# The two-sided 95% standard normal quantile.
Z95 = 1.959963984540054
# Percentile bootstrap resamples: enough for the 2.5% and 97.5% quantiles to be stable to about 0.5%.
BOOTSTRAP_RESAMPLES = 2000
# Up to this many discordant pairs McNemar's test is the exact binomial test.
EXACT_MCNEMAR_MAX = 50


def wilson_interval(successes: int, n: int, *, z: float = Z95) -> tuple[float, float] | None:
    """The Wilson score interval for ``successes`` out of ``n`` (``None`` when ``n`` is 0).

    Example: 9 of 12 gives (0.468, 0.911), 0 of 12 gives (0.0, 0.242).
    """
    if n <= 0:
        return None
    if not 0 <= successes <= n:
        raise ValueError(f"successes must lie in [0, {n}], got {successes}")
    p = successes / n
    z2 = z * z
    denom = 1 + z2 / n
    center = (p + z2 / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    # The bounds are exact at the ends: 0/n has lower bound 0 and n/n upper bound 1 (up to rounding).
    lo = 0.0 if successes == 0 else max(0.0, center - half)
    hi = 1.0 if successes == n else min(1.0, center + half)
    return (lo, hi)


def _binom_cdf(k: int, n: int, p: float) -> float:
    """P(X ≤ k) for X ~ Binomial(n, p)."""
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    return math.fsum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k + 1))


def _bisect(f: Callable[[float], float], target: float, *, increasing: bool) -> float:
    lo, hi = 0.0, 1.0
    for _ in range(100):
        mid = (lo + hi) / 2
        if (f(mid) < target) == increasing:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def clopper_pearson_interval(successes: int, n: int, *, alpha: float = 0.05) -> tuple[float, float] | None:
    """The exact Clopper–Pearson interval (e.g. 9 of 12 gives (0.428, 0.945), 0 of 12 gives (0, 0.265))."""
    if n <= 0:
        return None
    if not 0 <= successes <= n:
        raise ValueError(f"successes must lie in [0, {n}], got {successes}")
    k = successes
    # Lower bound: the p at which P(X ≥ k) = α/2; upper bound: the p at which P(X ≤ k) = α/2.
    lo = 0.0 if k == 0 else _bisect(lambda p: 1 - _binom_cdf(k - 1, n, p), alpha / 2, increasing=True)
    hi = 1.0 if k == n else _bisect(lambda p: _binom_cdf(k, n, p), alpha / 2, increasing=False)
    return (lo, hi)


@dataclass(frozen=True)
class McNemar:
    """A paired before/after comparison of binary outcomes on the same items.

    Attributes:
        n: number of pairs.
        only_before: pairs refused before and not after (b).
        only_after: pairs refused after and not before (c).
        p_value: two-sided p-value of "before and after have the same rate".
        method: ``"exact"`` (binomial on the b + c discordant pairs) or ``"chi2-cc"``.
    """

    n: int
    only_before: int
    only_after: int
    p_value: float
    method: str

    def to_dict(self) -> dict[str, float | int | str]:
        return {
            "n": self.n,
            "only_before": self.only_before,
            "only_after": self.only_after,
            "p_value": self.p_value,
            "method": self.method,
        }


def mcnemar_test(before: Sequence[bool], after: Sequence[bool]) -> McNemar | None:
    """McNemar's test for paired binary outcomes (``None`` without pairs).

    With b + c ≤ :data:`EXACT_MCNEMAR_MAX` discordant pairs the p-value is the exact two-sided binomial
    test of b against Binomial(b + c, 1/2); above that, the chi-square statistic (|b − c| − 1)² / (b + c)
    with one degree of freedom.
    """
    if len(before) != len(after):
        raise ValueError(f"paired outcomes must have equal length, got {len(before)} and {len(after)}")
    if not before:
        return None
    b = sum(1 for x, y in zip(before, after, strict=True) if x and not y)
    c = sum(1 for x, y in zip(before, after, strict=True) if y and not x)
    m = b + c
    if m == 0:
        return McNemar(len(before), b, c, 1.0, "exact")
    if m <= EXACT_MCNEMAR_MAX:
        tail = _binom_cdf(min(b, c), m, 0.5)
        return McNemar(len(before), b, c, min(1.0, 2 * tail), "exact")
    stat = (abs(b - c) - 1) ** 2 / m
    return McNemar(len(before), b, c, math.erfc(math.sqrt(stat / 2)), "chi2-cc")


def _percentile_interval(values: np.ndarray, level: float) -> tuple[float, float]:
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(values, [tail, 100 - tail])
    return (float(lo), float(hi))


def bootstrap_mean(
    values: Sequence[float],
    *,
    seed: int = 0,
    resamples: int = BOOTSTRAP_RESAMPLES,
    level: float = 0.95,
) -> tuple[float, float] | None:
    """Percentile bootstrap interval of the mean of ``values`` (``None`` when empty; a point for one value)."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return None
    if x.size == 1:
        return (float(x[0]), float(x[0]))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.size, size=(resamples, x.size))
    return _percentile_interval(x[idx].mean(axis=1), level)


def bootstrap_paired(
    columns: Sequence[Sequence[float]],
    statistic: Callable[..., np.ndarray],
    *,
    seed: int = 0,
    resamples: int = BOOTSTRAP_RESAMPLES,
    level: float = 0.95,
) -> tuple[float, float] | None:
    """Percentile bootstrap interval of a statistic of paired per-item columns, resampling items jointly.

    ``statistic(*resampled)`` receives one array of shape ``[resamples, n]`` per column (row *r* of every
    array is the same resample of the items) and returns ``[resamples]`` values. ``None`` without items.
    """
    arrays = [np.asarray(c, dtype=np.float64) for c in columns]
    n = arrays[0].size
    if any(a.shape != (n,) for a in arrays):
        raise ValueError(f"paired columns must be 1-D of equal length, got {[a.shape for a in arrays]}")
    if n == 0:
        return None
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(resamples, n))
    return _percentile_interval(np.asarray(statistic(*(a[idx] for a in arrays))), level)


def perplexity_ratio_ci(
    nll_edited: Sequence[float],
    nll_baseline: Sequence[float],
    tokens: Sequence[int],
    *,
    seed: int = 0,
    resamples: int = BOOTSTRAP_RESAMPLES,
) -> tuple[float, float] | None:
    """Bootstrap interval of perplexity(edited) / perplexity(baseline), resampling sentences.

    Each argument is per sentence: summed NLL (nats) under each model and the number of predicted tokens
    (the same for both models, which share a tokenizer). The ratio of one resample is
    exp((ΣNLL_edited − ΣNLL_baseline) / Σtokens).
    """

    def ratio(e: np.ndarray, b: np.ndarray, t: np.ndarray) -> np.ndarray:
        return np.exp((e.sum(axis=1) - b.sum(axis=1)) / np.maximum(t.sum(axis=1), 1))

    return bootstrap_paired([nll_edited, nll_baseline, tokens], ratio, seed=seed, resamples=resamples)
