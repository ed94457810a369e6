"""A user's own stream: ``contlearn run file.py:Class`` / ``module:Class``, or a class.

A plug-in stream needs no base class. It is a class built as ``Class(spec, seeds)`` with

- ``Spec``: a dataclass of its options, each with a default of type bool, int, float or str
  (``--set name=value``; :func:`contlearn.spec.param` adds help text and bounds);
- ``kind``: ``classification``, ``regression`` (the supervised protocol) or ``rl``;
- the methods of the protocol for its kind (:mod:`contlearn.envs.protocol`): ``next``,
  ``score``, ``probe_batch`` (supervised) or ``advance``, ``probe_batch`` (RL), and
  ``state_dict``, ``load_state_dict``, ``close`` for every kind.

:func:`contlearn.envs.check_stream` checks an instance's behaviour; this module checks only what
can be seen on the class, so that a run refuses a malformed stream before it writes anything.
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
import typing
from pathlib import Path
from typing import Any

from contlearn.errors import ConfigError
from contlearn.registry import absolute_ref, is_file_ref, load_entry_point, where

KINDS = ("classification", "regression", "rl")
_COMMON = ("state_dict", "load_state_dict", "close")
#: the methods of each kind's protocol
METHODS = {
    "classification": ("next", "score", "probe_batch", *_COMMON),
    "regression": ("next", "score", "probe_batch", *_COMMON),
    "rl": ("advance", "probe_batch", *_COMMON),
}
#: what every stream instance has (checked after it is built)
ATTRIBUTES = {
    "classification": ("info", "seeds", "step", "steps_per_task", "task"),
    "regression": ("info", "seeds", "step", "steps_per_task", "task"),
    "rl": ("info", "seeds", "step", "steps_per_task", "task", "obs"),
}
_OPTION_TYPES = (bool, int, float, str)


def class_problems(cls: Any) -> list[str]:
    """What a stream class lacks, in plain words (empty: it looks like a stream)."""
    if not inspect.isclass(cls):
        return [f"it is a {type(cls).__name__}, not a class"]
    problems = spec_problems(getattr(cls, "Spec", None))
    kind = getattr(cls, "kind", None)
    if kind not in KINDS:
        problems.append(f"its kind is {kind!r}, not one of {', '.join(KINDS)}")
        return problems
    missing = [m for m in METHODS[kind] if not callable(getattr(cls, m, None))]
    if missing:
        problems.append(
            f"it lacks the {kind} stream method(s) {', '.join(m + '()' for m in missing)}"
        )
    return problems


def spec_problems(spec: Any) -> list[str]:
    """What is wrong with a stream's ``Spec`` (empty: a dataclass of simple options)."""
    if spec is None:
        return ["it has no Spec (a dataclass of its options)"]
    if not (inspect.isclass(spec) and dataclasses.is_dataclass(spec)):
        return ["its Spec is not a dataclass"]
    try:
        hints = typing.get_type_hints(spec)
    except Exception as exc:  # noqa: BLE001 - an annotation that does not evaluate
        return [f"its Spec's annotations cannot be read ({where(exc)})"]
    problems = []
    for f in dataclasses.fields(spec):
        if f.default is dataclasses.MISSING:
            problems.append(f"Spec.{f.name} has no default")
        if hints.get(f.name) not in _OPTION_TYPES:
            problems.append(f"Spec.{f.name} is not of type bool, int, float or str")
    return problems


def load_stream_class(ref: str) -> Any:
    """Import a plug-in stream ``module:Class`` or ``path/to/file.py:Class`` and check it.

    Raises:
        ConfigError: it cannot be imported, or it is not a stream (the message says what
            is missing).
    """
    path_part, sep, attr = ref.rpartition(":")
    if not sep or not path_part or not attr:
        raise ConfigError(f"stream {ref!r} is not of the form module:Class or file.py:Class")
    if not is_file_ref(ref) and "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    cls = load_entry_point(ref, "stream")
    check_stream_class(cls, ref)
    return cls


class StreamCheckError(ConfigError):
    """A stream breaks its protocol; ``problems`` lists every violation in plain words."""

    def __init__(self, name: str, problems: list[str], *, is_class: bool = False) -> None:
        self.problems = problems
        listed = "; ".join(f"({i}) {p}" for i, p in enumerate(problems, 1))
        if is_class:
            text = f"is not a stream: {listed}; see `Your own stream` in the README"
        else:
            text = f"fails {len(problems)} check(s): {listed}"
        super().__init__(f"stream {name} {text}")


def check_stream_class(cls: Any, name: str) -> None:
    """Raise one :class:`StreamCheckError` naming everything a stream class lacks."""
    problems = class_problems(cls)
    if problems:
        raise StreamCheckError(name, problems, is_class=True)


def resolve_stream(stream: str | type, *, portable: bool = True) -> tuple[Any, str]:
    """The stream class for a registered id, a ``module:Class``/``file.py:Class`` reference
    or a class, and the name a run records for it (file references with absolute paths).

    Args:
        stream: the id, reference or class.
        portable: for a class, name it by a reference that finds it again in another process
            (refusing one defined in a notebook); else by its class name.

    Raises:
        ConfigError: an unknown id, a reference that does not import, or not a stream.
    """
    from contlearn.envs import streams

    if inspect.isclass(stream):
        from contlearn.running.plugins import class_ref

        check_stream_class(stream, stream.__name__)
        return stream, class_ref(stream, "stream") if portable else stream.__name__
    if not isinstance(stream, str) or not stream:
        raise ConfigError(f"stream={stream!r} must be a stream id, module:Class or a class")
    if ":" in stream:
        return load_stream_class(stream), absolute_ref(stream)
    cls = streams.get(stream)
    if not getattr(cls, "__module__", "").startswith("contlearn."):  # (a user's registration)
        check_stream_class(cls, stream)
    return cls, stream


def build_stream(cls: Any, spec: Any, seeds: list[int], name: str) -> Any:
    """Build a plug-in stream and check that it has the attributes of its kind's protocol.

    Raises:
        ConfigError: its constructor fails, or the stream lacks an attribute (one line each).
    """
    try:
        stream = cls(spec, seeds)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - the user's constructor: its error, in one line
        raise ConfigError(f"stream {name} failed to start ({where(exc)}); fix it") from exc
    missing = [a for a in ATTRIBUTES[cls.kind] if not hasattr(stream, a)]
    if missing:
        close = getattr(stream, "close", None)
        if callable(close):
            close()
        raise ConfigError(
            f"stream {name} lacks the attribute(s) {', '.join(missing)} once built; set them "
            "in __init__ (see `Your own stream` in the README)"
        )
    return stream
