"""The one loop: a stream shows inputs, the agent answers, the stream's feedback teaches it.

The engine counts steps and tasks and emits records (values, not hooks;
:class:`~contlearn.loop.records.Record`). A supervised loop emits::

    Record("task_start", step, task, {})                  # before the task's first step
    Record("probe", step, task, {metric: (R,)}, layer)     # at probe points (see below)
    Record("task_end", step, task, {"accuracy": (R,), "loss": (R,), ...})
    Record("task_end", step, task, {"test_accuracy": (R,)})  # held-out streams, after the
                                                          # task's last step
    Record("diverged", step, task, {"diverged": (1,)}, replica=r)  # a non-finite loss

``task_end`` carries the task's online score (scored on the answer given *before* each update)
and the mean of every per-step metric the agent returned; agents with ``diagnostics()``
(:class:`~contlearn.agents.protocol.SupportsDiagnostics`: learner bookkeeping such as CBP's
replacement count) add one ``task_end`` record per layer. ``probe`` records come at the start
of every task, or every ``probe_every`` steps (:class:`ProbeSchedule`). A run that stops
mid-task emits a ``task_end`` for the partial task. There are no per-step records: per-step
metrics reach the store as their task's means. Consumers (the run store's writer,
:func:`~contlearn.loop.records.write_record`) never write back. The RL loop
(:mod:`contlearn.loop.rl`) shares :class:`SteppingLoop` and emits its own kinds.

What the loop asks of the agent beyond ``act``/``observe`` is each an optional capability of
:mod:`contlearn.agents.protocol`, checked with ``isinstance`` once, when the loop is made.

(Over 400 lines: the supervised loop and the stepping machinery the RL loop shares; split,
the record order above would be spread over files.)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, cast

import torch

from contlearn.agents.contract import check_action, check_metrics
from contlearn.agents.protocol import (
    Agent,
    SupportsBlocks,
    SupportsDiagnostics,
    SupportsGradientWatch,
    SupportsOutputs,
    SupportsProbeLoss,
    SupportsProbeSnapshot,
    SupportsProbeThreads,
    SupportsStopReplicas,
    SupportsTaskStart,
)
from contlearn.envs.protocol import BlockStream, HeldOutStream, Stream, SupervisedStreamProtocol
from contlearn.errors import ContlearnError
from contlearn.loop.held_out import held_out_metric, held_out_score
from contlearn.loop.progress import Progress
from contlearn.loop.records import Record, TaskTotals, mark_diverged, results_records
from contlearn.probes.measures import AFTER_STEP, SNAPSHOT_SAFE, probes_for, run_step_probes
from contlearn.probes.schedule import (  # noqa: F401 (the runner takes torch_threads from here)
    ProbeSchedule,
    scheduled_results,
    submit_probes,
    torch_threads,
)

#: the wall time a block of steps aims at (see :meth:`SupervisedLoop.advance`)
BLOCK_SECONDS = 0.25


class DivergenceError(ContlearnError):
    """A replica's loss became NaN or infinite and the run was set to stop on divergence."""


def probe_records(
    schedule: ProbeSchedule,
    stream: SupervisedStreamProtocol,
    agent: Agent,
    step: int,
    task: int,
    diverged: torch.Tensor | None = None,
    memory: dict[str, torch.Tensor] | None = None,
) -> list[Record]:
    """Run the scheduled probes that precede the probe step's update, on a fresh probe batch of
    the current task and the agent's ``update_stats()`` since the last probe (NaN for the
    ``diverged`` replicas; ``memory``: what probes keep across probe points)."""
    results = scheduled_results(schedule, stream, agent, memory)
    return results_records(step, task, results, diverged)


class SteppingLoop:
    """What every loop shares: stepping to a target with stops and checkpoints.

    Subclasses have ``stream`` (with a ``step`` count) and ``step()``.
    """

    stream: Any  # a Stream of the loop's kind (SupervisedStreamProtocol, RLStreamProtocol)
    agent: Agent
    emit: Callable[[Record], None]
    diverged: torch.Tensor  # (R,) bool
    on_divergence: str
    #: the class name of a plug-in replica agent whose returns are checked every step
    #: (:mod:`contlearn.agents.contract`); empty: trusted (built-in agents, and one-seed
    #: agents, which their adapter checks)
    checked: str = ""

    def __init__(
        self,
        stream: Stream,
        agent: Agent,
        emit: Callable[[Record], None],
        progress: Progress | None,
        on_divergence: str,
    ) -> None:
        self.stream, self.agent, self.emit = stream, agent, emit
        self.progress, self.on_divergence = progress, on_divergence
        self.info = stream.info
        self.diverged = torch.zeros(stream.info.num_replicas, dtype=torch.bool)

    def step(self) -> None:
        """One step of the loop."""
        raise NotImplementedError

    def advance(self, limit: int) -> None:
        """At least one and at most ``limit`` steps (default: one :meth:`step`)."""
        self.step()

    def settle(self) -> None:
        """Emit whatever is still being computed (e.g. concurrent probes): :meth:`run` calls
        it before a checkpoint and before it returns, so a checkpoint has every record."""

    def replica_task(self, replica: int) -> int:
        """The task replica ``replica`` is on."""
        raise NotImplementedError

    def finish(self) -> None:
        """Emit what the run's end adds (the partial task's end, a last probe)."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """The loop's own state (a checkpoint's ``loop``)."""
        raise NotImplementedError

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        raise NotImplementedError

    def _check_divergence(self, loss: torch.Tensor, step: int | None = None) -> None:
        """Detect replicas whose loss just became NaN or infinite (at ``step``, default: the
        stream's step count)."""
        bad = ~torch.isfinite(loss.detach().reshape(-1)) & ~self.diverged
        if not bool(bad.any()):
            return
        step = self.stream.step if step is None else step
        replicas = [int(r) for r in bad.nonzero().flatten()]
        for r in replicas:
            self.emit(
                Record(
                    "diverged", step, self.replica_task(r), {"diverged": torch.ones(1)}, replica=r
                )
            )
        if self.on_divergence == "stop":
            seeds = [self.stream.seeds[r] for r in replicas]
            raise DivergenceError(
                f"seed {', '.join(map(str, seeds))} diverged (non-finite loss) at step "
                f"{step}; lower lr, or set on_divergence=mark to let the other seeds go on"
            )
        self.diverged |= bad
        if isinstance(self.agent, SupportsStopReplicas):
            self.agent.stop_replicas(self.diverged.clone())

    def run(
        self,
        steps: int,
        stop: Callable[[], bool] | None = None,
        checkpoint: Callable[[], None] | None = None,
        checkpoint_due: Callable[[int], bool] | None = None,
    ) -> bool:
        """Step until ``steps`` steps are done (global count) or ``stop()`` says so.

        Args:
            steps: the step count to stop at.
            stop: polled before every step (e.g. a signal flag).
            checkpoint: called after a step when ``checkpoint_due(step)`` is true.
            checkpoint_due: when to checkpoint.

        Returns:
            True if all steps were done, False if stopped early.
        """
        while self.stream.step < steps:
            if stop is not None and stop():
                self.settle()
                return False
            limit = steps - self.stream.step
            if checkpoint is not None and checkpoint_due is not None:
                upcoming = getattr(checkpoint_due, "steps_to_next", lambda step: 1)
                limit = min(limit, upcoming(self.stream.step))
            self.advance(limit)
            if (
                checkpoint is not None
                and checkpoint_due is not None
                and checkpoint_due(self.stream.step)
            ):
                self.settle()
                checkpoint()
        self.settle()
        return True


class SupervisedLoop(SteppingLoop):
    """The loop over a supervised stream, resumable between any two steps.

    Args:
        stream: a supervised stream (``next``, ``score``, ``info``; see ``contlearn.envs.base``).
        agent: an agent over all of the stream's replicas (``act``, ``observe``).
        emit: called with every :class:`Record`.
        progress: optional progress display.
        probes: when to run which probes (default: none).
        on_divergence: what a non-finite loss does: ``mark`` (record ``diverged`` for that
            replica, stop its learning, go on with the others) or ``stop`` (raise).
    """

    stream: SupervisedStreamProtocol

    def __init__(
        self,
        stream: SupervisedStreamProtocol,
        agent: Agent,
        emit: Callable[[Record], None],
        progress: Progress | None = None,
        probes: ProbeSchedule | None = None,
        on_divergence: str = "mark",
    ) -> None:
        super().__init__(stream, agent, emit, progress, on_divergence)
        self.probes = probes
        self.totals = TaskTotals(self.info.num_replicas)
        self.task = stream.task
        #: the held-out score recorded after each task's last step ("": none; held_out.py)
        self.held_out = held_out_metric(stream, agent)
        self._diagnostics = agent.diagnostics if isinstance(agent, SupportsDiagnostics) else None
        self._on_task_start = (
            agent.on_task_start
            if self.info.boundaries_visible and isinstance(agent, SupportsTaskStart)
            else None
        )
        # (blocks of steps when the stream and the agent both can: see advance)
        self._blocks = isinstance(stream, BlockStream) and isinstance(agent, SupportsBlocks)
        self._step_seconds = 0.01  # running estimate of a step's time in blocks
        # (the probes that measure something on this agent)
        names = probes_for(probes.names, agent) if probes is not None else []
        # after-step probes (plasticity) need the loss of a sample after its update
        self._after_step = bool(AFTER_STEP.intersection(names)) and isinstance(
            agent, SupportsProbeLoss
        )
        self._probe_point: tuple[int, int] | None = None  # (step, task) awaiting them
        # probes computed on another thread while a block learns (learn_block only): the
        # built-in ones, on agents that can copy their network, when a probe uses one thread
        # (and only when some probe needs the probe batch: the in-line path draws none else)
        self._concurrent = (
            any(n not in AFTER_STEP for n in names)
            and isinstance(agent, SupportsProbeSnapshot)
            and all(n in SNAPSHOT_SAFE or n in AFTER_STEP for n in names)
            and probes is not None
            and probes.threads <= 1
            and isinstance(agent, SupportsProbeThreads)
            and agent.probe_threads() == 1
        )
        self._in_flight: tuple[int, int, Future, torch.Tensor] | None = None
        #: what probes keep from one probe point to the next (checkpointed)
        self.probe_memory: dict[str, torch.Tensor] = {}
        if "grad_magnitude" in names and isinstance(agent, SupportsGradientWatch):
            agent.watch_gradients(True)

    def _end_task(self, step: int) -> None:
        self.emit(Record("task_end", step, self.task, self.totals.means(self.info.metric)))
        self.totals.reset()
        for layer, values in (self._diagnostics() if self._diagnostics else {}).items():
            self.emit(Record("task_end", step, self.task, values, layer))

    def _begin(self, batch: Any, done: int, concurrent: bool = False) -> float:
        """Before learning on ``batch`` (``done`` steps completed): the task boundary it may
        start and the probes due (if ``concurrent`` and they can, started on the probe thread:
        :meth:`settle` emits them); returns the seconds spent probing."""
        if batch.new_task:
            if self.totals.steps:
                self._end_task(done)
            self.task = batch.task
            self.emit(Record("task_start", done, self.task, {}))
            if self._on_task_start is not None:
                self._on_task_start(self.task)
        if self.probes is None or not self.probes.due(done, batch.new_task):
            return 0.0
        start = time.perf_counter()
        self.settle()  # (the previous probe's records first)
        future = (
            # (_concurrent holds only for a SupportsProbeSnapshot agent)
            submit_probes(self.probes, self.stream, cast(SupportsProbeSnapshot, self.agent))
            if (concurrent and self._concurrent)
            else None
        )
        if future is not None:
            self._in_flight = (done, self.task, future, self.diverged.clone())
        else:
            records = probe_records(
                self.probes,
                self.stream,
                self.agent,
                done,
                self.task,
                self.diverged,
                self.probe_memory,
            )
            for record in records:
                self.emit(record)
        if self._after_step:
            self._probe_point = (done, self.task)
        return time.perf_counter() - start

    def settle(self) -> None:
        """Emit the records of the probes running concurrently, waiting for them if need be
        (before the next probe, a checkpoint, the end)."""
        if self._in_flight is not None:
            step, task, future, diverged = self._in_flight
            self._in_flight = None
            for record in results_records(step, task, future.result(), diverged):
                self.emit(record)

    def _after_step_probes(
        self, obs: torch.Tensor, target: torch.Tensor, metrics: dict[str, torch.Tensor]
    ) -> None:
        """The after-step probes of the probe point just passed: the step's loss before its
        update (``metrics["loss"]``, ``(R,)``) and after it, on the same sample."""
        point, self._probe_point = self._probe_point, None
        if point is None or "loss" not in metrics or self.probes is None:
            return
        assert isinstance(self.agent, SupportsProbeLoss)  # (else no probe point is kept)
        after = self.agent.probe_loss(obs, target)
        results = run_step_probes(self.probes.names, self.agent, metrics["loss"], after)
        for record in results_records(*point, results, self.diverged):
            self.emit(record)

    def step(self) -> None:
        """One step: maybe a task boundary and probes, then act, observe and score."""
        stream, agent = self.stream, self.agent
        batch = stream.next()
        self._begin(batch, stream.step - 1)
        pred = agent.act(batch.obs)
        if self.checked:
            shape = (*batch.obs.shape[:2], self.info.num_outputs)
            pred = check_action(f"{self.checked}.act", pred, shape)
            metrics = check_metrics(
                f"{self.checked}.observe",
                agent.observe(batch.obs, pred, batch.target),
                self.info.num_replicas,
            )
        else:
            metrics = agent.observe(batch.obs, pred, batch.target) or {}
        if "loss" in metrics:
            self._check_divergence(metrics["loss"])
        if self._probe_point is not None:
            self._after_step_probes(batch.obs, batch.target, metrics)
        self.totals.add(stream.score(pred, batch.target), metrics)
        self._held_out_if_due()
        if self.progress is not None:
            self.progress.update(stream.step, self.task, self.totals.running)

    def _held_out_if_due(self) -> None:
        """After a task's last step: its held-out score (``contlearn/loop/held_out.py``)."""
        stream = cast(HeldOutStream, self.stream)
        if self.held_out and stream.step == stream.task_ends_at:
            score = held_out_score(stream, cast(SupportsOutputs, self.agent))
            values = {self.held_out: mark_diverged(score, self.diverged)}
            self.emit(Record("task_end", stream.step, self.task, values))

    def advance(self, limit: int) -> None:
        """A block of up to ``limit`` steps when the stream and the agent can take one
        (``next_block``, ``learn_block``), else one :meth:`step`."""
        # (both are what they are cast to when self._blocks: checked once, in __init__)
        stream, agent = cast(BlockStream, self.stream), cast(SupportsBlocks, self.agent)
        # (once an agent learns in blocks, every step goes through learn_block, also single
        # ones: the kernel's arithmetic is not the per-step path's, to the last bit)
        if not self._blocks or not agent.block_ready(stream.batch_size):
            self.step()
            return
        done = stream.step
        probes = self.probes
        if probes is not None and probes.names and probes.every:
            limit = min(limit, probes.every - done % probes.every)
        # blocks of about BLOCK_SECONDS, so that stops, progress and time-based checkpoints
        # stay prompt for large networks (where a block of a few hundred steps takes seconds)
        limit = min(limit, max(1, int(BLOCK_SECONDS / self._step_seconds)))
        started = time.perf_counter()
        batch = stream.next_block(limit)
        started += self._begin(batch, done, concurrent=True)  # (not a cost of the steps)
        if self._probe_point is None:
            pred, metrics = agent.learn_block(batch.obs, batch.target)
        else:  # the first step alone, then its after-step probes (the same numbers: blocks
            # of any split give the same bits)
            pred, metrics = agent.learn_block(batch.obs[:1], batch.target[:1])
            self._after_step_probes(
                batch.obs[0], batch.target[0], {k: v[0] for k, v in metrics.items()}
            )
            if batch.obs.shape[0] > 1:
                rest, more = agent.learn_block(batch.obs[1:], batch.target[1:])
                pred = torch.cat([pred, rest])
                metrics = {k: torch.cat([v, more[k]]) for k, v in metrics.items()}
        loss = metrics.get("loss")
        if loss is not None and not bool(torch.isfinite(loss).all()):
            for t in range(loss.shape[0]):
                self._check_divergence(loss[t], done + t + 1)
        self.totals.add_block(stream.score(pred, batch.target), metrics)
        self._held_out_if_due()
        per_step = (time.perf_counter() - started) / batch.obs.shape[0]
        self._step_seconds = 0.5 * self._step_seconds + 0.5 * per_step
        if self.progress is not None:
            self.progress.update(stream.step, self.task, self.totals.running)

    def replica_task(self, replica: int) -> int:
        """Every replica is on the same task."""
        return self.task

    def finish(self) -> None:
        """Emit the probes still running and the ``task_end`` of the current (possibly
        partial) task."""
        self.settle()
        if self.totals.steps:
            self._end_task(self.stream.step)

    def state_dict(self) -> dict[str, Any]:
        """The loop's own state: current task and the task's running sums (probes still
        running are emitted first: :meth:`run` has done so before its checkpoints)."""
        self.settle()
        t = self.totals
        return {
            "task": self.task,
            "diverged": self.diverged.clone(),
            "score": t.score.clone(),
            "examples": t.examples,
            "steps": t.steps,
            "metrics": {k: v.clone() for k, v in t.metrics.items()},
            "probe_memory": {k: v.clone() for k, v in self.probe_memory.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.task = int(state["task"])
        self.diverged = state["diverged"].clone()
        if bool(self.diverged.any()) and isinstance(self.agent, SupportsStopReplicas):
            self.agent.stop_replicas(self.diverged.clone())
        self.totals.score = state["score"].clone()
        self.totals.examples = int(state["examples"])
        self.totals.steps = int(state["steps"])
        self.totals.metrics = {k: v.clone() for k, v in state["metrics"].items()}
        self.probe_memory = {k: v.clone() for k, v in state.get("probe_memory", {}).items()}


def run_loop(
    stream: SupervisedStreamProtocol,
    agent: Agent,
    steps: int,
    emit: Callable[[Record], None],
    progress: Progress | None = None,
    probes: ProbeSchedule | None = None,
) -> None:
    """Run a supervised stream to ``steps`` steps and emit the last task's end."""
    loop = SupervisedLoop(stream, agent, emit, progress, probes)
    loop.run(steps)
    loop.finish()
