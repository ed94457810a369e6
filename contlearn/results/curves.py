"""The numbers behind the figures: curves of a metric over tasks, per group, with bootstrap CIs.

Pure functions of the long DataFrame of :func:`contlearn.load_runs` (plus config columns from
``load_runs(config=...)``); :mod:`contlearn.results.plots` draws them and
:mod:`contlearn.results.summary` tabulates them.

How a curve is computed (the same for :func:`~contlearn.results.plots.plot_decay` and
:func:`~contlearn.results.plots.plot_probes`):

1. rows of one metric; layer ``None`` takes the whole-network rows (``layer == ""``; the probes
   write a unit-weighted aggregate there), or, for a metric recorded only per layer
   (``effective_rank``, ...), the mean over layers;
2. one *replicate* is one (run, seed): its values are averaged within each x-bin
   (``bin`` consecutive tasks, or ``bin`` consecutive recorded steps);
3. across the replicates of a group: the mean, and a percentile bootstrap CI that resamples
   replicates (seeds), vectorised in numpy with a fixed seed. One replicate: no band. Or, with
   ``stat="iqm"``, the interquartile mean (Agarwal et al. 2021, "Deep reinforcement learning
   at the edge of the statistical precipice": the mean of the values left after cutting
   ⌊n/4⌋ from each end, as ``scipy.stats.trim_mean(x, 0.25)`` and rliable) with the percentile
   bootstrap of the IQM; fewer than :data:`MIN_SEEDS_FOR_IQM_CI` replicates: no interval (it
   would not mean anything), which the figures say.

Groups are the values of ``by`` (a column such as ``learner`` or a config key, or a list of
them). Runs in one group that differ in a loaded config column are split by that column too, so
different hyper-parameters are never averaged together.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from contlearn.errors import ContlearnError

SCORE_METRICS = ("test_accuracy", "accuracy", "squared_error", "episode_return")
"""Per-task scores, in the order :func:`default_metric` prefers them: the held-out accuracy
at each task's end where a stream has one (the image streams), else the online score."""
NON_PROBE_METRICS = (*SCORE_METRICS, "loss")
BASE_COLUMNS = ("run", "stream", "learner", "seed", "step", "task", "metric", "layer", "value")
# Config keys that never make runs incomparable (bookkeeping, not hyper-parameters).
IGNORED_CONFIG = frozenset(
    {
        "seeds",
        "tasks",
        "steps",
        "probes",
        "probe_every",
        "probe_size",
        "on_divergence",
        "checkpoint_every",
        "checkpoint_minutes",
        "checkpoint_keep",
        "flush_rows",
        "flush_seconds",
        "data_dir",
        "device",
        "out",
        "overwrite",
        "progress",
    }
)


#: the statistics a curve can show over replicates
STATS = ("mean", "iqm")
#: the fewest replicates an IQM interval is drawn for
MIN_SEEDS_FOR_IQM_CI = 3


def check_stat(stat: str) -> None:
    """ContlearnError unless ``stat`` is one of :data:`STATS`."""
    if stat not in STATS:
        raise ContlearnError(f"unknown statistic {stat!r}; choose one of {', '.join(STATS)}")


def iqm(values: np.ndarray, axis: int = 0) -> np.ndarray:
    """Interquartile mean along ``axis``, NaNs skipped: sort the n values, cut ⌊n/4⌋ from each
    end, average the rest (NaN where no value)."""
    v = np.moveaxis(np.asarray(values, dtype=float), axis, 0)
    srt = np.sort(v, axis=0)  # NaN last
    count = (~np.isnan(v)).sum(axis=0)
    cut = count // 4
    pos = np.arange(v.shape[0]).reshape((-1,) + (1,) * (v.ndim - 1))
    keep = (pos >= cut) & (pos < count - cut)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(keep, np.nan_to_num(srt), 0.0).sum(axis=0) / keep.sum(axis=0)


def bootstrap_iqm_ci(
    values: np.ndarray, ci: float = 0.95, n_boot: int = 1000, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bootstrap CI of the IQM over replicates (rows), for every column at once;
    NaN where fewer than :data:`MIN_SEEDS_FOR_IQM_CI` replicates have a value."""
    values = np.asarray(values, dtype=float)
    n, n_x = values.shape
    lo, hi = np.full(n_x, np.nan), np.full(n_x, np.nan)
    enough = (~np.isnan(values)).sum(axis=0) >= MIN_SEEDS_FOR_IQM_CI
    if not enough.any():
        return lo, hi
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n))  # (B, n)
    boots = iqm(values[idx][:, :, enough], axis=1)  # (B, n_x')
    q = np.nanquantile(boots, [(1 - ci) / 2, (1 + ci) / 2], axis=0)
    lo[enough], hi[enough] = q[0], q[1]
    return lo, hi


def stratified_iqm(
    values: np.ndarray, ci: float = 0.95, n_boot: int = 1000, seed: int = 0
) -> tuple[float, float, float]:
    """IQM over every (replicate, task) value of ``values`` (replicates × tasks) and its
    stratified bootstrap CI (Agarwal et al. 2021): each resample draws replicates with
    replacement independently within each task. ``(iqm, lo, hi)``; the interval is NaN with
    fewer than :data:`MIN_SEEDS_FOR_IQM_CI` replicates."""
    values = np.asarray(values, dtype=float)
    n, m = values.shape
    point = float(iqm(values.reshape(-1)))
    if n < MIN_SEEDS_FOR_IQM_CI:
        return point, math.nan, math.nan
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n, m))  # per task its own draw
    boots = iqm(values[idx, np.arange(m)].reshape(n_boot, n * m), axis=1)
    lo, hi = np.nanquantile(boots, [(1 - ci) / 2, (1 + ci) / 2])
    return point, float(lo), float(hi)


def check_comparable(df: pd.DataFrame) -> None:
    """Refuse a frame whose runs come from different streams.

    Raises:
        ContlearnError: the runs mix streams, or the frame holds no rows.
    """
    if df.empty:
        raise ContlearnError(
            "no metric rows to plot; check the run directories (runs still "
            "starting have no metrics yet)"
        )
    streams = [str(s) for s in pd.unique(df["stream"].dropna())]
    if len(streams) > 1:
        names = ", ".join(streams[:-1]) + f" and {streams[-1]}"
        raise ContlearnError(f"runs mix streams {names}; plot them separately")


def default_metric(df: pd.DataFrame) -> str:
    """The score to plot: ``test_accuracy``, else ``accuracy``, else ``squared_error``, else
    ``episode_return``.

    Raises:
        ContlearnError: none of them is present.
    """
    present = set(df["metric"].unique())
    for metric in SCORE_METRICS:
        if metric in present:
            return metric
    raise ContlearnError(
        f"no score metric ({', '.join(SCORE_METRICS)}) in the runs; pass "
        f"metric= one of: {', '.join(sorted(present)) or 'none'}"
    )


def probe_metrics(df: pd.DataFrame) -> list[str]:
    """Every metric present that is not a per-task score or the loss, sorted."""
    return sorted(set(df["metric"].unique()) - set(NON_PROBE_METRICS))


def _format_value(value: object) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def group_keys(df: pd.DataFrame, by: str | Sequence[str]) -> list[str]:
    """The columns that define groups: ``by`` plus config columns that vary inside a group.

    Raises:
        ContlearnError: a ``by`` key is not a column.
    """
    keys = [by] if isinstance(by, str) else list(by)
    if not keys:
        raise ContlearnError("by needs at least one column, e.g. by='learner'")
    for key in keys:
        if key not in df.columns:
            extra = [c for c in df.columns if c not in BASE_COLUMNS]
            hint = (
                f"config columns loaded: {', '.join(extra)}"
                if extra
                else ("load the runs with load_runs(..., config=True) to group by config keys")
            )
            raise ContlearnError(f"cannot group by {key!r}: no such column; {hint}")
    # the learner first: its own options (learner.*) then split a group only when they vary
    # among runs of one learner, not merely because another learner lacks them
    candidates = ["learner"] if "learner" in df.columns and "learner" not in keys else []
    candidates += [c for c in df.columns if c not in (*BASE_COLUMNS, *keys, *IGNORED_CONFIG)]
    for col in candidates:
        values = df[col].map(_format_value)
        if values.groupby([df[k].map(_format_value) for k in keys]).nunique().max() > 1:
            keys.append(col)
    return keys


def group_labels(df: pd.DataFrame, keys: Sequence[str]) -> pd.Series:
    """A label per row: the value for ``learner``/``run``/``stream``, else ``"k1=v1, k2=v2"``."""
    if len(keys) == 1 and keys[0] in ("learner", "run", "stream"):
        return df[keys[0]].map(_format_value)
    values = zip(*(df[k].map(_format_value) for k in keys), strict=True)
    return pd.Series(
        [", ".join(f"{k}={v}" for k, v in zip(keys, row, strict=True)) for row in values],
        index=df.index,
        dtype=object,
    )


def _select(df: pd.DataFrame, metric: str, layer: str | None) -> pd.DataFrame:
    """Rows of ``metric`` for ``layer``: None (whole network / mean of layers), a name, "all"."""
    rows = df[df["metric"] == metric]
    if rows.empty:
        raise ContlearnError(
            f"no rows of metric {metric!r}; metrics present: "
            f"{', '.join(sorted(df['metric'].unique()))}"
        )
    layers = sorted(rows["layer"].unique())
    if layer is None:
        if "" in layers:
            return rows[rows["layer"] == ""]
        keys = ["run", "seed", "step", "task"]
        agg = {c: "first" for c in rows.columns if c not in (*keys, "layer", "value")}
        means = rows.groupby(keys, sort=False).agg({**agg, "value": "mean"})
        return means.reset_index().assign(layer="")
    if layer == "all":
        return rows
    if layer not in layers:
        raise ContlearnError(
            f"metric {metric!r} has no rows for layer {layer!r}; layers: "
            f"{', '.join(repr(n) for n in layers)}"
        )
    return rows[rows["layer"] == layer]


#: the number of points :func:`default_bin` aims at on a step axis
STEP_POINTS = 50


def default_bin(df: pd.DataFrame, x: str) -> int:
    """The default points' width: 1 task on a task axis; on a step axis a round width (1, 2 or
    5 times a power of ten) giving about :data:`STEP_POINTS` points over the recorded steps,
    so that a point holds the episode ends of every seed (they end at different steps)."""
    if x != "step" or df.empty:
        return 1
    target = max(float(df["step"].max()) / STEP_POINTS, 1.0)
    power = 10 ** math.floor(math.log10(target))
    return int(min((m * power for m in (1, 2, 5, 10) if m * power >= target), default=power))


def _bin_x(rows: pd.DataFrame, x: str, bin: int) -> pd.DataFrame:
    """Add ``xbin`` (bin id) and ``xpos`` (mean of the distinct x values in the bin)."""
    if x not in ("task", "step"):
        raise ContlearnError(f"x must be 'task' or 'step', not {x!r}")
    if not isinstance(bin, (int, np.integer)) or bin < 1:
        raise ContlearnError(f"bin must be a whole number of tasks >= 1, not {bin!r}")
    values = rows[x].to_numpy()
    xbin = values // bin  # tasks per point, or a fixed width in steps
    distinct_pairs = pd.DataFrame({"xbin": xbin, "x": values}).drop_duplicates()
    xpos = distinct_pairs.groupby("xbin")["x"].mean()
    return rows.assign(xbin=xbin, xpos=pd.Series(xbin).map(xpos).to_numpy())


def replicate_curves(
    df: pd.DataFrame,
    metric: str,
    by: str | Sequence[str] = "learner",
    x: str = "task",
    bin: int = 1,
    layer: str | None = None,
) -> pd.DataFrame:
    """Per (group, layer, replicate, x-bin) mean of ``metric`` (steps 1-2 of the module doc).

    ``by`` as in :func:`group_keys`; ``x`` ``"task"`` or ``"step"``; ``bin`` tasks (or recorded
    steps) per point; ``layer`` ``None`` (whole network, or mean over layers), a name or "all".

    Returns:
        Columns: ``group, layer, run, seed, xbin`` and the group keys, ``x`` (bin position),
        ``value``.
    """
    rows = _select(df, metric, layer)
    keys = group_keys(rows, by)
    rows = _bin_x(rows.assign(group=group_labels(rows, keys)), x, bin)
    cols = ["group", "layer", "run", "seed", "xbin"]
    firsts = {k: (k, "first") for k in keys if k not in cols}
    out = rows.groupby(cols, sort=True).agg(**firsts, x=("xpos", "first"), value=("value", "mean"))
    return out.reset_index()


def bootstrap_ci(
    values: np.ndarray, ci: float = 0.95, n_boot: int = 1000, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bootstrap CI of the mean over replicates, for every column at once.

    Resampling replicates with replacement is drawn as multinomial counts ``W`` (n_boot, n):
    each bootstrap mean is ``(W @ v) / (W @ observed)``, so NaNs are skipped and no
    (n_boot, n, n_x) array is built.

    Args:
        values: (n_replicates, n_x) array; NaN where a replicate has no value.
        ci: the coverage, e.g. 0.95. n_boot: resamples. seed: of the numpy generator.

    Returns:
        ``(lo, hi)`` arrays of shape (n_x,); NaN where fewer than two replicates have a value.
    """
    values = np.asarray(values, dtype=float)
    n = values.shape[0]
    observed = ~np.isnan(values)
    lo = np.full(values.shape[1], np.nan)
    hi = lo.copy()
    if n < 2:
        return lo, hi
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(float)  # (B, n)
    with np.errstate(invalid="ignore", divide="ignore"):
        boots = (weights @ np.where(observed, values, 0.0)) / (weights @ observed)  # (B, n_x)
    enough = observed.sum(axis=0) >= 2
    if enough.any():
        q = np.nanquantile(boots[:, enough], [(1 - ci) / 2, (1 + ci) / 2], axis=0)
        lo[enough], hi[enough] = q[0], q[1]
    return lo, hi


def curve_stats(
    df: pd.DataFrame,
    metric: str | None = None,
    by: str | Sequence[str] = "learner",
    x: str = "task",
    bin: int = 1,
    layer: str | None = None,
    ci: float = 0.95,
    n_boot: int = 1000,
    seed: int = 0,
    stat: str = "mean",
) -> pd.DataFrame:
    """The numbers behind a curve: per (group, layer, x) mean (or IQM) over replicates and its
    CI.

    Args are those of :func:`replicate_curves` and :func:`bootstrap_ci`; ``metric`` defaults to
    :func:`default_metric`; ``stat``: ``mean`` or ``iqm`` (module docstring).

    Returns:
        Columns ``group, layer, x, mean, center, lo, hi, seeds`` (``center``: the value drawn,
        the mean or the IQM; ``lo``/``hi`` its interval; ``seeds``: replicates with a value),
        sorted by group, layer and x.
    """
    check_stat(stat)
    metric = metric or default_metric(df)
    reps = replicate_curves(df, metric, by, x, bin, layer)
    parts = []
    for (group, lay), frame in reps.groupby(["group", "layer"], sort=True):
        wide = frame.pivot_table(
            index=["run", "seed"], columns="x", values="value", aggfunc="mean", dropna=False
        )
        matrix = wide.to_numpy()  # (replicates, n_x)
        if stat == "iqm":
            lo, hi = bootstrap_iqm_ci(matrix, ci, n_boot, seed)
        else:
            lo, hi = bootstrap_ci(matrix, ci, n_boot, seed)
        mean = np.nanmean(matrix, axis=0)
        parts.append(
            pd.DataFrame(
                {
                    "group": group,
                    "layer": lay,
                    "x": wide.columns.to_numpy(dtype=float),
                    "mean": mean,
                    "center": iqm(matrix) if stat == "iqm" else mean,
                    "lo": lo,
                    "hi": hi,
                    "seeds": (~np.isnan(matrix)).sum(axis=0),
                }
            )
        )
    return pd.concat(parts, ignore_index=True)
