"""Typed, documented, validated options: the ``*Spec`` dataclasses of streams, agents, learners.

Every option of a stream, network or learner is a field of a frozen dataclass declared with
:func:`param`, which carries its help text and bounds. The same declaration drives ``--set``
parsing, TOML configs, ``contlearn list`` and validation, so no option can be silently ignored.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Mapping, Sequence
from typing import Any

from contlearn.errors import ConfigError

#: the largest whole number an option takes: the store's step and seed columns are int64, and
#: counts derived from options (seed + seeds, tasks × examples) must still fit
MAX_INT = 2**62
_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def param(
    default: Any,
    help: str,  # noqa: A002 - mirrors argparse
    *,
    choices: Sequence[Any] | None = None,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
) -> Any:
    """Declare one option of a Spec dataclass.

    Args:
        default: the default value (also fixes the type for parsing).
        help: one line shown by ``contlearn list``.
        choices: allowed values, if the option is an enumeration.
        low: inclusive lower bound (exclusive if ``low_open``), for numbers.
        high: inclusive upper bound, for numbers.
        low_open: make ``low`` exclusive (e.g. a learning rate must be > 0).
    """
    meta = {
        "help": help,
        "choices": tuple(choices) if choices else None,
        "low": low,
        "high": high,
        "low_open": low_open,
    }
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass(frozen=True)
class FieldInfo:
    """What ``contlearn list`` and the parser know of one option."""

    name: str
    type: type
    default: Any
    help: str
    choices: tuple[Any, ...] | None
    low: float | None
    high: float | None
    low_open: bool


def spec_fields(spec_cls: type) -> list[FieldInfo]:
    """The options of a Spec dataclass, in declaration order."""
    hints = typing.get_type_hints(spec_cls)
    out = []
    for f in dataclasses.fields(spec_cls):
        meta: Mapping[str, Any] = f.metadata or {}
        out.append(
            FieldInfo(
                name=f.name,
                type=_base_type(hints[f.name]),
                default=f.default,
                help=meta.get("help", ""),
                choices=meta.get("choices"),
                low=meta.get("low"),
                high=meta.get("high"),
                low_open=meta.get("low_open", False),
            )
        )
    return out


def _base_type(hint: Any) -> type:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def parse_value(field: FieldInfo, raw: Any, where: str) -> Any:
    """Convert a raw value (a ``--set`` string or a TOML value) to the field's type and check it.

    Args:
        field: the option.
        raw: the value as given.
        where: how the user named it, e.g. ``learner.replacement_rate``, for messages.

    Raises:
        ConfigError: the value has the wrong type, is out of range or not an allowed choice.
    """
    if isinstance(raw, bool) and field.type is str and field.choices and "true" in field.choices:
        raw = str(raw).lower()  # (a tri-state option: true/false/auto)
    value = _convert(field.type, raw, where)
    if field.choices is not None and value not in field.choices:
        allowed = ", ".join(str(c) for c in field.choices)
        raise ConfigError(f"{where}={raw!r} is not allowed; choose one of {allowed}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{where}={raw!r} must be a finite number")
        if isinstance(value, int) and abs(value) > MAX_INT:
            raise ConfigError(
                f"{where}={raw!r} is out of range; whole numbers must be at most 2**62 "
                f"({MAX_INT:.2e}), what the run store's int64 columns hold with room to count"
            )
        if field.low is not None and (value < field.low or (field.low_open and value == field.low)):
            op = ">" if field.low_open else ">="
            raise ConfigError(f"{where}={raw!r} is out of range; it must be {op} {field.low}")
        if field.high is not None and value > field.high:
            raise ConfigError(f"{where}={raw!r} is out of range; it must be <= {field.high}")
    return value


def _convert(kind: type, raw: Any, where: str) -> Any:
    if kind is bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.strip().lower() in _TRUE | _FALSE:
            return raw.strip().lower() in _TRUE
        raise ConfigError(f"{where}={raw!r} is not a boolean; use true or false")
    if kind is int:
        if isinstance(raw, bool):
            raise ConfigError(f"{where}={raw!r} is not an integer; give a whole number")
        if isinstance(raw, int):
            return raw
        if isinstance(raw, float) and raw.is_integer():
            return int(raw)
        if isinstance(raw, str):
            text = raw.strip().replace("_", "")
            try:
                return int(text)
            except ValueError:
                try:
                    as_float = float(text)
                except ValueError:
                    as_float = math.nan
                if math.isfinite(as_float) and as_float.is_integer():
                    return int(as_float)
        raise ConfigError(f"{where}={raw!r} is not an integer; give a whole number such as 1000")
    if kind is float:
        if isinstance(raw, bool):
            raise ConfigError(f"{where}={raw!r} is not a number")
        if isinstance(raw, (int, float)):
            return float(raw)
        if isinstance(raw, str):
            try:
                return float(raw.strip())
            except ValueError:
                pass
        raise ConfigError(f"{where}={raw!r} is not a number; give e.g. 0.01 or 1e-4")
    if kind is str:
        if isinstance(raw, str):
            return raw.strip()
        if isinstance(raw, (list, tuple)) and all(
            isinstance(x, (int, float, str)) and not isinstance(x, bool) for x in raw
        ):
            return ",".join(str(x) for x in raw)
        if isinstance(raw, (int, float)) and not isinstance(raw, bool):
            return str(raw)
        raise ConfigError(f"{where}={raw!r} is not a string")
    raise TypeError(f"unsupported option type {kind!r} for {where}")


def build_spec(spec_cls: type, values: Mapping[str, Any], prefix: str = "") -> Any:
    """Instantiate a Spec from raw values, parsing and validating each, then ``validate()``.

    Args:
        spec_cls: the Spec dataclass.
        values: option name -> raw value; names must be fields of ``spec_cls``.
        prefix: how option names are written by the user (``"learner."``), for messages.

    Raises:
        ConfigError: an unknown option or a bad value.
    """
    fields = {f.name: f for f in spec_fields(spec_cls)}
    kwargs = {}
    for name, raw in values.items():
        if name not in fields:
            raise ConfigError(f"unknown option {prefix}{name!r} for {spec_cls.__name__}")
        kwargs[name] = parse_value(fields[name], raw, prefix + name)
    spec = spec_cls(**kwargs)
    check = getattr(spec, "validate", None)
    if check is not None:
        check()
    return spec


def parse_int_list(text: str, where: str, *, allow_empty: bool = False) -> tuple[int, ...]:
    """Parse ``"100,100,100"`` into positive ints (the ``hidden`` option's format)."""
    parts = [p.strip() for p in str(text).split(",")]
    if parts == [""]:
        parts = []
    if "" in parts:
        raise ConfigError(
            f"{where}={text!r} has an empty width between commas; give widths like 100,100,100"
        )
    if not parts and not allow_empty:
        raise ConfigError(f"{where}={text!r} is empty; give comma-separated widths like 100,100")
    out = []
    for p in parts:
        try:
            n = int(p)
        except ValueError:
            raise ConfigError(
                f"{where}={text!r} must be comma-separated whole numbers like 100,100,100"
            ) from None
        if n <= 0:
            raise ConfigError(f"{where}={text!r} has a non-positive width {n}; widths must be > 0")
        if n > MAX_INT:
            raise ConfigError(f"{where}={text!r} has a width above 2**62; give a smaller one")
        out.append(n)
    return tuple(out)
