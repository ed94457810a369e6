"""Executing a resolved run: streams, agents, the loop, checkpoints, signals and resume.

A run is one or more *groups*: one group over all replicas for agents that support them, one
group per seed otherwise. Each group runs its loop to the target step count, checkpointing
every ``checkpoint_every`` steps and every ``checkpoint_minutes``, at its end, and when a
SIGINT/SIGTERM arrives (the current step finishes first). A checkpoint records how many metric
parts were on disk; resuming drops later parts, so rows are never duplicated or skipped.

**Stream lifecycle.** A run builds its streams once (:func:`open_streams`, which the API enters
before it writes anything, so bad data files fail early) and closes each when its group ends
and all of them when the run ends, however it ends: the worker processes of ``vector=split`` or
``async`` RL streams never outlive a run (nor, in a sweep, reach the next run). The agent's
``close()`` (:class:`~contlearn.agents.protocol.SupportsClose`) is called at its group's end.

(Over 400 lines: running a group and resuming it, with the checks a resume makes before it
writes anything — its length, its metric parts, its checkpoint — read as one sequence.)
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, cast

import torch

from contlearn.agents.protocol import (
    Agent,
    BuiltinAgentClass,
    SupportsBackend,
    SupportsCheckpoints,
    SupportsClose,
    SupportsDevice,
    SupportsPreferredThreads,
    SupportsReplicaWorkers,
    supports_replicas,
)
from contlearn.envs.protocol import (
    RLStreamProtocol,
    ScheduledTaskStream,
    Stream,
    SupervisedStreamProtocol,
)
from contlearn.errors import ConfigError, ContlearnError, RunDirError, RunInterrupted
from contlearn.loop.adapter import SingleReplicaAdapter
from contlearn.loop.engine import (
    ProbeSchedule,
    SteppingLoop,
    SupervisedLoop,
    torch_threads,
)
from contlearn.loop.progress import Progress
from contlearn.loop.records import Record, record_writer
from contlearn.results.store import METRICS_DIR, MetricWriter, read_meta, record_backend
from contlearn.running.checkpoint import load_latest, save_checkpoint
from contlearn.running.config import RunConfig, total_steps


class SignalStop:
    """While active, SIGINT/SIGTERM ask the loop to stop after the current step.

    A second signal of the same kind interrupts at once (KeyboardInterrupt).
    """

    def __init__(self) -> None:
        self.signum = 0
        self._old: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum:
            raise KeyboardInterrupt
        self.signum = signum

    def requested(self) -> bool:
        """Whether a stop was asked for."""
        return bool(self.signum)

    def __enter__(self) -> SignalStop:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


class CheckpointDue:
    """Checkpoint every ``every`` steps (0: never) and every ``minutes`` (0: never)."""

    def __init__(self, every: int, minutes: float) -> None:
        self.every, self.seconds = every, minutes * 60.0
        self.last = time.monotonic()
        self.seen: int | None = None  # the step of the previous call

    def steps_to_next(self, step: int) -> int:
        """Steps from ``step`` to the next step-count checkpoint (a large number if none; the
        time-based ones are checked after every block of steps)."""
        return self.every - step % self.every if self.every else 1 << 62

    def __call__(self, step: int) -> bool:
        """Whether to checkpoint after ``step``: a multiple of ``every`` reached since the
        previous call (RL loops advance ``num_envs`` steps at once), or the minutes passed."""
        now = time.monotonic()
        before = step - 1 if self.seen is None else self.seen
        self.seen = step
        if (self.every and step // self.every > before // self.every) or (
            self.seconds and now - self.last >= self.seconds
        ):
            self.last = now
            return True
        return False


def stream_groups(cfg: RunConfig) -> list[list[int]]:
    """The seeds of each group: all of them for agents with replica support, else one each."""
    return [list(cfg.seeds)] if supports_replicas(cfg.agent_cls) else [[s] for s in cfg.seeds]


def make_streams(cfg: RunConfig) -> list[Stream]:
    """One stream per group (:func:`stream_groups`); the caller closes them (use
    :func:`open_streams`). If one fails to build, those built before it are closed."""
    from contlearn.envs import make_stream

    streams: list[Stream] = []
    try:
        for seeds in stream_groups(cfg):
            streams.append(make_stream(cfg.stream_cls or cfg.stream, cfg.stream_spec, seeds))
    except BaseException:
        close_streams(streams)
        raise
    return streams


def close_streams(streams: Sequence[Stream]) -> None:
    """Close every stream (each close is idempotent), even if one of them fails to."""
    with contextlib.ExitStack() as stack:
        for stream in streams:
            stack.callback(stream.close)


@contextlib.contextmanager
def open_streams(cfg: RunConfig) -> Iterator[list[Stream]]:
    """The run's streams (:func:`make_streams`), closed when the block ends."""
    streams = make_streams(cfg)
    try:
        yield streams
    finally:
        close_streams(streams)


def make_agent(cfg: RunConfig, stream: Stream) -> Agent:
    """The run's agent for one stream (plug-in agents wrapped to look replica-batched), with
    the probes named explicitly in ``probes`` checked against what it provides."""
    from contlearn.agents.protocol import require_agent_methods
    from contlearn.running.plugins import build_plugin_agent

    seeds = stream.seeds
    agent: Agent
    if isinstance(cfg.agent_cls, BuiltinAgentClass):
        agent = cfg.agent_cls(stream.info, seeds, cfg.agent_spec, cfg.learner)
    elif supports_replicas(cfg.agent_cls):
        agent = build_plugin_agent(cfg.agent_cls, stream.info, seeds, cfg.agent_spec, cfg.learner)
    else:
        agent = build_plugin_agent(
            cfg.agent_cls, stream.info, seeds[0], cfg.agent_spec, cfg.learner
        )
    require_agent_methods(agent)
    if not supports_replicas(cfg.agent_cls):
        agent = SingleReplicaAdapter(agent, (stream.info.num_outputs,))
    check_requested_probes(cfg, agent)
    return agent


def check_requested_probes(cfg: RunConfig, agent: Agent) -> None:
    """Refuse a probe named in ``probes`` (not through ``default``) that cannot run on the
    agent, naming what the agent must provide (``default`` runs those that can).

    Raises:
        ConfigError: such a probe.
    """
    from contlearn.probes.measures import explicit_probes, probe_needs

    for name in explicit_probes(cfg.run.probes):
        needs = probe_needs(name, agent)
        if needs:
            raise ConfigError(
                f"probe {name} cannot run on agent {cfg.agent}: it needs {needs}; "
                "add it to the agent or drop the probe from probes="
            )


def plugin_checked(cfg: RunConfig) -> str:
    """The class name whose returns the loop checks: a plug-in agent's with replicas (an
    agent of one seed is checked by its adapter; built-in agents are trusted)."""
    if isinstance(cfg.agent_cls, BuiltinAgentClass) or not supports_replicas(cfg.agent_cls):
        return ""
    return cfg.agent_cls.__name__


def place_agent(cfg: RunConfig, agent: Agent) -> Agent:
    """Move the agent to the run's ``device`` (agents that have a ``to`` method)."""
    if cfg.run.device == "cpu":
        return agent
    if not isinstance(agent, SupportsDevice):
        raise ContlearnError(
            f"agent {cfg.agent} cannot run on device={cfg.run.device}: it has "
            "no to() method; use device=cpu"
        )
    return agent.to(cfg.run.device)


@contextlib.contextmanager
def intra_op_threads(requested: int, agent: Agent, plugin: bool = False) -> Iterator[int]:
    """torch's intra-op threads while a run's loop runs: ``requested``, or (0) the agent's
    ``preferred_threads()``; without that method, a plug-in agent gets 1 (online learning on
    small batches: more threads only add their hand-offs) and a built-in one leaves the
    setting as it is. An agent with threads of its own (``replica_workers``) gets
    ``requested``, or (0) the process's setting before the run (torch's default: the cores; a
    sweep worker: its share of them)."""
    if isinstance(agent, SupportsReplicaWorkers):
        agent.replica_workers = requested or torch.get_num_threads()
    if isinstance(agent, SupportsPreferredThreads):
        preferred = agent.preferred_threads()
    else:
        preferred = 1 if plugin else 0
    with torch_threads(requested or preferred) as n:
        yield n


def probe_schedule(cfg: RunConfig) -> ProbeSchedule:
    """The run's probe schedule from its ``probes``, ``probe_every``, ``probe_size`` and
    ``threads`` keys."""
    from contlearn.probes.measures import parse_probes

    return ProbeSchedule(
        tuple(parse_probes(cfg.run.probes)),
        cfg.run.probe_every,
        cfg.run.probe_size,
        cfg.run.threads,
    )


def make_loop(
    stream: Stream,
    agent: Agent,
    emit: Callable[[Record], None],
    bar: Progress,
    probes: ProbeSchedule,
    cfg: RunConfig,
) -> SteppingLoop:
    """The loop for a stream's kind."""
    loop: SteppingLoop
    if stream.info.kind == "rl":
        from contlearn.loop.rl import RLLoop

        # (info.kind is the stream's declaration of which protocol it follows)
        loop = RLLoop(
            cast(RLStreamProtocol, stream), agent, emit, bar, probes, cfg.run.on_divergence
        )
    else:
        loop = SupervisedLoop(
            cast(SupervisedStreamProtocol, stream), agent, emit, bar, probes, cfg.run.on_divergence
        )
    loop.checked = plugin_checked(cfg)
    return loop


def agent_backend(agent: Any) -> str:
    """The name of the path that runs ``agent``'s steps: its ``backend`` attribute
    (:mod:`contlearn.backends`), or ``own`` for an agent that brings its own step."""
    if isinstance(agent, SupportsBackend) and isinstance(agent.backend, str) and agent.backend:
        return agent.backend
    return "own"


def announce_backend(path: Path, agent: Any, show: bool) -> None:
    """Record the agent's backend in ``meta.json`` and, where the run shows its progress
    (a terminal, or ``--progress``), say it on stderr above the bar. (Unshown, stderr stays
    free for one-line errors and stdout for the run's path.)"""
    backend = agent_backend(agent)
    record_backend(path, backend)
    if show:
        print(f"contlearn: backend {backend}", file=sys.stderr, flush=True)


def _warn(message: str) -> None:
    print(f"contlearn: warning: {message}", file=sys.stderr)


def execute(
    cfg: RunConfig,
    path: Path,
    writer: MetricWriter,
    show: bool,
    resuming: bool = False,
    streams: Sequence[Stream] | None = None,
    started: Callable[[], None] | None = None,
) -> None:
    """Run every group of a run to its end, resuming from the newest checkpoint if asked.

    Args:
        cfg, path, writer, show, resuming: the run, its directory and writer, whether to show
            progress, whether to continue from the newest checkpoint.
        streams: the run's streams, already built (:func:`open_streams`; the caller closes
            them); default: built here, and closed before this returns or raises.
        started: called once the checkpoint is loaded and checked, before anything is
            written (a resume writes its new ``config.json`` then, not before).

    Raises:
        RunInterrupted: a signal stopped the run (after a checkpoint).
        ContlearnError: a run cannot be resumed.
    """
    if streams is None:
        with open_streams(cfg) as built:
            execute(cfg, path, writer, show, resuming, built, started)
        return
    ckpt = load_latest(path, _warn, read_meta(path).get("run_id")) if resuming else None
    start = int(ckpt["group"]) if ckpt else 0
    if resuming:
        parts = int(ckpt["parts"]) if ckpt else 0
        check_parts(path, parts)
        if ckpt is not None and start < len(streams):
            check_length(cfg, path, int(ckpt["step"]), streams[start])
        writer.truncate(parts)  # no checkpoint: start over cleanly
    if started is not None:
        started()
    with SignalStop() as stop:
        for g, stream in enumerate(streams):
            try:
                if g >= start:
                    # (every group has the same configuration: the first one run announces it)
                    _run_group(
                        cfg,
                        g,
                        stream,
                        writer,
                        path,
                        show,
                        ckpt if g == start else None,
                        stop,
                        announce=g == start,
                    )
            finally:
                stream.close()  # (its workers go now, not at the run's end)


def stream_steps(cfg: RunConfig, stream: Stream) -> int:
    """The steps ``cfg`` runs on ``stream`` (tasks of different lengths counted by the
    stream's ``steps_until``: :class:`~contlearn.envs.protocol.ScheduledTaskStream`)."""
    until = stream.steps_until if isinstance(stream, ScheduledTaskStream) else None
    return total_steps(cfg, stream.steps_per_task, until)


def check_length(cfg: RunConfig, path: Path, step: int, stream: Stream) -> None:
    """Refuse a resume whose new length is shorter than what the run has already done.

    Raises:
        RunDirError: the newest checkpoint is past the configured length.
    """
    steps_per_task = stream.steps_per_task
    steps = stream_steps(cfg, stream)
    if step > steps:
        done = f"{step} steps ({step // max(steps_per_task, 1)} tasks)"
        raise RunDirError(
            f"{path} has already run {done}, more than the {steps} steps asked for; "
            "resume to its own length or a longer one"
        )


def check_parts(path: Path, parts: int) -> None:
    """Refuse to resume when metric parts the checkpoint counts on are missing (deleted or
    moved away): the resumed run would leave a hole in the metrics without a word.

    Raises:
        RunDirError: a part with index < ``parts`` is not on disk.
    """
    folder = path / METRICS_DIR
    have = {p.name for p in folder.glob("part-*.parquet")} if folder.is_dir() else set()
    missing = [i for i in range(parts) if f"part-{i:05d}.parquet" not in have]
    if missing:
        raise RunDirError(
            f"{len(missing)} of the {parts} metric parts the newest checkpoint follows are "
            f"missing from {folder} (first: part-{missing[0]:05d}.parquet); put them back, "
            "or start the run anew with --overwrite"
        )


def _run_group(
    cfg: RunConfig,
    group: int,
    stream: Stream,
    writer: MetricWriter,
    path: Path,
    show: bool,
    ckpt: dict[str, Any] | None,
    stop: SignalStop,
    announce: bool = False,
) -> None:
    agent = make_agent(cfg, stream)
    try:
        placed = place_agent(cfg, agent)
        if announce:
            announce_backend(path, placed, show)
        _run_agent(cfg, group, stream, placed, writer, path, show, ckpt, stop)
    finally:
        if isinstance(agent, SupportsClose):  # e.g. PPO's value worker process
            agent.close()


def _run_agent(
    cfg: RunConfig,
    group: int,
    stream: Stream,
    agent: Agent,
    writer: MetricWriter,
    path: Path,
    show: bool,
    ckpt: dict[str, Any] | None,
    stop: SignalStop,
) -> None:
    steps = stream_steps(cfg, stream)
    seeds = stream.seeds
    emit = record_writer(writer, seeds)
    savable = isinstance(agent, SupportsCheckpoints)
    run_id = read_meta(path).get("run_id")
    if ckpt is not None:
        if not isinstance(agent, SupportsCheckpoints):
            raise ContlearnError(f"agent {cfg.agent} has no load_state_dict; cannot resume")
        try:
            stream.load_state_dict(ckpt["stream"])
            agent.load_state_dict(ckpt["agent"])
        except (KeyError, ValueError, RuntimeError, TypeError, IndexError) as exc:
            raise RunDirError(
                f"the newest checkpoint in {path} does not fit this run ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}); move it aside to resume "
                "from the previous one"
            ) from exc
    desc = "" if len(cfg.seeds) == len(seeds) else f"seed {seeds[0]}"
    bar = Progress(steps, stream.info.metric, show, initial=stream.step, desc=desc)
    loop = make_loop(stream, agent, emit, bar, probe_schedule(cfg), cfg)
    if ckpt is not None:
        loop.load_state_dict(ckpt["loop"])

    def checkpoint() -> None:
        assert isinstance(agent, SupportsCheckpoints)
        writer.flush()
        save_checkpoint(
            path,
            {
                "run_id": run_id,  # (a checkpoint of another run put here is passed over)
                "group": group,
                "step": stream.step,
                "parts": writer.parts_written,
                "stream": stream.state_dict(),
                "agent": agent.state_dict(),
                "loop": loop.state_dict(),
            },
            stream.step,
            keep=cfg.run.checkpoint_keep,
        )

    try:
        plugin = not isinstance(cfg.agent_cls, BuiltinAgentClass)
        with intra_op_threads(cfg.run.threads, agent, plugin):
            done = loop.run(
                steps,
                stop.requested,
                checkpoint if savable else None,
                CheckpointDue(cfg.run.checkpoint_every, cfg.run.checkpoint_minutes),
            )
            if savable:
                checkpoint()  # at the end (or the stop), before the partial task's rows
            loop.finish()
        writer.flush()
    finally:
        bar.close(stream.step)
    if not done:
        raise RunInterrupted(path, stream.step, stop.signum, savable)
