"""End-to-end runs through the Python API: records, replicas, scoring, store."""

from __future__ import annotations

import json

import pytest
import torch

import contlearn
from contlearn.results.store import COLUMNS, load_runs
from tests.test_streams import STREAMS

SMALL = {"examples_per_task": 200, "hidden": "16,16"}


@pytest.fixture(autouse=True)
def _generated_image_data(image_data):
    """The CIFAR streams among STREAMS read generated archives (tests/conftest.py)."""


def test_done_when_three_seeds_five_tasks_give_fifteen_accuracy_rows(tmp_path):
    res = contlearn.run(
        "permuted-mnist", seeds=3, tasks=5, config={"examples_per_task": 500}, out=tmp_path / "run"
    )
    df = load_runs(res.path)
    assert list(df.columns[: len(COLUMNS)]) == list(COLUMNS)
    acc = df[df.metric == "accuracy"]
    assert len(acc) == 15
    assert sorted(acc.seed.unique()) == [0, 1, 2]
    assert sorted(acc.task.unique()) == [0, 1, 2, 3, 4]
    assert (acc.layer == "").all() and acc.value.between(0, 1).all()
    assert acc.value.mean() > 0.3  # it learns something in 500 examples
    assert list(acc[acc.seed == 0].step) == [500, 1000, 1500, 2000, 2500]


@pytest.mark.parametrize("stream", STREAMS)  # (every registered supervised stream)
def test_batched_replicas_equal_seeds_run_one_by_one(tmp_path, stream):
    config = {**SMALL, "hidden": "8"}
    together = contlearn.run(stream, seeds=3, tasks=3, config=config, out=tmp_path / "all")
    frames = [
        contlearn.run(
            stream, seed=s, seeds=1, tasks=3, config=config, out=tmp_path / f"s{s}"
        ).metrics()
        for s in range(3)
    ]
    a = together.metrics().sort_values(["seed", "task", "metric"]).reset_index(drop=True)
    import pandas as pd

    b = pd.concat(frames).sort_values(["seed", "task", "metric"]).reset_index(drop=True)
    assert list(a.seed) == list(b.seed) and list(a.metric) == list(b.metric)
    torch.testing.assert_close(
        torch.tensor(a.value.values), torch.tensor(b.value.values), rtol=1e-5, atol=1e-6
    )


def test_same_seed_gives_identical_metrics(tmp_path):
    a = contlearn.run("permuted-mnist", seeds=2, tasks=2, config=SMALL, out=tmp_path / "a")
    b = contlearn.run("permuted-mnist", seeds=2, tasks=2, config=SMALL, out=tmp_path / "b")
    assert a.metrics().value.tolist() == b.metrics().value.tolist()


class _EchoAgent:
    """Predicts the label it was last taught: perfect *after* an update, chance before."""

    def __init__(self, info, seed):
        self.last = 0

    def act(self, obs):
        return torch.nn.functional.one_hot(torch.tensor([self.last] * obs.shape[0]), 10).float()

    def observe(self, obs, action, feedback):
        self.last = int(feedback[-1])
        return {}


def test_accuracy_is_scored_before_the_update(tmp_path):
    res = contlearn.run(
        "permuted-mnist",
        agent=_EchoAgent,
        tasks=2,
        config={"examples_per_task": 2000},
        out=tmp_path / "echo",
    )
    acc = res.metrics().query("metric == 'accuracy'").value
    assert acc.max() < 0.2  # had it been scored after the update it would be 1.0


def test_partial_last_task_is_recorded_with_steps(tmp_path):
    res = contlearn.run(
        "bit-flipping", steps=250, config={"examples_per_task": 100}, out=tmp_path / "p"
    )
    rows = res.metrics().query("metric == 'squared_error'")
    assert rows.task.tolist() == [0, 1, 2] and rows.step.tolist() == [100, 200, 250]


def test_run_dir_holds_config_meta_and_parquet_parts(tmp_path):
    res = contlearn.run(
        "permuted-mnist",
        seeds=2,
        tasks=4,
        config={**SMALL, "flush_rows": 4, "probes": "none"},
        out=tmp_path / "r",
    )
    config = json.loads((res.path / "config.json").read_text())
    assert config["stream"] == "permuted-mnist" and config["hidden"] == "16,16"
    assert config["learner"] == "bp" and config["lr"] == 0.01 and config["seeds"] == 2
    meta = json.loads((res.path / "meta.json").read_text())
    assert meta["seeds"] == [0, 1] and "torch" in meta["versions"] and meta["started"]
    parts = sorted((res.path / "metrics").glob("part-*.parquet"))
    assert len(parts) >= 4  # appended in chunks, not one file at the end
    import pandas as pd

    raw = pd.concat(pd.read_parquet(p) for p in parts)  # readable without contlearn
    assert len(raw) == len(res.metrics()) == 2 * 4 * 2


def test_load_runs_accepts_a_root_and_adds_config_columns(tmp_path):
    contlearn.run(
        "bit-flipping",
        tasks=2,
        config={"examples_per_task": 50, "lr": 0.01},
        out=tmp_path / "root" / "a",
    )
    contlearn.run(
        "bit-flipping",
        tasks=2,
        config={"examples_per_task": 50, "lr": 0.02},
        out=tmp_path / "root" / "b",
    )
    df = load_runs(tmp_path / "root", config=True)
    assert set(df.run) == {"a", "b"}
    assert "lr" in df.columns and "hidden" not in df.columns  # only keys that vary
    assert df.groupby("run").lr.first().to_dict() == {"a": 0.01, "b": 0.02}


def test_python_api_rejects_bad_input_before_writing(tmp_path):
    with pytest.raises(contlearn.ContlearnError, match="unknown stream"):
        contlearn.run("nope", out=tmp_path / "x")
    with pytest.raises(contlearn.ContlearnError, match="examples_per_task"):
        contlearn.run("permuted-mnist", config={"examples_per_task": -5}, out=tmp_path / "x")
    assert not (tmp_path / "x").exists()


class TaskStartAgent:
    """Records the tasks it is told of (at module level: a run's agent must be found again)."""

    calls: list[int] = []

    def __init__(self, info, seed):
        pass

    def act(self, obs):
        return torch.zeros(obs.shape[0], 1)

    def observe(self, obs, action, feedback):
        return {}

    def on_task_start(self, task):
        self.calls.append(task)


def test_boundaries_visible_calls_on_task_start(tmp_path, monkeypatch):
    calls: list[int] = []
    monkeypatch.setattr(TaskStartAgent, "calls", calls)
    Agent = TaskStartAgent
    contlearn.run(
        "bit-flipping", agent=Agent, tasks=3, config={"examples_per_task": 5}, out=tmp_path / "a"
    )
    assert calls == []
    contlearn.run(
        "bit-flipping",
        agent=Agent,
        tasks=3,
        config={"examples_per_task": 5, "boundaries_visible": True},
        out=tmp_path / "b",
    )
    assert calls == [0, 1, 2]


def test_unreadable_metrics_part_is_reported_by_name(tmp_path, cli):
    res = contlearn.run(
        "bit-flipping",
        steps=50,
        config={"examples_per_task": 10, "probes": "none", "flush_rows": 10},
        out=tmp_path / "r",
    )
    part = sorted((res.path / "metrics").glob("part-*.parquet"))[1]
    part.write_bytes(b"garbage")
    with pytest.raises(contlearn.ContlearnError, match=part.name):
        load_runs(res.path)
    code, _, err = cli("summary", res.path)
    assert code == 2 and part.name in err and err.count("\n") == 1
