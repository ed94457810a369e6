"""Figures of loss of plasticity, drawn from the long DataFrame of :func:`contlearn.load_runs`.

Pure functions of that frame (plus config columns from ``load_runs(config=...)``); nothing
touches a live network. Figures are :class:`matplotlib.figure.Figure` objects built without
pyplot (no global figure state; the Agg canvas renders them). The curves they draw (means over
seeds and bootstrap bands) are computed by :mod:`contlearn.results.curves`, whose docstring says
how.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, overload

import pandas as pd

from contlearn.errors import ContlearnError
from contlearn.results.curves import (
    MIN_SEEDS_FOR_IQM_CI,
    check_comparable,
    curve_stats,
    default_bin,
    default_metric,
    probe_metrics,
)

if TYPE_CHECKING:
    from matplotlib.artist import Artist
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure, SubFigure

METRIC_LABELS = {  # axis labels with units; other metrics get their name, spaced
    "accuracy": "online accuracy (fraction correct)",
    "test_accuracy": "held-out accuracy at task end (fraction correct)",
    "squared_error": "mean squared error",
    "episode_return": "episode return",
    "loss": "online loss",
    "dead_fraction": "dead units (fraction)",
    "dormant_fraction": "dormant units (fraction)",
    "feedback_alignment": "error vs backprop's (degrees)",
    "weight_alignment": "feedback vs forward weights (degrees)",
    "effective_rank": "effective rank",
    "approx_rank": "approximate rank (99% energy)",
    "stable_rank": "stable rank",
    "weight_magnitude": "mean |weight|",
    "grad_magnitude": "mean |gradient|",
    "plasticity": "plasticity (1 - L_after / L_before)",
    "saturation": "saturated units (fraction)",
    "replacements": "replacements (cumulative)",
    "eligible_units": "eligible units",
    "mean_age": "mean unit age (steps)",
    "utility_q50": "median utility",
}
LINESTYLES = ("-", "--", ":", "-.")


def metric_label(metric: str) -> str:
    """Axis label (with units) of a metric; unknown metrics get their name, spaced."""
    return METRIC_LABELS.get(metric, metric.replace("_", " "))


def x_label(x: str, metric: str = "", bin: int = 1) -> str:
    """Axis label of the x column ``task`` or ``step`` (the task of RL runs is a friction)."""
    label = "friction index" if metric == "episode_return" else "task index"
    label = "steps" if x == "step" else label
    if bin > 1:
        label += f" (means over {bin} tasks)" if x == "task" else f" (means over {bin:,}-step bins)"
    return label


def _colors(groups: Sequence[str]) -> dict[str, object]:
    import matplotlib as mpl

    cmap = mpl.colormaps["tab10" if len(groups) <= 10 else "tab20"]
    return {g: cmap(i % cmap.N) for i, g in enumerate(groups)}


def _draw(
    ax: Axes, stats: pd.DataFrame, colors: dict[str, object], x: str, label_layers: bool
) -> None:
    """One line (and CI band when there are >= 2 replicates) per (group, layer)."""
    from matplotlib.ticker import EngFormatter, MaxNLocator

    layer_style = {
        lay: LINESTYLES[i % len(LINESTYLES)]
        for i, lay in enumerate(sorted(stats["layer"].unique()))
    }
    for (group, lay), curve in stats.groupby(["group", "layer"], sort=True):
        color, style = colors[group], layer_style[lay] if label_layers else "-"
        label = f"{group} · {lay or 'network'}" if label_layers else group
        marker = "o" if len(curve) <= 40 and not label_layers else None
        ax.plot(
            curve["x"],
            curve["center"],
            color=color,
            linestyle=style,
            marker=marker,
            markersize=3,
            linewidth=1.6,
            label=label,
        )
        if curve["lo"].notna().any():
            ax.fill_between(
                curve["x"], curve["lo"], curve["hi"], color=color, alpha=0.2, linewidth=0
            )
    ax.grid(True, color="0.9", linewidth=0.8)
    ax.set_axisbelow(True)
    if x == "task":
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    else:
        ax.xaxis.set_major_formatter(EngFormatter(sep=""))


def _new_figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure

    class InlineFigure(Figure):
        """A figure that a notebook shows inline as the value of a cell (without pyplot)."""

        def _repr_png_(self) -> bytes:
            import io

            buffer = io.BytesIO()
            self.savefig(buffer, format="png", dpi=100)
            return buffer.getvalue()

    return InlineFigure(figsize=(width, height), layout="constrained")


def _band_note(stats: pd.DataFrame, ci: float, stat: str = "mean") -> str:
    seeds = sorted(set(stats.groupby(["group", "layer"])["seeds"].max()))
    n = str(seeds[0]) if len(seeds) == 1 else f"{seeds[0]}-{seeds[-1]}"
    what = "IQM" if stat == "iqm" else "mean"
    if stats["lo"].notna().any():
        return f"{what} of {n} seeds, band: {ci:.0%} bootstrap CI"
    if stat == "iqm" and seeds[-1] < MIN_SEEDS_FOR_IQM_CI:
        return f"IQM of {n} seed{'s' if n != '1' else ''}; no interval: not meaningful below 3"
    return f"{what} of {n} seed{'s' if n != '1' else ''}"


def task_change_steps(df: pd.DataFrame) -> list[int]:
    """Steps at which some replicate's task index increases (each seed's task changes: on RL
    streams the seeds' episode rows reach a new friction at different steps), distinct and
    sorted."""
    starts = df.groupby(["run", "seed", "task"])["step"].min()
    changes: set[int] = set()
    for _, per_task in starts.groupby(level=["run", "seed"]):
        changes.update(int(s) for s in per_task.sort_index().iloc[1:])
    return sorted(changes)


def mark_task_changes(ax: Axes, df: pd.DataFrame, limit: int = 200) -> None:
    """Faint vertical lines where the task changes (skipped past ``limit`` changes)."""
    changes = task_change_steps(df)
    if 0 < len(changes) <= limit:
        for step in changes:
            ax.axvline(step, color="0.75", linewidth=0.7, linestyle=":", zorder=0)


@overload
def plot_decay(
    df: pd.DataFrame,
    metric: str | None = ...,
    by: str | Sequence[str] = ...,
    bin: int | None = ...,
    x: str = ...,
    ax: None = ...,
    ci: float = ...,
    n_boot: int = ...,
    seed: int = ...,
    layer: str | None = ...,
    stat: str = ...,
) -> Figure: ...
@overload
def plot_decay(
    df: pd.DataFrame,
    metric: str | None = ...,
    by: str | Sequence[str] = ...,
    bin: int | None = ...,
    x: str = ...,
    *,
    ax: Axes,
    ci: float = ...,
    n_boot: int = ...,
    seed: int = ...,
    layer: str | None = ...,
    stat: str = ...,
) -> Figure | SubFigure: ...
def plot_decay(
    df: pd.DataFrame,
    metric: str | None = None,
    by: str | Sequence[str] = "learner",
    bin: int | None = None,
    x: str = "task",
    ax: Axes | None = None,
    ci: float = 0.95,
    n_boot: int = 1000,
    seed: int = 0,
    layer: str | None = None,
    stat: str = "mean",
) -> Figure | SubFigure:
    """The plasticity-decay curve: a per-task score against task index, one line per group.

    Args:
        df: a frame from :func:`contlearn.load_runs` (one stream).
        metric: default ``test_accuracy``, else ``accuracy``, else ``squared_error``, else
            ``episode_return``.
        by: column or config key (or a list of them) whose values make the lines.
        bin: tasks per point (default 1), or with ``x="step"`` the width of a point in steps
            (x at the mean of the recorded steps in it; default :func:`default_bin`: about 50
            points over the runs' steps, so that each holds every seed's episode ends).
        x: ``"task"`` or ``"step"``; on a step axis the task changes (e.g. friction changes)
            are marked with faint vertical lines.
        ax: draw into these axes instead of a new figure.
        ci: coverage of the bootstrap band over seeds (no band with one seed).
        n_boot: bootstrap resamples. seed: seed of the bootstrap.
        layer: ``None`` for whole-network rows, or a layer name / ``"all"`` for layer metrics.
        stat: ``mean`` (band: bootstrap CI of the mean) or ``iqm`` (interquartile mean, band:
            bootstrap CI of the IQM, none below 3 seeds; :mod:`contlearn.results.curves`).

    Returns:
        A new figure, or ``ax.figure`` when ``ax`` is given (a ``SubFigure`` for axes of one).

    Raises:
        ContlearnError: mixed streams, unknown metric / column / layer, bad ``x`` or ``bin``.
    """
    check_comparable(df)
    metric = metric or default_metric(df)
    bin = default_bin(df, x) if bin is None else bin
    stats = curve_stats(df, metric, by, x, bin, layer, ci, n_boot, seed, stat)
    fig = _new_figure(7.5, 4.2) if ax is None else ax.figure
    ax = ax if ax is not None else fig.add_subplot()
    groups = sorted(stats["group"].unique())
    _draw(ax, stats, _colors(groups), x, label_layers=layer == "all")
    if x == "step":
        mark_task_changes(ax, df)
    ax.set_xlabel(x_label(x, metric, bin))
    ax.set_ylabel(metric_label(metric))
    over = "per task" if x == "task" else "over steps"
    ax.set_title(
        f"{df['stream'].iloc[0]}: {metric_label(metric).split(' (')[0]} {over}\n"
        f"{_band_note(stats, ci, stat)}",
        fontsize=11,
    )
    ax.legend(
        title=_legend_title(by, layer),
        loc="upper left",
        bbox_to_anchor=(1.02, 1.0),
        frameon=False,
        fontsize=9,
        title_fontsize=9,
    )
    return fig


def plot_probes(
    df: pd.DataFrame,
    probes: Sequence[str] | None = None,
    by: str | Sequence[str] = "learner",
    layer: str | None = None,
    x: str = "task",
    bin: int | None = None,
    ci: float = 0.95,
    n_boot: int = 1000,
    seed: int = 0,
    stat: str = "mean",
) -> Figure:
    """A panel of probe metrics against task (or step): one subplot per probe.

    Args:
        df: a frame from :func:`contlearn.load_runs` (one stream).
        probes: metric names; default every metric that is not a score or the loss.
        by: column or config key (or a list of them) whose values make the lines.
        layer: ``None``: the whole-network value (``layer == ""``) where the probe records
            one, else the mean over layers; a layer name: that layer; ``"all"``: one line
            style per layer.
        x: ``"task"`` or ``"step"``. bin: tasks (or steps) per point, as in
            :func:`plot_decay`.
        ci, n_boot, seed, stat: the statistic and its bootstrap band, as in :func:`plot_decay`.

    Returns:
        The figure; subplots share the x axis and are titled by probe.

    Raises:
        ContlearnError: mixed streams, no probe metrics, unknown probe / layer.
    """
    check_comparable(df)
    probes = list(probes) if probes is not None else probe_metrics(df)
    if not probes:
        raise ContlearnError(
            "no probe metrics in the runs (only scores: "
            f"{', '.join(sorted(df['metric'].unique()))}); enable probes"
        )
    bin = default_bin(df, x) if bin is None else bin
    stats = {p: curve_stats(df, p, by, x, bin, layer, ci, n_boot, seed, stat) for p in probes}
    groups = sorted(set().union(*(s["group"] for s in stats.values())))
    colors = _colors(groups)
    fig, axes, ncols = _panel_grid(len(probes))
    for i, (ax, probe) in enumerate(zip(axes, probes, strict=False)):
        _draw(ax, stats[probe], colors, x, label_layers=layer == "all")
        ax.set_title(metric_label(probe), fontsize=10)
        ax.tick_params(labelbottom=True, labelsize=8)
        if i + ncols >= len(probes):  # lowest panel of its column
            ax.set_xlabel(x_label(x, bin=bin))
    wheres = {None: "whole network / mean of layers", "all": "per layer"}
    where = wheres.get(layer, f"layer {layer}")
    note = _band_note(pd.concat(stats.values()), ci, stat)
    fig.suptitle(f"{df['stream'].iloc[0]}: probes ({where})\n{note}", fontsize=11)
    _figure_legend(fig, axes, _legend_title(by, layer), len(groups) if layer == "all" else 0)
    return fig


def _legend_title(by: str | Sequence[str], layer: str | None) -> str:
    return (by if isinstance(by, str) else ", ".join(by)) + (" · layer" if layer == "all" else "")


def _panel_grid(n: int) -> tuple[Figure, list[Axes], int]:
    """A figure with ``n`` visible panels sharing x (2 x 2 for four, else up to 3 a row)."""
    ncols = 2 if n == 4 else min(3, n)
    nrows = math.ceil(n / ncols)
    fig = _new_figure(3.4 * ncols + 1.8, 2.6 * nrows + 0.6)
    axes = list(fig.subplots(nrows, ncols, sharex=True, squeeze=False).ravel())
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n], ncols


def _figure_legend(fig: Figure, axes: Sequence[Axes], title: str, ncols: int = 0) -> None:
    """One legend below the panels, each label once (``ncols`` 0: up to four columns)."""
    seen: dict[str, Artist] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            seen.setdefault(label, handle)
    # with layers, one column per group keeps each group's layers below each other
    fig.legend(
        list(seen.values()),
        list(seen),
        title=title,
        loc="outside lower center",
        frameon=False,
        fontsize=9,
        title_fontsize=9,
        ncols=ncols or min(len(seen), 4),
    )


def save_figure(fig: Figure, path: str | Path, dpi: int = 150) -> Path:
    """Save ``fig`` as PNG, SVG or PDF (by the extension), creating parent folders.

    Returns:
        The path written.

    Raises:
        ContlearnError: the extension is not ``.png``, ``.svg`` or ``.pdf``, or the file
            cannot be written (a file where a folder should be, no permission, ...).
    """
    path = Path(path)
    ext = path.suffix.lower()
    if ext not in (".png", ".svg", ".pdf"):
        raise ContlearnError(
            f"cannot save a figure as {path}: unknown format "
            f"{ext or '(no extension)'!r}; use .png, .svg or .pdf"
        )
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, format=ext[1:], dpi=dpi)
    except OSError as exc:
        raise ContlearnError(
            f"cannot save the figure as {path} ({exc.strerror or exc}); choose another --out"
        ) from None
    return path
