"""MuJoCo physics that change on a schedule: the machinery behind the Slippery environments.

A continual-RL stream is a gymnasium environment whose dynamics change every so many steps
(docs/design.md §1). Here one physical parameter of a MuJoCo model follows a
:class:`~contlearn.envs.parameter_schedule.ParameterSchedule`:

- ``friction``: the sliding friction ``model.geom_friction[:, 0]`` of *every* geom, floor
  included (and of explicit contact pairs, if any). MuJoCo combines a contact pair's friction by
  the element-wise max of the two geoms (or takes the higher-``priority`` geom's), so changing
  only the floor would change nothing while the robot keeps friction 1; with every geom set to
  the same value, every contact uses exactly that value whatever the rule.
- ``gravity``: the magnitude g of ``model.opt.gravity = (0, 0, -g)``.
- ``mass_scale``: a global factor s on the masses of the original model,
  ``body_mass = s · body_mass₀``, with ``body_inertia = s · body_inertia₀`` (a uniform change of
  density, so the shapes stay physically consistent), then ``mj_setConst`` to refresh the derived
  constants (subtree masses, inverse weights used by the constraint solver).

Values change in the compiled model; no XML is written at run time. Three ways in:

- :class:`ScheduledPhysicsWrapper` wraps any MuJoCo env instance, for any parameter;
- :class:`SlipperyMixin` turns a MuJoCo env *class* into its Slippery (friction) version, as
  :class:`~contlearn.envs.slippery_ant.SlipperyAntEnv` and the registered
  ``contlearn/Slippery{HalfCheetah,Hopper,Walker2d}-v0`` classes below do;
- :class:`ScheduledPhysics` (schedule + model + observation feature) is what both share.

When a value changes is :class:`~contlearn.envs.parameter_schedule.ParameterSchedule`'s business
(no simulator involved).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, SupportsFloat, cast

import gymnasium as gym
import mujoco
import numpy as np
from gymnasium import utils
from gymnasium.envs.mujoco.half_cheetah_v5 import HalfCheetahEnv
from gymnasium.envs.mujoco.hopper_v5 import HopperEnv
from gymnasium.envs.mujoco.mujoco_env import MujocoEnv
from gymnasium.envs.mujoco.walker2d_v5 import Walker2dEnv

from contlearn.envs.parameter_schedule import DEFAULT_RANGES, PARAMETERS, ParameterSchedule
from contlearn.errors import ConfigError


def parameter_setter(model: mujoco.MjModel, parameter: str) -> Callable[[float], None]:
    """A function that writes one value of ``parameter`` into the compiled ``model``.

    ``mass_scale`` scales the masses and inertias the model has *now* (captured here).
    """
    if parameter == "friction":

        def set_friction(value: float) -> None:
            model.geom_friction[:, 0] = value  # every geom: contacts combine friction by max
            if model.npair:  # explicit <pair>s carry their own friction (2 sliding directions)
                model.pair_friction[:, :2] = value

        return set_friction
    if parameter == "gravity":

        def set_gravity(value: float) -> None:
            model.opt.gravity[:] = (0.0, 0.0, -value)

        return set_gravity
    if parameter == "mass_scale":
        mass0, inertia0 = model.body_mass.copy(), model.body_inertia.copy()
        scratch = mujoco.MjData(model)  # mj_setConst moves its data to qpos0: never the env's

        def set_mass_scale(value: float) -> None:
            model.body_mass[:] = value * mass0
            model.body_inertia[:] = value * inertia0
            mujoco.mj_setConst(model, scratch)

        return set_mass_scale
    raise ConfigError(f"unknown parameter {parameter!r}; use one of {PARAMETERS}")


class ScheduledPhysics:
    """A :class:`ParameterSchedule` bound to a MuJoCo model: the part every env variant shares.

    Call :meth:`before_reset` before the inner env resets and :meth:`after_reset` /
    :meth:`after_step` on what the inner env returns. ``reset(seed=s)`` restarts the schedule
    from ``s``; ``reset()`` without a seed is an episode end and continues it.

    Args:
        model: the env's compiled model (changed in place).
        parameter: one of :data:`PARAMETERS`; also the ``info`` key of the current value.
        schedule: when and to what the parameter changes.
        in_obs: append the value's feature (log of it if log-uniform) to observations.
        schedule_seed: if given, seeded resets restart the schedule from this seed instead of
            the reset's: env copies that share it (one replica's copies in a vector env) draw
            the same sequence of values, while their initial states differ.
    """

    def __init__(
        self,
        model: mujoco.MjModel,
        parameter: str,
        schedule: ParameterSchedule,
        in_obs: bool = False,
        schedule_seed: int | None = None,
    ) -> None:
        self.parameter = parameter
        self.schedule = schedule
        self.in_obs = in_obs
        self.schedule_seed = schedule_seed
        if schedule_seed is not None:
            schedule.restart(schedule_seed)
        self._set = parameter_setter(model, parameter)
        self._set(schedule.value)

    def observation_space(self, space: gym.spaces.Space) -> gym.spaces.Space:
        """``space`` widened by one unbounded dimension if the value is in the observation."""
        if not self.in_obs:
            return space
        if not (isinstance(space, gym.spaces.Box) and len(space.shape) == 1):
            raise ConfigError(
                f"cannot append the {self.parameter} to observations in {space}; "
                "use a flat Box observation space or leave it out"
            )
        low = np.append(space.low, -np.inf).astype(space.dtype)
        high = np.append(space.high, np.inf).astype(space.dtype)
        return gym.spaces.Box(low, high, dtype=space.dtype)

    def before_reset(self, seed: int | None) -> None:
        """Restart the schedule (``seed`` given) or end the episode, then set the value."""
        if seed is not None:
            self.schedule.restart(seed if self.schedule_seed is None else self.schedule_seed)
            self._set(self.schedule.value)
        elif self.schedule.episode_end():
            self._set(self.schedule.value)

    def after_reset(self, obs: np.ndarray, info: dict[str, Any]) -> tuple[np.ndarray, dict]:
        """The reset's observation and info, with the value and task added."""
        return self._observe(obs), {**info, **self.info()}

    def after_step(self, obs: np.ndarray, info: dict[str, Any]) -> tuple[np.ndarray, dict]:
        """Count the step (changing the value if due); the value and task governing the next step.

        In immediate mode the change happens after the simulated step, so the returned
        observation and info already show the new value: the one the next action will meet.
        """
        if self.schedule.step():
            self._set(self.schedule.value)
        return self._observe(obs), {**info, **self.info()}

    def info(self) -> dict[str, Any]:
        """``{parameter: current value, "task": number of changes so far}``."""
        return {self.parameter: self.schedule.value, "task": self.schedule.task}

    def _observe(self, obs: np.ndarray) -> np.ndarray:
        if not self.in_obs:
            return obs
        value = self.schedule.value
        feature = np.log(value) if self.schedule.log_uniform else value
        return np.append(obs, feature).astype(obs.dtype)

    def state_dict(self) -> dict[str, Any]:
        """The schedule's position (plain python values) tagged with the parameter name."""
        return {"parameter": self.parameter, **self.schedule.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume the schedule from :meth:`state_dict` and write its value into the model."""
        if state.get("parameter", self.parameter) != self.parameter:
            raise ConfigError(
                f"schedule state is for {state['parameter']!r}, not {self.parameter!r}"
            )
        self.schedule.load_state_dict(state)
        self._set(self.schedule.value)


class ScheduledPhysicsWrapper(gym.Wrapper, utils.RecordConstructorArgs):
    """Change one physical parameter of any MuJoCo env on a schedule (see the module docstring).

    ``info`` gains ``info[parameter]`` (current value) and ``info["task"]`` at every reset and
    step. Example::

        env = ScheduledPhysicsWrapper(gymnasium.make("Hopper-v5"), "gravity",
                                      change_every=100_000)

    Args:
        env: an env whose ``unwrapped`` is a gymnasium ``MujocoEnv``.
        parameter: ``"friction"``, ``"gravity"`` or ``"mass_scale"``.
        change_every: environment steps between changes.
        value_range: ``(low, high)`` of the values; ``None``: :data:`DEFAULT_RANGES`.
        log_uniform: draw values log-uniformly (else uniformly).
        immediate: change mid-episode right when due (else at the next episode end).
        initial_value: the first task's value (``None``: drawn).
        value_in_obs: append the value (its log if log-uniform) to the observation.
    """

    def __init__(
        self,
        env: gym.Env,
        parameter: str = "friction",
        change_every: int = 2_000_000,
        value_range: tuple[float, float] | None = None,
        log_uniform: bool = True,
        immediate: bool = False,
        initial_value: float | None = None,
        value_in_obs: bool = False,
    ) -> None:
        utils.RecordConstructorArgs.__init__(
            self,
            parameter=parameter,
            change_every=change_every,
            value_range=value_range,
            log_uniform=log_uniform,
            immediate=immediate,
            initial_value=initial_value,
            value_in_obs=value_in_obs,
        )
        gym.Wrapper.__init__(self, env)
        if parameter not in PARAMETERS:
            raise ConfigError(f"unknown parameter {parameter!r}; use one of {PARAMETERS}")
        schedule = ParameterSchedule(
            change_every,
            value_range or DEFAULT_RANGES[parameter],
            log_uniform=log_uniform,
            immediate=immediate,
            initial_value=initial_value,
        )
        model = cast(MujocoEnv, env.unwrapped).model  # a MuJoCo env, as documented above
        self.physics = ScheduledPhysics(model, parameter, schedule, value_in_obs)
        self.observation_space = self.physics.observation_space(env.observation_space)

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[Any, dict[str, Any]]:
        """Reset the env; ``seed`` also restarts the schedule, no seed may apply a due change."""
        self.physics.before_reset(seed)
        obs, info = self.env.reset(seed=seed, options=options)
        return self.physics.after_reset(obs, info)

    def step(self, action: Any) -> tuple[Any, SupportsFloat, bool, bool, dict[str, Any]]:
        """Step the env and count the step in the schedule."""
        obs, reward, terminated, truncated, info = self.env.step(action)
        obs, info = self.physics.after_step(obs, info)
        return obs, reward, terminated, truncated, info

    def get_schedule_state(self) -> dict[str, Any]:
        """The schedule's position as plain python values (for checkpoints)."""
        return self.physics.state_dict()

    def set_schedule_state(self, state: dict[str, Any]) -> None:
        """Resume the schedule from :meth:`get_schedule_state` (call after ``reset``)."""
        self.physics.load_state_dict(state)


class SlipperyMixin:
    """Makes a gymnasium MuJoCo env class slippery: ``class X(SlipperyMixin, HopperEnv)``.

    Every ``change_every`` steps the sliding friction of every geom is set to a value drawn
    log-uniformly from ``friction_range`` by the env's own generator, seeded by
    ``reset(seed=...)`` (which restarts the schedule at task 0). ``info`` carries ``friction``
    and ``task`` at every reset and step. All other keyword arguments go to the env class.

    Args:
        change_every: environment steps between friction changes.
        friction_range: ``(low, high)`` of the log-uniform draws.
        initial_friction: the first task's friction (``None``: drawn like the others).
        change_immediately: change mid-episode when due (default: at the next episode end).
        friction_in_obs: append log-friction to the observation.
        schedule_seed: seed of the friction schedule (``None``: the seed of ``reset(seed=...)``);
            copies of an env that share it see the same frictions (see :class:`ScheduledPhysics`).
        **kwargs: the wrapped env class's own arguments (``xml_file``, ``frame_skip``, ...).
    """

    model: mujoco.MjModel
    observation_space: gym.spaces.Space

    def __init__(
        self,
        change_every: int = 2_000_000,
        friction_range: tuple[float, float] = DEFAULT_RANGES["friction"],
        initial_friction: float | None = None,
        change_immediately: bool = False,
        friction_in_obs: bool = False,
        schedule_seed: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        schedule = ParameterSchedule(
            change_every,
            friction_range,
            immediate=change_immediately,
            initial_value=initial_friction,
        )
        self._physics = ScheduledPhysics(
            self.model, "friction", schedule, friction_in_obs, schedule_seed
        )
        self.observation_space = self._physics.observation_space(self.observation_space)
        # The env class recorded its own positional args for pickling; record ours instead.
        utils.EzPickle.__init__(
            cast(utils.EzPickle, self),  # gymnasium's MuJoCo env classes are EzPickles
            change_every=change_every,
            friction_range=friction_range,
            initial_friction=initial_friction,
            change_immediately=change_immediately,
            friction_in_obs=friction_in_obs,
            schedule_seed=schedule_seed,
            **kwargs,
        )

    @property
    def friction(self) -> float:
        """The sliding friction every geom has now."""
        return self._physics.schedule.value

    @property
    def task(self) -> int:
        """Number of friction changes since the schedule (re)started."""
        return self._physics.schedule.task

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Reset; ``seed`` also restarts the schedule, no seed may apply a due change."""
        self._physics.before_reset(seed)
        obs, info = super().reset(seed=seed, options=options)  # type: ignore[misc]  # the env class'
        return self._physics.after_reset(obs, info)

    # Typed as gymnasium.Env.step: MujocoEnv.step's annotation (a float64 reward, an info of
    # float64 values only) does not hold once info carries the int task, so every class that
    # combines the two carries a type: ignore[misc] naming this method.
    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        """Step the simulation and count the step in the friction schedule."""
        obs, reward, terminated, truncated, info = super().step(action)  # type: ignore[misc]  # the env class'
        obs, info = self._physics.after_step(obs, info)
        return obs, reward, terminated, truncated, info

    def get_schedule_state(self) -> dict[str, Any]:
        """The schedule's position: steps since change, task, friction, generator state.

        Plain python values (JSON-serialisable), for checkpoints.
        """
        return self._physics.state_dict()

    def set_schedule_state(self, state: dict[str, Any]) -> None:
        """Resume the schedule from :meth:`get_schedule_state` (call after ``reset``)."""
        self._physics.load_state_dict(state)


class SlipperyHalfCheetahEnv(SlipperyMixin, HalfCheetahEnv):  # type: ignore[misc]  # SlipperyMixin.step
    """HalfCheetah-v5 with a friction schedule (:class:`SlipperyMixin`).

    Version History:
        * v0: initial version (on gymnasium HalfCheetah-v5).
    """


class SlipperyHopperEnv(SlipperyMixin, HopperEnv):  # type: ignore[misc]  # SlipperyMixin.step
    """Hopper-v5 with a friction schedule (:class:`SlipperyMixin`).

    Version History:
        * v0: initial version (on gymnasium Hopper-v5).
    """


class SlipperyWalker2dEnv(SlipperyMixin, Walker2dEnv):  # type: ignore[misc]  # SlipperyMixin.step
    """Walker2d-v5 with a friction schedule (:class:`SlipperyMixin`).

    Setting one friction for every geom replaces Walker2d's per-foot frictions (0.9 and 1.9).

    Version History:
        * v0: initial version (on gymnasium Walker2d-v5).
    """
