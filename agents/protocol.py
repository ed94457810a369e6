"""The Agent Protocol: what the engine needs of an agent. No base class to inherit.

An agent answers each observation (``act``) and then learns from the stream's feedback
(``observe``). Online accuracy is scored on the answer given by ``act``, before ``observe``
updates anything. Tensors carry a leading replica dim ``R`` when the agent declares
``supports_replicas = True``; otherwise the engine runs seeds one after another and the agent
sees plain ``(B, ...)`` tensors.

Optional methods, used when present: ``on_task_start(task: int)`` (called only when the stream's
``boundaries_visible`` is true), ``state_dict()`` / ``load_state_dict(state)`` (checkpoints),
and for probes (docs/design.md §5; :class:`contlearn.agents.online.OnlineAgent` has them all):

- ``features(obs) -> dict[str, Tensor]``: hidden activations ``{layer: (R, B, H)}``;
- ``update_stats() -> {metric: {layer: (R,)}}``: statistics of the training steps since the
  last call (``grad_magnitude``), which the engine calls at every probe point;
  ``watch_gradients(on)`` is called first if the run records ``grad_magnitude``;
- ``probe_loss(obs, target) -> (R,)``: the loss on a batch without learning (``plasticity``);
- ``probe_snapshot()``: a copy of the network with ``features`` and ``net.params`` that stays
  valid while the agent learns on (the engine then probes on another thread).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

#: Per-step metrics an agent returns from ``observe``: name -> tensor of shape (R,) (or scalar).
Metrics = dict[str, torch.Tensor]


@runtime_checkable
class Agent(Protocol):
    """A learner on a stream (see the module docstring)."""

    def act(self, obs: torch.Tensor) -> torch.Tensor:
        """Predictions for ``obs``: ``(R, B, ...)`` in, ``(R, B, num_outputs)`` out."""
        ...

    def observe(self, obs: torch.Tensor, action: torch.Tensor, feedback: torch.Tensor) -> Metrics:
        """Learn from the feedback (supervised: the target) for the answer ``action``."""
        ...


def check_agent(agent: object) -> None:
    """Raise TypeError naming what is missing if ``agent`` does not satisfy :class:`Agent`."""
    missing = [m for m in ("act", "observe") if not callable(getattr(agent, m, None))]
    if missing:
        raise TypeError(
            f"{type(agent).__name__} is not an agent: it lacks {', '.join(missing)}(); "
            "see contlearn.agents.Agent"
        )
