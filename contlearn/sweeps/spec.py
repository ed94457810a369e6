"""Sweep specs: a base config × axes × seed groups, expanded into named runs (nothing runs here).

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
and variant keys that differ between variants). :mod:`contlearn.sweeps.plan` resolves and runs
them.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from contlearn.errors import ConfigError
from contlearn.running.config import flatten

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
        return {
            "base": self.base,
            "axes": self.axes,
            "variants": [{"set": fixed, "axes": axes} for fixed, axes in self.variants],
            "seed": self.seed,
            "seeds": self.seeds,
            "seeds_per_run": self.seeds_per_run,
        }


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


def _axes(table: Mapping[str, Any], where: str) -> Axes:
    """The ``grid`` and ``zip`` of a table as axis groups."""
    grid, zips = table.get("grid", {}), table.get("zip", [])
    if (
        not isinstance(grid, Mapping)
        or not isinstance(zips, list)
        or not all(isinstance(z, Mapping) for z in zips)
    ):
        raise ConfigError(
            f"sweep spec: [{where}grid] must be a table and [[{where}zip]] an array of tables"
        )
    groups = [flatten(grid)] + [flatten(z) for z in zips]
    for i, group in enumerate(groups):
        name = f"{where}grid" if i == 0 else f"{where}zip[{i - 1}]"
        for key, values in group.items():
            if key in ("seed", "seeds"):
                raise ConfigError(
                    f"{name} sets {key!r}; seeds are set by the top-level seed, "
                    "seeds and seeds_per_run"
                )
            if not isinstance(values, list) or not values:
                raise ConfigError(
                    f"{name}.{key} must be a non-empty list of values, e.g. {key} = [{values!r}]"
                )
        if i and len({len(v) for v in group.values()}) > 1:
            lengths = ", ".join(f"{k}: {len(v)}" for k, v in group.items())
            raise ConfigError(
                f"{name} lists differ in length ({lengths}); values in a zip group move together"
            )
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
    if (
        not isinstance(tables, list)
        or not tables
        or not all(isinstance(t, Mapping) for t in tables)
    ):
        raise ConfigError("sweep spec: [[variant]] must be an array of tables")
    out = []
    for i, table in enumerate(tables):
        fixed = flatten({k: v for k, v in table.items() if k not in ("grid", "zip")})
        bad = sorted(set(fixed) & {"seed", "seeds", "seeds_per_run", "variant"})
        if bad:
            raise ConfigError(f"variant[{i}] sets {bad[0]!r}; set it at the top of the spec")
        out.append((fixed, _axes(table, "variant.")))
    return out


def _check_keys(
    axes: Axes, variants: list[tuple[dict[str, Any], Axes]], overrides: Mapping[str, Any]
) -> None:
    shared = [k for g in axes for k in g]
    for fixed, own in variants:
        keys = shared + list(fixed) + [k for g in own for k in g]
        dup = next((k for i, k in enumerate(keys) if k in keys[:i]), None)
        if dup:
            raise ConfigError(
                f"sweep key {dup!r} is given twice (in two axes, or in an axis "
                "and a variant); give it once"
            )
        clash = sorted(set(keys) & set(overrides))
        if clash:
            raise ConfigError(
                f"--set {clash[0]} overrides a sweep axis or variant key; edit the spec instead"
            )


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
    return SweepSpec(
        {k: v for k, v in base.items() if k not in ("seed", "seeds")},
        axes,
        variants,
        _count(base, "seed", 0, 0),
        seeds,
        _count(data, "seeds_per_run", seeds, 1),
    )


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
        raise ConfigError(
            f"cannot read sweep spec {file} ({exc.strerror}); check the path"
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
        name = f"{name[: NAME_LIMIT - 12]}__{digest}"
    return name


def _points(spec: SweepSpec) -> list[dict[str, Any]]:
    """Every point (variant keys, shared axes, variant axes), in order."""

    def product(axes: Axes) -> list[dict[str, Any]]:
        groups = [
            [dict(zip(g, vals, strict=True)) for vals in zip(*g.values(), strict=True)]
            for g in axes
        ]
        return [
            {k: v for part in combo for k, v in part.items()}
            for combo in itertools.product(*groups)
        ]

    return [
        {**fixed, **point} for fixed, own in spec.variants for point in product(spec.axes + own)
    ]


def _name_keys(spec: SweepSpec) -> set[str]:
    """Keys named in run names: axis keys, and variant keys that differ between variants."""
    keys = {k for g in spec.axes for k in g}
    keys |= {k for _, own in spec.variants for g in own for k in g}
    fixed = [f for f, _ in spec.variants]
    keys |= {
        k
        for f in fixed
        for k in f
        if any(json.dumps(g.get(k), default=str) != json.dumps(f[k], default=str) for g in fixed)
    }
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
                raise ConfigError(
                    f"sweep runs {names[name]} and {len(runs)} are both named "
                    f"{name!r}; remove the duplicate value"
                )
            names[name] = len(runs)
            runs.append(SweepRun(name, point, {**spec.base, **full, "seed": first, "seeds": n}))
    return runs


__all__ = ["SweepRun", "SweepSpec", "expand", "parse_spec", "read_spec", "run_name"]
