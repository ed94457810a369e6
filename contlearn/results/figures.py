"""``contlearn.plot``: what ``contlearn plot`` draws, from run directories, as a figure (shown
inline in a notebook; :mod:`contlearn.results.plots` draws it), and the runs' frame that
``plot`` and ``summary`` group (:func:`load_runs_by`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from contlearn.errors import ContlearnError
from contlearn.results.curves import check_comparable, default_metric
from contlearn.results.plots import plot_decay, plot_probes, save_figure

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure


def plot_runs(
    runs: str | Path | Sequence[str | Path],
    *,
    probes: bool = False,
    metric: str | None = None,
    by: str = "learner",
    x: str | None = None,
    bin: int | None = None,
    layer: str | None = None,
    stat: str = "mean",
    out: str | Path | None = None,
) -> Figure:
    """What ``contlearn plot`` draws, from run directories or folders of runs: the decay
    curve, or with ``probes`` the probe panel (in a notebook the figure shows inline).

    Args:
        runs: run directories and/or folders holding runs.
        probes: the probe panel instead of the decay curve.
        metric: the score (default: the stream's); decay curve only.
        by: a column (``learner``, ``stream``, ``run``, ``seed``) or config key.
        x: ``task`` or ``step`` (default: step for RL returns, task otherwise).
        bin, layer, stat: as for :func:`plot_decay`.
        out: also save it there (png, svg or pdf).

    Raises:
        ContlearnError: no metrics, a ``by`` that no run has, mixed streams, and as
            :func:`plot_decay` / :func:`plot_probes`.
    """
    df = load_runs_by(runs, by)
    if df.empty:
        raise ContlearnError(f"no metrics recorded yet in {runs}")
    check_comparable(df)
    metric = metric or default_metric(df)
    x = x or ("step" if metric == "episode_return" else "task")
    if probes:
        fig = plot_probes(df, by=by, layer=layer, bin=bin, x=x, stat=stat)
    else:
        fig = plot_decay(df, metric=metric, by=by, bin=bin, layer=layer, x=x, stat=stat)
    if out is not None:
        save_figure(fig, out)
    return fig


def load_runs_by(paths: str | Path | Sequence[str | Path], by: str) -> pd.DataFrame:
    """:func:`load_runs` with every varying config key as a column, and ``by`` as one too: a
    column (``learner``, ``stream``, ``run``, ``seed``) or a config key of the runs, even one
    that all of them share (what ``plot`` and ``summary`` group by).

    Raises:
        ContlearnError: no run has a column or config key ``by`` (not one group of None).
    """
    from contlearn.results.store import find_runs, load_runs, read_config

    df = load_runs(paths, config=True)
    if by in df.columns:
        return df
    if not any(by in read_config(r) for r in find_runs(paths)):
        raise ContlearnError(
            f"--by {by}: no run has a column or config key of that name; use a column "
            "(learner, stream, run, seed) or a key from the runs' config.json"
        )
    return load_runs(paths, config=[by])
