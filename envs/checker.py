"""``check_stream``: does a stream keep its protocol? (as gymnasium's ``check_env`` does for envs)

It builds the stream a few times from its Spec and seeds, takes a few steps, and checks what
the engine and the runner rely on (:mod:`contlearn.envs.protocol`): the ``info`` fields; the
shapes and dtypes of what it yields; task boundaries every ``steps_per_task`` steps;
determinism (the same seeds give the same data, other seeds other data, and replica r depends
only on its own seed); that probing does not move the stream; that ``next_block`` gives the
examples of T ``next`` calls; that its state survives a checkpoint (``torch.save`` and
``torch.load(weights_only=True)``) and a resume; and that ``close`` may be called twice. Every
violation is collected and raised in one :class:`StreamCheckError`.

A stream class may set ``check_settings``, Spec values that make the check cheap (short tasks,
small batches); ``settings`` overrides them.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from contlearn.envs.plugins import KINDS, StreamCheckError, build_stream, resolve_stream
from contlearn.errors import ConfigError
from contlearn.registry import where
from contlearn.spec import build_spec

Problems = list[str]
Make = Callable[[Sequence[int]], Any]


def check_stream(
    stream: str | type,
    seeds: Sequence[int] = (0, 1),
    steps: int | None = None,
    *,
    spec: Any = None,
    settings: Mapping[str, Any] | None = None,
) -> None:
    """Check that a stream keeps the protocol of its kind.

    Args:
        stream: a registered id, ``module:Class`` / ``file.py:Class``, or a stream class.
        seeds: the replicas' seeds (at least two, distinct, for the determinism checks).
        steps: steps taken per comparison (default: two tasks and a step, at most 32).
        spec: the stream's Spec instance (default: its Spec with the class's
            ``check_settings`` and ``settings``).
        settings: Spec values over the class's ``check_settings``.

    Raises:
        StreamCheckError: the violations, every one of them, in one message (``problems``
            lists them).
        ConfigError: the stream or its settings cannot be found or parsed.
    """
    cls, name = resolve_stream(stream, portable=False)  # (a class that is no stream: raised)
    seeds = [int(s) for s in seeds]
    if len(seeds) < 2 or len(set(seeds)) != len(seeds):
        raise ConfigError(f"check_stream needs two or more distinct seeds, not {seeds}")
    if steps is not None and steps < 2:
        raise ConfigError(f"check_stream needs steps >= 2 (or None), not {steps}")
    if spec is None:
        spec = build_spec(cls.Spec, {**getattr(cls, "check_settings", {}), **(settings or {})})

    def make(replica_seeds: Sequence[int]) -> Any:
        return build_stream(cls, spec, list(replica_seeds), name)

    if cls.kind == "rl":
        from contlearn.envs.checker_rl import rl_problems as check
    else:
        from contlearn.envs.checker_supervised import supervised_problems as check
    problems = check(make, seeds, steps, cls.kind)
    if problems:
        raise StreamCheckError(name, problems)


def attempt(problems: Problems, what: str, fn: Callable[[], Any]) -> Any:
    """``fn()``, or None with a problem noted if it raises."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - the stream's failure is what the check reports
        problems.append(f"{what} raised {where(exc)}")
        return None


def same(a: Any, b: Any) -> bool:
    """Whether two values (tensors, arrays, numbers, nested tuples, lists and dicts) are
    equal element for element."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.shape == b.shape
            and bool(torch.equal(a, b))
        )
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    try:
        return bool((a == b).all()) if hasattr(a == b, "all") else bool(a == b)
    except Exception:  # noqa: BLE001 - not comparable: not the same
        return False


def replica(value: Any, r: int) -> Any:
    """Replica ``r``'s part of a value whose tensors lead with the replica dim."""
    if isinstance(value, torch.Tensor):
        return value[r : r + 1]
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a NamedTuple
        return type(value)(*(replica(v, r) for v in value))
    if isinstance(value, (tuple, list)):
        return type(value)(replica(v, r) for v in value)
    return value


def round_trip(state: Any) -> Any:
    """A state as a checkpoint gives it back (``torch.load(weights_only=True)``)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def check_info(stream: Any, seeds: Sequence[int], kind: str) -> Problems:
    """The ``info`` fields and the counters of a stream just built."""
    problems: Problems = []
    info = stream.info
    need = ("name", "kind", "input_shape", "num_outputs", "num_replicas", "metric")
    missing = [f for f in need if not hasattr(info, f)]
    if missing:
        return [f"info lacks {', '.join(missing)}"]
    if info.kind != kind or info.kind not in KINDS:
        problems.append(f"info.kind is {info.kind!r}, but the class's kind is {kind!r}")
    if info.num_replicas != len(seeds):
        problems.append(f"info.num_replicas is {info.num_replicas} for {len(seeds)} seeds")
    if list(stream.seeds) != list(seeds):
        problems.append(f"seeds is {list(stream.seeds)}, not the seeds given {list(seeds)}")
    shape = info.input_shape
    if not isinstance(shape, tuple) or not all(isinstance(d, int) and d > 0 for d in shape):
        problems.append(f"info.input_shape {shape!r} is not a tuple of positive ints")
    if not isinstance(info.num_outputs, int) or info.num_outputs < 1:
        problems.append(f"info.num_outputs {info.num_outputs!r} is not a positive int")
    spt = stream.steps_per_task
    if not isinstance(spt, int) or spt < 1:
        problems.append(f"steps_per_task {spt!r} is not a positive int")
    if stream.step != 0:
        problems.append(f"step is {stream.step} before the first step, not 0")
    return problems


def check_close(make: Make, seeds: Sequence[int]) -> Problems:
    """``close()`` twice, on a stream just built, raises nothing."""
    problems: Problems = []
    stream = attempt(problems, "building the stream", lambda: make(seeds))
    if stream is not None:
        attempt(problems, "close()", stream.close)
        attempt(problems, "a second close()", stream.close)
    return problems


__all__ = ["StreamCheckError", "check_stream"]
