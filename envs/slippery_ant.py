"""Slippery Ant: Ant-v5 whose friction changes every so many steps (Dohare et al., Nature 2024).

The continual-RL benchmark of "Loss of plasticity in deep continual learning": the MuJoCo ant
must keep running forward while the ground's friction changes, every 2 million steps, to a value
drawn log-uniformly from [0.02, 2]. A policy that loses plasticity stops adapting to new
frictions. Registered as ``contlearn/SlipperyAnt-v0`` (1000-step episodes).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from gymnasium.envs.mujoco.ant_v5 import AntEnv

from contlearn.envs.mujoco_schedule import SlipperyMixin


class OnePassAntEnv(AntEnv):
    """Ant-v5 whose :meth:`step` derives each quantity once: the same observation, reward,
    termination and info as ``AntEnv.step``, bit for bit (``tests/test_slippery_ant.py``).

    Gymnasium's step clips the contact forces twice (observation and contact cost) and builds
    the state vector twice (healthy reward and termination), each through a property, and
    looks the main body up by name twice: ~30 µs of a ~260 µs step. Here each is computed once,
    with the same numpy operations on the same arrays in the same order. Every Ant-v5 argument
    keeps its meaning (the weights, ranges and observation options are read from the
    attributes ``AntEnv.__init__`` sets), so v5's contract, which gymnasium's versioning
    freezes, holds as it is.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._main_body_id = self.data.body(self._main_body).id  # (a name or an index)

    def step(self, action: np.ndarray) -> tuple[np.ndarray, Any, bool, bool, dict[str, Any]]:
        """One Ant-v5 step (``AntEnv.step``'s arithmetic, each term once)."""
        data, body = self.data, self._main_body_id
        xy_position_before = data.xpos[body, :2].copy()
        self.do_simulation(action, self.frame_skip)
        xy_position_after = data.xpos[body, :2].copy()
        xy_velocity = (xy_position_after - xy_position_before) / self.dt
        x_velocity, y_velocity = xy_velocity

        low, high = self._contact_force_range
        contact_forces = np.clip(data.cfrc_ext, low, high)
        position, velocity = data.qpos.flatten(), data.qvel.flatten()
        state = np.concatenate([data.qpos.flat, data.qvel.flat])  # (state_vector())
        min_z, max_z = self._healthy_z_range
        is_healthy = np.isfinite(state).all() and min_z <= state[2] <= max_z
        if self._exclude_current_positions_from_observation:
            position = position[2:]
        if self._include_cfrc_ext_in_observation:
            observation = np.concatenate((position, velocity, contact_forces[1:].flatten()))
        else:
            observation = np.concatenate((position, velocity))

        forward_reward = x_velocity * self._forward_reward_weight
        healthy_reward = is_healthy * self._healthy_reward
        rewards = forward_reward + healthy_reward
        ctrl_cost = self._ctrl_cost_weight * np.sum(np.square(action))
        contact_cost = self._contact_cost_weight * np.sum(np.square(contact_forces))
        reward = rewards - (ctrl_cost + contact_cost)
        terminated = (not is_healthy) and self._terminate_when_unhealthy
        info = {
            "x_position": data.qpos[0],
            "y_position": data.qpos[1],
            "distance_from_origin": np.linalg.norm(data.qpos[0:2], ord=2),
            "x_velocity": x_velocity,
            "y_velocity": y_velocity,
            "reward_forward": forward_reward,
            "reward_ctrl": -ctrl_cost,
            "reward_contact": -contact_cost,
            "reward_survive": healthy_reward,
        }
        if self.render_mode == "human":
            self.render()
        return observation, reward, terminated, False, info


class SlipperyAntEnv(SlipperyMixin, OnePassAntEnv):  # type: ignore[misc]  # SlipperyMixin.step
    """Ant-v5 with a friction schedule.

    **What changes.** Every ``change_every`` environment steps (default 2,000,000) the sliding
    friction ``model.geom_friction[:, 0]`` of *every* geom, floor and ant alike, is set to a new
    value ``exp(U(log 0.02, log 2.0))`` (``friction_range``). All geoms get the same value because
    MuJoCo combines a contact's friction by the max of its two geoms: lowering only the floor
    would leave every contact at the ant's friction of 1. Torsional and rolling friction are
    untouched (the ant's contacts have ``condim=3``, which ignores them).

    **When.** By default the change waits for the next episode end (``reset()``), so an episode
    never mixes two frictions; ``change_immediately=True`` changes right after the step that
    completes ``change_every`` steps. The step counter counts every ``step()`` across episodes
    and restarts at each change.

    **Randomness.** The env's own generator, seeded by ``reset(seed=s)`` (independent of the
    ``np_random`` that draws the initial state): a seeded reset restarts the schedule at task 0,
    so the frictions are a function of ``s``. The first task's friction is drawn like every later
    one (the paper's setting) unless ``initial_friction`` is given (e.g. 1.0, the Ant-v5
    default). Before the first seeded reset the schedule runs from OS entropy.

    **Info and observation.** ``info["friction"]`` (current value) and ``info["task"]`` (number of
    changes so far) at every reset and step; after an immediate change they already show the new
    friction, which governs the next step. ``friction_in_obs=True`` appends log-friction to the
    observation (the observation space grows by one unbounded dimension).

    **Checkpoints.** :meth:`get_schedule_state` / :meth:`set_schedule_state` save and restore the
    schedule's position (steps since change, task, friction, generator state) as plain python
    values.

    Args:
        change_every: environment steps between friction changes.
        friction_range: ``(low, high)`` of the log-uniform draws.
        initial_friction: the first task's friction (``None``: drawn).
        change_immediately: change mid-episode when due (default: at the next episode end).
        friction_in_obs: append log-friction to the observation.
        schedule_seed: seed of the friction schedule (``None``: the seed of ``reset(seed=...)``);
            env copies sharing it see the same frictions from different initial states.
        **kwargs: every Ant-v5 argument (``ctrl_cost_weight``, ``xml_file``, ``frame_skip``,
            ``include_cfrc_ext_in_observation``, ``render_mode``, ...).

    **Speed.** Steps through :class:`OnePassAntEnv`: Ant-v5's step with each term computed
    once (the same numbers).

    Version History:
        * v0: initial version (on gymnasium Ant-v5, official ``mujoco`` bindings).
    """
