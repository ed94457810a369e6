"""The Python API: ``contlearn.run(...)`` does what ``contlearn run`` does."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from contlearn.agents.protocol import BuiltinAgentClass
from contlearn.envs.protocol import Stream
from contlearn.errors import ConfigError, ContlearnError, RunDirError
from contlearn.loop.progress import want_progress
from contlearn.registry import absolute_ref
from contlearn.results.store import (
    MetricWriter,
    RunLock,
    check_run_dir,
    clear_run,
    is_run_dir,
    load_runs,
    make_run_dir,
    read_config,
    run_name,
    write_atomic,
    write_config,
)
from contlearn.running.config import RunConfig, RunSpec, read_config_file, resolve
from contlearn.running.plugins import takes_learner
from contlearn.running.runner import execute, open_streams, stream_groups


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
    stream: str | type | None = None,
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
    resume: bool = False,
    progress: bool | None = None,
) -> RunResult:
    """Run a stream with an agent and learner, writing a run directory.

    Args:
        stream: registered stream id, ``module:Class``, ``file.py:Class`` or a stream class
            (or ``stream`` in ``config``/``config_file``).
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
        resume: continue the run already in ``out`` (same config; the length may grow), or
            start it if there is none.
        progress: show a progress bar (default: only on a TTY, not under CI).

    Returns:
        A :class:`RunResult` with the run's path and resolved config.

    Raises:
        ContlearnError: bad names, keys, values or run directory (nothing is written then).
    """
    if overwrite and resume:
        raise ConfigError(
            "--overwrite replaces a run and --resume continues it; give one of them, not both"
        )
    values: dict[str, Any] = read_config_file(config_file) if config_file else {}
    values.update(config or {})
    explicit = {
        "stream": stream,
        "learner": learner,
        "agent": agent,
        "seeds": seeds,
        "seed": seed,
        "tasks": tasks,
        "steps": steps,
    }
    given = {k: v for k, v in explicit.items() if v is not None}
    check_overridden({k: values[k] for k in given if k in values})
    values.update(given)
    cfg = resolve(values)
    if "learner" in values and not takes_learner(cfg.agent_cls):
        raise ConfigError(
            f"agent {cfg.agent} takes no learner; drop --learner or add a "
            "`learner` parameter to its __init__"
        )
    label = learner_label(cfg)
    path = Path(out) if out is not None else default_run_dir(cfg.stream_label, label)
    flat = stored_config(cfg)
    if resume and is_run_dir(path):
        return _continue(path, flat, progress)
    check_run_dir(path, overwrite=overwrite)
    # the streams first, once: bad data files fail before anything is written, and the
    # streams (and any worker processes of theirs) are closed however the run ends
    with open_streams(cfg) as streams:
        new = [p for p in (path, *path.parents) if not p.exists()]  # (folders made for it)
        make_run_dir(path)
        try:
            with RunLock(path):  # (a live writer of a run in path is refused, before clear_run)
                if overwrite:
                    clear_run(path)
                write_config(path, flat, cfg.seeds)
                _execute(cfg, path, flat, progress, resuming=False, streams=streams)
        except ConfigError:  # refused at its start (e.g. a plug-in agent failing in __init__)
            _forget_unstarted(path, new)
            raise
    return RunResult(path, flat)


def _forget_unstarted(path: Path, made: list[Path]) -> None:
    """Remove the run just begun in ``path`` if it wrote no metrics and no checkpoint, and the
    folders made for it if they are empty again: a run refused at its start leaves nothing
    behind (and the same --out can be used again)."""
    if any((path / "metrics").glob("part-*")) or any((path / "checkpoints").glob("*")):
        return
    clear_run(path)
    for folder in made:  # (innermost first)
        try:
            folder.rmdir()
        except OSError:
            return


def check_overridden(values: Mapping[str, Any]) -> None:
    """Check config values that an argument overrides (``--set tasks=abc`` with ``--tasks 5``):
    a bad value is an error even where it would not be used.

    Raises:
        ConfigError: a value is malformed or out of range, or names no stream or learner.
    """
    from contlearn.envs.plugins import resolve_stream
    from contlearn.learners import learner_def
    from contlearn.spec import parse_value, spec_fields

    fields = {f.name: f for f in spec_fields(RunSpec)}
    for key, value in values.items():
        if key in fields:
            parse_value(fields[key], value, key)
        elif key == "stream" and isinstance(value, (str, type)):
            resolve_stream(value)
        elif key == "learner" and isinstance(value, str):
            learner_def(value)


def resume(
    path: str | Path,
    *,
    tasks: int | None = None,
    steps: int | None = None,
    progress: bool | None = None,
) -> RunResult:
    """Continue a run from its newest checkpoint, optionally to a new length.

    The result equals that of a run that never stopped (bit for bit on CPU).

    Args:
        path: the run directory.
        tasks, steps: a new run length (default: the one in its config).
        progress: show a progress bar.

    Raises:
        ContlearnError: not a run, or it cannot be resumed.
    """
    path = Path(path)
    flat = read_config(path)
    if tasks is not None or steps is not None:
        flat = {**flat, "tasks": tasks or 0, "steps": steps or 0}
    return _continue(path, flat, progress)


#: keys that may change when a run is continued (its length and I/O settings)
RESUMABLE_KEYS = (
    "tasks",
    "steps",
    "flush_rows",
    "flush_seconds",
    "checkpoint_every",
    "checkpoint_minutes",
    "checkpoint_keep",
    "threads",
    "device",
    "fast",
    "log",
)


def changed_keys(stored: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Config keys whose values differ, other than those a continued run may change.

    A plug-in's ``file.py:Class`` is the same as its absolute form (older runs recorded the
    path as given, relative to the directory they were started in). A key the stored config
    lacks (an option added to contlearn after the run was written) counts as its default
    today: that run ran as the default does."""
    stored = with_new_defaults(stored, new)

    def value(config: Mapping[str, Any], k: str) -> Any:
        v = config.get(k)
        return absolute_ref(v) if k in ("stream", "agent") and isinstance(v, str) else v

    return sorted(
        k
        for k in set(stored) | set(new)
        if k not in RESUMABLE_KEYS and value(stored, k) != value(new, k)
    )


def with_new_defaults(stored: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """``stored`` with the keys of ``new`` it lacks filled in as the stored config resolves
    today (their defaults); unchanged where it lacks none or no longer resolves."""
    if not set(new) - set(stored):
        return dict(stored)
    try:
        filled = stored_config(resolve(dict(stored)))
    except ContlearnError:
        return dict(stored)
    return {**{k: filled[k] for k in set(new) - set(stored) if k in filled}, **stored}


def _continue(path: Path, flat: dict[str, Any], progress: bool | None) -> RunResult:
    stored = read_config(path)
    changed = changed_keys(stored, flat)
    if changed:
        k = changed[0]
        raise RunDirError(
            f"{path} holds a run with {k}={stored.get(k)!r}, not {flat.get(k)!r}; "
            "resume it with its own config or choose another --out"
        )
    cfg = resolve(flat)
    length = {k: stored.get(k) for k in ("tasks", "steps")} != {
        k: flat[k] for k in ("tasks", "steps")
    }
    if length and len(stream_groups(cfg)) > 1:
        raise RunDirError(
            "a run of an agent without replica support cannot be extended; start a new run"
        )

    def write_new_config() -> None:  # (once the checkpoint is checked: a refused resume
        if flat != stored:  # leaves config.json as it was)
            write_atomic(path / "config.json", json.dumps(flat, indent=2).encode())

    with RunLock(path):
        _execute(cfg, path, flat, progress, resuming=True, started=write_new_config)
    return RunResult(path, flat)


def stored_config(cfg: RunConfig) -> dict[str, Any]:
    """What ``config.json`` holds for a resolved config."""
    flat = cfg.to_dict()
    if not takes_learner(cfg.agent_cls):  # the learner keys would mean nothing for this agent
        flat = {
            k: v
            for k, v in flat.items()
            if k not in ("learner", "credit") and not k.startswith(("learner.", "credit."))
        }
    return flat


def _execute(
    cfg: RunConfig,
    path: Path,
    flat: dict[str, Any],
    progress: bool | None,
    resuming: bool,
    streams: list[Stream] | None = None,
    started: Callable[[], None] | None = None,
) -> None:
    from contlearn.results.store import read_meta
    from contlearn.results.trackers import make_trackers, parse_trackers

    meta = read_meta(path)
    name = str(meta.get("name") or path.name)
    trackers = make_trackers(
        parse_trackers(cfg.run.log), path, name, str(meta.get("run_id", name)), flat
    )
    writer = MetricWriter(
        path,
        run_name(path),
        cfg.stream_label,
        learner_label(cfg),
        cfg.run.flush_rows,
        cfg.run.flush_seconds,
        trackers=trackers,
    )
    try:
        execute(
            cfg,
            path,
            writer,
            want_progress(progress),
            resuming=resuming,
            streams=streams,
            started=started,
        )
    finally:
        try:
            writer.close()
        finally:
            for tracker in trackers:
                tracker.close()


def learner_label(cfg: RunConfig) -> str:
    """The ``learner`` column: the learner's name, prefixed by the credit rule's unless it is
    backprop (``dfa+cbp``), or a plug-in agent's class name when that agent takes no learner."""
    if not isinstance(cfg.agent_cls, BuiltinAgentClass) and not takes_learner(cfg.agent_cls):
        return cfg.agent_cls.__name__
    credit = cfg.learner.credit.name
    return cfg.learner.name if credit == "bp" else f"{credit}+{cfg.learner.name}"


__all__ = ["ConfigError", "RunResult", "default_run_dir", "resume", "run"]
