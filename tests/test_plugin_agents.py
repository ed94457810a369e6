"""Plug-in agents (issue #16): their returns checked against the contract, probes for every
agent that shows its features, ``check_agent``, threads, and RL metrics per episode."""

from __future__ import annotations

import textwrap

import pytest
import torch

import contlearn
from contlearn.agents import AgentContractError, check_agent
from contlearn.cli import main
from contlearn.results.store import load_runs

AGENTS = textwrap.dedent(
    '''
    import torch
    import torch.nn.functional as F
    from torch import nn


    class Net:
        """One seed, an nn.Sequential with its own optimizer, features for the probes."""

        def __init__(self, info, seed, lr: float = 0.05, hidden: int = 16):
            torch.manual_seed(seed)
            d = 1
            for s in info.input_shape:
                d *= s
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(d, hidden), nn.ReLU(),
                                     nn.Linear(hidden, info.num_outputs))
            self.opt = torch.optim.SGD(self.net.parameters(), lr=lr)
            self.classify = info.kind == "classification"

        def act(self, obs):
            with torch.no_grad():
                return self.net(obs)

        def observe(self, obs, action, target):
            out = self.net(obs)
            loss = F.cross_entropy(out, target) if self.classify else F.mse_loss(out, target)
            self.opt.zero_grad()
            loss.backward()
            self.opt.step()
            return {"loss": loss.item(), "threads": torch.get_num_threads()}

        def features(self, obs):
            with torch.no_grad():
                return {"hidden1": self.net[2](self.net[1](self.net[0](obs)))}

        def state_dict(self):
            return {"net": self.net.state_dict(), "opt": self.opt.state_dict()}

        def load_state_dict(self, state):
            self.net.load_state_dict(state["net"])
            self.opt.load_state_dict(state["opt"])


    class FloatReplica:
        """A replica agent that returns a float (whose seed's?)."""

        supports_replicas = True

        def __init__(self, info, seeds):
            self.n = info.num_outputs

        def act(self, obs):
            return torch.zeros(*obs.shape[:2], self.n)

        def observe(self, obs, action, target):
            return {"loss": 0.3}


    class WrongShape(Net):
        def act(self, obs):
            return torch.zeros(obs.shape[0], 3)


    class Broken(Net):
        """Several faults at once: state with an object, answers that depend on the clock."""

        def __init__(self, info, seed, lr: float = 0.05, hidden: int = 16):
            super().__init__(info, seed, lr, hidden)
            self.gen = torch.Generator()  # (unseeded: differs per agent)
            self.gen.seed()

        def act(self, obs):
            return super().act(obs) + torch.rand(1, generator=self.gen)

        def features(self, obs):
            return {"hidden1": torch.zeros(3)}

        def state_dict(self):
            return {"net": self.net.state_dict(), "gen": self.gen}


    class EveryStep:
        """RL: returns its step count every step, so per-episode means can be checked."""

        def __init__(self, info, seed):
            self.n, self.t = info.num_outputs, 0
            self.low = info.action_low

        def act(self, obs):
            return torch.zeros(obs.shape[0], self.n)

        def observe(self, obs, action, feedback):
            self.t += 1
            return {"t": float(self.t)}

        def state_dict(self):
            return {"t": self.t}

        def load_state_dict(self, state):
            self.t = state["t"]
    '''
)


@pytest.fixture()
def agents(tmp_path, monkeypatch):
    (tmp_path / "agents.py").write_text(AGENTS)
    monkeypatch.chdir(tmp_path)
    return tmp_path / "agents.py"


TINY = ["--tasks", "2", "--set", "examples_per_task=60", "--set", "probe_size=20"]


def _one_line_error(capsys, args, match):
    assert main([str(a) for a in args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("contlearn: error: ") and match in err, err
    return err


def test_a_float_from_a_replica_agent_is_a_one_line_error_and_leaves_nothing(agents, capsys):
    out = agents.parent / "r"
    err = _one_line_error(
        capsys,
        [
            "run",
            "permuted-mnist",
            "--agent",
            f"{agents}:FloatReplica",
            "--seeds",
            "2",
            *TINY,
            "--out",
            out,
        ],
        "FloatReplica.observe returned loss=float 0.3",
    )
    assert "(R,) = (2,)" in err
    assert not out.exists()


def test_a_wrong_answer_shape_names_the_expected_shape(agents, capsys):
    _one_line_error(
        capsys,
        ["run", "permuted-mnist", "--agent", f"{agents}:WrongShape", *TINY, "--out", "w"],
        "WrongShape.act returned a torch.float32 tensor of shape (1, 3); the Agent Protocol "
        "asks for a float tensor of shape (1, 10)",
    )


def test_a_one_seed_agent_gets_probes_and_runs_with_one_thread(agents):
    result = contlearn.run(
        "permuted-mnist",
        agent=f"{agents}:Net",
        seeds=2,
        tasks=2,
        config={"examples_per_task": 60, "probe_size": 20, "threads": 0},
        out="p",
    )
    df = load_runs(result.path)
    probes = df[df.metric.isin(["effective_rank", "dead_fraction", "weight_magnitude"])]
    assert set(probes.metric) == {"effective_rank", "dead_fraction", "weight_magnitude"}
    assert set(probes.seed) == {0, 1} and set(probes.task) == {0, 1}
    # the weight probe reads the nn.Module's parameters, named as the module names them
    assert {"1", "3"} <= set(df[df.metric == "weight_magnitude"].layer)
    # ranks of the features it gave, by hand for the first probe of seed 0 is in test_probes;
    # here: a value in range
    ranks = probes[probes.metric == "effective_rank"].value
    assert ((ranks >= 1) & (ranks <= 16)).all()
    assert (df[df.metric == "threads"].value == 1).all()


def test_a_probe_named_that_the_agent_cannot_feed_is_refused_before_anything_is_written(
    agents, capsys
):
    err = _one_line_error(
        capsys,
        [
            "run",
            "permuted-mnist",
            "--agent",
            f"{agents}:Net",
            *TINY,
            "--set",
            "probes=effective_rank,plasticity",
            "--out",
            "q",
        ],
        "probe plasticity cannot run on agent",
    )
    assert "probe_loss(obs, target)" in err
    assert not (agents.parent / "q").exists()
    # and the default probes run those it can feed
    assert main(["run", "permuted-mnist", "--agent", f"{agents}:Net", *TINY, "--out", "d"]) == 0


def test_check_agent_reports_the_capabilities_of_a_good_agent(agents):
    report = check_agent(f"{agents}:Net", "bit-flipping", steps=5)
    assert {"SupportsFeatures", "SupportsParameters", "SupportsCheckpoints"} <= set(
        report.capabilities
    )
    assert any("one after another" in note for note in report.notes)
    assert check_agent("online", "permuted-mnist", steps=3).notes == []


def test_check_agent_names_every_fault_of_a_broken_agent(agents):
    with pytest.raises(AgentContractError) as caught:
        check_agent(f"{agents}:Broken", "permuted-mnist", steps=3)
    message = str(caught.value)
    assert "\n" not in message
    assert "(1) Broken.features returned hidden1=(3,)" in message
    assert "(2) state_dict() cannot be saved and loaded with torch.load(weights_only=True)" in (
        message
    )
    assert "(3) two agents built with the same seed answer" in message
    with pytest.raises(AgentContractError, match="loss=float 0.3"):
        check_agent(f"{agents}:FloatReplica", "permuted-mnist", steps=3)
    with pytest.raises(AgentContractError, match=r"shape \(1, 10\)"):
        check_agent(f"{agents}:WrongShape", "permuted-mnist", steps=3)


def test_check_agent_finds_unsaveable_state_and_unseeded_answers(agents, tmp_path):
    source = AGENTS + textwrap.dedent(
        """
        class Unsaveable(Net):
            def state_dict(self):
                return {"net": self.net.state_dict(), "gen": torch.Generator()}


        class Unseeded(Net):
            def act(self, obs):  # (a generator seeded from the clock)
                clock = torch.Generator()
                clock.seed()
                return super().act(obs) + torch.rand(1, generator=clock)


        class GlobalNoise(Net):
            def act(self, obs):  # (the global generator: not in its state)
                return super().act(obs) + torch.rand(1)
        """
    )
    (tmp_path / "more.py").write_text(source)
    with pytest.raises(AgentContractError, match=r"torch.load\(weights_only=True\)"):
        check_agent(f"{tmp_path / 'more.py'}:Unsaveable", "bit-flipping", steps=2)
    with pytest.raises(AgentContractError, match="answer the same first inputs differently"):
        check_agent(f"{tmp_path / 'more.py'}:Unseeded", "bit-flipping", steps=2)
    with pytest.raises(AgentContractError, match=r"load_state_dict\(state_dict\(\)\) answers"):
        check_agent(f"{tmp_path / 'more.py'}:GlobalNoise", "bit-flipping", steps=2)


@pytest.mark.mujoco
def test_per_step_rl_metrics_are_recorded_per_episode_and_resume_exactly(agents):
    config = {"change_every": 150, "max_episode_steps": 40, "probes": "none"}
    whole = contlearn.run(
        "slippery-ant", agent=f"{agents}:EveryStep", seeds=1, steps=130, config=config, out="a"
    )
    df = load_runs(whole.path)
    episodes = df[df.metric == "episode_length"].sort_values("step")
    t = df[df.metric == "t"].sort_values("step")
    # one row per episode (plus the unfinished one at the end), not per step
    assert len(t) == len(episodes) + (episodes.step.max() < 130)
    # each the mean of the step counts 1..130 it covers
    edges = [0, *episodes.step.tolist()]
    if edges[-1] < 130:
        edges.append(130)
    expected = [(a + 1 + b) / 2 for a, b in zip(edges, edges[1:], strict=False)]
    assert t.value.tolist() == pytest.approx(expected)
    assert t.step.tolist() == edges[1:]
    # stopped mid-episode and resumed: the same rows
    part = contlearn.run(
        "slippery-ant",
        agent=f"{agents}:EveryStep",
        seeds=1,
        steps=70,
        config={**config, "checkpoint_every": 50},
        out="b",
    )
    contlearn.resume(part.path, steps=130)
    again = load_runs(part.path)
    mine = again[again.metric == "t"].sort_values("step")
    assert mine.value.tolist() == pytest.approx(t.value.tolist())


def test_the_replica_plugin_metrics_still_record_as_tensors(agents, tmp_path):
    source = AGENTS + textwrap.dedent(
        """
        class GoodReplica(FloatReplica):
            def observe(self, obs, action, target):
                return {"loss": torch.full((obs.shape[0],), 0.5)}
        """
    )
    (tmp_path / "good.py").write_text(source)
    result = contlearn.run(
        "permuted-mnist",
        agent=f"{tmp_path / 'good.py'}:GoodReplica",
        seeds=2,
        tasks=1,
        config={"examples_per_task": 20},
        out="g",
    )
    df = load_runs(result.path)
    assert (df[df.metric == "loss"].value == 0.5).all() and set(df.seed) == {0, 1}


def test_bad_feature_shapes_from_a_one_seed_agent_are_named(agents, tmp_path, capsys):
    source = AGENTS + textwrap.dedent(
        """
        class BadFeatures(Net):
            def features(self, obs):
                return {"hidden1": torch.zeros(3)}
        """
    )
    (tmp_path / "bad.py").write_text(source)
    _one_line_error(
        capsys,
        [
            "run",
            "permuted-mnist",
            "--agent",
            f"{tmp_path / 'bad.py'}:BadFeatures",
            *TINY,
            "--set",
            "probes=effective_rank",
            "--out",
            "bf",
        ],
        "BadFeatures.features returned hidden1=(3,)",
    )
    assert torch.get_num_threads() >= 1
