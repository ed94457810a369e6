"""The loop over an RL stream: the agent acts on every env copy, the stream steps them all.

One step of :class:`RLLoop` is one step of the vector env for every replica (docs/design.md §1):
``action = agent.act(obs)``, the stream steps every copy, and ``agent.observe(obs, action,
feedback)`` gets the :class:`~contlearn.envs.rl_stream.Feedback` ``(reward, next_obs,
terminated, truncated)``. It has the interface of :class:`contlearn.loop.engine.SupervisedLoop`.

Records (values, not hooks):

- ``Record("episode", step, task, {"episode_return", "episode_length", "friction"},
  replica=r)`` at every episode end: episodes end at different steps in different replicas, so
  each record holds one replica's values ``(1,)``, and ``task`` is that replica's friction
  index. If several copies of a replica end an episode on the same step, the record holds
  their means (one row per seed and step). ``friction`` is left out for envs without one.
- ``Record("update", ...)`` with the metrics ``observe`` returns. An agent that returns them
  once per update (its class sets ``rl_metrics = "update"``; PPO: ``policy_loss``, ...) has
  them recorded as they come. Any other agent (``rl_metrics = "episode"``, the default: a
  plug-in returning a loss every step) has them averaged per replica over the steps since
  that replica's last episode end and recorded with the episode (``replica=r``, the episode's
  task), and the unfinished episodes' at the run's end: rows per episode, not per step.
- ``Record("diverged", step, task, {"diverged": (1,)}, replica=r)`` when replica r's update
  ``loss`` becomes non-finite (see ``on_divergence``).
- ``Record("probe", ...)`` every ``probe_every`` steps (default :data:`RL_PROBE_EVERY`), and
  at :meth:`RLLoop.finish`, computed with the current networks on the observations acted on in
  the stream's last ``probe_window`` steps (the paper's last 1000 steps):

  - ``dormant_fraction``: for RL, the paper's definition: share of units active (non-zero;
    ReLU: positive) on at most 1% of those inputs (:func:`activity_dormant_fraction`);
  - ``dead_fraction``, ``effective_rank``, ``approx_rank``, ``stable_rank``,
    ``weight_magnitude``: the probes of :mod:`contlearn.probes.measures`, per hidden layer
    (``policy.hidden2`` is the policy's last hidden layer);
  - ``grad_magnitude`` (mean |g| of a minibatch update; PPO samples the first minibatch of
    every epoch) and ``weight_change`` (mean |Δθ| per rollout's update phase), averaged
    since the previous probe, from the agent's ``update_stats()``; the learner's
    ``diagnostics()`` (CBP: ``replacements``, ``mean_age``, ...).

Records whose values cover every replica carry the replicas' common task; while the replicas'
tasks differ (around a friction change) they are split per replica so every row's ``task`` is
its replica's.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from contlearn.agents.contract import check_action, check_metrics
from contlearn.agents.protocol import (
    Agent,
    SupportsDiagnostics,
    SupportsFeatures,
    SupportsRLMetrics,
)
from contlearn.envs.protocol import RLStreamProtocol
from contlearn.loop.engine import ProbeSchedule, SteppingLoop
from contlearn.loop.progress import Progress
from contlearn.loop.records import Record, mark_diverged
from contlearn.probes.measures import PROBES, ProbeContext, _with_aggregate, network_of
from contlearn.probes.schedule import update_stats

if TYPE_CHECKING:  # (importing it imports mujoco)
    from contlearn.envs.rl_stream import EpisodeEnd

#: Probe interval of RL runs when ``probe_every`` is 0 (the reference logs ranks every 10k).
RL_PROBE_EVERY = 10_000
#: A unit active on at most this share of the window's inputs is dormant (Dohare et al. 2024).
DORMANT_ACTIVITY = 0.01


def activity_dormant_fraction(
    features: dict[str, torch.Tensor], threshold: float = DORMANT_ACTIVITY
) -> dict[str, torch.Tensor]:
    """Share of units active (activation ≠ 0) on at most ``threshold`` of the inputs.

    Args:
        features: ``{layer: (R, P, H)}``.
        threshold: the activity share at or below which a unit is dormant.

    Returns:
        ``{layer: (R,)}`` plus ``""``, the share over all layers' units.
    """
    out = {}
    for layer, h in features.items():
        activity = (h != 0).to(torch.float64).mean(1)  # (R, H)
        out[layer] = (activity <= threshold).to(torch.float64).mean(1)
    return _with_aggregate(out, {k: v.shape[-1] for k, v in features.items()})


class RLLoop(SteppingLoop):
    """The loop over an RL stream, resumable between any two steps.

    Args:
        stream: an RL stream (:class:`~contlearn.envs.protocol.RLStreamProtocol`).
        agent: an agent over all of the stream's replicas (``act``, ``observe``).
        emit: called with every :class:`~contlearn.loop.records.Record`.
        progress: optional progress display (shows the mean of the last episode returns).
        probes: which probes to run; ``every`` 0 means :data:`RL_PROBE_EVERY` steps.
        on_divergence: what a non-finite update ``loss`` does: ``mark`` (record ``diverged``
            for that replica, stop its learning, go on with the others) or ``stop`` (raise).
    """

    stream: RLStreamProtocol

    def __init__(
        self,
        stream: RLStreamProtocol,
        agent: Agent,
        emit: Callable[[Record], None],
        progress: Progress | None = None,
        probes: ProbeSchedule | None = None,
        on_divergence: str = "mark",
    ) -> None:
        super().__init__(stream, agent, emit, progress, on_divergence)
        self.names = probes.names if probes is not None else ()
        every = probes.every if probes is not None else None
        self.every = (every or RL_PROBE_EVERY) if self.names else 0
        self.last_probe = -1
        self.recent: deque[float] = deque(maxlen=10 * self.info.num_replicas)
        self.per_episode = not (
            isinstance(agent, SupportsRLMetrics) and agent.rl_metrics == "update"
        )
        #: per-step metrics since each replica's last episode end: sums and counts ``(R,)``
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, torch.Tensor] = {}

    def step(self) -> None:
        """One step of every env copy: act, step the stream, observe, record."""
        stream, agent = self.stream, self.agent
        before = stream.step
        obs = stream.obs
        action = agent.act(obs)
        if self.checked:
            shape = (*obs.shape[:2], self.info.num_outputs)
            action = check_action(f"{self.checked}.act", action, shape)
        feedback, ended = stream.advance(action)
        metrics = agent.observe(obs, action, feedback)
        if self.checked:
            metrics = check_metrics(f"{self.checked}.observe", metrics, self.info.num_replicas)
        metrics = metrics or {}
        step = stream.step
        if metrics:
            if self.per_episode:
                self._accumulate(metrics)
            else:
                self._emit_all("update", step, metrics)
            if "loss" in metrics:
                self._check_divergence(metrics["loss"])
        if ended:
            self._episodes(step, ended)
        if self.every and step // self.every > before // self.every:  # (steps of E at once)
            self._probe(step)
        if self.progress is not None:
            self.progress.update(step, int(stream.task.max()), self._running)

    def _accumulate(self, metrics: dict[str, torch.Tensor]) -> None:
        R = self.info.num_replicas
        for name, value in metrics.items():
            v = value.detach().to(torch.float64).reshape(-1).expand(R)
            if name not in self.sums:
                self.sums[name] = torch.zeros(R, dtype=torch.float64)
                self.counts[name] = torch.zeros(R, dtype=torch.float64)
            self.sums[name] += v
            self.counts[name] += 1

    def _episode_metrics(self, step: int, replica: int, task: int) -> None:
        """Emit replica ``replica``'s per-step metric means since its last one, and restart."""
        values = {
            name: (self.sums[name][replica] / n[replica]).reshape(1)
            for name, n in self.counts.items()
            if n[replica] > 0
        }
        if values:
            self.emit(Record("update", step, task, values, replica=replica))
        for name in self.counts:
            self.sums[name][replica] = 0.0
            self.counts[name][replica] = 0.0

    def _running(self) -> float:
        return float(np.mean(self.recent)) if self.recent else float("nan")

    def _emit_all(
        self, kind: str, step: int, values: dict[str, torch.Tensor], layer: str = ""
    ) -> None:
        """Emit values ``(R,)`` with each replica's task (split per replica if they differ)."""
        tasks = self.stream.task
        if (tasks == tasks[0]).all():
            self.emit(Record(kind, step, int(tasks[0]), values, layer))
            return
        for r, task in enumerate(tasks.tolist()):
            self.emit(
                Record(
                    kind, step, task, {k: v[r : r + 1] for k, v in values.items()}, layer, replica=r
                )
            )

    def replica_task(self, replica: int) -> int:
        """The friction index of the replica's world."""
        return int(self.stream.task[replica])

    def _episodes(self, step: int, ended: Sequence[EpisodeEnd]) -> None:
        """One ``episode`` record per replica with an episode end on this step."""
        for r in sorted({e.replica for e in ended}):
            mine = [e for e in ended if e.replica == r]
            ret = float(np.mean([e.ret for e in mine]))
            values = {
                "episode_return": ret,
                "episode_length": float(np.mean([e.length for e in mine])),
            }
            friction = float(np.mean([e.friction for e in mine]))
            if not np.isnan(friction):
                values["friction"] = friction
            self.recent.extend(e.ret for e in mine)
            task = max(e.task for e in mine)
            self.emit(
                Record(
                    "episode",
                    step,
                    task,
                    {k: torch.tensor([v], dtype=torch.float64) for k, v in values.items()},
                    replica=r,
                )
            )
            if self.counts:
                self._episode_metrics(step, r, task)

    def _probe(self, step: int) -> None:
        """Probe the agent on the stream's recent observations (see the module docstring)."""
        self.last_probe = step
        results: dict[str, dict[str, torch.Tensor]] = {}
        agent = self.agent
        obs = self.stream.probe_batch()  # (R, P, obs_dim)
        if isinstance(agent, SupportsFeatures) and obs.shape[1] > 0:
            features = agent.features(obs)
            all_params, activation = network_of(agent)
            params = {k: v for k, v in all_params.items() if k.endswith((".weight", ".bias"))}
            ctx = ProbeContext(features, params, activation, agent, obs)
            for name in self.names:
                values = (
                    activity_dormant_fraction(features)
                    if name == "dormant_fraction"
                    else PROBES[name](ctx)
                )
                if values:
                    results[name] = values
        for metric, by_layer in update_stats(agent).items():
            if metric != "grad_magnitude" or metric in self.names:
                results[metric] = by_layer
        for metric, by_layer in results.items():
            for layer, per_replica in by_layer.items():
                marked = mark_diverged(per_replica, self.diverged)
                self._emit_all("probe", step, {metric: marked}, layer)
        diagnostics = agent.diagnostics() if isinstance(agent, SupportsDiagnostics) else {}
        for layer, values in diagnostics.items():
            self._emit_all("probe", step, values, layer)

    def finish(self) -> None:
        """Probe once more at the last step, unless that step was just probed; record the
        unfinished episodes' per-step metric means."""
        if self.every and self.stream.step > 0 and self.last_probe != self.stream.step:
            self._probe(self.stream.step)
        for r in range(self.info.num_replicas) if self.counts else ():
            self._episode_metrics(self.stream.step, r, self.replica_task(r))

    def state_dict(self) -> dict[str, Any]:
        """The loop's own state: last probe, diverged replicas, returns shown by the bar, and
        the per-step metrics summed since each replica's last episode end."""
        return {
            "last_probe": self.last_probe,
            "diverged": self.diverged.clone(),
            "recent": list(self.recent),
            "sums": {k: v.clone() for k, v in self.sums.items()},
            "counts": {k: v.clone() for k, v in self.counts.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.last_probe = int(state["last_probe"])
        self.diverged = state["diverged"].clone()
        self.recent.clear()
        self.recent.extend(float(v) for v in state["recent"])
        # (checkpoints from before per-episode metrics have none pending)
        self.sums = {k: v.clone() for k, v in state.get("sums", {}).items()}
        self.counts = {k: v.clone() for k, v in state.get("counts", {}).items()}
