"""Slippery Ant and the scheduled-physics machinery (slippery_ant.py, mujoco_schedule.py,
parameter_schedule.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import gymnasium as gym
import numpy as np
import pytest

import contlearn.envs  # noqa: F401  (registers the contlearn/ ids)
from contlearn.envs.mujoco_schedule import ScheduledPhysicsWrapper
from contlearn.envs.parameter_schedule import ParameterSchedule
from contlearn.envs.slippery_ant import SlipperyAntEnv
from contlearn.errors import ConfigError

pytestmark = pytest.mark.mujoco

IDS = [
    "contlearn/SlipperyAnt-v0",
    "contlearn/SlipperyHalfCheetah-v0",
    "contlearn/SlipperyHopper-v0",
    "contlearn/SlipperyWalker2d-v0",
]


def actions(env: gym.Env, n: int, seed: int = 0) -> np.ndarray:
    """A fixed action sequence ``(n, action_dim)``."""
    shape = (n, *env.action_space.shape)
    return np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)


def run(env: gym.Env, acts: np.ndarray, reset_every: int | None = None) -> tuple[list, list]:
    """Step through ``acts``, resetting (without seed) every ``reset_every`` steps.

    Returns the observations and the (friction, task) of every step's info.
    """
    obs, marks = [], []
    for t, action in enumerate(acts):
        if reset_every and t and t % reset_every == 0:
            env.reset()
        o, _, _, _, info = env.step(action)
        obs.append(o)
        marks.append((info["friction"], info["task"]))
    return obs, marks


@pytest.mark.parametrize("env_id", IDS)
@pytest.mark.parametrize("friction_in_obs", [False, True])
def test_check_env_passes(env_id: str, friction_in_obs: bool) -> None:
    from gymnasium.utils.env_checker import check_env

    env = gym.make(env_id, friction_in_obs=friction_in_obs, change_every=3, change_immediately=True)
    # "human" rendering needs a display, which test machines lack.
    check_env(env.unwrapped, skip_render_check=True)


def test_make_after_import() -> None:
    env = gym.make("contlearn/SlipperyAnt-v0", ctrl_cost_weight=0.1)
    assert isinstance(env.unwrapped, SlipperyAntEnv)
    assert env.spec.max_episode_steps == 1000
    assert env.unwrapped._ctrl_cost_weight == 0.1  # Ant-v5 kwargs are forwarded
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the passive env checker warns on its first reset/step
        obs, info = env.reset(seed=0)
        env.step(env.action_space.sample())
    assert obs.shape == env.observation_space.shape == (105,)
    assert 0.02 <= info["friction"] <= 2.0 and info["task"] == 0


def test_register_envs_is_idempotent() -> None:
    from contlearn.envs.gym_registration import register_envs

    register_envs()
    assert all(env_id in gym.registry for env_id in IDS)


def rollout(friction: float, seed: int = 0, n: int = 60) -> np.ndarray:
    env = SlipperyAntEnv(initial_friction=friction, terminate_when_unhealthy=False)
    env.reset(seed=seed)
    assert np.all(env.model.geom_friction[:, 0] == friction)  # floor and ant alike
    return np.stack([env.step(a)[0] for a in actions(env, n)])


def test_friction_changes_rollouts() -> None:
    # Both below the ant's own friction of 1: changing only the floor would change nothing,
    # since MuJoCo takes the max of a contact's two frictions.
    low, high = rollout(0.05), rollout(0.5)
    assert not np.allclose(low, high)
    assert np.array_equal(rollout(0.05), low)  # same friction, seed, actions: same rollout


def test_changes_at_episode_end() -> None:
    env = SlipperyAntEnv(change_every=5, terminate_when_unhealthy=False)
    env.reset(seed=1)
    _, marks = run(env, actions(env, 36), reset_every=3)
    tasks = [task for _, task in marks]
    # Episodes of 3 steps: due after 5 steps, applied at the reset after 6, 12, 18, ... steps.
    assert tasks == [t // 6 for t in range(36)]
    assert env.task == 5 and env.get_schedule_state()["steps_since_change"] == 6
    assert len({f for f, _ in marks}) == 6
    assert np.all(env.model.geom_friction[:, 0] == env.friction)


def test_changes_immediately() -> None:
    env = SlipperyAntEnv(change_every=4, change_immediately=True, terminate_when_unhealthy=False)
    _, info = env.reset(seed=1)
    frictions = [info["friction"]]
    for t, action in enumerate(actions(env, 30), start=1):
        if t % 7 == 0:  # resets do not delay immediate changes nor reset the counter
            env.reset()
        _, _, _, _, info = env.step(action)
        assert info["task"] == t // 4  # changed right after steps 4, 8, ...
        assert info["friction"] == env.model.geom_friction[0, 0] == env.friction
        if t % 4 == 0:
            frictions.append(info["friction"])
    assert len(set(frictions)) == len(frictions) == 8
    assert all(0.02 <= f <= 2.0 for f in frictions)


def test_values_are_log_uniform() -> None:
    schedule = ParameterSchedule(1, (0.02, 2.0), immediate=True, seed=0)
    values = []
    for _ in range(4000):
        schedule.step()
        values.append(schedule.value)
    logs = np.log10(values)  # log-uniform on [0.02, 2]: uniform on [log 0.02, log 2]
    assert np.all((logs >= np.log10(0.02)) & (logs <= np.log10(2.0)))
    counts, _ = np.histogram(logs, bins=4, range=(np.log10(0.02), np.log10(2.0)))
    assert np.all(np.abs(counts / 4000 - 0.25) < 0.03), counts
    uniform = ParameterSchedule(1, (0.02, 2.0), log_uniform=False, immediate=True, seed=0)
    uniform.step()
    assert schedule.value != uniform.value


def test_deterministic_given_seed() -> None:
    def marks(seed: int, env: SlipperyAntEnv | None = None) -> tuple[list, list]:
        env = env or SlipperyAntEnv(
            change_every=3, change_immediately=True, terminate_when_unhealthy=False
        )
        env.reset(seed=seed)
        return run(env, actions(env, 20))

    obs_a, marks_a = marks(3)
    obs_b, marks_b = marks(3)
    assert marks_a == marks_b and np.array_equal(obs_a, obs_b)
    assert marks(4)[1] != marks_a  # another seed, other frictions
    env = SlipperyAntEnv(change_every=3, change_immediately=True, terminate_when_unhealthy=False)
    marks(5, env)
    assert marks(3, env)[1] == marks_a  # a seeded reset restarts the schedule


def test_initial_friction_and_info() -> None:
    env = gym.make(
        "contlearn/SlipperyAnt-v0", initial_friction=1.0, change_every=2, change_immediately=True
    )
    _, info = env.reset(seed=0)
    assert info["friction"] == 1.0 and info["task"] == 0
    _, _, _, _, info = env.step(env.action_space.sample())
    assert (info["friction"], info["task"]) == (1.0, 0)
    _, _, _, _, info = env.step(env.action_space.sample())
    assert info["friction"] != 1.0 and info["task"] == 1


def test_friction_in_obs() -> None:
    env = gym.make(
        "contlearn/SlipperyAnt-v0", friction_in_obs=True, change_every=2, change_immediately=True
    )
    assert env.observation_space.shape == (106,)
    obs, info = env.reset(seed=0)
    assert obs[-1] == pytest.approx(np.log(info["friction"]))
    for _ in range(3):
        obs, _, _, _, info = env.step(env.action_space.sample())
        assert env.observation_space.contains(obs)
        assert obs[-1] == pytest.approx(np.log(info["friction"]))
    assert info["task"] == 1


def test_schedule_state_round_trip() -> None:
    env = SlipperyAntEnv(change_every=4, terminate_when_unhealthy=False)
    env.reset(seed=7)
    acts = actions(env, 40)
    run(env, acts[:10], reset_every=3)
    state = json.loads(json.dumps(env.get_schedule_state()))  # plain python values
    env.reset()
    _, first = run(env, acts[10:], reset_every=3)
    assert first[-1][1] > state["task"]
    for target in (env, SlipperyAntEnv(change_every=4, terminate_when_unhealthy=False)):
        target.reset(seed=99)
        target.set_schedule_state(state)
        assert np.all(target.model.geom_friction[:, 0] == state["value"])
        target.reset()
        assert run(target, acts[10:], reset_every=3)[1] == first


def cheetah_rollout(parameter: str, value: float, n: int = 40) -> tuple[np.ndarray, gym.Env]:
    env = ScheduledPhysicsWrapper(gym.make("HalfCheetah-v5"), parameter, initial_value=value)
    env.reset(seed=0)
    return np.stack([env.step(a)[0] for a in actions(env, n)]), env


@pytest.mark.parametrize(
    "parameter, low, high",
    [("friction", 0.05, 0.3), ("gravity", 5.0, 15.0), ("mass_scale", 0.5, 2.0)],
)
def test_wrapper_changes_rollouts(parameter: str, low: float, high: float) -> None:
    obs_low, env = cheetah_rollout(parameter, low)
    obs_high, _ = cheetah_rollout(parameter, high)
    assert not np.allclose(obs_low, obs_high)
    assert np.array_equal(cheetah_rollout(parameter, low)[0], obs_low)
    model, base = env.unwrapped.model, gym.make("HalfCheetah-v5").unwrapped.model
    if parameter == "gravity":
        assert np.array_equal(model.opt.gravity, [0.0, 0.0, -low])
    if parameter == "mass_scale":  # relative to the original masses, not compounding
        assert np.allclose(model.body_mass, low * base.body_mass)
        env.set_schedule_state({**env.get_schedule_state(), "value": 1.0})
        assert np.allclose(model.body_mass, base.body_mass)


def test_wrapper_schedule_on_hopper() -> None:
    env = ScheduledPhysicsWrapper(
        gym.make("Hopper-v5"), "gravity", change_every=3, immediate=True, value_in_obs=True
    )
    assert env.observation_space.shape == (12,)
    obs, info = env.reset(seed=0)
    assert obs[-1] == pytest.approx(np.log(info["gravity"]))
    for t in range(1, 10):
        obs, _, _, _, info = env.step(env.action_space.sample() * 0)
        assert info["task"] == t // 3 and 4.905 <= info["gravity"] <= 19.62
        assert env.unwrapped.model.opt.gravity[2] == -info["gravity"]
    assert env.spec.additional_wrappers[-1].kwargs["parameter"] == "gravity"


def test_bad_options_raise() -> None:
    with pytest.raises(ConfigError):
        ParameterSchedule(0)
    with pytest.raises(ConfigError):
        ParameterSchedule(10, (0.0, 1.0))  # log-uniform needs low > 0
    with pytest.raises(ConfigError):
        ScheduledPhysicsWrapper(gym.make("Hopper-v5"), "viscosity")


def test_import_does_not_import_mujoco() -> None:
    code = (
        "import sys, gymnasium, contlearn.envs; "
        "gymnasium.spec('contlearn/SlipperyAnt-v0'); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'mujoco' "
        "or m.startswith('gymnasium.envs.mujoco') or m.startswith('contlearn.envs.slip')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {
            "include_cfrc_ext_in_observation": False,
            "exclude_current_positions_from_observation": False,
            "main_body": "torso",
        },
        {
            "terminate_when_unhealthy": False,
            "healthy_z_range": (0.3, 0.9),
            "contact_force_range": (-0.5, 2.0),
            "ctrl_cost_weight": 0.1,
            "contact_cost_weight": 1e-3,
            "forward_reward_weight": 2.0,
            "healthy_reward": 0.5,
            "frame_skip": 3,
        },
    ],
)
def test_one_pass_step_is_ant_v5_bit_for_bit(kwargs: dict) -> None:
    """OnePassAntEnv.step (each term once) gives gymnasium's AntEnv.step exactly: observation,
    reward, termination and info, values and types, through terminations and resets."""
    from gymnasium.envs.mujoco.ant_v5 import AntEnv

    from contlearn.envs.slippery_ant import OnePassAntEnv

    ours, theirs = OnePassAntEnv(**kwargs), AntEnv(**kwargs)
    rng = np.random.default_rng(0)
    ends = 0
    for seed in (3, 4):
        for a, b in zip(ours.reset(seed=seed), theirs.reset(seed=seed), strict=True):
            assert np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b
        for _ in range(1500):
            action = rng.uniform(-1, 1, 8) * 3  # (beyond the action space: tumbles, ends)
            got, want = ours.step(action), theirs.step(action)
            assert got[0].dtype == want[0].dtype and np.array_equal(got[0], want[0])
            for x, y in zip(got[1:4], want[1:4], strict=True):
                assert type(x) is type(y) and x == y
            assert list(got[4]) == list(want[4])
            for k, v in want[4].items():
                assert type(got[4][k]) is type(v) and got[4][k] == v, k
            if want[2]:
                ends += 1
                ours.reset()
                theirs.reset()
    assert ends > 0 or not kwargs.get("terminate_when_unhealthy", True)
