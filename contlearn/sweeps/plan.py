"""Sweeps: a base config × axes × seed groups, one ordinary run directory per run.

A sweep spec (its TOML keys and how runs are named: :mod:`contlearn.sweeps.spec`) expands into
runs. Every run's config is resolved before anything runs. Each run is
``contlearn.run(config, out=ROOT/name, resume=True)``: finished runs (their ``done.json`` matches
the config) are skipped, the others start or continue, in local processes
(:mod:`contlearn.sweeps.local`) or on Ray (:mod:`contlearn.sweeps.on_ray`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from contlearn.errors import ConfigError, ContlearnError, RunDirError
from contlearn.registry import Registration, check_portable, runtime_registrations
from contlearn.sweeps.local import DONE_FILE, SweepProgress, SweepResult, run_local
from contlearn.sweeps.spec import SweepRun, SweepSpec, expand, parse_spec, read_spec

SWEEP_FILE = "sweep.json"


@dataclass
class Plan:
    """An expanded, validated sweep and where each run stands (done, partial or new), with the
    registrations made at run time that its worker processes make again."""

    spec: SweepSpec
    root: Path
    runs: list[SweepRun]
    status: dict[str, str]
    digests: dict[str, str] = field(default_factory=dict)
    registrations: list[Registration] = field(default_factory=list)

    def names_used(self) -> set[tuple[str, str]]:
        """The ``(registry kind, name)`` of every stream, agent, learner and credit rule its
        runs name."""
        kinds = {
            "stream": "stream",
            "agent": "agent",
            "learner": "learner",
            "credit": "credit rule",
        }
        return {
            (kind, r.config[key])
            for r in self.runs
            for key, kind in kinds.items()
            if isinstance(r.config.get(key), str)
        }

    def describe(self) -> str:
        """One line per run (``status  name``) and a count line."""
        lines = [f"{self.status[r.name]:<8} {r.name}" for r in self.runs]
        counts = {s: sum(v == s for v in self.status.values()) for s in ("done", "partial", "new")}
        lines.append(
            f"{len(self.runs)} runs in {self.root}: "
            + ", ".join(f"{n} {s}" for s, n in counts.items())
        )
        return "\n".join(lines)


def expected_config(run: SweepRun) -> dict[str, Any]:
    """The ``config.json`` the run will hold (resolved, as JSON values).

    Raises:
        ConfigError: the run's config is invalid (the message names the run).
    """
    from contlearn.running.api import stored_config
    from contlearn.running.config import resolve
    from contlearn.running.plugins import takes_learner

    try:
        cfg = resolve(run.config)
        if "learner" in run.config and not takes_learner(cfg.agent_cls):
            raise ConfigError(f"agent {cfg.agent} takes no learner")
    except ContlearnError as exc:
        raise ConfigError(f"sweep run {run.name}: {exc}") from None
    return json.loads(json.dumps(stored_config(cfg), default=str))


def digest(config: Mapping[str, Any]) -> str:
    """SHA-256 of a config's canonical JSON (recorded in ``done.json``)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def run_status(path: Path, expected: dict[str, Any]) -> str:
    """``done``, ``partial`` (a run to continue) or ``new``.

    Raises:
        RunDirError: the folder holds a run of another config (not only of another length).
    """
    from contlearn.results.store import is_run_dir, read_config
    from contlearn.running.api import changed_keys, with_new_defaults

    if not is_run_dir(path):
        return "new"
    stored = read_config(path)
    changed = changed_keys(stored, expected)
    if changed:
        k = changed[0]
        raise RunDirError(
            f"{path} holds a run with {k}={stored.get(k)!r}, not "
            f"{expected.get(k)!r}; the spec changed: use another --out"
        )
    try:
        done = json.loads((path / DONE_FILE).read_text())
    except (OSError, ValueError):
        return "partial"
    # (a run finished before an option was added to contlearn recorded its config without it)
    if digest(with_new_defaults(stored, expected)) != digest(expected):
        return "partial"
    return "done" if done.get("config_sha256") in (digest(expected), digest(stored)) else "partial"


def plan_sweep(
    spec: str | Path | SweepSpec | Mapping[str, Any],
    out: str | Path,
    overrides: Mapping[str, Any] | None = None,
) -> Plan:
    """Expand and validate a sweep and find where each run stands; writes nothing.

    Args:
        spec: a spec file, a parsed table (as TOML gives) or a :class:`SweepSpec`.
        out: the sweep root (one run directory per run below it).
        overrides: base config keys (``--set``), applied over the spec's.

    Raises:
        ContlearnError: a bad spec, an invalid run config, or a root holding other runs there.
    """
    from contlearn.results.store import is_run_dir

    if not isinstance(spec, SweepSpec):
        spec = (
            read_spec(spec, overrides)
            if isinstance(spec, (str, Path))
            else parse_spec(spec, overrides)
        )
    root = Path(out).absolute()
    if is_run_dir(root) or root.is_file():
        raise RunDirError(f"{root} is a run or a file; give a folder for the sweep's runs")
    runs = expand(spec)
    expected = {r.name: expected_config(r) for r in runs}
    runs = [portable(r, expected[r.name]) for r in runs]
    status = {r.name: run_status(root / r.name, expected[r.name]) for r in runs}
    digests = {n: digest(c) for n, c in expected.items()}
    return Plan(spec, root, runs, status, digests, runtime_registrations())


def portable(run: SweepRun, expected: Mapping[str, Any]) -> SweepRun:
    """The run with its plug-in stream and agent named as its ``config.json`` names them: a
    class by its reference, a ``file.py:Class`` by its absolute path (a worker may start
    elsewhere)."""
    fixed: dict[str, Any] = {
        k: expected[k]
        for k in ("stream", "agent")
        if k in run.config and not (isinstance(run.config[k], str) and ":" not in run.config[k])
    }
    return replace(run, config={**run.config, **fixed}) if fixed else run


def write_sweep_file(plan: Plan) -> None:
    """``ROOT/sweep.json``: the spec and its expansion."""
    from contlearn.results.store import write_atomic

    plan.root.mkdir(parents=True, exist_ok=True)
    data = {
        "written": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "spec": plan.spec.to_dict(),
        "runs": [{"name": r.name, "point": r.point, "config": r.config} for r in plan.runs],
    }
    write_atomic(plan.root / SWEEP_FILE, json.dumps(data, indent=2, default=str).encode())


def _run(plan: Plan, progress: bool | None, backend: Any) -> SweepResult:
    write_sweep_file(plan)
    todo = [r for r in plan.runs if plan.status[r.name] != "done"]
    skipped = [r.name for r in plan.runs if plan.status[r.name] == "done"]
    bar = SweepProgress(len(plan.runs), len(skipped), progress)
    try:
        outcomes = backend(todo, bar)
    finally:
        bar.close()
    return SweepResult(plan.root, outcomes, skipped)


def run_sweep(
    plan: Plan,
    *,
    backend: str = "local",
    workers: int | None = None,
    address: str | None = None,
    cpus_per_run: float = 1,
    progress: bool | None = None,
) -> SweepResult:
    """Run every run of a plan that is not done; writes ``sweep.json`` first.

    Args:
        plan: from :func:`plan_sweep`.
        backend: ``local`` (process pool) or ``ray``.
        workers: local processes (default ``os.cpu_count()``; 1 runs in this process).
        address: Ray cluster address (default: ``RAY_ADDRESS``, else a new local Ray).
        cpus_per_run: CPUs Ray reserves for each run (torch uses that many threads).
        progress: show the progress line (default: on a terminal and not under CI).

    Raises:
        ContlearnError: a bad backend or worker count, Ray missing or unreachable, or a
            registration made at run time that worker processes cannot import (nothing is
            written then).
    """
    workers = (os.cpu_count() or 1) if workers is None else workers
    if backend not in ("local", "ray") or workers < 1 or cpus_per_run <= 0:
        raise ConfigError(
            f"sweep needs backend local or ray ({backend!r}), workers ≥ 1 "
            f"({workers}) and cpus-per-run > 0 ({cpus_per_run})"
        )
    left = sum(s != "done" for s in plan.status.values())
    if backend == "ray" or min(workers, left) > 1:  # (runs in other processes)
        check_portable(plan.registrations, plan.names_used())
    if backend == "ray":
        from contlearn.sweeps.on_ray import ray_session, run_ray

        with ray_session(address) as ray:
            return _run(
                plan, progress, lambda todo, bar: run_ray(ray, plan, todo, cpus_per_run, bar)
            )
    return _run(
        plan,
        progress,
        lambda todo, bar: run_local(plan, todo, min(workers, max(1, len(todo))), bar),
    )


def sweep(
    spec: str | Path | Mapping[str, Any],
    out: str | Path,
    *,
    overrides: Mapping[str, Any] | None = None,
    **options: Any,
) -> SweepResult:
    """Plan and run a sweep: :func:`plan_sweep` then :func:`run_sweep` (``options``)."""
    return run_sweep(plan_sweep(spec, out, overrides), **options)


__all__ = ["Plan", "SweepResult", "plan_sweep", "run_sweep", "sweep"]
