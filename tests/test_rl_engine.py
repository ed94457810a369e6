"""The RL loop end to end: clean rows in the run store, probes, divergence and resume."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

import contlearn
from contlearn.envs import make_stream
from contlearn.loop.engine import DivergenceError, ProbeSchedule
from contlearn.loop.rl import RLLoop, activity_dormant_fraction
from contlearn.results.store import load_runs
from contlearn.running.config import resolve

pytestmark = pytest.mark.mujoco

SMALL = {
    "rollout": 64,
    "minibatch_size": 32,
    "epochs": 1,
    "hidden": "32,32",
    "change_every": 120,
    "change_immediately": True,
    "max_episode_steps": 80,
    "probe_every": 150,
    "learner.maturity": 5,
    "learner.replacement_rate": 0.05,
}


def test_activity_dormant_fraction_counts_rarely_active_units() -> None:
    h = torch.zeros(1, 200, 4)
    h[0, :2, 1] = 1.0  # active on 1% of the inputs: dormant
    h[0, :3, 2] = 1.0  # 1.5%: not dormant
    h[0, :, 3] = 0.5  # always active
    out = activity_dormant_fraction({"layer": h})
    assert out["layer"].tolist() == [0.5] and out[""].tolist() == [0.5]


def test_run_writes_clean_episode_rows(tmp_path) -> None:
    result = contlearn.run(
        "slippery-ant", learner="cbp", seeds=2, steps=400, config=SMALL, out=tmp_path / "run"
    )
    df = load_runs(result.path)
    assert not df["value"].isna().any()
    episodes = df[df["metric"].isin(["episode_return", "episode_length", "friction"])]
    assert set(episodes["layer"]) == {""}
    assert not episodes.duplicated(["seed", "step", "metric"]).any()
    wide = episodes.pivot_table(
        index=["seed", "step", "task"], columns="metric", values="value"
    ).reset_index()
    assert wide["episode_length"].between(1, 80).all()
    # one friction per (seed, task), tasks never go back, and seeds draw their own frictions
    assert (wide.groupby(["seed", "task"])["friction"].nunique() == 1).all()
    assert all(g["task"].is_monotonic_increasing for _, g in wide.groupby("seed"))
    assert wide["task"].max() >= 2
    frictions = wide.groupby(["seed", "task"])["friction"].first().unstack(0)
    assert (frictions[0] != frictions[1]).all()
    probes = df[df["metric"] == "dormant_fraction"]
    assert set(probes["layer"]) == {
        "",
        "policy.hidden1",
        "policy.hidden2",
        "value.hidden1",
        "value.hidden2",
    }
    assert sorted(probes["step"].unique()) == [150, 300, 400]  # every 150 and at the end
    assert {
        "replacements",
        "weight_change",
        "grad_magnitude",
        "effective_rank",
        "policy_loss",
    } <= set(df["metric"])


def test_resume_equals_uninterrupted(tmp_path) -> None:
    config = {**SMALL, "checkpoint_every": 100}
    full = contlearn.run(
        "slippery-ant", learner="cbp", seeds=2, steps=400, config=config, out=tmp_path / "full"
    )
    part = tmp_path / "part"
    contlearn.run("slippery-ant", learner="cbp", seeds=2, steps=230, config=config, out=part)
    contlearn.resume(part, steps=400)

    def frame(path) -> pd.DataFrame:
        df = load_runs(path).drop(columns=["run"])
        return df.sort_values(["seed", "step", "metric", "layer"]).reset_index(drop=True)

    pd.testing.assert_frame_equal(frame(part), frame(full.path))


class _NaNAgent:
    """Acts with zeros; its second update reports a NaN loss for replica 0."""

    def __init__(self) -> None:
        self.calls, self.stopped = 0, None

    def act(self, obs: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*obs.shape[:2], 8)

    def observe(self, obs, action, feedback) -> dict[str, torch.Tensor]:
        self.calls += 1
        return {"loss": torch.tensor([float("nan") if self.calls >= 2 else 0.0, 1.0])}

    def stop_replicas(self, mask: torch.Tensor) -> None:
        self.stopped = mask


@pytest.mark.parametrize("mode", ["mark", "stop"])
def test_divergence_marks_or_stops(mode: str) -> None:
    cfg = resolve({"stream": "slippery-ant"})
    stream = make_stream("slippery-ant", cfg.stream_spec, [0, 1])
    records: list = []
    agent = _NaNAgent()
    loop = RLLoop(stream, agent, records.append, None, ProbeSchedule(), mode)
    if mode == "stop":
        with pytest.raises(DivergenceError, match="seed 0 diverged"):
            loop.run(3)
        return
    loop.run(3)
    diverged = [r for r in records if r.kind == "diverged"]
    assert [(r.step, r.replica) for r in diverged] == [(2, 0)]  # reported once
    assert agent.stopped.tolist() == [True, False]


class _RandomAgent:
    """A plug-in agent without replica support: sees (E, obs_dim) and RL feedback tuples."""

    def __init__(self, info, seed: int):
        self.gen = torch.Generator().manual_seed(seed)
        self.n = info.num_outputs

    def act(self, obs):
        return torch.rand(obs.shape[0], self.n, generator=self.gen) * 2 - 1

    def observe(self, obs, action, feedback):
        reward, next_obs, terminated, truncated = feedback
        assert reward.shape == (obs.shape[0],) and next_obs.shape == obs.shape
        return {}


@pytest.mark.mujoco
def test_plugin_agent_without_replicas_runs_on_an_rl_stream(tmp_path):
    res = contlearn.run(
        "slippery-ant",
        agent=_RandomAgent,
        seeds=2,
        steps=1100,
        config={"change_every": 500},
        out=tmp_path / "r",
    )
    df = res.metrics()
    returns = df[df.metric == "episode_return"]
    assert sorted(returns.seed.unique()) == [0, 1] and set(df.learner) == {"_RandomAgent"}
