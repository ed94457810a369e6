"""Reinforcement-learning streams: MuJoCo envs whose friction changes, with replicas.

An RL stream is a gymnasium environment whose dynamics change on a schedule (docs/design.md §1).
Each step the agent acts on the current observations and the stream returns
:class:`Feedback` ``(reward, next_obs, terminated, truncated)``.

**Replicas** (docs/design.md §2). Replica r owns ``num_envs`` copies of the env, all seeded from
r's own seed: one seed for the friction schedule, shared by r's copies (they live in the same
world and draw the same frictions; ``schedule_seed`` of
:class:`~contlearn.envs.mujoco_schedule.SlipperyMixin`), and one reset seed per copy (different
initial states). So replica r alone steps exactly as replica r in a batch. The R·E copies run
in one vector env (``vector=sync``: :class:`~contlearn.envs.split_vector.CopiesVectorEnv`, in
this process; ``split``: a few here and the rest in one worker process; ``async``: gymnasium's
``AsyncVectorEnv``, one process per copy), all with *same-step* autoreset: when an episode
ends, the copy is reset within the same step, ``Feedback.next_obs`` holds the episode's final
observation and :attr:`obs` the new one.

**One step unit: environment steps** (as stable-baselines3 and cleanrl count them). Every step
count of an RL stream counts the environment steps of one seed, summed over its ``num_envs``
copies: :attr:`step` (and so a run's ``steps``, ``probe_every``, ``checkpoint_every`` and the
store's ``step`` column), ``change_every``, ``probe_window`` and PPO's ``rollout``. One step of
the loop steps every copy once: ``num_envs`` environment steps. (With one copy, the paper's
setting, loop steps and environment steps coincide.)

**Frictions and tasks.** A seed's world changes friction every ``change_every`` environment
steps: each of its E copies after ``change_every / E`` steps of its own (so ``change_every``
must be a multiple of ``num_envs``). By default a copy changes at its first episode end after
that, so an episode never mixes two frictions; a replica's copies change to the same value,
each at its own episode end. A replica's task is the newest friction index among its copies.

**Checkpoints** may be taken after any step: the state holds every copy's MuJoCo integration
state (``mj_getState(mjSTATE_INTEGRATION)``: time, qpos, qvel, actuator state, warm start,
controls) plus ``data.xpos`` (Ant reads the torso position left by the previous step), its
time-limit counter, its ``np_random`` and friction schedule, and the stream's own counters,
current observations, open episodes' returns and the probe window.

(Over 400 lines: stepping, replicas, frictions and exact-resume state of one stream; they
share the per-copy bookkeeping.)

Version History:
    * v0: initial version.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import gymnasium as gym
import mujoco
import numpy as np
import torch
from gymnasium.vector import AsyncVectorEnv, AutoresetMode

from contlearn.backends.auto import auto_vector
from contlearn.envs.base import StreamInfo
from contlearn.envs.gym_registration import ENVS
from contlearn.envs.split_vector import CopiesVectorEnv, SplitVectorEnv, VectorCopies
from contlearn.errors import ConfigError
from contlearn.seeding import child_seed
from contlearn.spec import param

_SLIPPERY_IDS = frozenset(env_id for env_id, _ in ENVS)
_SIM_STATE = mujoco.mjtState.mjSTATE_INTEGRATION


@dataclass(frozen=True)
class RLStreamSpec:
    """Options of the Slippery MuJoCo streams."""

    env_id: str = param(
        "contlearn/SlipperyAnt-v0",
        "gymnasium id: a contlearn/Slippery*-v0 id, or any other id for a stationary control run",
    )
    change_every: int = param(
        2_000_000,
        "environment steps of a seed (summed over its num_envs copies) between friction "
        "changes (paper: 2M); a multiple of num_envs",
        low=1,
    )
    friction_range_low: float = param(
        0.02, "lowest friction of the log-uniform draws (paper)", low=0.0, low_open=True
    )
    friction_range_high: float = param(
        2.0, "highest friction of the log-uniform draws (paper)", low=0.0, low_open=True
    )
    initial_friction: float = param(
        0.0, "the first task's friction (0: drawn like the others)", low=0.0
    )
    change_immediately: bool = param(
        False,
        "change mid-episode when due (default: at the next"
        " episode end, so no episode mixes two frictions)",
    )
    friction_in_obs: bool = param(False, "append log(friction) to the observation (paper: no)")
    num_envs: int = param(1, "env copies per replica, stepped together (paper: 1)", low=1)
    vector: str = param(
        "auto",
        "step the copies in this process (sync), one process per copy"
        " (async), or half here and half in one worker process (split: 2 cores);"
        " auto: split for num_envs > 1 with 2+ cores and threads != 1, else sync",
        choices=("auto", "sync", "async", "split"),
    )
    max_episode_steps: int = param(0, "time limit per episode (0: the env's own, 1000)", low=0)
    probe_window: int = param(
        1000, "recent environment steps whose observations probes use (paper: 1000)", low=1
    )

    def validate(self) -> None:
        """The friction range must be ordered; friction changes fall on whole loop steps."""
        if self.change_every % self.num_envs:
            raise ConfigError(
                f"change_every={self.change_every} must be a multiple of num_envs="
                f"{self.num_envs} (it counts the environment steps of all of a seed's copies)"
            )
        if self.friction_range_low > self.friction_range_high:
            raise ConfigError(
                f"friction_range_low={self.friction_range_low} must be <= "
                f"friction_range_high={self.friction_range_high}"
            )


#: what :attr:`MujocoRLStream.step` counts (recorded in checkpoints: older ones counted loop steps)
STEP_UNIT = "env"


class Feedback(NamedTuple):
    """What the stream returns for one action of every copy (docs/design.md §1).

    Attributes:
        reward: ``(R, E)`` float32.
        next_obs: ``(R, E, obs_dim)`` float32; the final observation where an episode ended.
        terminated: ``(R, E)`` bool, the episode reached a terminal state.
        truncated: ``(R, E)`` bool, the episode was cut by the time limit.
    """

    reward: torch.Tensor
    next_obs: torch.Tensor
    terminated: torch.Tensor
    truncated: torch.Tensor


class EpisodeEnd(NamedTuple):
    """One finished episode of one env copy.

    Attributes:
        replica: the replica r.
        copy: the copy's index within the replica.
        ret: undiscounted return.
        length: steps.
        friction: the friction of its last step (NaN for envs without a schedule).
        task: the friction index of its last step.
    """

    replica: int
    copy: int
    ret: float
    length: int
    friction: float
    task: int


class _EnvCopy(gym.Wrapper):
    """Outermost wrapper of each env copy: a small ``info`` and a settable ``sim_state``."""

    def _small(self, info: dict[str, Any]) -> dict[str, Any]:
        return {"friction": float(info.get("friction", math.nan)), "task": int(info.get("task", 0))}

    def reset(self, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
        obs, info = self.env.reset(**kwargs)
        return obs, self._small(info)

    def step(self, action: Any) -> tuple[Any, Any, bool, bool, dict[str, Any]]:
        obs, reward, terminated, truncated, info = self.env.step(action)
        return obs, reward, terminated, truncated, self._small(info)

    def _time_limit(self) -> gym.wrappers.TimeLimit | None:
        env: Any = self.env
        while isinstance(env, gym.Wrapper):
            if isinstance(env, gym.wrappers.TimeLimit):
                return env
            env = env.env
        return None

    @property
    def sim_state(self) -> dict[str, Any]:
        """Everything that defines this copy's future (plain types and numpy arrays)."""
        u: Any = self.env.unwrapped
        sim = np.empty(mujoco.mj_stateSize(u.model, _SIM_STATE))
        mujoco.mj_getState(u.model, u.data, sim, _SIM_STATE)
        limit = self._time_limit()
        schedule = getattr(u, "get_schedule_state", None)
        return {
            "sim": sim,
            "xpos": u.data.xpos.copy(),
            "rng": u.np_random.bit_generator.state,
            "elapsed": limit._elapsed_steps if limit is not None else None,
            "schedule": schedule() if schedule is not None else None,
        }

    @sim_state.setter
    def sim_state(self, state: dict[str, Any]) -> None:
        u: Any = self.env.unwrapped
        mujoco.mj_setState(u.model, u.data, np.asarray(state["sim"], np.float64), _SIM_STATE)
        u.data.xpos[:] = np.asarray(state["xpos"])
        u.np_random.bit_generator.state = state["rng"]
        limit = self._time_limit()
        if limit is not None:
            limit._elapsed_steps = state["elapsed"]
        if state["schedule"] is not None:
            u.set_schedule_state(state["schedule"])


def make_copy(env_id: str, kwargs: dict[str, Any], max_episode_steps: int) -> gym.Env:
    """One env copy: ``gymnasium.make`` plus the stream's outer wrapper (module level, so an
    async vector env can pickle it)."""
    import contlearn.envs  # noqa: F401  (registers the contlearn/ ids in a fresh process)

    limit = {"max_episode_steps": max_episode_steps} if max_episode_steps else {}
    return _EnvCopy(gym.make(env_id, disable_env_checker=True, **limit, **kwargs))


class MujocoRLStream:
    """A Slippery MuJoCo env (or any gymnasium env) as a replica-batched RL stream.

    See the module docstring. The loop calls :meth:`advance` with actions for :attr:`obs`.

    Args:
        spec: the options.
        seeds: one root seed per replica.
    """

    kind: ClassVar[str] = "rl"
    name: ClassVar[str] = "mujoco-rl"
    default_agent: ClassVar[str] = "ppo"
    Spec: ClassVar[type] = RLStreamSpec
    #: small settings for :func:`contlearn.envs.check_stream`: short tasks and episodes
    check_settings: ClassVar[dict] = {
        "change_every": 3,
        "change_immediately": True,
        "max_episode_steps": 5,
        "probe_window": 4,
    }

    def __init__(self, spec: RLStreamSpec, seeds: Sequence[int]) -> None:
        self.spec = spec
        self.seeds = [int(s) for s in seeds]
        R, E = len(self.seeds), spec.num_envs
        self.num_envs = E
        self.has_schedule = spec.env_id in _SLIPPERY_IDS
        reset_seeds: list[int | None] = []
        fns: list[Any] = []
        for seed in self.seeds:
            words = child_seed(seed, "stream").generate_state(1 + E, np.uint32)
            kwargs = self._env_kwargs(int(words[0]))
            reset_seeds.extend(int(w) for w in words[1:])
            fns.extend(
                [functools.partial(make_copy, spec.env_id, kwargs, spec.max_episode_steps)] * E
            )
        self._closed = False
        self.vec = self._vector_env(fns)
        try:  # (a stream that fails to start leaves no worker process behind)
            obs, info = self._start(reset_seeds)
        except BaseException:
            self.close()
            raise
        obs_dim = int(np.prod(obs.shape[1:]))
        act_dim = int(np.prod(self.vec.single_action_space.shape or ()))
        self.info = StreamInfo(
            self.name,
            "rl",
            (obs_dim,),
            act_dim,
            False,
            R,
            "episode_return",
            action_low=tuple(float(v) for v in self._low.reshape(-1)),
            action_high=tuple(float(v) for v in self._high.reshape(-1)),
        )
        self.steps_per_task = spec.change_every
        self.step = 0
        self.obs = self._tensor(obs)  # (R, E, obs_dim)
        self.friction = np.asarray(info["friction"], np.float64).reshape(R, E)
        self.copy_task = np.asarray(info["task"], np.int64).reshape(R, E)
        self.ep_return = np.zeros((R, E))
        self.ep_length = np.zeros((R, E), np.int64)
        # the last probe_window environment steps: ceil(probe_window / E) loop steps
        self.window = torch.zeros(-(-spec.probe_window // E), R, E, obs_dim)  # (W, R, E, D)
        self._window_np = self.window.numpy()  # (the same memory; load_state_dict copies in)

    def _start(self, reset_seeds: list[int | None]) -> tuple[np.ndarray, dict[str, Any]]:
        """Check the action space and reset every copy."""
        space = self.vec.single_action_space
        if not isinstance(space, gym.spaces.Box):
            raise ConfigError(f"{self.spec.env_id} has {space} actions; RL streams need a Box")
        self._low, self._high = space.low.astype(np.float64), space.high.astype(np.float64)
        return self.vec.reset(seed=reset_seeds)

    def _env_kwargs(self, schedule_seed: int) -> dict[str, Any]:
        spec = self.spec
        if not self.has_schedule:
            return {}
        return {
            "change_every": spec.change_every // spec.num_envs,  # (each copy's own steps)
            "friction_range": (spec.friction_range_low, spec.friction_range_high),
            "initial_friction": spec.initial_friction or None,
            "change_immediately": spec.change_immediately,
            "friction_in_obs": spec.friction_in_obs,
            "schedule_seed": schedule_seed,
        }

    def _vector_env(self, fns: list[Any]) -> VectorCopies:
        try:  # copy=False: the stream copies what it keeps (into torch tensors)
            if self.spec.vector == "async":
                return AsyncVectorEnv(fns, copy=False, autoreset_mode=AutoresetMode.SAME_STEP)
            vector = auto_vector(self.spec.vector, len(fns), threads=0)  # (the config's choice)
            if vector == "split" and len(fns) > 1:
                return SplitVectorEnv(fns)
            return CopiesVectorEnv(fns)
        except gym.error.Error as exc:
            raise ConfigError(f"cannot make env {self.spec.env_id!r}: {exc}") from None

    @property
    def num_replicas(self) -> int:
        """R, the number of replicas."""
        return len(self.seeds)

    @property
    def task(self) -> np.ndarray:
        """Each replica's friction index ``(R,)``: the newest among its copies."""
        return self.copy_task.max(1)

    def _tensor(self, obs: np.ndarray) -> torch.Tensor:
        # (cast and reshape in numpy: the same IEEE rounding as torch's, without a torch op's
        # dispatch per step; astype copies, so the tensor has its own memory)
        R, E = self.num_replicas, self.num_envs
        return torch.from_numpy(obs.astype(np.float32).reshape(R, E, -1))

    def advance(self, action: torch.Tensor) -> tuple[Feedback, list[EpisodeEnd]]:
        """Step every copy with ``action`` ``(R, E, act_dim)`` (clipped to the action space).

        Returns:
            The feedback for the action and the episodes that ended on this step.
        """
        R, E = self.num_replicas, self.num_envs
        # (in numpy: the same widening to float64 and clipping as torch's ops, without a torch
        # op's dispatch per step; np.array copies, so the caller's tensor is not clipped)
        act = np.array(action.detach().numpy(), dtype=np.float64).reshape(R * E, -1)
        if not np.isfinite(act.sum()):  # a diverged replica: keep NaN away from MuJoCo (a sum
            act = np.nan_to_num(act)  # is not finite if any term is not; nan_to_num keeps finite)
        ticks = self.step // E  # (loop steps so far)
        # what the agent acted on (through numpy views: a plain copy, no torch dispatch)
        self._window_np[ticks % len(self._window_np)] = self.obs.numpy()
        np.maximum(act, self._low, out=act)  # (np.clip's min(max(a, low), high), two ufuncs)
        np.minimum(act, self._high, out=act)
        obs, reward, terminated, truncated, info = self.vec.step(act)
        self.step += E  # (environment steps of each seed)
        self.obs = self._tensor(obs)  # (R, E, obs_dim), reset observations where done
        next_obs = self.obs
        done = terminated | truncated
        if done.any():
            final = obs.copy()
            for i in np.flatnonzero(done):
                final[i] = info["final_obs"][i]
            next_obs = self._tensor(final)
        self.ep_return += reward.reshape(R, E)
        self.ep_length += 1
        ended = self._episodes(done.reshape(R, E)) if done.any() else []
        self.friction[:] = info["friction"].reshape(R, E)
        self.copy_task[:] = info["task"].reshape(R, E)
        feedback = Feedback(
            torch.from_numpy(reward.astype(np.float32).reshape(R, E)),
            next_obs,
            torch.from_numpy(terminated.reshape(R, E)),
            torch.from_numpy(truncated.reshape(R, E)),
        )
        return feedback, ended

    def _episodes(self, done: np.ndarray) -> list[EpisodeEnd]:
        """Episodes ending where ``done`` ``(R, E)``; their returns and lengths restart."""
        ended = [
            EpisodeEnd(
                int(r),
                int(e),
                float(self.ep_return[r, e]),
                int(self.ep_length[r, e]),
                float(self.friction[r, e]),
                int(self.copy_task[r, e]),
            )
            for r, e in zip(*np.nonzero(done), strict=True)
        ]
        self.ep_return[done] = 0.0
        self.ep_length[done] = 0
        return ended

    def probe_batch(self, size: int | None = None) -> torch.Tensor:
        """The observations acted on in the last ``probe_window`` environment steps (fewer
        early on; with E copies, the last ``ceil(probe_window / E)`` loop steps' E each).

        Args:
            size: ignored (the window is ``probe_window``); kept for the stream interface.

        Returns:
            ``(R, P, obs_dim)``, oldest first.
        """
        W, ticks = len(self.window), self.step // self.num_envs
        filled = min(ticks, W)
        order = torch.arange(ticks - filled, ticks) % W
        obs = self.window[order]  # (P_steps, R, E, obs_dim)
        return obs.permute(1, 0, 2, 3).reshape(self.num_replicas, -1, obs.shape[-1])

    def state_dict(self) -> dict[str, Any]:
        """Counters, observations, open episodes, probe window and every copy's state."""
        copies = [
            {**s, "sim": torch.from_numpy(s["sim"]), "xpos": torch.from_numpy(s["xpos"])}
            for s in self.vec.get_attr("sim_state")
        ]
        return {
            "step": self.step,
            "step_unit": STEP_UNIT,
            "obs": self.obs.clone(),
            "friction": torch.from_numpy(self.friction.copy()),
            "copy_task": torch.from_numpy(self.copy_task.copy()),
            "ep_return": torch.from_numpy(self.ep_return.copy()),
            "ep_length": torch.from_numpy(self.ep_length.copy()),
            "window": self.window.clone(),
            "copies": copies,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (same spec and seeds)."""
        copies = [
            {**s, "sim": s["sim"].numpy(), "xpos": s["xpos"].numpy()} for s in state["copies"]
        ]
        if len(copies) != self.vec.num_envs:
            raise ValueError(f"state has {len(copies)} env copies, stream {self.vec.num_envs}")
        if state.get("step_unit") != STEP_UNIT and self.num_envs > 1:
            raise ValueError(
                "the checkpoint counts loop steps (a run of contlearn before steps became "
                f"environment steps) and this stream has num_envs={self.num_envs}; finish it "
                "with the version that made it, or start it anew"
            )
        self.vec.set_attr("sim_state", copies)
        self.step = int(state["step"])
        self.obs = state["obs"].clone()
        self.friction[:] = state["friction"].numpy()
        self.copy_task[:] = state["copy_task"].numpy()
        self.ep_return[:] = state["ep_return"].numpy()
        self.ep_length[:] = state["ep_length"].numpy()
        self.window.copy_(state["window"])

    def close(self) -> None:
        """Close the env copies (ends the worker processes of ``vector=split``/``async``);
        harmless to call again."""
        if self._closed:
            return
        self._closed = True
        self.vec.close()

    def __enter__(self) -> MujocoRLStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SlipperyAntStream(MujocoRLStream):
    """Slippery Ant (Dohare et al. 2024): Ant-v5 whose friction changes every 2M steps to a
    value drawn log-uniformly from [0.02, 2]; see :class:`MujocoRLStream` and
    docs/slippery_ant.md."""

    name: ClassVar[str] = "slippery-ant"
