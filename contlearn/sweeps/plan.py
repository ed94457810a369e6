"""Sweeps: a base config × axes × seed groups, one ordinary run directory per run.

A spec is a TOML file with the keys of ``contlearn run`` configs plus a few of its own::

    stream = "permuted-mnist"       # the base config: any run key, nested tables allowed
    tasks = 100
    seeds = 10                      # seeds in all (``seed``: the first, default 0) ...
    seeds_per_run = 5               # ... 5 per run: seed=0,seeds=5 and seed=5,seeds=5
    [grid]                          # the product of these lists
    lr = [0.01, 0.003]
    [[zip]]                         # lists that move together (equal lengths); each [[zip]]
    hidden = ["100,100", "1000"]    # group is one more factor of the product
    batch_size = [1, 16]

    [[variant]]                     # optional: a union of sub-sweeps, each with its own keys
    learner = "bp"                  # fixed keys of this variant ...
    [[variant]]
    learner = "cbp"
    [variant.grid]                  # ... and its own axes ([variant.grid], [[variant.zip]])
    "learner.replacement_rate" = [1e-4, 1e-5]

Runs are ordered variant by variant, then by the axes as written (the first varies slowest),
seed groups fastest, and named ``key=value__...__seeds=A-B`` by the keys that vary (axis keys,
and variant keys that differ between variants). Every run's config is resolved before anything
runs. Each run is ``contlearn.run(config, out=ROOT/name, resume=True)``: finished runs (their
``done.json`` matches the config) are skipped, the others start or continue.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from contlearn.errors import ConfigError, ContlearnError, RunDirError
from contlearn.running.config import flatten
from contlearn.sweeps.local import DONE_FILE, SweepProgress, SweepResult, run_local

SWEEP_FILE = "sweep.json"
SPEC_KEYS = ("grid", "zip", "variant", "seeds_per_run")
NAME_LIMIT = 160

Axes = list[dict[str, list[Any]]]
"""Groups of keys with equal-length value lists; each group is one factor of the product."""


@dataclass(frozen=True)
class SweepSpec:
    """A parsed sweep spec.

    Attributes:
        base: flat config keys of every run (without ``seed``/``seeds``).
        axes: the shared axes (a ``[grid]`` key is a group of one, a ``[[zip]]`` a group).
        variants: ``(fixed keys, axes)`` of each ``[[variant]]`` (one empty variant if none).
        seed: the first seed. seeds: seeds in all. seeds_per_run: seeds batched in one run.
    """

    base: dict[str, Any]
    axes: Axes
    variants: list[tuple[dict[str, Any], Axes]] = field(default_factory=lambda: [({}, [])])
    seed: int = 0
    seeds: int = 1
    seeds_per_run: int = 1

    def to_dict(self) -> dict[str, Any]:
        """The spec as plain values (what ``sweep.json`` records)."""
        return {"base": self.base, "axes": self.axes,
                "variants": [{"set": fixed, "axes": axes} for fixed, axes in self.variants],
                "seed": self.seed, "seeds": self.seeds, "seeds_per_run": self.seeds_per_run}


@dataclass(frozen=True)
class SweepRun:
    """One run of a sweep: a point of the axes and a group of seeds.

    Attributes:
        name: the run directory's name under the sweep root.
        point: the keys that vary at this point, with their values.
        config: flat config for :func:`contlearn.run` (base, point, ``seed``, ``seeds``).
    """

    name: str
    point: dict[str, Any]
    config: dict[str, Any]


@dataclass
class Plan:
    """An expanded, validated sweep and where each run stands (done, partial or new)."""

    spec: SweepSpec
    root: Path
    runs: list[SweepRun]
    status: dict[str, str]
    digests: dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        """One line per run (``status  name``) and a count line."""
        lines = [f"{self.status[r.name]:<8} {r.name}" for r in self.runs]
        counts = {s: sum(v == s for v in self.status.values()) for s in ("done", "partial", "new")}
        lines.append(f"{len(self.runs)} runs in {self.root}: " +
                     ", ".join(f"{n} {s}" for s, n in counts.items()))
        return "\n".join(lines)


def _axes(table: Mapping[str, Any], where: str) -> Axes:
    """The ``grid`` and ``zip`` of a table as axis groups."""
    grid, zips = table.get("grid", {}), table.get("zip", [])
    if not isinstance(grid, Mapping) or not isinstance(zips, list) or not all(
            isinstance(z, Mapping) for z in zips):
        raise ConfigError(f"sweep spec: [{where}grid] must be a table and [[{where}zip]] an "
                          "array of tables")
    groups = [flatten(grid)] + [flatten(z) for z in zips]
    for i, group in enumerate(groups):
        name = f"{where}grid" if i == 0 else f"{where}zip[{i - 1}]"
        for key, values in group.items():
            if key in ("seed", "seeds"):
                raise ConfigError(f"{name} sets {key!r}; seeds are set by the top-level seed, "
                                  "seeds and seeds_per_run")
            if not isinstance(values, list) or not values:
                raise ConfigError(f"{name}.{key} must be a non-empty list of values, "
                                  f"e.g. {key} = [{values!r}]")
        if i and len({len(v) for v in group.values()}) > 1:
            lengths = ", ".join(f"{k}: {len(v)}" for k, v in group.items())
            raise ConfigError(f"{name} lists differ in length ({lengths}); values in a zip "
                              "group move together")
    return [{k: v} for k, v in groups[0].items()] + [g for g in groups[1:] if g]


def _count(data: Mapping[str, Any], key: str, default: int, low: int) -> int:
    value = data.get(key, default)
    if isinstance(value, str) and value.strip().isdigit():  # from --set
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"sweep {key}={value!r} must be an integer ≥ {low}")
    return value


def _variants(data: Mapping[str, Any]) -> list[tuple[dict[str, Any], Axes]]:
    tables = data.get("variant", [{}])
    if not isinstance(tables, list) or not tables or not all(
            isinstance(t, Mapping) for t in tables):
        raise ConfigError("sweep spec: [[variant]] must be an array of tables")
    out = []
    for i, table in enumerate(tables):
        fixed = flatten({k: v for k, v in table.items() if k not in ("grid", "zip")})
        bad = sorted(set(fixed) & {"seed", "seeds", "seeds_per_run", "variant"})
        if bad:
            raise ConfigError(f"variant[{i}] sets {bad[0]!r}; set it at the top of the spec")
        out.append((fixed, _axes(table, "variant.")))
    return out


def _check_keys(axes: Axes, variants: list[tuple[dict[str, Any], Axes]],
                overrides: Mapping[str, Any]) -> None:
    shared = [k for g in axes for k in g]
    for fixed, own in variants:
        keys = shared + list(fixed) + [k for g in own for k in g]
        dup = next((k for i, k in enumerate(keys) if k in keys[:i]), None)
        if dup:
            raise ConfigError(f"sweep key {dup!r} is given twice (in two axes, or in an axis "
                              "and a variant); give it once")
        clash = sorted(set(keys) & set(overrides))
        if clash:
            raise ConfigError(f"--set {clash[0]} overrides a sweep axis or variant key; edit "
                              "the spec instead")


def parse_spec(data: Mapping[str, Any], overrides: Mapping[str, Any] | None = None) -> SweepSpec:
    """Build a :class:`SweepSpec` from a parsed TOML table and ``--set`` base overrides.

    Raises:
        ConfigError: a malformed axis, unequal zip lengths, a key given twice, bad seeds.
    """
    overrides = dict(overrides or {})
    axes, variants = _axes(data, ""), _variants(data)
    _check_keys(axes, variants, overrides)
    base = {**flatten({k: v for k, v in data.items() if k not in SPEC_KEYS}), **overrides}
    seeds = _count(base, "seeds", 1, 1)
    return SweepSpec({k: v for k, v in base.items() if k not in ("seed", "seeds")}, axes,
                     variants, _count(base, "seed", 0, 0), seeds,
                     _count(data, "seeds_per_run", seeds, 1))


def read_spec(path: str | Path, overrides: Mapping[str, Any] | None = None) -> SweepSpec:
    """Read a sweep spec (TOML) file; see the module docstring for its keys.

    Raises:
        ConfigError: the file is missing or malformed, or the spec is invalid.
    """
    from contlearn.running.config import tomllib

    file = Path(path)
    try:
        data = tomllib.loads(file.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read sweep spec {file} ({exc.strerror}); check the path"
                          ) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"sweep spec {file} is malformed: {exc}") from None
    return parse_spec(data, overrides)


def format_value(value: Any) -> str:
    """A value as it appears in run names: ``0.003``, ``1e-05``, ``100,100``, ``true``."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return ",".join(format_value(v) for v in value)
    return repr(value) if isinstance(value, float) else str(value)


def run_name(point: Mapping[str, Any], seed: int, seeds: int) -> str:
    """``key=value__...__seeds=A-B``, sanitised for file systems; long names get a hash."""
    parts = [f"{k}={format_value(v)}" for k, v in point.items()]
    parts.append(f"seeds={seed}" if seeds == 1 else f"seeds={seed}-{seed + seeds - 1}")
    name = re.sub(r"[^A-Za-z0-9._,=+-]+", "-", "__".join(parts)).strip("-.")
    if len(name) > NAME_LIMIT:
        digest = hashlib.sha1(name.encode()).hexdigest()[:10]
        name = f"{name[:NAME_LIMIT - 12]}__{digest}"
    return name


def _points(spec: SweepSpec) -> list[dict[str, Any]]:
    """Every point (variant keys, shared axes, variant axes), in order."""
    def product(axes: Axes) -> list[dict[str, Any]]:
        groups = [[dict(zip(g, vals, strict=True)) for vals in zip(*g.values(), strict=True)]
                  for g in axes]
        return [{k: v for part in combo for k, v in part.items()}
                for combo in itertools.product(*groups)]

    return [{**fixed, **point} for fixed, own in spec.variants
            for point in product(spec.axes + own)]


def _name_keys(spec: SweepSpec) -> set[str]:
    """Keys named in run names: axis keys, and variant keys that differ between variants."""
    keys = {k for g in spec.axes for k in g}
    keys |= {k for _, own in spec.variants for g in own for k in g}
    fixed = [f for f, _ in spec.variants]
    keys |= {k for f in fixed for k in f if any(json.dumps(g.get(k), default=str) !=
                                                json.dumps(f[k], default=str) for g in fixed)}
    return keys


def expand(spec: SweepSpec) -> list[SweepRun]:
    """Every (point, seed group) of a spec, in order; names are unique.

    Raises:
        ConfigError: two runs would get the same name (a duplicate value in an axis).
    """
    keys, end = _name_keys(spec), spec.seed + spec.seeds
    runs: list[SweepRun] = []
    names: dict[str, int] = {}
    for full in _points(spec):
        point = {k: v for k, v in full.items() if k in keys}
        for first in range(spec.seed, end, spec.seeds_per_run):
            n = min(spec.seeds_per_run, end - first)
            name = run_name(point, first, n)
            if name in names:
                raise ConfigError(f"sweep runs {names[name]} and {len(runs)} are both named "
                                  f"{name!r}; remove the duplicate value")
            names[name] = len(runs)
            runs.append(SweepRun(name, point, {**spec.base, **full, "seed": first, "seeds": n}))
    return runs


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
    from contlearn.running.api import changed_keys

    if not is_run_dir(path):
        return "new"
    stored = read_config(path)
    changed = changed_keys(stored, expected)
    if changed:
        k = changed[0]
        raise RunDirError(f"{path} holds a run with {k}={stored.get(k)!r}, not "
                          f"{expected.get(k)!r}; the spec changed: use another --out")
    try:
        done = json.loads((path / DONE_FILE).read_text())
    except (OSError, ValueError):
        return "partial"
    return "done" if done.get("config_sha256") == digest(expected) else "partial"


def plan_sweep(spec: str | Path | SweepSpec | Mapping[str, Any], out: str | Path,
               overrides: Mapping[str, Any] | None = None) -> Plan:
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
        spec = (read_spec(spec, overrides) if isinstance(spec, (str, Path))
                else parse_spec(spec, overrides))
    root = Path(out).absolute()
    if is_run_dir(root) or root.is_file():
        raise RunDirError(f"{root} is a run or a file; give a folder for the sweep's runs")
    runs = expand(spec)
    expected = {r.name: expected_config(r) for r in runs}
    status = {r.name: run_status(root / r.name, expected[r.name]) for r in runs}
    return Plan(spec, root, runs, status, {n: digest(c) for n, c in expected.items()})


def write_sweep_file(plan: Plan) -> None:
    """``ROOT/sweep.json``: the spec and its expansion."""
    from contlearn.results.store import write_atomic

    plan.root.mkdir(parents=True, exist_ok=True)
    data = {"written": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "spec": plan.spec.to_dict(),
            "runs": [{"name": r.name, "point": r.point, "config": r.config} for r in plan.runs]}
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


def run_sweep(plan: Plan, *, backend: str = "local", workers: int | None = None,
              address: str | None = None, cpus_per_run: float = 1,
              progress: bool | None = None) -> SweepResult:
    """Run every run of a plan that is not done; writes ``sweep.json`` first.

    Args:
        plan: from :func:`plan_sweep`.
        backend: ``local`` (process pool) or ``ray``.
        workers: local processes (default ``os.cpu_count()``; 1 runs in this process).
        address: Ray cluster address (default: ``RAY_ADDRESS``, else a new local Ray).
        cpus_per_run: CPUs Ray reserves for each run (torch uses that many threads).
        progress: show the progress line (default: on a terminal and not under CI).

    Raises:
        ContlearnError: a bad backend or worker count, Ray missing or unreachable (nothing is
            written then).
    """
    workers = (os.cpu_count() or 1) if workers is None else workers
    if backend not in ("local", "ray") or workers < 1 or cpus_per_run <= 0:
        raise ConfigError(f"sweep needs backend local or ray ({backend!r}), workers ≥ 1 "
                          f"({workers}) and cpus-per-run > 0 ({cpus_per_run})")
    if backend == "ray":
        from contlearn.sweeps.on_ray import ray_session, run_ray

        with ray_session(address) as ray:
            return _run(plan, progress, lambda todo, bar: run_ray(ray, plan, todo, cpus_per_run,
                                                                  bar))
    return _run(plan, progress, lambda todo, bar: run_local(plan, todo,
                                                            min(workers, max(1, len(todo))), bar))


def sweep(spec: str | Path | Mapping[str, Any], out: str | Path, *,
          overrides: Mapping[str, Any] | None = None, **options: Any) -> SweepResult:
    """Plan and run a sweep: :func:`plan_sweep` then :func:`run_sweep` (``options``)."""
    return run_sweep(plan_sweep(spec, out, overrides), **options)


__all__ = ["Plan", "SweepResult", "SweepRun", "SweepSpec", "expand", "parse_spec", "plan_sweep",
           "read_spec", "run_name", "run_sweep", "sweep"]
