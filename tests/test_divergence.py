"""Divergence: a NaN/inf loss marks that seed (the others go on) or stops the run cleanly."""

from __future__ import annotations

import math

import pytest
import torch

import contlearn
from contlearn.results.store import load_runs


class _Breaks:
    """Replica 1's loss becomes NaN at step 30; counts learning steps per replica."""

    supports_replicas = True

    def __init__(self, info, seeds):
        self.R = len(seeds)
        self.step = 0
        self.learned = torch.zeros(self.R)
        self.stopped = torch.zeros(self.R, dtype=torch.bool)

    def act(self, obs):
        return torch.zeros(obs.shape[0], obs.shape[1], 1)

    def observe(self, obs, action, feedback):
        self.step += 1
        loss = torch.ones(self.R)
        if self.step >= 30:
            loss[1] = math.nan
        self.learned += (~self.stopped).float()
        return {"loss": loss}

    def stop_replicas(self, mask):
        self.stopped = mask


def test_mark_records_the_diverged_seed_and_the_others_go_on(tmp_path):
    agents = []

    class Agent(_Breaks):
        def __init__(self, info, seeds):
            super().__init__(info, seeds)
            agents.append(self)

    res = contlearn.run(
        "bit-flipping",
        agent=Agent,
        seeds=3,
        steps=100,
        config={"examples_per_task": 50},
        out=tmp_path / "r",
    )
    df = res.metrics()
    marks = df[df.metric == "diverged"]
    assert marks.seed.tolist() == [1] and marks.step.tolist() == [30]
    assert agents[0].learned.tolist() == [100, 30, 100]  # only seed 1 stopped learning
    loss = df[df.metric == "loss"]
    assert loss[loss.seed != 1].value.notna().all()


def test_stop_ends_the_run_with_a_clear_message_and_keeps_rows(tmp_path, cli):
    code, _, err = cli(
        "run",
        "bit-flipping",
        "--seeds",
        "2",
        "--tasks",
        "5",
        "--set",
        "examples_per_task=200",
        "--set",
        "lr=1e6",
        "--set",
        "on_divergence=stop",
        "--set",
        "probes=none",
        "--out",
        tmp_path / "r",
    )
    assert code == 2 and err.count("\n") == 1 and "diverged" in err and "lower lr" in err
    df = load_runs(tmp_path / "r")
    assert (df.metric == "diverged").any()


def test_mark_with_the_online_agent_freezes_diverged_replicas(tmp_path):
    res = contlearn.run(
        "bit-flipping",
        seeds=2,
        tasks=3,
        config={"examples_per_task": 100, "lr": 1e6, "probes": "none"},
        out=tmp_path / "r",
    )
    df = res.metrics()
    assert sorted(df[df.metric == "diverged"].seed) == [0, 1]
    assert df.task.max() == 2  # the run went to its end


@pytest.mark.parametrize("mode", ["mark", "stop"])
def test_bad_on_divergence_value_is_refused(mode, tmp_path):
    with pytest.raises(contlearn.ContlearnError):
        contlearn.run(
            "bit-flipping", steps=1, config={"on_divergence": mode + "x"}, out=tmp_path / "x"
        )
