"""The explicit contracts: the agent's capability Protocols and the stream Protocols."""

from __future__ import annotations

import re
import typing
from pathlib import Path

import pytest
import torch

from contlearn.agents import Agent
from contlearn.agents import protocol as agent_protocol
from contlearn.agents.protocol import (
    CAPABILITIES,
    capabilities,
    require_agent_methods,
    supports_replicas,
)
from contlearn.envs import protocol as stream_protocol
from contlearn.loop.adapter import SingleReplicaAdapter
from contlearn.running.config import resolve
from contlearn.running.runner import make_agent, open_streams

ROOT = Path(__file__).resolve().parents[1]
#: the modules that may ask an agent or a stream for something optional
LOOKERS = [
    "contlearn/loop/engine.py",
    "contlearn/loop/rl.py",
    "contlearn/probes/measures.py",
    "contlearn/probes/schedule.py",
    "contlearn/running/runner.py",
    "contlearn/running/plugins.py",
    "contlearn/running/api.py",
]


class Plain:
    """The smallest agent: the two required methods, nothing optional."""

    def __init__(self, info=None, seed=0) -> None:
        self.saved = None

    def act(self, obs: torch.Tensor) -> torch.Tensor:
        return torch.zeros(obs.shape[0], 10)

    def observe(self, obs, action, feedback) -> dict[str, float]:
        return {"loss": 0.5}


class Full(Plain):
    """A plain agent with the capabilities that need no replica dim."""

    def on_task_start(self, task: int) -> None:
        self.task = task

    def state_dict(self) -> dict:
        return {"x": 1}

    def load_state_dict(self, state: dict) -> None:
        self.saved = state

    def close(self) -> None:
        self.closed = True


def declared() -> set[str]:
    """Every member name of the agent and stream Protocols."""
    names: set[str] = set()
    for module in (agent_protocol, stream_protocol):
        for obj in vars(module).values():
            if isinstance(obj, type) and getattr(obj, "_is_protocol", False):
                attrs = getattr(obj, "__protocol_attrs__", None)  # (Python 3.12 on)
                names |= set(attrs) if attrs is not None else typing._get_protocol_attrs(obj)
    return names


def test_plain_agent_is_an_agent_with_no_capabilities() -> None:
    agent = Plain()
    assert isinstance(agent, Agent) and capabilities(agent) == []
    require_agent_methods(agent)
    with pytest.raises(TypeError, match="lacks observe"):
        require_agent_methods(type("Half", (), {"act": lambda self, obs: obs})())
    assert not supports_replicas(Plain)


def test_single_replica_adapter_forwards_only_what_the_agent_has() -> None:
    assert capabilities(SingleReplicaAdapter(Plain())) == []
    assert capabilities(SingleReplicaAdapter(Plain(), (10,))) == []  # (act's shape: no outputs)
    with_outputs = type("WithOutputs", (Plain,), {"outputs": lambda self, obs: obs[:, :2] * 2})
    adapter = SingleReplicaAdapter(with_outputs(), (10,))
    assert capabilities(adapter) == ["SupportsOutputs"]
    assert torch.equal(adapter.outputs(torch.ones(1, 3, 4)), torch.full((1, 3, 2), 2.0))
    inner = Full()
    adapter = SingleReplicaAdapter(inner)
    assert capabilities(adapter) == ["SupportsTaskStart", "SupportsCheckpoints", "SupportsClose"]
    adapter.load_state_dict(adapter.state_dict())
    adapter.close()
    assert inner.saved == {"x": 1} and inner.closed
    assert adapter.observe(torch.zeros(1, 3, 2), torch.zeros(1, 3, 10), torch.zeros(1, 3))[
        "loss"
    ].shape == (1,)


@pytest.mark.parametrize(
    "config, expected",
    [
        (
            {"stream": "permuted-mnist", "examples_per_task": 100},
            {
                "SupportsTaskStart",
                "SupportsCheckpoints",
                "SupportsFeatures",
                "SupportsNetwork",
                "SupportsUpdateStats",
                "SupportsGradientWatch",
                "SupportsProbeLoss",
                "SupportsOutputs",
                "SupportsCreditAlignment",
                "SupportsInitialParameters",
                "SupportsHessianTrace",
                "SupportsProbeSnapshot",
                "SupportsDiagnostics",
                "SupportsPreferredThreads",
                "SupportsProbeThreads",
                "SupportsReplicaWorkers",
                "SupportsDevice",
                "SupportsBlocks",
                "SupportsParameters",
                "SupportsBackend",
            },
        ),
        pytest.param(
            {"stream": "permuted-mnist", "agent": "ff", "hidden": "8,8"},
            {
                "SupportsTaskStart",
                "SupportsCheckpoints",
                "SupportsFeatures",
                "SupportsParameters",
                "SupportsUpdateStats",
                "SupportsGradientWatch",
                "SupportsProbeLoss",
                "SupportsGoodnessGap",
                "SupportsOutputs",
                "SupportsNetwork",
                "SupportsDiagnostics",
                "SupportsPreferredThreads",
                "SupportsBackend",
                "SupportsBlocks",
                "SupportsReplicaWorkers",
            },
        ),
        pytest.param(
            {"stream": "slippery-ant", "hidden": "8,8"},
            {
                "SupportsCheckpoints",
                "SupportsFeatures",
                "SupportsNetwork",
                "SupportsUpdateStats",
                "SupportsDiagnostics",
                "SupportsPreferredThreads",
                "SupportsDevice",
                "SupportsStopReplicas",
                "SupportsClose",
                "SupportsBackend",
                "SupportsCreditAlignment",
                "SupportsRLMetrics",
            },
            marks=pytest.mark.mujoco,
        ),
    ],
)
def test_the_builtin_agents_declare_their_capabilities(config, expected) -> None:
    cfg = resolve({**config, "seeds": 2})
    with open_streams(cfg) as streams:
        agent = make_agent(cfg, streams[0])
        try:
            assert set(capabilities(agent)) == expected
        finally:
            if isinstance(agent, agent_protocol.SupportsClose):
                agent.close()
    assert len(CAPABILITIES) == 24


def test_every_optional_name_looked_up_is_declared_in_a_protocol() -> None:
    """The engine, probes and runner ask for capabilities with isinstance; any getattr or
    hasattr left there names only things declared in the Protocols (or not agents' at all)."""
    allowed = declared() | {"steps_to_next"}  # (the checkpoint schedule's, not an agent's)
    allowed |= {"params", "activation"}  # (a network's: ProbedNetwork)
    for path in LOOKERS:
        text = (ROOT / path).read_text()
        for name in re.findall(r"(?:getattr|hasattr)\([^,]+,\s*\"(\w+)\"", text):
            assert name in allowed, f"{path} looks up {name!r}, which no Protocol declares"
        assert not re.search(r"(?:getattr|hasattr)\((?:self\.)?(?:agent|stream)\b", text), path
