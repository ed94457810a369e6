"""The Python API: ``contlearn.run(...)`` does what ``contlearn run`` does."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from contlearn.config import RunConfig, read_config_file, resolve, total_steps
from contlearn.engine import ProbeSchedule, Record, SingleReplicaAdapter, run_loop
from contlearn.errors import ConfigError
from contlearn.plugins import takes_learner
from contlearn.progress import Progress, want_progress
from contlearn.store import MetricWriter, load_runs, prepare_run_dir, write_config


@dataclass(frozen=True)
class RunResult:
    """A finished run.

    Attributes:
        path: the run directory.
        config: the resolved config (flat keys).
    """

    path: Path
    config: dict[str, Any]

    def metrics(self):
        """The run's metrics as a DataFrame (see :func:`contlearn.load_runs`)."""
        return load_runs(self.path)


def default_run_dir(stream: str, learner: str, root: str | Path = "runs") -> Path:
    """``runs/<stream>__<learner>__<YYYYmmdd-HHMMSS>`` (suffixed if it exists)."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path(root) / re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{stream}__{learner}__{stamp}")
    path, n = base, 2
    while path.exists():
        path, n = base.with_name(f"{base.name}-{n}"), n + 1
    return path


def run(
    stream: str | None = None,
    *,
    learner: str | None = None,
    agent: str | type | None = None,
    seeds: int | None = None,
    seed: int | None = None,
    tasks: int | None = None,
    steps: int | None = None,
    config: Mapping[str, Any] | None = None,
    config_file: str | Path | None = None,
    out: str | Path | None = None,
    overwrite: bool = False,
    progress: bool | None = None,
) -> RunResult:
    """Run a stream with an agent and learner, writing a run directory.

    Args:
        stream: registered stream id (or ``stream`` in ``config``/``config_file``).
        learner: learner name (default ``bp``).
        agent: registered agent name, ``module:Class``, or a class satisfying the Agent
            Protocol (default: the built-in ``online`` agent).
        seeds: number of seeds (replicas).
        seed: the first seed.
        tasks: tasks to run. steps: steps to run instead.
        config: any config keys (as ``--set``), e.g. ``{"hidden": "100,100", "lr": 0.01}``.
        config_file: a TOML (or JSON) config file, applied before ``config``.
        out: the run directory (default ``runs/<stream>__<learner>__<time>``).
        overwrite: replace a run already in ``out``.
        progress: show a progress bar (default: only on a TTY, not under CI).

    Returns:
        A :class:`RunResult` with the run's path and resolved config.

    Raises:
        ContlearnError: bad names, keys, values or run directory (nothing is written then).
    """
    values: dict[str, Any] = read_config_file(config_file) if config_file else {}
    values.update(config or {})
    explicit = {"stream": stream, "learner": learner, "agent": agent, "seeds": seeds,
                "seed": seed, "tasks": tasks, "steps": steps}
    values.update({k: v for k, v in explicit.items() if v is not None})
    cfg = resolve(values)
    if "learner" in values and not takes_learner(cfg.agent_cls):
        raise ConfigError(f"agent {cfg.agent} takes no learner; drop --learner or add a "
                          "`learner` parameter to its __init__")
    label = learner_label(cfg)
    path = Path(out) if out is not None else default_run_dir(cfg.stream, label)
    streams = _make_streams(cfg)  # build first: bad data files fail before anything is written
    prepare_run_dir(path, overwrite=overwrite)
    flat = cfg.to_dict()
    if not takes_learner(cfg.agent_cls):  # the learner keys would mean nothing for this agent
        flat = {k: v for k, v in flat.items() if k != "learner" and not k.startswith("learner.")}
    write_config(path, flat, cfg.seeds)
    writer = MetricWriter(path, path.name, cfg.stream, label,
                          cfg.run.flush_rows, cfg.run.flush_seconds)
    try:
        for stream_obj in streams:
            _run_one(cfg, stream_obj, writer, want_progress(progress))
    finally:
        writer.close()
    return RunResult(path, flat)


def learner_label(cfg: RunConfig) -> str:
    """The ``learner`` column: the learner's name, or a plug-in agent's class name when that
    agent takes no learner."""
    if getattr(cfg.agent_cls, "Spec", None) is None and not takes_learner(cfg.agent_cls):
        return cfg.agent_cls.__name__
    return cfg.learner.name


def _make_streams(cfg: RunConfig) -> list[Any]:
    """One stream over all replicas, or one per seed for agents without replica support."""
    from contlearn.envs import make_stream

    if getattr(cfg.agent_cls, "supports_replicas", False):
        return [make_stream(cfg.stream, cfg.stream_spec, cfg.seeds)]
    return [make_stream(cfg.stream, cfg.stream_spec, [s]) for s in cfg.seeds]


def _make_agent(cfg: RunConfig, stream: Any) -> Any:
    from contlearn.agents import check_agent
    from contlearn.plugins import build_plugin_agent

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


def probe_schedule(cfg: RunConfig) -> ProbeSchedule:
    """The run's probe schedule from its ``probes``, ``probe_every``, ``probe_size`` keys."""
    from contlearn.probes import parse_probes

    return ProbeSchedule(tuple(parse_probes(cfg.run.probes)), cfg.run.probe_every,
                         cfg.run.probe_size)


def _run_one(cfg: RunConfig, stream: Any, writer: MetricWriter, show: bool) -> None:
    agent = _make_agent(cfg, stream)
    steps = total_steps(cfg, stream.steps_per_task)
    seeds = stream.seeds
    desc = "" if len(cfg.seeds) == len(seeds) else f"seed {seeds[0]}"
    bar = Progress(steps, stream.info.metric, show, desc=desc)

    def emit(record: Record) -> None:
        for name, values in record.values.items():
            writer.append(seeds, record.step, record.task, name, values.tolist(), record.layer)

    try:
        run_loop(stream, agent, steps, emit, bar, probe_schedule(cfg))
    finally:
        bar.close(stream.step)


__all__ = ["ConfigError", "RunResult", "default_run_dir", "run"]
