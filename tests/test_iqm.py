"""The interquartile mean and its bootstrap intervals (contlearn/results/curves.py) against a
plain-Python trimmed mean (scipy.stats.trim_mean's definition: cut int(n/4) from each end of
the sorted values) and hand-built score matrices; `--stat iqm` in plot and summary."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

from contlearn.results.curves import bootstrap_iqm_ci, iqm, stratified_iqm


def trim_mean(values) -> float:
    """scipy.stats.trim_mean(values, 0.25), written out."""
    xs = sorted(float(v) for v in values)
    cut = int(0.25 * len(xs))
    kept = xs[cut : len(xs) - cut]
    return sum(kept) / len(kept)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 8, 11])
def test_iqm_is_scipys_trim_mean(n: int) -> None:
    rng = np.random.default_rng(n)
    v = rng.normal(size=(n, 6))
    np.testing.assert_allclose(iqm(v), [trim_mean(v[:, j]) for j in range(6)])


def test_iqm_skips_nans_per_column() -> None:
    v = np.array([[1.0, np.nan], [2.0, 5.0], [3.0, np.nan], [100.0, 7.0]])
    got = iqm(v)
    assert got[0] == pytest.approx(2.5)  # 4 values: cut one from each end
    assert got[1] == pytest.approx(6.0)  # 2 values: nothing cut
    assert np.isnan(iqm(np.full((3, 1), np.nan)))[0]


def test_iqm_intervals_need_three_seeds_and_cover_the_point() -> None:
    two = np.array([[0.5, 0.6], [0.7, 0.8]])
    lo, hi = bootstrap_iqm_ci(two)
    assert np.isnan(lo).all() and np.isnan(hi).all()
    rng = np.random.default_rng(0)
    many = rng.normal(0.7, 0.05, size=(10, 3))
    lo, hi = bootstrap_iqm_ci(many, n_boot=500)
    point = iqm(many)
    assert (lo <= point).all() and (point <= hi).all() and (hi - lo < 0.2).all()


def test_stratified_bootstrap_resamples_within_tasks() -> None:
    # every task's seeds hold the same value: any within-task resample keeps it, so the
    # interval is a point; a resample across tasks would not be
    values = np.tile(np.array([[0.1, 0.5, 0.9]]), (4, 1))
    point, lo, hi = stratified_iqm(values, n_boot=200)
    assert point == pytest.approx(trim_mean(values.reshape(-1)))
    assert lo == pytest.approx(point) and hi == pytest.approx(point)
    p2, lo2, hi2 = stratified_iqm(values[:2])
    assert math.isnan(lo2) and math.isnan(hi2) and p2 == pytest.approx(0.5)


def test_plot_and_summary_take_stat_iqm(tmp_path) -> None:
    import contlearn

    out = tmp_path / "run"
    contlearn.run(
        "permuted-mnist",
        seeds=3,
        tasks=2,
        config={"examples_per_task": 60, "hidden": "8", "probe_size": 32},
        out=out,
        progress=False,
    )
    cli = [sys.executable, "-m", "contlearn"]
    summary = subprocess.run(
        [*cli, "summary", str(out), "--stat", "iqm"], capture_output=True, text=True
    )
    assert summary.returncode == 0, summary.stderr
    assert "IQM over seeds" in summary.stdout and "final_lo" in summary.stdout
    png = tmp_path / "iqm.png"
    plot = subprocess.run(
        [*cli, "plot", str(out), "--stat", "iqm", "--out", str(png)], capture_output=True, text=True
    )
    assert plot.returncode == 0, plot.stderr
    assert png.stat().st_size > 10_000
    bad = subprocess.run(
        [*cli, "summary", str(out), "--stat", "median"], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "median" in bad.stderr
    from contlearn.results.summary import summary_table

    table = summary_table(contlearn.load_runs([out]), stat="iqm")
    assert table["final_lo"].notna().all() and (table["final_lo"] <= table["final_hi"]).all()
