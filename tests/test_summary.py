"""Tests of contlearn.results.summary against numbers computed by hand."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from contlearn.errors import ContlearnError
from contlearn.results.summary import final_tasks, format_summary, summary_table

# seed-mean curves: seed 0 has these values, seed 1 the same + 0.1 (mean: + 0.05)
CURVE_A = [0.5, 0.7, 0.9, 0.8, 0.8, 0.6, 0.6, 0.6, 0.6, 0.4]  # 10 tasks: final = last 1
CURVE_B = [0.3] * 18 + [0.2, 0.1]  # 20 tasks: final = mean of last 2


def rows(learner, curve, metric="accuracy", stream="permuted-mnist"):
    out = []
    for seed, shift in ((0, 0.0), (1, 0.1)):
        for task, value in enumerate(curve):
            out.append(
                dict(
                    run=f"r-{learner}",
                    stream=stream,
                    learner=learner,
                    seed=seed,
                    step=(task + 1) * 10,
                    task=task,
                    metric=metric,
                    layer="",
                    value=value + shift,
                )
            )
    return out


def probe_rows(learner, values):
    """dead_fraction per (seed, layer) on tasks 0..9; ``values`` are those of task 9."""
    out = []
    for (seed, layer), last in values.items():
        for task in range(10):
            out.append(
                dict(
                    run=f"r-{learner}",
                    stream="permuted-mnist",
                    learner=learner,
                    seed=seed,
                    step=task * 10,
                    task=task,
                    metric="dead_fraction",
                    layer=layer,
                    value=last if task == 9 else 0.0,
                )
            )
    return out


@pytest.fixture
def df():
    dead = {(0, "h1"): 0.2, (0, "h2"): 0.4, (1, "h1"): 0.3, (1, "h2"): 0.5}
    return pd.DataFrame(rows("a", CURVE_A) + rows("b", CURVE_B) + probe_rows("a", dead))


def test_summary_numbers_by_hand(df):
    table = summary_table(df).set_index("learner")
    a, b = table.loc["a"], table.loc["b"]
    assert a["metric"] == "accuracy" and a["seeds"] == 2 and a["tasks"] == 10
    assert a["first_task"] == pytest.approx(0.55)
    assert a["peak"] == pytest.approx(0.95)
    assert a["final"] == pytest.approx(0.45)
    assert a["drop_from_peak"] == pytest.approx(0.5)
    assert a["final_dead_fraction"] == pytest.approx(0.35)  # mean of 0.2, 0.4, 0.3, 0.5
    assert math.isnan(a["final_effective_rank"])
    assert b["tasks"] == 20
    assert b["final"] == pytest.approx(0.2)  # mean of 0.25 and 0.15
    assert b["drop_from_peak"] == pytest.approx(0.35 - 0.2)
    assert math.isnan(b["final_dead_fraction"])


def test_error_metric_sign_convention():
    curve = [1.0, 0.4, 0.2, 0.3, 0.5, 0.6, 0.6, 0.7, 0.8, 0.9]
    table = summary_table(pd.DataFrame(rows("bp", curve, "squared_error", "bit-flipping")))
    row = table.iloc[0]
    assert row["metric"] == "squared_error"
    assert row["peak"] == pytest.approx(0.25)  # best = lowest error
    assert row["final"] == pytest.approx(0.95)
    assert row["drop_from_peak"] == pytest.approx(0.7)  # > 0: final worse than best


@pytest.mark.parametrize(("n", "expected"), [(1, 1), (6, 1), (10, 1), (19, 1), (20, 2), (99, 9)])
def test_final_tasks(n, expected):
    assert final_tasks(n) == expected


def test_summary_by_config_key(df):
    df = df.assign(lr=df["learner"].map({"a": 0.1, "b": 0.01}))
    table = summary_table(df, by="lr")
    assert list(table["lr"]) == [0.01, 0.1]


def test_summary_refuses_mixed_streams(df):
    other = pd.DataFrame(rows("c", CURVE_A, "squared_error", "bit-flipping"))
    with pytest.raises(ContlearnError, match="mix streams"):
        summary_table(pd.concat([df, other]))


def test_format_summary_aligned(df):
    text = format_summary(summary_table(df))
    lines = text.splitlines()
    assert lines[0].startswith("score: accuracy")
    header, rule, first, second = lines[1:]
    assert header.split() == [
        "learner",
        "seeds",
        "tasks",
        "first_task",
        "peak",
        "final",
        "drop_from_peak",
        "final_dead_fraction",
        "final_effective_rank",
    ]
    assert set(rule.replace(" ", "")) == {"-"}
    assert first.split()[0] == "a" and second.split()[0] == "b"
    assert "n/a" in first and "0.35" in first
    # numbers are right-aligned: every row ends at the same column as the header
    assert len({len(line) for line in (header, rule, first, second)}) == 1
