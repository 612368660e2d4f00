"""Paired significance tests over per-query metric values, and Holm-Bonferroni correction.

The test is a paired randomization (sign-flip) test of the mean per-query difference, two-sided, computed by
`scipy.stats.permutation_test` with a fixed seed: with n queries there are 2**n equally likely sign patterns under
the null hypothesis that the two systems are exchangeable on every query. scipy enumerates them all (an exact
p-value) when 2**n <= `N_RESAMPLES`, i.e. n <= 13; above that it draws `N_RESAMPLES` random patterns and reports
(hits + 1) / (N_RESAMPLES + 1), so a p-value is never 0. No parametric assumption (unlike the paired t-test), and it
is the test Smucker, Allan and Carterette (CIKM 2007) recommend for IR.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from scipy import stats

from kvrank.errors import KvrankError

N_RESAMPLES = 10_000
SEED = 0
TEST_NAME = (f"paired randomization test (sign flips of per-query differences), {N_RESAMPLES} resamples "
             f"(exact when 2^n <= {N_RESAMPLES}), two-sided, seed {SEED}; scipy.stats.permutation_test")
SIGNIFICANT = 0.05  # a dagger in the tables below this p-value


def paired_p_value(a: Sequence[float], b: Sequence[float], *, n_resamples: int = N_RESAMPLES,
                   seed: int = SEED) -> float:
    """Two-sided p-value of the paired randomization test of mean(b - a) != 0."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"paired samples must be two 1-d vectors of one length, got {x.shape} and {y.shape}")
    if x.size == 0:
        raise KvrankError("no queries to test: the two runs share no per-query values")
    diff = y - x
    if not np.any(diff):
        return 1.0  # identical on every query: nothing to test (scipy agrees, but skip the resampling)
    result = stats.permutation_test(
        (diff,), _mean, permutation_type="samples", vectorized=True, n_resamples=n_resamples,
        alternative="two-sided", random_state=seed)
    return float(min(1.0, result.pvalue))


def _mean(x: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(x, axis=axis)


def paired_tests(first: Mapping[str, Mapping[str, float]], second: Mapping[str, Mapping[str, float]],
                 metrics: Sequence[str]) -> dict[str, float]:
    """metric -> p-value of `second` vs `first`, over the queries both hold (query id -> metric -> value)."""
    shared = sorted(first.keys() & second.keys())
    if not shared:
        raise KvrankError("the two runs share no queries with per-query values; compare runs of the same "
                          "queries (a report's per_query)")
    return {metric: paired_p_value([first[q][metric] for q in shared], [second[q][metric] for q in shared])
            for metric in metrics}


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values, in the input order (Holm 1979; statsmodels' `multipletests(...,
    method="holm")`): sort ascending, multiply the i-th smallest (0-based) by (m - i), carry the running maximum
    so adjusted values never decrease, cap at 1. Reject where adjusted p < alpha. (scipy has no Holm; a dozen
    lines here instead of a statsmodels dependency.)"""
    p = np.asarray(p_values, dtype=np.float64)
    m = p.size
    order = np.argsort(p, kind="stable")
    scaled = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    adjusted = np.empty(m)
    adjusted[order] = scaled
    return adjusted.tolist()


def mark(p_value: float | None) -> str:
    """A dagger when `p_value` < 0.05, else nothing."""
    return "\u2020" if p_value is not None and p_value < SIGNIFICANT else ""
