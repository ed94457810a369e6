"""What a plug-in agent's answers must look like, checked where the engine receives them.

The engine trusts the built-in agents; a plug-in agent's ``act`` and ``observe`` returns are
checked on every step (a few attribute reads), so a wrong type or shape is a one-line
:class:`AgentContractError` naming the contract instead of a traceback deep in the engine:

- ``act(obs)`` returns a floating-point tensor: ``(R, B, num_outputs)`` for a replica agent
  (``supports_replicas = True``), ``(B, num_outputs)`` for any other (RL streams: ``E`` env
  copies in place of ``B``, ``num_outputs`` action dimensions);
- ``observe(...)`` returns None or a mapping of metric names to values. A replica agent gives
  every metric as a tensor of shape ``(R,)``, one value per seed (a float would not say whose it
  is); any other agent gives numbers (a Python float or int, or a one-element tensor).
"""

from __future__ import annotations

from collections.abc import Mapping
from numbers import Real
from typing import Any

import torch

from contlearn.errors import ConfigError


class AgentContractError(ConfigError):
    """An agent broke the Agent Protocol (a return of the wrong type or shape)."""


def _shape(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return f"{type(value).__name__} {value!r}"[:80]


def check_action(who: str, action: Any, expected: tuple[int, ...]) -> torch.Tensor:
    """``action`` if it is a floating-point tensor of shape ``expected``.

    Raises:
        AgentContractError: naming ``who`` (``"MyAgent.act"``), what it returned and what the
            contract asks for.
    """
    if (
        not isinstance(action, torch.Tensor)
        or not action.is_floating_point()
        or tuple(action.shape) != expected
    ):
        raise AgentContractError(
            f"{who} returned {_shape(action)}; the Agent Protocol asks for a float tensor of "
            f"shape {expected} (see 'Your own agent' in the README)"
        )
    return action


def check_metrics(who: str, metrics: Any, replicas: int | None) -> dict[str, torch.Tensor]:
    """The metrics ``observe`` returned as ``{name: float64 tensor (R,)}``.

    Args:
        who: the method, for messages (``"MyAgent.observe"``).
        metrics: what it returned (None: no metrics).
        replicas: R for a replica agent (every value must be a tensor of shape ``(R,)``), or
            None for an agent of one seed (numbers; returned as shape ``(1,)``).

    Raises:
        AgentContractError: not a mapping, a name that is not a string, or a value of the wrong
            type or shape.
    """
    if metrics is None:
        return {}
    if not isinstance(metrics, Mapping):
        raise AgentContractError(
            f"{who} returned {_shape(metrics)}; return a dict of metrics (or None), "
            'e.g. {"loss": loss}'
        )
    out = {}
    for name, value in metrics.items():
        if not isinstance(name, str) or not name:
            raise AgentContractError(f"{who} returned a metric named {name!r}; name it by a string")
        if replicas is None:
            ok = isinstance(value, Real) and not isinstance(value, bool)
            ok = ok or (isinstance(value, torch.Tensor) and value.numel() == 1)
            if not ok:
                raise AgentContractError(
                    f"{who} returned {name}={_shape(value)}; an agent without replicas returns "
                    "one number per metric (a float or a one-element tensor)"
                )
            out[name] = torch.as_tensor(value).detach().to(torch.float64).reshape(1)
            continue
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != (replicas,):
            raise AgentContractError(
                f"{who} returned {name}={_shape(value)}; a replica agent returns a tensor of "
                f"shape (R,) = ({replicas},) per metric, one value per seed"
            )
        if value.dtype == torch.bool or value.is_complex():
            raise AgentContractError(
                f"{who} returned {name} as a {value.dtype} tensor; return real numbers"
            )
        out[name] = value.detach()
    return out
