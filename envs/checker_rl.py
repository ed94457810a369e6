"""The checks :func:`contlearn.envs.check_stream` makes of an RL stream.

An RL stream (:class:`~contlearn.envs.protocol.RLStreamProtocol`) has ``obs`` ``(R, E,
obs_dim)``; ``advance(action (R, E, act_dim))`` returns ``(feedback, episodes)`` with
``feedback = (reward, next_obs, terminated, truncated)``, ``(R, E)`` except ``next_obs``;
``task`` is ``(R,)`` and never decreases; ``probe_batch()`` is ``(R, P, obs_dim)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
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
from contlearn.envs.checker_supervised import built


def actions(stream: Any, n: int) -> torch.Tensor:
    """``n`` fixed actions ``(n, R, E, act_dim)`` in [-1, 1]."""
    R, E = stream.obs.shape[:2]
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, R, E, stream.info.num_outputs, generator=g) * 2 - 1


def play(stream: Any, acts: torch.Tensor) -> list[Any]:
    """The observation before and the feedback of each action."""
    out = []
    for a in acts:
        obs = stream.obs.clone()
        feedback, _ = stream.advance(a)
        out.append((obs, tuple(feedback)))
    return out


def step_problems(stream: Any, acts: torch.Tensor) -> Problems:
    """Shapes and dtypes of ``obs`` and the feedback; ``step`` and ``task`` counters."""
    info = stream.info
    obs = stream.obs
    if not isinstance(obs, torch.Tensor) or obs.dim() != 3 or obs.shape[0] != info.num_replicas:
        return [f"obs is not a tensor of shape (R={info.num_replicas}, E, obs_dim)"]
    R, E = obs.shape[:2]
    if (obs.shape[2],) != tuple(info.input_shape) or obs.dtype != torch.float32:
        return [f"obs is not float32 of shape ({R}, {E}, {info.input_shape[0]})"]
    tasks = [np.asarray(stream.task)]
    for i, a in enumerate(acts):
        result = stream.advance(a)
        if not (isinstance(result, tuple) and len(result) == 2 and len(result[0]) == 4):
            return ["advance() does not return ((reward, next_obs, terminated, truncated), ended)"]
        reward, next_obs, terminated, truncated = result[0]
        problems = []
        for what, value, shape in (
            ("reward", reward, (R, E)),
            ("next_obs", next_obs, (R, E, *info.input_shape)),
            ("terminated", terminated, (R, E)),
            ("truncated", truncated, (R, E)),
        ):
            if not isinstance(value, torch.Tensor) or tuple(value.shape) != shape:
                problems.append(f"advance() at step {i}: {what} is not a tensor of shape {shape}")
        if stream.step != i + 1:
            problems.append(f"step is {stream.step} after {i + 1} calls of advance()")
        if problems:
            return problems
        tasks.append(np.asarray(stream.task))
    if any(t.shape != (R,) for t in tasks):
        return [f"task is not of shape ({R},)"]
    if any((b < a).any() for a, b in zip(tasks, tasks[1:], strict=False)):
        return ["task decreased: a replica's task index must never go back"]
    return []


def probe_problems(stream: Any) -> Problems:
    """``probe_batch()`` is ``(R, P, obs_dim)``."""
    problems: Problems = []
    probe = attempt(problems, "probe_batch()", stream.probe_batch)
    info = stream.info
    if probe is not None and (
        not isinstance(probe, torch.Tensor)
        or probe.dim() != 3
        or (probe.shape[0], probe.shape[2]) != (info.num_replicas, info.input_shape[0])
    ):
        problems.append(f"probe_batch() is not of shape (R={info.num_replicas}, P, obs_dim)")
    return problems


def determinism_problems(make: Make, seeds: list[int], acts: torch.Tensor) -> Problems:
    """Same seeds and actions, same data; other seeds, other observations; replica r alone,
    the same as in a batch."""
    problems: Problems = []
    with built(make, seeds, problems) as one, built(make, seeds, problems) as two:
        if one is None or two is None:
            return problems
        ran = play(one, acts)
        if not same(ran, play(two, acts)):
            problems.append(
                f"two streams with seeds {seeds} give different data for the same actions"
            )
    other = [s + 1_000 for s in seeds]
    with built(make, other, problems) as stranger:
        if stranger is not None and same(play(stranger, acts), ran):
            problems.append(f"seeds {other} give the same data as seeds {seeds}")
    last = len(seeds) - 1
    with built(make, [seeds[last]], problems) as alone:
        if alone is not None and not same(
            play(alone, acts[:, last : last + 1]), replica_of(ran, last)
        ):
            problems.append(
                f"replica {last} (seed {seeds[last]}) alone gives other data than in a batch "
                f"of seeds {seeds}: a replica must depend only on its own seed"
            )
    return problems


def replica_of(ran: list[Any], r: int) -> list[Any]:
    """Replica ``r``'s part of what :func:`play` returned."""
    return [(obs[r : r + 1], replica(feedback, r)) for obs, feedback in ran]


def state_problems(make: Make, seeds: list[int], acts: torch.Tensor) -> Problems:
    """The state after k steps, through a checkpoint, gives the same next steps."""
    problems: Problems = []
    k = max(1, len(acts) // 2)
    with built(make, seeds, problems) as first, built(make, seeds, problems) as second:
        if first is None or second is None:
            return problems
        play(first, acts[:k])
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
        if not same(play(first, acts[k:]), play(second, acts[k:])):
            problems.append("after load_state_dict(state_dict()) the stream gives other data")
    return problems


def rl_problems(make: Make, seeds: Sequence[int], steps: int | None, kind: str) -> Problems:
    """Every check of an RL stream."""
    seeds = list(seeds)
    problems: Problems = []
    with built(make, seeds, problems) as stream:
        if stream is None:
            return problems
        problems += check_info(stream, seeds, kind)
        if problems:
            return problems
        n = steps or min(2 * stream.steps_per_task + 1, 32)
        acts = actions(stream, n)
        attempt(problems, "advance()", lambda: problems.extend(step_problems(stream, acts)))
        if problems:
            return problems
        problems += probe_problems(stream)
    problems += determinism_problems(make, seeds, acts)
    problems += state_problems(make, seeds, acts)
    return problems + check_close(make, seeds)
