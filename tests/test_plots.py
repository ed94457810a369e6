"""Tests of contlearn.results.plots (and the curves it draws, contlearn.results.curves) on small
synthetic frames (and one run store round trip)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from matplotlib.collections import PolyCollection
from matplotlib.figure import Figure

from contlearn.errors import ContlearnError
from contlearn.results.curves import check_comparable, curve_stats, probe_metrics
from contlearn.results.plots import plot_decay, plot_probes, save_figure
from contlearn.results.store import MetricWriter, load_runs, write_config


def frame(
    learners=("bp", "cbp"),
    seeds=3,
    tasks=6,
    stream="permuted-mnist",
    metric="accuracy",
    probes=(),
    layers=("hidden1", "hidden2"),
    run=None,
) -> pd.DataFrame:
    """A long frame as load_runs returns: a score (and loss) per task, probes per layer."""
    rng = np.random.default_rng(1)
    rows = []
    for li, learner in enumerate(learners):
        for seed in range(seeds):
            for task in range(tasks):
                base = dict(
                    run=run or f"run-{learner}",
                    stream=stream,
                    learner=learner,
                    seed=seed,
                    step=(task + 1) * 100,
                    task=task,
                )
                score = 0.9 - 0.05 * task * (li + 1) + rng.normal(0, 0.02)
                rows += [
                    {**base, "metric": metric, "layer": "", "value": score},
                    {**base, "metric": "loss", "layer": "", "value": 1 - score},
                ]
                rows += [
                    {**base, "metric": p, "layer": lay, "value": task + li + rng.random()}
                    for p in probes
                    for lay in layers
                ]
    return pd.DataFrame(rows)


def bands(ax) -> list[PolyCollection]:
    return [c for c in ax.collections if isinstance(c, PolyCollection)]


def data_lines(ax) -> list:
    return [line for line in ax.get_lines() if not line.get_label().startswith("_")]


@pytest.mark.parametrize("ext", ["png", "svg", "pdf"])
def test_save_figure_formats_create_parent_dirs(tmp_path, ext):
    path = save_figure(plot_decay(frame(seeds=2, tasks=3)), tmp_path / "a" / "b" / f"fig.{ext}")
    assert path.is_file() and path.stat().st_size > 1000


@pytest.mark.parametrize("name", ["fig.jpeg", "fig"])
def test_save_figure_unknown_extension(tmp_path, name):
    with pytest.raises(ContlearnError, match=r"\.png, \.svg or \.pdf") as err:
        save_figure(Figure(), tmp_path / name)
    assert "\n" not in str(err.value)
    assert not (tmp_path / name).exists()


def test_decay_one_line_and_band_per_group():
    fig = plot_decay(frame(learners=("bp", "cbp", "redo"), seeds=3))
    ax = fig.axes[0]
    assert sorted(line.get_label() for line in data_lines(ax)) == ["bp", "cbp", "redo"]
    assert len(bands(ax)) == 3
    assert ax.get_xlabel() == "task index"
    assert ax.get_ylabel() == "online accuracy (fraction correct)"
    assert "permuted-mnist" in ax.get_title()
    assert ax.get_legend() is not None


def test_decay_one_seed_has_no_band():
    ax = plot_decay(frame(seeds=1)).axes[0]
    assert len(data_lines(ax)) == 2
    assert bands(ax) == []


def test_decay_binning_reduces_points_to_bin_centres():
    df = frame(learners=("bp",), tasks=6)
    assert len(data_lines(plot_decay(df).axes[0])[0].get_xdata()) == 6
    line = data_lines(plot_decay(df, bin=3).axes[0])[0]
    np.testing.assert_allclose(line.get_xdata(), [1.0, 4.0])
    expected = df[df.metric == "accuracy"].groupby(df.task // 3)["value"].mean()
    np.testing.assert_allclose(line.get_ydata(), expected.to_numpy())


def test_decay_x_step_and_error_metric_defaults():
    ax = plot_decay(frame(stream="bit-flipping", metric="squared_error"), x="step").axes[0]
    assert ax.get_ylabel() == "mean squared error"
    assert ax.get_xlabel() == "steps (means over 20-step bins)"  # (the default: ~50 points)
    np.testing.assert_allclose(data_lines(ax)[0].get_xdata(), [100, 200, 300, 400, 500, 600])


def test_decay_draws_into_given_axes():
    fig = Figure()
    ax = fig.add_subplot()
    assert plot_decay(frame(), ax=ax) is fig
    assert len(data_lines(ax)) == 2


def test_mixed_streams_refused():
    df = pd.concat([frame(stream="permuted-mnist"), frame(stream="bit-flipping")])
    msg = "runs mix streams permuted-mnist and bit-flipping; plot them separately"
    with pytest.raises(ContlearnError, match=msg):
        check_comparable(df)
    with pytest.raises(ContlearnError, match="mix streams"):
        plot_decay(df)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"metric": "nope"}, "no rows of metric 'nope'"),
        ({"by": "lr"}, "cannot group by 'lr'"),
        ({"x": "epoch"}, "x must be"),
        ({"bin": 0}, "bin must be"),
    ],
)
def test_decay_bad_arguments(kwargs, match):
    with pytest.raises(ContlearnError, match=match):
        plot_decay(frame(), **kwargs)


def test_group_by_list_of_keys_labels():
    df = frame(learners=("bp",)).assign(lr=0.01)
    df = pd.concat([df, frame(learners=("bp",), run="other").assign(lr=0.1)])
    labels = {line.get_label() for line in data_lines(plot_decay(df, by=["learner", "lr"]).axes[0])}
    assert labels == {"learner=bp, lr=0.01", "learner=bp, lr=0.1"}


def _write_run(path, learner, lr, seeds=(0, 1)):
    path.mkdir()
    write_config(
        path, {"stream": "permuted-mnist", "learner": learner, "lr": lr, "seeds": len(seeds)}, seeds
    )
    writer = MetricWriter(path, path.name, "permuted-mnist", learner)
    for task in range(4):
        writer.append(seeds, (task + 1) * 10, task, "accuracy", [0.5 + lr * task] * len(seeds))
    writer.close()


def test_runs_differing_in_config_are_not_averaged(tmp_path):
    _write_run(tmp_path / "a", "bp", 0.01)
    _write_run(tmp_path / "b", "bp", 0.1)
    _write_run(tmp_path / "c", "adam", 0.01, seeds=(0, 1, 2))
    df = load_runs(tmp_path, config=True)
    labels = {line.get_label() for line in data_lines(plot_decay(df).axes[0])}
    assert labels == {"learner=adam, lr=0.01", "learner=bp, lr=0.01", "learner=bp, lr=0.1"}
    stats = curve_stats(df, by="lr")  # different learners are never pooled either
    assert set(stats["group"]) == {
        "lr=0.01, learner=adam",
        "lr=0.01, learner=bp",
        "lr=0.1, learner=bp",
    }
    assert stats.loc[stats["group"] == "lr=0.01, learner=adam", "seeds"].eq(3).all()


def test_probes_default_panel_and_layer_aggregation():
    df = frame(probes=("dead_fraction", "effective_rank", "replacements"))
    assert probe_metrics(df) == ["dead_fraction", "effective_rank", "replacements"]
    fig = plot_probes(df)
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in visible] == [
        "dead units (fraction)",
        "effective rank",
        "replacements (cumulative)",
    ]
    for ax in visible:
        assert len(data_lines(ax)) == 2 and len(bands(ax)) == 2
    rows = df[(df.metric == "dead_fraction") & (df.learner == "bp") & (df.task == 0)]
    np.testing.assert_allclose(data_lines(visible[0])[0].get_ydata()[0], rows["value"].mean())


def test_probes_one_layer_and_all_layers():
    df = frame(probes=("dead_fraction",), layers=("hidden1", "hidden2", "hidden3"))
    one = data_lines(plot_probes(df, layer="hidden2").axes[0])
    rows = df[(df.metric == "dead_fraction") & (df.layer == "hidden2") & (df.learner == "bp")]
    np.testing.assert_allclose(one[0].get_ydata(), rows.groupby("task")["value"].mean())
    lines = data_lines(plot_probes(df, layer="all").axes[0])
    assert len(lines) == 6
    assert len({line.get_linestyle() for line in lines}) == 3


def test_probes_errors():
    with pytest.raises(ContlearnError, match="no probe metrics"):
        plot_probes(frame())
    with pytest.raises(ContlearnError, match="no rows for layer 'out'"):
        plot_probes(frame(probes=("dead_fraction",)), layer="out")


def test_probes_binning_and_steps():
    fig = plot_probes(frame(probes=("dead_fraction", "effective_rank")), x="step", bin=300)
    ax = fig.axes[0]
    assert len(data_lines(ax)[0].get_xdata()) == 3
    assert ax.get_xlabel().startswith("steps")


def test_whole_network_row_preferred_over_layer_mean():
    df = frame(learners=("bp",), probes=("dead_fraction",))
    whole = (
        df[df.metric == "dead_fraction"]
        .drop_duplicates(["seed", "task"])
        .assign(layer="", value=0.5)
    )
    line = data_lines(plot_probes(pd.concat([df, whole])).axes[0])[0]
    np.testing.assert_allclose(line.get_ydata(), 0.5)


def test_step_axis_uses_fixed_width_bins_and_marks_task_changes():
    rows = []
    for seed in (0, 1):
        for i, step in enumerate([50, 120, 260, 310, 480, 530]):
            rows.append(
                {
                    "run": "r",
                    "stream": "slippery-ant",
                    "learner": "bp",
                    "seed": seed,
                    "step": step + seed,
                    "task": i // 2,
                    "metric": "episode_return",
                    "layer": "",
                    "value": float(i),
                }
            )
    df = pd.DataFrame(rows)
    fig = plot_decay(df, x="step", bin=200)
    ax = fig.axes[0]
    assert len(data_lines(ax)[0].get_xdata()) == 3  # steps 0-199, 200-399, 400-599
    markers = [ln for ln in ax.get_lines() if ln.get_linestyle() == ":"]
    # every seed's task changes (seed 1's episodes reach each friction a step later)
    assert sorted(ln.get_xdata()[0] for ln in markers) == [260, 261, 480, 481]


def test_rl_episodes_of_two_seeds_are_binned_into_a_mean_with_a_band():
    """Episodes end at different steps in each seed: by default the step axis is binned so
    that every point holds both seeds (not a zigzag through alternate seeds' episodes)."""
    rng = np.random.default_rng(0)
    rows = []
    for seed in (0, 1):
        ends = np.cumsum(rng.integers(40, 120, size=120)) + seed * 7
        for step in ends[ends < 6000]:
            rows.append(
                dict(
                    run="r",
                    stream="slippery-ant",
                    learner="bp",
                    seed=seed,
                    step=int(step),
                    task=int(step // 2000),
                    metric="episode_return",
                    layer="",
                    value=float(step) / 10 + rng.normal(0, 5),
                )
            )
    df = pd.DataFrame(rows)
    fig = plot_decay(df, x="step")
    ax = fig.axes[0]
    assert "mean of 2 seeds" in ax.get_title()
    assert len(bands(ax)) == 1
    xs = data_lines(ax)[0].get_xdata()
    assert 25 <= len(xs) <= 50 and np.all(np.diff(xs) > 0)  # (6000 steps in 200-step bins)
    stats = curve_stats(df, "episode_return", x="step", bin=100)
    assert (stats["seeds"] == 2).mean() > 0.8  # (episodes last 40-120 steps: most bins hold both)


@pytest.mark.mujoco
def test_a_two_seed_slippery_ant_run_plots_the_mean_of_both_seeds_with_a_band(tmp_path):
    import contlearn
    from contlearn.cli import main

    config = {"hidden": "8,8", "max_episode_steps": 50, "change_every": 1000, "probes": "none"}
    run = contlearn.run("slippery-ant", seeds=2, steps=2000, config=config, out=tmp_path / "r")
    assert main(["plot", str(run.path)]) == 0 and (run.path / "plot.png").is_file()
    ax = plot_decay(load_runs(run.path), x="step").axes[0]  # (what the command draws)
    assert "mean of 2 seeds" in ax.get_title()
    assert len(bands(ax)) == 1
