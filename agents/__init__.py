"""contlearn's agents: the Agent Protocol, the built-in agents, and plug-in agent loading.

Built-in agents are registered by name; a user's own class is named ``module:Class`` (or
``path/to/file.py:Class``) and needs no base class, only ``act`` and ``observe``.
"""

from __future__ import annotations

from typing import Any

from contlearn.agents.contract import AgentContractError
from contlearn.agents.protocol import Agent, Metrics
from contlearn.registry import Registry

agents = Registry("agent")
agents.register(
    "online",
    "contlearn.agents.online:OnlineAgent",
    "online supervised MLP (replica-batched) trained by a learner",
)
agents.register(
    "ff",
    "contlearn.agents.forward_forward:FFAgent",
    "Forward-Forward (Hinton 2022): local goodness learning per layer (replica-batched)",
)
agents.register(
    "ppo",
    "contlearn.agents.ppo:PPOAgent",
    "PPO, Gaussian policy + value MLPs (replica-batched) trained by a learner",
)
agents.seal()  # (the built-in entries; later ones are the user's)


def check_agent(agent: str | type, stream: str = "permuted-mnist", **options: Any) -> Any:
    """Run ``agent`` (a class or ``module:Class``) a few steps on ``stream`` and raise an
    :class:`AgentContractError` naming every contract it breaks; else return an
    :class:`~contlearn.running.agent_check.AgentReport` (see
    :func:`contlearn.running.agent_check.check_agent` for the checks and options)."""
    from contlearn.running.agent_check import check_agent as check

    return check(agent, stream, **options)


__all__ = ["Agent", "AgentContractError", "Metrics", "agents", "check_agent"]
