"""One line of numbers per learner (or hyper-parameter setting): how much plasticity was lost.

Computed from the long DataFrame of :func:`contlearn.load_runs`, on the seed-mean per-task
score curve (the curve :func:`contlearn.results.plots.plot_decay` draws with ``bin=1``).

Sign convention: ``drop_from_peak`` is positive when the final score is *worse* than the best
one. For scores where higher is better (``accuracy``, ``episode_return``) ``peak`` is the
maximum of the curve and ``drop_from_peak = peak - final``; for error metrics where lower is
better (``squared_error``) ``peak`` is the *minimum* error and ``drop_from_peak = final - peak``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from contlearn.results.curves import (
    check_comparable,
    check_stat,
    default_metric,
    group_keys,
    iqm,
    replicate_curves,
    stratified_iqm,
)

LOWER_IS_BETTER = frozenset({"squared_error", "loss"})
"""Metrics whose best value is the smallest."""
FINAL_PROBES = ("dead_fraction", "effective_rank")
STAT_COLUMNS = (
    "metric",
    "seeds",
    "tasks",
    "first_task",
    "peak",
    "final",
    "drop_from_peak",
    *(f"final_{p}" for p in FINAL_PROBES),
)


def final_tasks(n_tasks: int) -> int:
    """How many of the last tasks make ``final``: 10% of them (rounded down), at least one."""
    return max(1, n_tasks // 10)


def _score_stats(curve: pd.Series, lower_is_better: bool) -> dict[str, float]:
    """first_task, peak, final, drop_from_peak of a seed-mean curve indexed by task."""
    curve = curve.sort_index()
    final = float(curve.iloc[-final_tasks(len(curve)) :].mean())
    peak = float(curve.min() if lower_is_better else curve.max())
    drop = final - peak if lower_is_better else peak - final
    return {
        "first_task": float(curve.iloc[0]),
        "peak": peak,
        "final": final,
        "drop_from_peak": drop,
    }


def _final_probe(df: pd.DataFrame, probe: str, keys: list[str]) -> pd.Series:
    """Per group: ``probe`` on the last task it was probed, mean over seeds.

    The whole-network value (``layer == ""``) where the probe records one, else the mean over
    layers (as :func:`contlearn.results.curves.replicate_curves` with ``layer=None``).
    """
    if probe not in set(df["metric"].unique()):
        return pd.Series(dtype=float)
    reps = replicate_curves(df, probe, keys, x="task")
    last = reps[reps["xbin"] == reps.groupby("group")["xbin"].transform("max")]
    return last.groupby("group")["value"].mean()


def summary_table(
    df: pd.DataFrame,
    by: str | Sequence[str] = "learner",
    metric: str | None = None,
    stat: str = "mean",
) -> pd.DataFrame:
    """Per group: how well it learned at first, at best, at the end, and its probes at the end.

    Args:
        df: a frame from :func:`contlearn.load_runs` (one stream).
        by: column or config key (or a list of them) that defines the groups; config columns
            that vary inside a group split it further (see
            :func:`contlearn.results.curves.group_keys`).
        metric: the per-task score; default ``test_accuracy`` (the held-out score), else
            ``accuracy``, else ``squared_error``, else ``episode_return``.

    Returns:
        One row per group: the group key columns, then ``metric``, ``seeds`` (replicates: one
        per run and seed), ``tasks`` (tasks with a score), ``first_task`` (seed-mean score on
        the first task), ``peak`` (best of the seed-mean curve: max, or min for error
        metrics), ``final`` (mean of the curve over the last 10% of tasks, at least one),
        ``drop_from_peak`` (positive = final worse than peak; see the module docstring),
        ``final_dead_fraction`` and ``final_effective_rank`` (on the last probed task, mean
        over seeds, of the whole-network value, or the mean over layers where the probe has
        none; NaN if not recorded). With ``stat="iqm"`` the per-task curve is the
        interquartile mean over seeds instead of the mean, ``final`` is the IQM of every
        (seed, task) score of the last 10% of tasks, and ``final_lo``/``final_hi`` its 95%
        stratified bootstrap interval (NaN, "not meaningful", below 3 seeds;
        :func:`contlearn.results.curves.stratified_iqm`).

    Raises:
        ContlearnError: mixed streams, no score metric, unknown ``by`` column.
    """
    check_comparable(df)
    check_stat(stat)
    metric = metric or default_metric(df)
    keys = group_keys(df[df["metric"] == metric], by)
    reps = replicate_curves(df, metric, keys, x="task")
    probes = {p: _final_probe(df, p, keys) for p in FINAL_PROBES}
    rows = []
    for group, frame in reps.groupby("group", sort=True):
        wide = frame.pivot_table(index=["run", "seed"], columns="x", values="value", aggfunc="mean")
        curve = pd.Series(
            iqm(wide.to_numpy()) if stat == "iqm" else np.nanmean(wide.to_numpy(), axis=0),
            index=wide.columns,
        )
        row = {k: frame[k].iloc[0] for k in keys}
        row.update(metric=metric, seeds=len(wide), tasks=len(curve))
        row.update(_score_stats(curve, metric in LOWER_IS_BETTER))
        if stat == "iqm":
            last = wide.to_numpy()[:, -final_tasks(len(curve)) :]
            final, lo, hi = stratified_iqm(last)
            peak = row["peak"]
            drop = final - peak if metric in LOWER_IS_BETTER else peak - final
            row.update(final=final, drop_from_peak=drop, final_lo=lo, final_hi=hi)
        for probe, values in probes.items():
            row[f"final_{probe}"] = float(values.get(group, np.nan))
        rows.append(row)
    columns = [*keys, *STAT_COLUMNS]
    if stat == "iqm":
        columns[columns.index("final") + 1 : columns.index("final") + 1] = ["final_lo", "final_hi"]
    return pd.DataFrame(rows, columns=columns)


def _cell(value: object) -> str:
    if isinstance(value, (float, np.floating)):
        return "n/a" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def format_summary(table: pd.DataFrame) -> str:
    """The table as aligned plain text for the terminal (text left, numbers right).

    A ``metric`` column that is the same on every row moves to a header line.
    """
    header = []
    if "metric" in table.columns and table["metric"].nunique() == 1:
        metric = table["metric"].iloc[0]
        better = "lower" if metric in LOWER_IS_BETTER else "higher"
        over = "IQM over seeds" if "final_lo" in table.columns else "mean over seeds"
        header.append(
            f"score: {metric} per task, {over} ({better} is better; "
            "drop_from_peak > 0: final worse than peak)"
        )
        if "final_lo" in table.columns and table["final_lo"].isna().any():
            header.append(
                "final_lo/final_hi: 95% stratified bootstrap interval; n/a below 3 seeds "
                "(not meaningful)"
            )
        table = table.drop(columns="metric")
    cols = list(table.columns)
    cells = [[_cell(v) for v in row] for row in table.itertuples(index=False)]
    numeric = [pd.api.types.is_numeric_dtype(table[c]) for c in cols]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(cols)]

    def line(values: Sequence[str]) -> str:
        parts = [
            v.rjust(w) if num else v.ljust(w)
            for v, w, num in zip(values, widths, numeric, strict=True)
        ]
        return "  ".join(parts).rstrip()

    body = [line(cols), line(["-" * w for w in widths]), *(line(r) for r in cells)]
    return "\n".join(header + body)
