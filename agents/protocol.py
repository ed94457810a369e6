"""The Agent Protocol and its optional capabilities: what the engine may ask of an agent.

No base class to inherit: every contract here is a ``typing.Protocol`` checked at run time
(``isinstance(agent, SupportsCheckpoints)``). An agent answers each observation (``act``) and
then learns from the stream's feedback (``observe``); online accuracy is scored on the answer
given by ``act``, before ``observe`` updates anything. Tensors carry a leading replica dim ``R``
when the agent's class declares ``supports_replicas = True``; otherwise the engine runs seeds one
after another and the agent sees plain ``(B, ...)`` tensors.

Everything else is optional, one small Protocol per capability, each used when the agent has
it. The engine (:mod:`contlearn.loop.engine`, :mod:`contlearn.loop.rl`), the probes
(:mod:`contlearn.probes`) and the runner (:mod:`contlearn.running.runner`) look up no other
name on an agent:

- :class:`SupportsTaskStart` ``on_task_start(task)``: called at a task's first step, only when
  the stream's ``boundaries_visible`` is true;
- :class:`SupportsCheckpoints` ``state_dict()`` / ``load_state_dict(state)``: checkpoints and
  exact resume (without them a run cannot be resumed);
- probing (docs/design.md §5; :class:`contlearn.agents.online.OnlineAgent` has them all):
  :class:`SupportsFeatures` ``features(obs)`` (hidden activations ``{layer: (R, B, H)}``),
  :class:`SupportsParameters` ``parameters()`` and ``activation`` (the current parameters
  ``{name: (R, ...)}`` and the hidden nonlinearity, for the weight probes; an agent without
  them may offer :class:`SupportsNetwork` ``net.params`` and ``net.activation`` instead),
  :class:`SupportsUpdateStats` ``update_stats()`` (training statistics since the last call, such
  as ``grad_magnitude``, read at every probe point), :class:`SupportsGradientWatch`
  ``watch_gradients(on)`` (called first if the run records ``grad_magnitude``),
  :class:`SupportsProbeLoss` ``probe_loss(obs, target)`` (``plasticity``),
  :class:`SupportsOutputs` ``outputs(obs)`` (the network's outputs without learning:
  ``churn``),
  :class:`SupportsGoodnessGap` ``goodness_gap(obs, target)`` (Forward-Forward's goodness gap),
  :class:`SupportsProbeSnapshot` ``probe_snapshot()`` (a copy of the network that stays valid
  while the agent learns on: the engine then probes on another thread) and
  :class:`SupportsDiagnostics` ``diagnostics()`` (learner bookkeeping such as CBP's
  replacements, recorded per layer);
- threads: :class:`SupportsPreferredThreads` ``preferred_threads()`` (torch's intra-op threads
  for the run's loop, 0: leave them), :class:`SupportsProbeThreads` ``probe_threads()`` (the
  same while probing), :class:`SupportsReplicaWorkers` ``replica_workers`` (set by the runner
  from the ``threads`` option) and ``block_workers()`` (the threads it then uses);
- :class:`SupportsDevice` ``to(device)``: runs with ``device`` other than ``cpu``;
- :class:`SupportsBlocks` ``block_ready(batch_size)`` / ``learn_block(obs, target)``: learn T
  supervised steps in one call (the stream must have ``next_block``);
- :class:`SupportsStopReplicas` ``stop_replicas(mask)``: stop learning in diverged replicas;
- :class:`SupportsRLMetrics` ``rl_metrics``: whether the RL loop records ``observe``'s
  metrics as they come (``"update"``) or per episode (``"episode"``, the default);
- :class:`SupportsClose` ``close()``: release what the agent holds (worker processes) at the
  end of its run.

On the agent's *class* the runner reads ``supports_replicas`` (:func:`supports_replicas`) and,
for the built-in agents, ``Spec`` (:class:`BuiltinAgentClass`); the config resolver also reads
``unsupported_learners`` (``{learner: reason}``), ``refused_options`` (``{config key: reason}``:
options other agents have that it lacks) and ``stream_kinds`` (the ``StreamInfo.kind``
values it learns on; others are refused) where a class declares them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import torch

#: Per-step metrics an agent returns from ``observe``: name -> tensor of shape (R,) (or scalar).
Metrics = dict[str, torch.Tensor]
#: Per-layer values: ``{metric: {layer: (R,)}}`` (probes, ``update_stats``) or
#: ``{layer: {metric: (R,)}}`` (``diagnostics``).
Nested = dict[str, dict[str, torch.Tensor]]


@runtime_checkable
class Agent(Protocol):
    """A learner on a stream (see the module docstring for the optional capabilities)."""

    def act(self, obs: torch.Tensor) -> torch.Tensor:
        """Predictions for ``obs``: ``(R, B, ...)`` in, ``(R, B, num_outputs)`` out."""
        ...

    def observe(self, obs: torch.Tensor, action: torch.Tensor, feedback: Any) -> Metrics:
        """Learn from the feedback (supervised: the target; RL: a ``Feedback``) for the answer
        ``action``."""
        ...


@runtime_checkable
class SupportsTaskStart(Protocol):
    """Told when a task starts (streams with visible boundaries only)."""

    def on_task_start(self, task: int) -> None:
        """Task ``task`` (counted from 0) starts with the next step."""
        ...


@runtime_checkable
class SupportsCheckpoints(Protocol):
    """Saves and restores its whole state (checkpoints, exact resume)."""

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly (tensors and plain types)."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        ...


@runtime_checkable
class SupportsFeatures(Protocol):
    """Shows its hidden activations (what the probes read)."""

    def features(self, obs: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{layer: (R, P, H)}`` for inputs ``(R, P, ...)``, without learning."""
        ...


@runtime_checkable
class ProbedNetwork(Protocol):
    """What the weight probes read of a network."""

    params: Mapping[str, torch.Tensor]
    activation: str


@runtime_checkable
class SupportsParameters(Protocol):
    """Hands out its current parameters (any deferred update applied) for the weight probes."""

    activation: str

    def parameters(self) -> Mapping[str, torch.Tensor]:
        """``{"<layer>.weight": (R, out, in), "<layer>.bias": (R, out), ...}``."""
        ...


@runtime_checkable
class SupportsNetwork(Protocol):
    """Has a network whose parameters the weight probes read (``net.params``, by name)."""

    net: ProbedNetwork


@runtime_checkable
class SupportsUpdateStats(Protocol):
    """Keeps statistics of its training steps between probe points."""

    def update_stats(self) -> Nested:
        """``{metric: {layer: (R,)}}`` since the last call, then starts afresh."""
        ...


@runtime_checkable
class SupportsGradientWatch(Protocol):
    """Records gradient magnitudes only when asked (they cost time)."""

    def watch_gradients(self, on: bool = True) -> None:
        """Start (or stop) accumulating ``grad_magnitude`` for :meth:`update_stats`."""
        ...


@runtime_checkable
class SupportsProbeLoss(Protocol):
    """Computes its loss on a batch without learning (the ``plasticity`` probe)."""

    def probe_loss(self, obs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The loss ``(R,)`` on ``obs``/``target``."""
        ...


@runtime_checkable
class SupportsOutputs(Protocol):
    """Computes its network's outputs on a batch without learning (the ``churn`` probe)."""

    def outputs(self, obs: torch.Tensor) -> torch.Tensor:
        """The outputs ``(R, B, C)`` for ``obs`` (logits, or predictions for regression)."""
        ...


@runtime_checkable
class SupportsInitialParameters(Protocol):
    """Gives the parameters it started from (the ``distance_from_init`` probe); its probe
    snapshot gives the same."""

    def initial_parameters(self) -> dict[str, torch.Tensor]:
        """``{name: (R, ...)}`` as at the start of the run, named as ``parameters()``."""
        ...


@runtime_checkable
class SupportsHessianTrace(Protocol):
    """Estimates the trace of its loss Hessian on a batch (the ``hessian_trace`` probe)."""

    def hessian_trace(self, obs: torch.Tensor, target: torch.Tensor, samples: int) -> torch.Tensor:
        """Hutchinson's estimate of tr(∇²L) per replica ``(R,)`` from ``samples`` probes."""
        ...


@runtime_checkable
class SupportsCreditAlignment(Protocol):
    """Measures how its credit rule's feedback aligns with backprop (the
    ``feedback_alignment`` and ``weight_alignment`` probes)."""

    def credit_alignment(
        self, obs: torch.Tensor, target: torch.Tensor | None
    ) -> dict[str, dict[str, torch.Tensor]]:
        """``{probe: {layer: (R,)}}`` in degrees on ``obs``/``target`` (``target`` None: an RL
        probe batch, whose probes need none); empty under backprop."""
        ...

    def has_feedback(self) -> bool:
        """Whether its credit rule is not backprop (so there is an alignment to measure)."""
        ...


@runtime_checkable
class SupportsGoodnessGap(Protocol):
    """Measures the Forward-Forward goodness gap (the ``goodness_gap`` probe)."""

    def goodness_gap(self, obs: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{layer: (R,)}``: mean goodness on positive minus on negative inputs of the probe
        batch (``obs``, true labels ``target``)."""
        ...


@runtime_checkable
class SupportsProbeSnapshot(Protocol):
    """Copies its network so probes can run on another thread while it learns on."""

    def probe_snapshot(self) -> Any:
        """An object with ``features`` and ``net.params`` that stays valid while the agent
        learns, or None to have the probes run in line."""
        ...


@runtime_checkable
class SupportsDiagnostics(Protocol):
    """Reports its learner's bookkeeping (CBP: replacements, ages, ...)."""

    def diagnostics(self) -> Nested:
        """``{layer: {metric: (R,)}}``."""
        ...


@runtime_checkable
class SupportsPreferredThreads(Protocol):
    """Knows how many torch threads suit its loop."""

    def preferred_threads(self) -> int:
        """torch's intra-op threads for the run's loop (0: leave the setting as it is)."""
        ...


@runtime_checkable
class SupportsProbeThreads(Protocol):
    """Knows how many torch threads suit its probes."""

    def probe_threads(self) -> int:
        """torch's intra-op threads while probing (0: the loop's setting)."""
        ...


@runtime_checkable
class SupportsReplicaWorkers(Protocol):
    """Runs replicas on threads of its own; the runner sets how many may run at once."""

    replica_workers: int

    def block_workers(self) -> int:
        """The threads it uses for its replicas (from ``replica_workers`` if set)."""
        ...


@runtime_checkable
class SupportsDevice(Protocol):
    """Can move to another torch device."""

    def to(self, device: str | torch.device) -> Any:
        """Move to ``device``; returns the agent."""
        ...


@runtime_checkable
class SupportsBlocks(Protocol):
    """Learns T supervised steps in one call (the C block loop)."""

    def block_ready(self, batch_size: int) -> bool:
        """Whether steps of ``batch_size`` examples go through :meth:`learn_block`."""
        ...

    def learn_block(self, obs: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, Metrics]:
        """T steps (``obs (T, R, B, ...)``): the predictions made before each step's update,
        ``(T, R, B, num_outputs)``, and per-step metrics ``(T, R)``."""
        ...


@runtime_checkable
class SupportsStopReplicas(Protocol):
    """Can stop learning in some replicas (diverged ones) and go on with the others."""

    def stop_replicas(self, mask: torch.Tensor) -> None:
        """Stop every replica where ``mask`` ``(R,)`` is True."""
        ...


@runtime_checkable
class SupportsBackend(Protocol):
    """Names the path that runs its steps (:mod:`contlearn.backends`; ``meta.json`` ``backend``)."""

    backend: str


@runtime_checkable
class SupportsRLMetrics(Protocol):
    """Says how the RL loop records the metrics ``observe`` returns (:mod:`contlearn.loop.rl`)."""

    #: ``"update"``: they come once per update and are recorded as they come (PPO);
    #: ``"episode"`` (what an agent without this attribute gets): per-step metrics, averaged
    #: per replica over each episode
    rl_metrics: str


@runtime_checkable
class SupportsClose(Protocol):
    """Holds resources (worker processes) to release at the end of its run."""

    def close(self) -> None:
        """Release them; calling it twice is harmless."""
        ...


@runtime_checkable
class BuiltinAgentClass(Protocol):
    """A built-in agent class: configured by a ``Spec`` dataclass, built with
    ``Class(info, seeds, spec, learner)``."""

    Spec: type

    def __call__(self, info: Any, seeds: Any, spec: Any, learner: Any) -> Agent:
        """The agent over replicas ``seeds``."""
        ...


def supports_replicas(agent_cls: type | object) -> bool:
    """Whether an agent (class) takes all replicas at once (``supports_replicas = True``)."""
    return bool(getattr(agent_cls, "supports_replicas", False))


def require_agent_methods(agent: object) -> None:
    """Raise TypeError naming what is missing if ``agent`` does not satisfy :class:`Agent`
    (:func:`contlearn.agents.check_agent` checks much more, by running it)."""
    missing = [m for m in ("act", "observe") if not callable(getattr(agent, m, None))]
    if missing:
        raise TypeError(
            f"{type(agent).__name__} is not an agent: it lacks {', '.join(missing)}(); "
            "see contlearn.agents.Agent"
        )


#: every optional capability, by the Protocol that declares it
CAPABILITIES: tuple[type, ...] = (
    SupportsTaskStart,
    SupportsCheckpoints,
    SupportsFeatures,
    SupportsParameters,
    SupportsNetwork,
    SupportsUpdateStats,
    SupportsGradientWatch,
    SupportsProbeLoss,
    SupportsOutputs,
    SupportsCreditAlignment,
    SupportsInitialParameters,
    SupportsHessianTrace,
    SupportsGoodnessGap,
    SupportsProbeSnapshot,
    SupportsDiagnostics,
    SupportsPreferredThreads,
    SupportsProbeThreads,
    SupportsReplicaWorkers,
    SupportsDevice,
    SupportsBlocks,
    SupportsStopReplicas,
    SupportsBackend,
    SupportsRLMetrics,
    SupportsClose,
)


def capabilities(agent: object) -> list[str]:
    """The names of the optional capabilities ``agent`` has (for messages and tests)."""
    return [c.__name__ for c in CAPABILITIES if isinstance(agent, c)]
