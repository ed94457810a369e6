"""The lean vector envs step exactly as gymnasium's SyncVectorEnv (same-step autoreset)."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from gymnasium.vector import AutoresetMode, SyncVectorEnv

from contlearn.envs import make_stream
from contlearn.envs.rl_stream import MujocoRLStream, make_copy
from contlearn.envs.split_vector import CopiesVectorEnv, SplitVectorEnv, local_copies
from contlearn.running.config import resolve

pytestmark = pytest.mark.mujoco

# short episodes (time limit 25) and a narrow healthy range (terminations), frictions changing
KWARGS = {
    "change_every": 20,
    "change_immediately": True,
    "schedule_seed": 3,
    "healthy_z_range": (0.5, 0.9),
}


def fns(n: int) -> list:
    return [functools.partial(make_copy, "contlearn/SlipperyAnt-v0", KWARGS, 25)] * n


def compare(vec, ref, steps: int = 120) -> tuple[int, int]:
    """Step both with the same actions; assert identical outputs; count terminations and
    truncations."""
    n = ref.num_envs
    seeds = list(range(10, 10 + n))
    obs, info = vec.reset(seed=seeds)
    obs_ref, info_ref = ref.reset(seed=seeds)
    assert np.array_equal(obs, obs_ref)
    rng = np.random.default_rng(0)
    ends = [0, 0]
    for _ in range(steps):
        action = rng.uniform(-1, 1, (n, 8))
        obs, reward, term, trunc, info = vec.step(action)
        obs_ref, reward_ref, term_ref, trunc_ref, info_ref = ref.step(action)
        for a, b in (
            (obs, obs_ref),
            (reward, reward_ref),
            (term, term_ref),
            (trunc, trunc_ref),
            (info["friction"], info_ref["friction"]),
            (info["task"], info_ref["task"]),
        ):
            assert np.array_equal(a, b)
        for i in np.flatnonzero(term | trunc):
            assert np.array_equal(info["final_obs"][i], info_ref["final_obs"][i])
        ends[0] += int(term.sum())
        ends[1] += int(trunc.sum())
    return ends[0], ends[1]


def test_copies_vector_env_steps_as_gymnasium_sync() -> None:
    vec = CopiesVectorEnv(fns(3))
    ref = SyncVectorEnv(fns(3), copy=False, autoreset_mode=AutoresetMode.SAME_STEP)
    try:
        terminations, truncations = compare(vec, ref)
        assert terminations >= 3 and truncations >= 3  # both kinds of episode end exercised
        assert vec.get_attr("task") == ref.get_attr("task")
    finally:
        vec.close()
        ref.close()


@pytest.mark.parametrize("local", [None, 1, 3])
def test_split_vector_env_steps_as_gymnasium_sync(local: int | None) -> None:
    vec = SplitVectorEnv(fns(4), local=local)
    ref = SyncVectorEnv(fns(4), copy=False, autoreset_mode=AutoresetMode.SAME_STEP)
    try:
        compare(vec, ref, steps=60)
        state = vec.get_attr("sim_state")
        vec.set_attr("sim_state", state)  # through the worker and back
        assert len(state) == 4
    finally:
        vec.close()
        ref.close()


def test_local_copies() -> None:
    assert [local_copies(n) for n in (2, 3, 4, 8, 16)] == [1, 1, 1, 3, 7]
    with pytest.raises(ValueError):
        SplitVectorEnv(fns(2), local=2)


def test_stream_steps_as_with_gymnasium_sync(monkeypatch: pytest.MonkeyPatch) -> None:
    """The stream's rollouts, episodes and checkpoints are those of the gymnasium vector env
    it used before (``vector=sync``)."""
    cfg = resolve(
        {
            "stream": "slippery-ant",
            "seeds": 2,
            "num_envs": 2,
            "vector": "sync",
            "max_episode_steps": 30,
            "change_every": 50,  # (25 of each copy)
            "change_immediately": True,
        }
    )
    lean = make_stream(cfg.stream, cfg.stream_spec, cfg.seeds)
    monkeypatch.setattr(
        MujocoRLStream,
        "_vector_env",
        lambda self, f: SyncVectorEnv(f, copy=False, autoreset_mode=AutoresetMode.SAME_STEP),
    )
    ref = make_stream(cfg.stream, cfg.stream_spec, cfg.seeds)
    try:
        g = torch.Generator().manual_seed(0)
        for _ in range(70):
            action = torch.rand(2, 2, 8, generator=g) * 2 - 1
            (fa, ea), (fb, eb) = lean.advance(action), ref.advance(action)
            assert all(torch.equal(x, y) for x, y in zip(fa, fb, strict=True)) and ea == eb
        assert torch.equal(lean.obs, ref.obs)
        a, b = lean.state_dict(), ref.state_dict()
        assert all(
            torch.equal(x["sim"], y["sim"]) and x["rng"] == y["rng"]
            for x, y in zip(a["copies"], b["copies"], strict=True)
        )
    finally:
        lean.close()
        ref.close()
