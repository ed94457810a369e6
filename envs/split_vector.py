"""A vector env for two cores: half the copies step in this process, half in one worker.

gymnasium's ``AsyncVectorEnv`` runs one process per copy and blocks in ``recv`` between steps;
on the 2-core test VM waking a blocked process costs ~0.3 ms, more than an Ant step (0.21 ms),
so two async copies stepped slower than two in-process ones. :class:`SplitVectorEnv` sends the
worker its actions, steps its own copies meanwhile, and then polls for the worker's answer;
the worker polls for its next command for up to :data:`SPIN_SECONDS` before it blocks (so it
sleeps through a PPO update instead of taking a core from it). Each copy is the same env object
with the same seeds as in a ``SyncVectorEnv``: results are identical (tested).

Only what :class:`~contlearn.envs.rl_stream.MujocoRLStream` uses is provided: ``reset``,
``step`` (same-step autoreset, ``info["final_obs"]``), ``get_attr``, ``set_attr``, ``close``.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode, SyncVectorEnv

#: how long the worker polls for a command before it blocks (a step's turnaround is ~0.1 ms)
SPIN_SECONDS = 0.002


def _sync(fns: Sequence[Callable[[], gym.Env]]) -> SyncVectorEnv:
    return SyncVectorEnv(list(fns), copy=False, autoreset_mode=AutoresetMode.SAME_STEP)


def _worker(conn: Any, fns: Sequence[Callable[[], gym.Env]]) -> None:
    """Serve ``(command, data)`` messages for a ``SyncVectorEnv`` of ``fns`` until ``close``."""
    vec = None
    try:
        vec = _sync(fns)
        conn.send(("ok", None))
        while True:
            deadline = time.perf_counter() + SPIN_SECONDS
            while not conn.poll(0) and time.perf_counter() < deadline:
                os.sched_yield()  # let a runnable process on this core go first
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


def _merge_info(a: dict[str, Any], na: int, b: dict[str, Any], nb: int) -> dict[str, Any]:
    """Concatenate two vector envs' infos (a key missing on one side: zeros, or None); nested
    infos (``final_info``) are left out."""
    out = {}
    for key in {**a, **b}:
        if isinstance(a.get(key, b.get(key)), dict):
            continue
        parts = []
        for info, n, other in ((a, na, b), (b, nb, a)):
            if key in info:
                parts.append(np.asarray(info[key]))
            else:
                like = np.asarray(other[key])
                parts.append(np.full(n, None, object) if like.dtype == object
                             else np.zeros((n, *like.shape[1:]), like.dtype))
        if parts[0].dtype == object or parts[1].dtype == object:
            merged = np.empty(na + nb, object)
            merged[:na], merged[na:] = list(parts[0]), list(parts[1])
            out[key] = merged
        else:
            out[key] = np.concatenate(parts)
    return out


class SplitVectorEnv:
    """Copies ``fns[:k]`` in this process, ``fns[k:]`` in one worker (``k = ⌈n/2⌉``).

    Args:
        fns: picklable env constructors (at least 2).
    """

    def __init__(self, fns: Sequence[Callable[[], gym.Env]]) -> None:
        if len(fns) < 2:
            raise ValueError("SplitVectorEnv needs at least 2 env copies")
        self.num_envs = len(fns)
        self._k = (len(fns) + 1) // 2
        self.local = _sync(fns[:self._k])
        self.single_action_space = self.local.single_action_space
        self.single_observation_space = self.local.single_observation_space
        ctx = mp.get_context()
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_worker, args=(child, list(fns[self._k:])), daemon=True)
        self._proc.start()
        child.close()
        self._closed = False
        self._answer()

    def _answer(self) -> Any:
        spins = 0
        while not self._conn.poll(0):  # the worker is busy on our behalf: poll, do not sleep
            os.sched_yield()
            spins += 1
            if spins % 4096 == 0 and not self._proc.is_alive() and not self._conn.poll(0):
                raise RuntimeError("the env worker process died")
        status, out = self._conn.recv()
        if status == "error":
            raise RuntimeError(f"env worker failed:\n{out}")
        return out

    def reset(self, seed: Sequence[int] | None = None, **kwargs: Any) -> tuple[Any, dict]:
        """Reset every copy (``seed``: one per copy)."""
        seeds = list(seed) if seed is not None else [None] * self.num_envs
        self._conn.send(("reset", seeds[self._k:]))
        obs, info = self.local.reset(seed=seeds[:self._k])
        obs_b, info_b = self._answer()
        return (np.concatenate([obs, obs_b]),
                _merge_info(info, self._k, info_b, self.num_envs - self._k))

    def step(self, actions: np.ndarray) -> tuple[Any, ...]:
        """Step every copy; the worker's half runs while this process steps its own."""
        self._conn.send(("step", actions[self._k:]))
        obs, reward, term, trunc, info = self.local.step(actions[:self._k])
        obs_b, reward_b, term_b, trunc_b, info_b = self._answer()
        return (np.concatenate([obs, obs_b]), np.concatenate([reward, reward_b]),
                np.concatenate([term, term_b]), np.concatenate([trunc, trunc_b]),
                _merge_info(info, self._k, info_b, self.num_envs - self._k))

    def get_attr(self, name: str) -> tuple[Any, ...]:
        """``name`` of every copy."""
        self._conn.send(("get_attr", name))
        return (*self.local.get_attr(name), *self._answer())

    def set_attr(self, name: str, values: Sequence[Any]) -> None:
        """Set ``name`` of copy i to ``values[i]``."""
        values = list(values)
        self._conn.send(("set_attr", (name, values[self._k:])))
        self.local.set_attr(name, values[:self._k])
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
        self._conn.close()
