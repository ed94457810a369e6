"""An agent of one seed, presented to the engine as a replica-batched agent with R = 1.

A plug-in agent without ``supports_replicas = True`` sees plain ``(B, ...)`` tensors: the
engine runs its seeds one after another, each through a :class:`SingleReplicaAdapter`, which
adds and removes the replica dim and checks what the agent returns
(:mod:`contlearn.agents.contract`). It has each optional capability the wrapped agent has, so
the probes see a one-seed agent as they see any other:

- ``features(obs)``: the agent's ``{layer: (B, H)}`` as ``(1, B, H)`` (activations with more
  dims, e.g. a conv layer's ``(B, C, H, W)``, count every trailing entry as a unit);
- ``parameters()`` / ``activation``: the agent's ``parameters()`` mapping, or, for an agent
  that is a ``torch.nn.Module`` (or has one as ``net`` or ``model``), its named parameters;
  each as ``(1, ...)``; the activation is the agent's ``activation`` attribute (default relu);
- ``update_stats()``, ``diagnostics()``: numbers per layer, as ``(1,)``;
- ``probe_loss(obs, target)``: the loss, as ``(1,)``;
- ``outputs(obs)``: the agent's ``(B, C)`` outputs as ``(1, B, C)`` (``churn``);
- ``on_task_start``, ``state_dict``/``load_state_dict``, ``preferred_threads``, ``to`` and
  ``close``, as they are.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from contlearn.agents.contract import AgentContractError, check_action, check_metrics
from contlearn.agents.protocol import (
    Agent,
    Metrics,
    SupportsCheckpoints,
    SupportsClose,
    SupportsDevice,
    SupportsDiagnostics,
    SupportsFeatures,
    SupportsOutputs,
    SupportsPreferredThreads,
    SupportsProbeLoss,
    SupportsRLMetrics,
    SupportsTaskStart,
    SupportsUpdateStats,
)


def module_of(agent: Any) -> torch.nn.Module | None:
    """The ``torch.nn.Module`` an agent is, or holds as ``net`` or ``model`` (else None)."""
    if isinstance(agent, torch.nn.Module):
        return agent
    for name in ("net", "model"):
        found = getattr(agent, name, None)
        if isinstance(found, torch.nn.Module):
            return found
    return None


def plain_parameters(agent: Any) -> dict[str, torch.Tensor] | None:
    """A one-seed agent's parameters ``{name: tensor}``: its ``parameters()`` mapping, else its
    module's named parameters (:func:`module_of`), detached; None if it has neither."""
    method = getattr(agent, "parameters", None)
    if callable(method) and not isinstance(agent, torch.nn.Module):
        found = method()
        if isinstance(found, Mapping):
            return {str(k): torch.as_tensor(v).detach() for k, v in found.items()}
    module = module_of(agent)
    if module is None:
        return None
    return {k: v.detach() for k, v in module.named_parameters()}


def _numbers(who: str, nested: Any) -> dict[str, dict[str, torch.Tensor]]:
    """``{a: {b: number}}`` as ``{a: {b: (1,)}}``."""
    if not isinstance(nested, Mapping):
        raise AgentContractError(f"{who} returned {type(nested).__name__}; return a dict of dicts")
    return {str(k): check_metrics(who, v, None) for k, v in nested.items()}


class SingleReplicaAdapter:
    """Presents an agent without replica support as an R = 1 replica-batched agent.

    Args:
        agent: the one-seed agent.
        outputs: its ``act``'s trailing shape (``(num_outputs,)``), checked on every step;
            None: not checked.
    """

    supports_replicas = True

    def __init__(self, agent: Agent, outputs: tuple[int, ...] | None = None) -> None:
        self.agent = agent
        #: (not ``outputs``: that name is the optional capability ``outputs(obs)``)
        self.action_shape = outputs
        self.name = type(agent).__name__
        # the capabilities that need no replica dim, as the wrapped agent has them
        if isinstance(agent, SupportsTaskStart):
            self.on_task_start = agent.on_task_start
        if isinstance(agent, SupportsCheckpoints):
            self.state_dict = agent.state_dict
            self.load_state_dict = agent.load_state_dict
        if isinstance(agent, SupportsClose):
            self.close = agent.close
        if isinstance(agent, SupportsPreferredThreads):
            self.preferred_threads = agent.preferred_threads
        if isinstance(agent, SupportsDevice):
            self.to = self._to
        if isinstance(agent, SupportsRLMetrics):
            self.rl_metrics = agent.rl_metrics
        # the probing ones, adding the replica dim
        if isinstance(agent, SupportsFeatures):
            self.features = self._features
        if plain_parameters(agent) is not None:
            self.activation = str(getattr(agent, "activation", "relu"))
            self.parameters = self._parameters
        if isinstance(agent, SupportsUpdateStats):
            self.update_stats = self._update_stats
        if isinstance(agent, SupportsDiagnostics):
            self.diagnostics = self._diagnostics
        if isinstance(agent, SupportsProbeLoss):
            self.probe_loss = self._probe_loss
        if isinstance(agent, SupportsOutputs):
            self.outputs = self._outputs

    def act(self, obs: torch.Tensor) -> torch.Tensor:
        """The wrapped agent's answer for replica 0, ``(1, B, ...)``."""
        action = self.agent.act(obs[0])
        if self.action_shape is not None:
            check_action(f"{self.name}.act", action, (obs.shape[1], *self.action_shape))
        return action.unsqueeze(0)

    def observe(self, obs: torch.Tensor, action: torch.Tensor, feedback: Any) -> Metrics:
        """The wrapped agent's ``observe`` on replica 0, its metrics as ``(1,)``."""
        if isinstance(feedback, tuple):  # RL feedback: (reward, next_obs, terminated, truncated)
            feedback = type(feedback)(*(f[0] for f in feedback))
        else:
            feedback = feedback[0]
        metrics = self.agent.observe(obs[0], action[0], feedback)
        return check_metrics(f"{self.name}.observe", metrics, None)

    def _features(self, obs: torch.Tensor) -> dict[str, torch.Tensor]:
        found = self.agent.features(obs[0])  # type: ignore[attr-defined]
        who = f"{self.name}.features"
        if not isinstance(found, Mapping):
            raise AgentContractError(
                f"{who} returned {type(found).__name__}; return {{layer: (B, H) tensor}}"
            )
        out = {}
        for layer, h in found.items():
            if not isinstance(h, torch.Tensor) or h.dim() < 2 or h.shape[0] != obs.shape[1]:
                shape = tuple(h.shape) if isinstance(h, torch.Tensor) else type(h).__name__
                raise AgentContractError(
                    f"{who} returned {layer}={shape}; return a (B, H) tensor per layer for "
                    f"inputs (B, ...) = ({obs.shape[1]}, ...)"
                )
            out[str(layer)] = h.detach().reshape(1, h.shape[0], -1)
        return out

    def _parameters(self) -> dict[str, torch.Tensor]:
        return {k: v.unsqueeze(0) for k, v in (plain_parameters(self.agent) or {}).items()}

    def _update_stats(self) -> dict[str, dict[str, torch.Tensor]]:
        return _numbers(f"{self.name}.update_stats", self.agent.update_stats())  # type: ignore[attr-defined]

    def _diagnostics(self) -> dict[str, dict[str, torch.Tensor]]:
        return _numbers(f"{self.name}.diagnostics", self.agent.diagnostics())  # type: ignore[attr-defined]

    def _probe_loss(self, obs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = self.agent.probe_loss(obs[0], target[0])  # type: ignore[attr-defined]
        return check_metrics(f"{self.name}.probe_loss", {"loss": loss}, None)["loss"]

    def _outputs(self, obs: torch.Tensor) -> torch.Tensor:
        out = self.agent.outputs(obs[0])  # type: ignore[attr-defined]
        if not isinstance(out, torch.Tensor) or out.dim() < 1 or out.shape[0] != obs.shape[1]:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise AgentContractError(
                f"{self.name}.outputs returned {shape}; return a (B, C) tensor for inputs "
                f"(B, ...) = ({obs.shape[1]}, ...)"
            )
        return out.detach().reshape(1, out.shape[0], -1)

    def _to(self, device: str | torch.device) -> SingleReplicaAdapter:
        moved = self.agent.to(device)  # type: ignore[attr-defined]
        if moved is not None and moved is not self.agent:
            return SingleReplicaAdapter(moved, self.action_shape)
        return self
