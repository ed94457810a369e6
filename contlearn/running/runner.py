"""Executing a resolved run: streams, agents, the loop, checkpoints, signals and resume.

A run is one or more *groups*: one group over all replicas for agents that support them, one
group per seed otherwise. Each group runs its loop to the target step count, checkpointing
every ``checkpoint_every`` steps and every ``checkpoint_minutes``, at its end, and when a
SIGINT/SIGTERM arrives (the current step finishes first). A checkpoint records how many metric
parts were on disk; resuming drops later parts, so rows are never duplicated or skipped.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from contlearn.errors import ContlearnError
from contlearn.loop.engine import (
    ProbeSchedule,
    Record,
    SingleReplicaAdapter,
    SupervisedLoop,
    torch_threads,
)
from contlearn.loop.progress import Progress
from contlearn.results.store import MetricWriter, record_backend
from contlearn.running.checkpoint import load_latest, save_checkpoint
from contlearn.running.config import RunConfig, total_steps


class RunInterrupted(Exception):  # noqa: N818 - an outcome, not an error
    """A run stopped on a signal after saving a checkpoint; ``code`` is 128 + signal."""

    def __init__(self, path: Path, step: int, signum: int, saved: bool) -> None:
        self.path, self.step, self.code = path, step, 128 + signum
        how = f"continue with `contlearn resume {path}`" if saved else "no checkpoint was saved"
        super().__init__(f"interrupted at step {step}; metrics flushed; {how}")


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

    def steps_to_next(self, step: int) -> int:
        """Steps from ``step`` to the next step-count checkpoint (a large number if none; the
        time-based ones are checked after every block of steps)."""
        return self.every - step % self.every if self.every else 1 << 62

    def __call__(self, step: int) -> bool:
        now = time.monotonic()
        if (self.every and step % self.every == 0) or (
                self.seconds and now - self.last >= self.seconds):
            self.last = now
            return True
        return False


def make_streams(cfg: RunConfig) -> list[Any]:
    """One stream over all replicas, or one per seed for agents without replica support."""
    from contlearn.envs import make_stream

    if getattr(cfg.agent_cls, "supports_replicas", False):
        return [make_stream(cfg.stream, cfg.stream_spec, cfg.seeds)]
    return [make_stream(cfg.stream, cfg.stream_spec, [s]) for s in cfg.seeds]


def make_agent(cfg: RunConfig, stream: Any) -> Any:
    """The run's agent for one stream (plug-in agents wrapped to look replica-batched)."""
    from contlearn.agents import check_agent
    from contlearn.running.plugins import build_plugin_agent

    seeds = stream.seeds
    if getattr(cfg.agent_cls, "Spec", None) is not None:
        agent = cfg.agent_cls(stream.info, seeds, cfg.agent_spec, cfg.learner)
    elif getattr(cfg.agent_cls, "supports_replicas", False):
        agent = build_plugin_agent(cfg.agent_cls, stream.info, seeds, cfg.agent_spec, cfg.learner)
    else:
        agent = build_plugin_agent(cfg.agent_cls, stream.info, seeds[0], cfg.agent_spec,
                                   cfg.learner)
    check_agent(agent)
    if not getattr(cfg.agent_cls, "supports_replicas", False):
        agent = SingleReplicaAdapter(agent)
    return agent


def place_agent(cfg: RunConfig, agent: Any) -> Any:
    """Move the agent to the run's ``device`` (agents that have a ``to`` method)."""
    if cfg.run.device == "cpu":
        return agent
    to = getattr(agent, "to", None)
    if to is None:
        raise ContlearnError(f"agent {cfg.agent} cannot run on device={cfg.run.device}: it has "
                             "no to() method; use device=cpu")
    return to(cfg.run.device)


@contextlib.contextmanager
def intra_op_threads(requested: int, agent: Any) -> Iterator[int]:
    """torch's intra-op threads while a run's loop runs: ``requested``, or (0) the agent's
    ``preferred_threads()`` (0 there, or no such method: leave the setting as it is). An agent
    with threads of its own (``replica_workers``) gets ``requested``, or (0) the process's
    setting before the run (torch's default: the cores; a sweep worker: its share of them)."""
    if hasattr(agent, "replica_workers"):
        agent.replica_workers = requested or torch.get_num_threads()
    with torch_threads(requested or getattr(agent, "preferred_threads", lambda: 0)()) as n:
        yield n


def probe_schedule(cfg: RunConfig) -> ProbeSchedule:
    """The run's probe schedule from its ``probes``, ``probe_every``, ``probe_size`` and
    ``threads`` keys."""
    from contlearn.probes.measures import parse_probes

    return ProbeSchedule(tuple(parse_probes(cfg.run.probes)), cfg.run.probe_every,
                         cfg.run.probe_size, cfg.run.threads)


def make_loop(stream: Any, agent: Any, emit: Any, bar: Progress, probes: ProbeSchedule,
              cfg: RunConfig) -> Any:
    """The loop for a stream's kind."""
    if stream.info.kind == "rl":
        from contlearn.loop.rl import RLLoop

        return RLLoop(stream, agent, emit, bar, probes, cfg.run.on_divergence)
    return SupervisedLoop(stream, agent, emit, bar, probes, cfg.run.on_divergence)


def agent_backend(agent: Any) -> str:
    """The name of the path that runs ``agent``'s steps: its ``backend`` attribute
    (:mod:`contlearn.backends`), or ``own`` for an agent that brings its own step."""
    backend = getattr(agent, "backend", None)
    return backend if isinstance(backend, str) and backend else "own"


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


def execute(cfg: RunConfig, path: Path, writer: MetricWriter, show: bool,
            resuming: bool = False) -> None:
    """Run every group of a run to its end, resuming from the newest checkpoint if asked.

    Raises:
        RunInterrupted: a signal stopped the run (after a checkpoint).
        ContlearnError: a run cannot be resumed.
    """
    streams = make_streams(cfg)
    ckpt = load_latest(path, _warn) if resuming else None
    if resuming:
        writer.truncate(ckpt["parts"] if ckpt else 0)  # no checkpoint: start over cleanly
    start = int(ckpt["group"]) if ckpt else 0
    with SignalStop() as stop:
        for g, stream in enumerate(streams):
            if g >= start:
                # (every group has the same configuration: the first one run announces it)
                _run_group(cfg, g, stream, writer, path, show, ckpt if g == start else None,
                           stop, announce=g == start)


def _run_group(cfg: RunConfig, group: int, stream: Any, writer: MetricWriter, path: Path,
               show: bool, ckpt: dict[str, Any] | None, stop: SignalStop,
               announce: bool = False) -> None:
    agent = place_agent(cfg, make_agent(cfg, stream))
    if announce:
        announce_backend(path, agent, show)
    steps = total_steps(cfg, stream.steps_per_task)
    seeds = stream.seeds

    def emit(record: Record) -> None:
        rows = seeds if record.replica is None else [seeds[record.replica]]
        for name, values in record.values.items():
            writer.append(rows, record.step, record.task, name, values.tolist(), record.layer)

    savable = callable(getattr(agent, "state_dict", None))
    if ckpt is not None:
        if not savable:
            raise ContlearnError(f"agent {cfg.agent} has no load_state_dict; cannot resume")
        stream.load_state_dict(ckpt["stream"])
        agent.load_state_dict(ckpt["agent"])
    desc = "" if len(cfg.seeds) == len(seeds) else f"seed {seeds[0]}"
    bar = Progress(steps, stream.info.metric, show, initial=stream.step, desc=desc)
    loop = make_loop(stream, agent, emit, bar, probe_schedule(cfg), cfg)
    if ckpt is not None:
        loop.load_state_dict(ckpt["loop"])

    def checkpoint() -> None:
        writer.flush()
        save_checkpoint(path, {"group": group, "step": stream.step,
                               "parts": writer.parts_written, "stream": stream.state_dict(),
                               "agent": agent.state_dict(), "loop": loop.state_dict()},
                        stream.step, keep=cfg.run.checkpoint_keep)

    try:
        with intra_op_threads(cfg.run.threads, agent):
            done = loop.run(steps, stop.requested, checkpoint if savable else None,
                            CheckpointDue(cfg.run.checkpoint_every, cfg.run.checkpoint_minutes))
            if savable:
                checkpoint()  # at the end (or the stop), before the partial task's rows
            loop.finish()
        writer.flush()
    finally:
        bar.close(stream.step)
        close = getattr(agent, "close", None)  # e.g. PPO's value worker process
        if callable(close):
            close()
    if not done:
        raise RunInterrupted(path, stream.step, stop.signum, savable)
