"""Tests of contlearn.results.curves: the bootstrap band over seeds."""

from __future__ import annotations

import numpy as np

from contlearn.results.curves import bootstrap_ci


def test_bootstrap_ci_contains_mean_and_shrinks_with_seeds():
    rng = np.random.default_rng(0)
    widths = []
    for n in (3, 12, 48):
        values = rng.normal(0.5, 0.1, size=(n, 5))
        lo, hi = bootstrap_ci(values, n_boot=2000, seed=0)
        mean = values.mean(axis=0)
        assert np.all(lo <= mean) and np.all(mean <= hi)
        widths.append(np.mean(hi - lo))
    assert widths[0] > widths[1] > widths[2]


def test_bootstrap_ci_deterministic_skips_nan_and_needs_two_seeds():
    values = np.array([[0.1, 0.2, np.nan], [0.3, 0.4, 0.5], [0.2, np.nan, np.nan]])
    lo, hi = bootstrap_ci(values, seed=3)
    lo2, hi2 = bootstrap_ci(values, seed=3)
    np.testing.assert_array_equal(lo, lo2)
    assert np.all(lo[:2] >= [0.1 - 1e-12, 0.2 - 1e-12])
    assert np.all(hi[:2] <= [0.3 + 1e-12, 0.4 + 1e-12])
    assert np.isnan(lo[2]) and np.isnan(hi[2])
    assert np.isnan(bootstrap_ci(values[:1])[0]).all()
