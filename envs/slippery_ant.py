"""Slippery Ant: Ant-v5 whose friction changes every so many steps (Dohare et al., Nature 2024).

The continual-RL benchmark of "Loss of plasticity in deep continual learning": the MuJoCo ant
must keep running forward while the ground's friction changes, every 2 million steps, to a value
drawn log-uniformly from [0.02, 2]. A policy that loses plasticity stops adapting to new
frictions. Registered as ``contlearn/SlipperyAnt-v0`` (1000-step episodes).
"""

from __future__ import annotations

from gymnasium.envs.mujoco.ant_v5 import AntEnv

from contlearn.envs.mujoco_schedule import SlipperyMixin


class SlipperyAntEnv(SlipperyMixin, AntEnv):  # type: ignore[misc]  # SlipperyMixin.step
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

    Version History:
        * v0: initial version (on gymnasium Ant-v5, official ``mujoco`` bindings).
    """
