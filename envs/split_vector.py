"""Lean vector envs for the RL streams: copies stepped in this process, or split over two.

:class:`CopiesVectorEnv` steps env copies one after the other in this process with *same-step*
autoreset, as gymnasium's ``SyncVectorEnv(..., autoreset_mode=SAME_STEP)`` does, but returns
only what :class:`~contlearn.envs.rl_stream.MujocoRLStream` reads (``info``: ``friction``,
``task`` and ``final_obs``), without gymnasium's per-copy info merging (~15–20 µs per copy and
step, 8% of an Ant step). Same env objects, same calls in the same order: identical results
(tested against ``SyncVectorEnv``).

gymnasium's ``AsyncVectorEnv`` runs one process per copy and blocks in ``recv`` between steps;
on the 2-core test VM waking a blocked process costs ~0.3 ms, more than an Ant step (0.21 ms),
so two async copies stepped slower than two in-process ones. :class:`SplitVectorEnv` keeps a
few copies in this process and the others in one worker process: it sends the worker its
actions, steps its own copies meanwhile, and then polls for the worker's answer; the worker
polls for its next command for up to :data:`SPIN_SECONDS` before it blocks (so it sleeps
through a PPO update instead of taking a core from it). This process also acts and keeps the
stream's books while the worker waits, so it keeps fewer copies (:func:`local_copies`). Each
copy is the same env object with the same seeds as in a ``SyncVectorEnv``: results are
identical (tested).

Only what the stream uses is provided: ``reset``, ``step``, ``get_attr``, ``set_attr``,
``close``, ``num_envs`` and the single spaces.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing as mp
import os
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import gymnasium as gym
import numpy as np

#: how long a waiting side polls before it blocks (a step's turnaround is ~0.1 ms)
SPIN_SECONDS = 0.002


class VectorCopies(Protocol):
    """What an RL stream asks of its vector of env copies: :class:`CopiesVectorEnv`,
    :class:`SplitVectorEnv`, or gymnasium's ``AsyncVectorEnv`` (same-step autoreset)."""

    num_envs: int
    single_action_space: gym.Space[Any]

    def reset(self, *, seed: list[int | None]) -> tuple[Any, dict[str, Any]]:
        """Reset copy i with ``seed[i]``: ``(observations, infos)``."""
        ...

    def step(self, actions: np.ndarray) -> tuple[Any, ...]:
        """Step every copy: ``(obs, reward, terminated, truncated, infos)``."""
        ...

    def get_attr(self, name: str) -> tuple[Any, ...]:
        """``name`` of every copy."""
        ...

    def set_attr(self, name: str, values: list[Any]) -> None:
        """Set ``name`` of copy i to ``values[i]``."""
        ...

    def close(self) -> None:
        """Release the copies (and any worker process)."""
        ...


def local_copies(num_envs: int) -> int:
    """How many of ``num_envs`` copies :class:`SplitVectorEnv` steps in this process.

    This process also acts, stores the transition and keeps the stream's books (≈ 1.3 Ant
    steps of work per loop step with 8 copies, measured), while the worker only steps, so it
    keeps ``⌊(n − 1) / 2⌋`` copies (at least 1): 3 of 8, 7 of 16, 1 of 4.
    """
    return max(1, (num_envs - 1) // 2)


def wait_ready(conn: Any, spin: float, alive: Callable[[], bool], block: float = 1.0) -> bool:
    """Wait until ``conn`` has a message: poll (``sched_yield``) for up to ``spin`` seconds,
    then block on the pipe in ``block``-second waits. Returns False (nothing to read) as soon
    as ``alive()`` says the other side is gone.

    Back-off: a reply due within a step's turnaround (~0.1 ms) is caught by the spin without
    a wake-up's latency; one that is not ready by then (the other side is busy, or has no core
    to run on because other jobs hold them) is waited for asleep, so a waiting process never
    takes a core from the process it waits for, nor from anything else on a busy machine.
    """
    deadline = time.perf_counter() + spin
    while not conn.poll(0):
        if time.perf_counter() >= deadline:
            break
        os.sched_yield()  # let a runnable process on this core go first
    else:
        return True
    while not conn.poll(block):  # (wakes as the message arrives)
        if not alive():
            return bool(conn.poll(0))
    return True


def wait_reply(conn: Any, proc: Any, name: str, spin: float = SPIN_SECONDS) -> Any:
    """The payload of a worker process's next ``(status, payload)`` reply on ``conn``, waited
    for by :func:`wait_ready` (a brief spin, then asleep).

    Raises:
        RuntimeError: the worker died, or replied ``("error", traceback)``.
    """
    if not wait_ready(conn, spin, proc.is_alive):
        raise RuntimeError(f"the {name} process died")
    status, out = conn.recv()
    if status == "error":
        raise RuntimeError(f"{name} failed:\n{out}")
    return out


class CopiesVectorEnv:
    """Env copies stepped in turn in this process, with same-step autoreset.

    ``step`` returns ``(obs, reward, terminated, truncated, info)`` like ``SyncVectorEnv`` with
    ``autoreset_mode=SAME_STEP``: where an episode ended the copy is reset within the step,
    ``obs`` holds its reset observation and ``info["final_obs"]`` the episode's last one.
    ``info`` holds ``friction`` (float64, NaN if a copy's info has none) and ``task`` (int64)
    of every copy, after the reset where one happened, and ``final_obs`` ``(n, *obs_shape)``
    (rows of copies that did not end are stale). ``obs`` is a buffer reused by the next
    ``step`` or ``reset`` (``SyncVectorEnv(copy=False)`` does the same).

    Args:
        fns: env constructors, called once each.
    """

    def __init__(self, fns: Sequence[Callable[[], gym.Env]]) -> None:
        self.envs = [fn() for fn in fns]
        self.num_envs = len(self.envs)
        self.single_action_space = self.envs[0].action_space
        self.single_observation_space = self.envs[0].observation_space
        n, space = self.num_envs, self.single_observation_space
        self._obs = np.zeros((n, *(space.shape or ())), space.dtype)
        self._final = np.zeros_like(self._obs)
        self._reward = np.zeros(n)
        self._terminated = np.zeros(n, bool)
        self._truncated = np.zeros(n, bool)
        self._friction = np.full(n, math.nan)
        self._task = np.zeros(n, np.int64)

    def _info(self, i: int, info: dict[str, Any]) -> None:
        self._friction[i] = info.get("friction", math.nan)
        self._task[i] = info.get("task", 0)

    def _infos(self, final: bool) -> dict[str, Any]:
        info = {"friction": self._friction.copy(), "task": self._task.copy()}
        if final:
            info["final_obs"] = self._final.copy()
        return info

    def reset(
        self, seed: Sequence[int | None] | None = None, **kwargs: Any
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Reset every copy (``seed``: one per copy, or ``None``)."""
        seeds = list(seed) if seed is not None else [None] * self.num_envs
        for i, (env, s) in enumerate(zip(self.envs, seeds, strict=True)):
            self._obs[i], info = env.reset(seed=s)
            self._info(i, info)
        return self._obs, self._infos(final=False)

    def step(
        self, actions: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        """Step copy i with ``actions[i]``; reset the copies whose episode ended."""
        ended = False
        for i, env in enumerate(self.envs):
            obs, reward, terminated, truncated, info = env.step(actions[i])
            self._reward[i], self._terminated[i], self._truncated[i] = (
                reward,
                terminated,
                truncated,
            )
            if terminated or truncated:
                self._final[i] = obs
                ended = True
                obs, info = env.reset()
            self._obs[i] = obs
            self._info(i, info)
        return (
            self._obs,
            self._reward.copy(),
            self._terminated.copy(),
            self._truncated.copy(),
            self._infos(final=ended),
        )

    def get_attr(self, name: str) -> tuple[Any, ...]:
        """``name`` of every copy (looked up through its wrappers)."""
        return tuple(env.get_wrapper_attr(name) for env in self.envs)

    def set_attr(self, name: str, values: Sequence[Any]) -> None:
        """Set ``name`` of copy i to ``values[i]``."""
        for env, value in zip(self.envs, values, strict=True):
            env.set_wrapper_attr(name, value)

    def close(self) -> None:
        """Close every copy."""
        for env in self.envs:
            env.close()


def _worker(conn: Any, fns: Sequence[Callable[[], gym.Env]]) -> None:
    """Serve ``(command, data)`` messages for a :class:`CopiesVectorEnv` of ``fns`` until
    ``close``."""
    vec = None
    parent = os.getppid()
    try:
        vec = CopiesVectorEnv(fns)
        conn.send(("ok", None))
        while True:
            # a brief spin, then asleep; leave if the stream's process is gone (a later fork
            # may hold our pipe's other end, so no EOF would tell)
            if not wait_ready(conn, SPIN_SECONDS, lambda: os.getppid() == parent):
                return
            command, data = conn.recv()
            if command == "close":
                break
            if command == "step":
                out: Any = vec.step(data)
            elif command == "reset":
                out = vec.reset(seed=data)
            elif command == "get_attr":
                out = vec.get_attr(data)
            else:  # set_attr
                vec.set_attr(*data)
                out = None
            conn.send(("ok", out))
    except Exception:  # noqa: BLE001 (handed to the parent, which raises)
        conn.send(("error", traceback.format_exc()))
    finally:
        if vec is not None:
            vec.close()
        conn.close()


def _merge_info(
    a: dict[str, Any], b: dict[str, Any], na: int, nb: int, row: tuple[int, ...]
) -> dict[str, Any]:
    """Concatenate two :class:`CopiesVectorEnv` infos (``final_obs``: zeros on a side without
    one; ``row`` is one observation's shape)."""
    out = {
        "friction": np.concatenate([a["friction"], b["friction"]]),
        "task": np.concatenate([a["task"], b["task"]]),
    }
    if "final_obs" in a or "final_obs" in b:
        out["final_obs"] = np.concatenate(
            [
                info["final_obs"] if "final_obs" in info else np.zeros((n, *row))
                for info, n in ((a, na), (b, nb))
            ]
        )
    return out


class SplitVectorEnv:
    """Copies ``fns[:k]`` in this process, ``fns[k:]`` in one worker (``k`` from
    :func:`local_copies` unless given); returns what :class:`CopiesVectorEnv` returns.

    Args:
        fns: picklable env constructors (at least 2).
        local: copies stepped in this process (1 ≤ local < ``len(fns)``).
    """

    def __init__(self, fns: Sequence[Callable[[], gym.Env]], local: int | None = None) -> None:
        if len(fns) < 2:
            raise ValueError("SplitVectorEnv needs at least 2 env copies")
        self.num_envs = len(fns)
        self._k = local_copies(len(fns)) if local is None else int(local)
        if not 1 <= self._k < self.num_envs:
            raise ValueError(f"local={local} copies: need 1 <= local < {self.num_envs}")
        self.local = CopiesVectorEnv(fns[: self._k])
        self.single_action_space = self.local.single_action_space
        self.single_observation_space = self.local.single_observation_space
        ctx = mp.get_context()
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_worker, args=(child, list(fns[self._k :])), daemon=True)
        self._proc.start()
        child.close()
        self._closed = False
        try:
            self._answer()
        except BaseException:  # (the worker could not build its copies: end it, and ours)
            self.close()
            raise

    def _answer(self) -> Any:
        return wait_reply(self._conn, self._proc, "env worker")

    def _merge(self, info: dict[str, Any], info_b: dict[str, Any]) -> dict[str, Any]:
        return _merge_info(
            info,
            info_b,
            self._k,
            self.num_envs - self._k,
            self.single_observation_space.shape or (),
        )

    def reset(
        self, seed: Sequence[int | None] | None = None, **kwargs: Any
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Reset every copy (``seed``: one per copy)."""
        seeds = list(seed) if seed is not None else [None] * self.num_envs
        self._conn.send(("reset", seeds[self._k :]))
        obs, info = self.local.reset(seed=seeds[: self._k])
        obs_b, info_b = self._answer()
        return np.concatenate([obs, obs_b]), self._merge(info, info_b)

    def step(self, actions: np.ndarray) -> tuple[Any, ...]:
        """Step every copy; the worker's copies run while this process steps its own."""
        self._conn.send(("step", actions[self._k :]))
        obs, reward, term, trunc, info = self.local.step(actions[: self._k])
        obs_b, reward_b, term_b, trunc_b, info_b = self._answer()
        return (
            np.concatenate([obs, obs_b]),
            np.concatenate([reward, reward_b]),
            np.concatenate([term, term_b]),
            np.concatenate([trunc, trunc_b]),
            self._merge(info, info_b),
        )

    def get_attr(self, name: str) -> tuple[Any, ...]:
        """``name`` of every copy."""
        self._conn.send(("get_attr", name))
        return (*self.local.get_attr(name), *self._answer())

    def set_attr(self, name: str, values: Sequence[Any]) -> None:
        """Set ``name`` of copy i to ``values[i]``."""
        values = list(values)
        self._conn.send(("set_attr", (name, values[self._k :])))
        self.local.set_attr(name, values[: self._k])
        self._answer()

    def close(self) -> None:
        """Close the copies and end the worker."""
        if self._closed:
            return
        self._closed = True
        self.local.close()
        with contextlib.suppress(BrokenPipeError, OSError):
            self._conn.send(("close", None))
        self._proc.join(timeout=5)
        if self._proc.is_alive():
            self._proc.terminate()
            self._proc.join(timeout=5)
        self._conn.close()
