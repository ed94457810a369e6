"""The checks :func:`contlearn.envs.check_stream` makes of a supervised stream.

Classification and regression streams (:class:`~contlearn.envs.protocol.SupervisedStreamProtocol`):
``next()`` gives ``Batch(obs (R, B, *input_shape) float32, target, task, new_task)`` with
``target`` ``(R, B)`` int64 class indices or ``(R, B, num_outputs)`` float32; a task starts
every ``steps_per_task`` steps; ``score`` gives ``(R, B)``; ``probe_batch(P)`` gives ``P``
examples per replica and does not move the stream.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from contlearn.envs.checker import (
    Make,
    Problems,
    attempt,
    check_close,
    check_info,
    replica,
    round_trip,
    same,
)
from contlearn.envs.protocol import HeldOutStream, ScheduledTaskStream

_PROBE = 3  # probe examples per replica


@contextlib.contextmanager
def built(make: Make, seeds: Sequence[int], problems: Problems) -> Iterator[Any]:
    """A stream built for ``seeds`` (None, with the problem noted, if that fails), closed
    afterwards."""
    stream = attempt(problems, f"building the stream for seeds {list(seeds)}", lambda: make(seeds))
    try:
        yield stream
    finally:
        if stream is not None:
            with contextlib.suppress(Exception):
                stream.close()


def walk(stream: Any, n: int) -> list[Any]:
    """The next ``n`` batches."""
    return [stream.next() for _ in range(n)]


def batch_problems(stream: Any, batches: list[Any], kind: str) -> Problems:
    """Shapes, dtypes and task boundaries of the first ``len(batches)`` batches."""
    info, spt = stream.info, stream.steps_per_task
    R, B = info.num_replicas, getattr(info, "batch_size", 1)
    for i, b in enumerate(batches):
        missing = [f for f in ("obs", "target", "task", "new_task") if not hasattr(b, f)]
        if missing:
            return [f"next() returned a {type(b).__name__} without {', '.join(missing)}"]
        problems = []
        want = (R, B, *info.input_shape)
        if not isinstance(b.obs, torch.Tensor) or tuple(b.obs.shape) != want:
            problems.append(f"next().obs at step {i} is not a tensor of shape {want}")
        elif b.obs.dtype != torch.float32:
            problems.append(f"next().obs at step {i} is {b.obs.dtype}, not torch.float32")
        problems += _target_problems(b.target, i, kind, R, B, info.num_outputs)
        task, new = expected_task(stream, i)
        if (bool(b.new_task), int(b.task)) != (new, task):
            rule = "its steps_until" if isinstance(stream, ScheduledTaskStream) else None
            problems.append(
                f"step {i} has task={b.task}, new_task={b.new_task}; with "
                f"{rule or f'steps_per_task={spt}'} it should be task={task}, new_task={new}"
            )
        if problems:
            return problems  # (the first step that breaks the protocol, not every one)
    return []


def expected_task(stream: Any, i: int) -> tuple[int, bool]:
    """The task step ``i`` (from 0) belongs to, and whether it is that task's first step."""
    if isinstance(stream, ScheduledTaskStream):
        task = 0
        while stream.steps_until(task + 1) <= i:
            task += 1
        return task, stream.steps_until(task) == i
    spt = stream.steps_per_task
    return i // spt, i % spt == 0


def held_out_problems(stream: Any, kind: str) -> Problems:
    """A held-out stream's ``held_out_batches`` give well-formed examples of the current task
    and leave the stream where it was."""
    if not isinstance(stream, HeldOutStream) or not stream.held_out_metric:
        return []
    info, before = stream.info, stream.step
    R = info.num_replicas
    chunks = list(stream.held_out_batches(3))
    if not chunks:
        return ["held_out_batches gave no examples"]
    for obs, target in chunks:
        n = obs.shape[1] if obs.ndim > 1 else -1
        if tuple(obs.shape) != (R, n, *info.input_shape) or obs.dtype != torch.float32:
            return [f"held_out_batches gave obs {tuple(obs.shape)}, not (R, n, *input_shape)"]
        problems = _target_problems(target, 0, kind, R, n, info.num_outputs)
        if problems:
            return [f"held_out_batches: {p}" for p in problems]
    if stream.step != before:
        return ["held_out_batches moved the stream"]
    return []


def _target_problems(target: Any, i: int, kind: str, R: int, B: int, outputs: int) -> Problems:
    want: tuple[int, ...]
    if kind == "classification":
        want, dtype = (R, B), torch.int64
    else:
        want, dtype = (R, B, outputs), torch.float32
    if not isinstance(target, torch.Tensor) or tuple(target.shape) != want:
        return [f"next().target at step {i} is not a tensor of shape {want} ({kind})"]
    if target.dtype != dtype:
        return [f"next().target at step {i} is {target.dtype}, not {dtype} ({kind})"]
    if kind == "classification" and ((target < 0) | (target >= outputs)).any():
        return [f"next().target at step {i} has labels outside 0..{outputs - 1}"]
    return []


def score_problems(stream: Any, batch: Any) -> Problems:
    """``score`` of predictions ``(R, B, num_outputs)`` is ``(R, B)``."""
    problems: Problems = []
    pred = torch.zeros(*batch.target.shape[:2], stream.info.num_outputs)
    score = attempt(problems, "score(pred, target)", lambda: stream.score(pred, batch.target))
    if score is not None and (
        not isinstance(score, torch.Tensor) or tuple(score.shape) != tuple(pred.shape[:2])
    ):
        problems.append(f"score(pred, target) is not a tensor of shape {tuple(pred.shape[:2])}")
    return problems


def probe_problems(make: Make, seeds: Sequence[int], n: int) -> Problems:
    """``probe_batch`` shapes, and that probing leaves the stream's data as it was."""
    problems: Problems = []
    with built(make, seeds, problems) as probed, built(make, seeds, problems) as twin:
        if probed is None or twin is None:
            return problems
        walk(probed, n), walk(twin, n)
        probe = attempt(problems, f"probe_batch({_PROBE})", lambda: probed.probe_batch(_PROBE))
        if probe is not None:
            info = probed.info
            want = (info.num_replicas, _PROBE, *info.input_shape)
            if not (isinstance(probe, tuple) and len(probe) == 2):
                problems.append("probe_batch() does not return (obs, target)")
            elif tuple(probe[0].shape) != want or probe[0].shape[:2] != probe[1].shape[:2]:
                problems.append(f"probe_batch({_PROBE}) obs is not of shape {want}")
            if not same(walk(probed, 2), walk(twin, 2)):
                problems.append("probe_batch() moves the stream: the batches after it change")
    return problems


def determinism_problems(make: Make, seeds: list[int], batches: list[Any]) -> Problems:
    """Same seeds, same data; other seeds, other data; replica r alone, the same as in a
    batch."""
    problems: Problems = []
    n = len(batches)
    with built(make, seeds, problems) as twin:
        if twin is not None and not same(walk(twin, n), batches):
            problems.append(f"two streams with seeds {seeds} give different data")
    other = [s + 1_000 for s in seeds]
    with built(make, other, problems) as stranger:
        if stranger is not None and _same_data(walk(stranger, n), batches):
            problems.append(f"seeds {other} give the same data as seeds {seeds}")
    last = len(seeds) - 1
    with built(make, [seeds[last]], problems) as alone:
        if alone is not None and not _same_data(
            walk(alone, n), [replica(b, last) for b in batches]
        ):
            problems.append(
                f"replica {last} (seed {seeds[last]}) alone gives other data than in a batch "
                f"of seeds {seeds}: a replica must depend only on its own seed"
            )
    return problems


def _same_data(a: list[Any], b: list[Any]) -> bool:
    return same([(x.obs, x.target) for x in a], [(y.obs, y.target) for y in b])


def state_problems(make: Make, seeds: list[int], n: int) -> Problems:
    """The state after k steps, through a checkpoint, gives the same next batches."""
    problems: Problems = []
    k = max(1, n // 2)
    with built(make, seeds, problems) as first, built(make, seeds, problems) as second:
        if first is None or second is None:
            return problems
        walk(first, k)
        state = attempt(
            problems, "state_dict() through a checkpoint", lambda: round_trip(first.state_dict())
        )
        if state is None:
            return problems
        attempt(problems, "load_state_dict()", lambda: second.load_state_dict(state))
        if problems:
            return problems
        if second.step != first.step:
            problems.append(f"load_state_dict() restores step {second.step}, not {first.step}")
        if not same(walk(first, n - k + 1), walk(second, n - k + 1)):
            problems.append("after load_state_dict(state_dict()) the stream gives other data")
    return problems


def block_problems(make: Make, seeds: list[int], batches: list[Any]) -> Problems:
    """``next_block(T)`` gives the examples of T ``next()`` calls, stacked."""
    problems: Problems = []
    with built(make, seeds, problems) as stream:
        if stream is None or not callable(getattr(stream, "next_block", None)):
            return problems
        T = min(3, stream.steps_per_task, len(batches))
        block = attempt(problems, f"next_block({T})", lambda: stream.next_block(T))
        if block is None:
            return problems
        t = block.obs.shape[0]
        want = (
            torch.stack([b.obs for b in batches[:t]]),
            torch.stack([b.target for b in batches[:t]]),
        )
        if not 1 <= t <= T or not same((block.obs, block.target), want):
            problems.append(f"next_block({T}) differs from {T} calls of next(), stacked")
        elif stream.step != t:
            problems.append(f"next_block({T}) gave {t} steps but step is {stream.step}")
    return problems


def supervised_problems(make: Make, seeds: Sequence[int], steps: int | None, kind: str) -> Problems:
    """Every check of a supervised (classification or regression) stream."""
    seeds = list(seeds)
    problems: Problems = []
    with built(make, seeds, problems) as stream:
        if stream is None:
            return problems
        problems += check_info(stream, seeds, kind)
        if problems:
            return problems
        n = steps or min(2 * stream.steps_per_task + 1, 32)
        batches = attempt(problems, "next()", lambda: walk(stream, n))
        if batches is None:
            return problems
        problems += batch_problems(stream, batches, kind)
        if stream.step != n:
            problems.append(f"step is {stream.step} after {n} calls of next(), not {n}")
        if problems:
            return problems  # (the comparisons below need well-formed batches)
        problems += score_problems(stream, batches[-1])
        problems += held_out_problems(stream, kind)
    problems += probe_problems(make, seeds, n)
    problems += determinism_problems(make, seeds, batches)
    problems += state_problems(make, seeds, n)
    problems += block_problems(make, seeds, batches)
    return problems + check_close(make, seeds)
