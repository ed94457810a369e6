"""The ``churn`` probe (contlearn/probes/churn.py): hand-computed values on a linear agent, its
fixed inputs and memory, zero churn without learning, exact resume, and where it is refused."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

import contlearn
from contlearn.errors import ConfigError
from contlearn.probes.churn import CHURN_INPUTS
from contlearn.probes.measures import run_probes

ROOT = Path(__file__).resolve().parents[1]


class Linear:
    """Outputs x Wᵀ per replica: ``(R, B, D) -> (R, B, C)``."""

    def __init__(self, w: torch.Tensor) -> None:
        self.w = w  # (R, C, D)

    def act(self, obs):
        return self.outputs(obs)

    def observe(self, obs, action, feedback):
        return {}

    def outputs(self, obs: torch.Tensor) -> torch.Tensor:
        return torch.bmm(obs, self.w.transpose(1, 2))


def test_churn_is_the_mean_output_distance_on_the_first_batch_kept() -> None:
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(2, 3, 4, generator=g)
    agent, memory = Linear(w0.clone()), {}
    first = torch.randn(2, 5, 4, generator=g)
    assert run_probes(["churn"], agent, first, torch.zeros(2, 5), memory=memory) == {}
    w1 = w0 + torch.randn(2, 3, 4, generator=g)
    agent.w = w1.clone()
    other = torch.randn(2, 5, 4, generator=g)  # a later probe batch: not what churn reads
    got = run_probes(["churn"], agent, other, torch.zeros(2, 5), memory=memory)["churn"][""]
    for r in range(2):
        want = sum(
            float(torch.linalg.norm(first[r, p] @ w1[r].T - first[r, p] @ w0[r].T))
            for p in range(5)
        )
        assert abs(float(got[r]) - want / 5) < 1e-5  # (float32 outputs)
    agent.w = w1 * 2
    got = run_probes(["churn"], agent, other, torch.zeros(2, 5), memory=memory)["churn"][""]
    want = torch.bmm(first, w1.transpose(1, 2)).to(torch.float64).norm(dim=2).mean(1)
    torch.testing.assert_close(got, want)


def test_churn_keeps_only_the_first_inputs_of_a_large_batch() -> None:
    agent, memory = Linear(torch.ones(1, 2, 3)), {}
    obs = torch.randn(1, CHURN_INPUTS + 10, 3)
    run_probes(["churn"], agent, obs, torch.zeros(1, CHURN_INPUTS + 10), memory=memory)
    assert torch.equal(memory["churn.inputs"], obs[:, :CHURN_INPUTS])
    assert memory["churn.outputs"].shape == (1, CHURN_INPUTS, 2)


BASE = {"examples_per_task": 60, "hidden": "10", "probe_size": 32, "probes": "churn"}


def _churn(path) -> pd.DataFrame:
    df = contlearn.load_runs(path)
    return df[df["metric"] == "churn"].sort_values(["seed", "step"]).reset_index(drop=True)


@pytest.mark.parametrize("stream", ["permuted-mnist", "bit-flipping"])
def test_churn_is_recorded_at_every_probe_point_but_the_first(stream, tmp_path) -> None:
    contlearn.run(stream, seeds=2, tasks=4, config=BASE, out=tmp_path / "a")
    df = _churn(tmp_path / "a")
    assert sorted(set(df["task"])) == [1, 2, 3] and len(df) == 6
    assert (df["layer"] == "").all() and (df["value"] > 0).all()
    contlearn.run(stream, seeds=2, tasks=3, config={**BASE, "lr": 1e-30}, out=tmp_path / "b")
    assert (_churn(tmp_path / "b")["value"] < 1e-20).all()  # nothing learned: nothing moved


def test_resume_measures_churn_as_an_uninterrupted_run(tmp_path) -> None:
    config = {**BASE, "checkpoint_every": 25}
    full = contlearn.run("permuted-mnist", seeds=2, tasks=4, config=config, out=tmp_path / "f")
    part = tmp_path / "p"
    contlearn.run("permuted-mnist", seeds=2, steps=150, config=config, out=part)
    contlearn.resume(part, tasks=4)
    pd.testing.assert_frame_equal(
        _churn(part).drop(columns=["run"]), _churn(full.path).drop(columns=["run"])
    )


def test_churn_is_refused_by_name_on_agents_without_outputs(tmp_path) -> None:
    agent = f"{ROOT / 'scripts' / 'my_agent.py'}:LinearAgent"  # (act and observe only)
    with pytest.raises(ConfigError, match="outputs"):
        contlearn.run(
            "permuted-mnist",
            agent=agent,
            tasks=1,
            config={"examples_per_task": 10, "probes": "churn"},
            out=tmp_path / "r",
        )
    assert not (tmp_path / "r").exists()


def test_churn_on_the_forward_forward_agent(tmp_path) -> None:
    # (its outputs are act's scores: goodness per label)
    config = {"examples_per_task": 20, "hidden": "8", "probes": "churn", "probe_every": 10}
    contlearn.run("permuted-mnist", agent="ff", tasks=2, config=config, out=tmp_path / "r")
    churn = _churn(tmp_path / "r")
    assert len(churn) > 0 and (churn.value >= 0).all()


@pytest.mark.mujoco
def test_churn_is_refused_on_ppo_with_the_reason(tmp_path) -> None:
    with pytest.raises(ConfigError, match="churn cannot run on agent ppo: it needs outputs"):
        contlearn.run(
            "slippery-ant",
            seeds=1,
            steps=100,
            config={"hidden": "8", "probes": "churn"},
            out=tmp_path / "r",
        )


PLUGIN = '''
import torch
from torch import nn


class Linear:
    """One seed, no replica dim, with outputs(obs) for churn."""

    def __init__(self, info, seed):
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(784, info.num_outputs))
        self.opt = torch.optim.SGD(self.net.parameters(), lr=0.05)

    def act(self, obs):
        with torch.no_grad():
            return self.net(obs)

    def observe(self, obs, action, target):
        loss = nn.functional.cross_entropy(self.net(obs), target)
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        return {"loss": loss.item()}

    def outputs(self, obs):
        with torch.no_grad():
            return self.net(obs)
'''


def test_churn_runs_on_a_one_seed_plugin_agent_with_outputs(tmp_path, monkeypatch) -> None:
    (tmp_path / "churn_agents.py").write_text(PLUGIN)
    monkeypatch.chdir(tmp_path)
    result = contlearn.run(
        "permuted-mnist",
        agent=f"{tmp_path / 'churn_agents.py'}:Linear",
        seeds=2,
        tasks=3,
        config={"examples_per_task": 40, "probe_size": 20, "probes": "churn"},
        out="p",
    )
    df = _churn(result.path)
    assert set(df["seed"]) == {0, 1} and set(df["task"]) == {1, 2}
    assert (df["value"] > 0).all()
