"""The held-out score at each task's end, for streams with a test split per task.

A stream that is a :class:`~contlearn.envs.protocol.HeldOutStream` with a non-empty
``held_out_metric`` (the image streams: ``test_accuracy``) has its agent scored, after the
last step of every task and without learning, on every held-out example of that task: the
agent's ``outputs(obs)`` (:class:`~contlearn.agents.protocol.SupportsOutputs`) in chunks of
:data:`HELD_OUT_CHUNK` examples per replica, rated by the stream's ``score``, averaged. The
loop emits it as a ``task_end`` record of its own, at the task's last step. A task cut short
by the run's end gets none (it never ended). An agent without ``outputs`` is refused when the
configuration is resolved (:func:`check_held_out`) and again when the loop is made (an agent
built by hand): the stream's ``held_out=false`` runs it without the held-out score.
"""

from __future__ import annotations

from typing import Any

import torch

from contlearn.agents.protocol import SupportsOutputs
from contlearn.envs.protocol import HeldOutStream
from contlearn.errors import ConfigError

#: examples per replica scored at once
HELD_OUT_CHUNK = 1000


def _refusal(stream: str, agent: str) -> ConfigError:
    return ConfigError(
        f"stream {stream} scores a held-out split at each task's end, which needs the agent's "
        f"outputs(obs) (no learning); agent {agent} has none: add outputs() or set held_out=false"
    )


def held_out_metric(stream: Any, agent: Any) -> str:
    """The metric the loop records at each task's end for ``stream`` (``""``: none).

    Raises:
        ConfigError: the stream has a held-out split but the agent cannot answer without
            learning (no ``outputs``).
    """
    if not isinstance(stream, HeldOutStream) or not stream.held_out_metric:
        return ""
    if not isinstance(agent, SupportsOutputs):
        raise _refusal(stream.info.name, getattr(agent, "name", type(agent).__name__))
    return stream.held_out_metric


def check_held_out(agent_cls: Any, agent: str, stream_cls: Any, stream_spec: Any) -> None:
    """Refuse, before anything is written, an agent class without ``outputs`` on a stream
    that scores a held-out split (the same refusal :func:`held_out_metric` makes in the loop).

    Raises:
        ConfigError: one line naming the stream, the agent and both ways out.
    """
    scores = callable(getattr(stream_cls, "held_out_batches", None))
    scores = scores and bool(getattr(stream_spec, "held_out", True))
    if scores and not callable(getattr(agent_cls, "outputs", None)):
        raise _refusal(str(getattr(stream_cls, "name", stream_cls)), agent)


@torch.no_grad()
def held_out_score(stream: HeldOutStream, agent: SupportsOutputs) -> torch.Tensor:
    """Each replica's mean score ``(R,)`` float64 on the current task's held-out split."""
    total: torch.Tensor | None = None
    count = 0
    for obs, target in stream.held_out_batches(HELD_OUT_CHUNK):
        outputs = agent.outputs(obs)
        score = stream.score(outputs.to(target.device), target)
        part = score.sum(1, dtype=torch.float64)  # (R,)
        total = part if total is None else total + part
        count += target.shape[1]
    if total is None:
        return torch.full((len(stream.seeds),), torch.nan, dtype=torch.float64)
    return total / count
