"""When a physical parameter changes, and to what value: the schedule, with no simulator involved.

A :class:`ParameterSchedule` counts environment steps and draws a new value every so many of
them from its own seeded generator; :mod:`contlearn.envs.mujoco_schedule` binds one to a MuJoCo
model (friction, gravity or mass scale). Importing this module does not import mujoco.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from contlearn.errors import ConfigError

#: The parameters a schedule can drive.
PARAMETERS = ("friction", "gravity", "mass_scale")

#: Default ranges. Friction: Dohare et al. 2024 (Slippery Ant). Gravity (0.5 g to 2 g) and mass
#: scale (0.5 to 2) are contlearn's choices; no paper fixes them.
DEFAULT_RANGES: dict[str, tuple[float, float]] = {
    "friction": (0.02, 2.0),
    "gravity": (0.5 * 9.81, 2.0 * 9.81),
    "mass_scale": (0.5, 2.0),
}

#: Spawn key of the schedule's generator: the same seed as ``reset(seed=...)`` but a stream of
#: randomness independent of the env's ``np_random`` (which gymnasium seeds with no spawn key).
_SPAWN_KEY = 0x51_1B_BE_21


class ParameterSchedule:
    """When a physical parameter changes, and to what value (no simulator involved).

    The schedule counts environment steps. Once ``change_every`` steps have been taken under the
    current value, a new value is drawn from ``value_range`` (log-uniformly by default) with the
    schedule's own generator: right after that step if ``immediate``, else at the next episode
    end, i.e. the next ``reset`` (the default: an episode never mixes two values). The counter
    restarts at each change, so a task lasts exactly ``change_every`` steps in immediate mode and,
    by default, until the first episode end after ``change_every`` steps.

    Args:
        change_every: steps between changes (≥ 1).
        value_range: ``(low, high)`` of the values drawn; ``low > 0`` if ``log_uniform``.
        log_uniform: draw ``exp(U(log low, log high))`` instead of ``U(low, high)``.
        immediate: change right after the step that completes ``change_every`` steps.
        initial_value: the first task's value; ``None`` draws it like every later value.
        seed: seed of the generator (``None``: fresh OS entropy); see :meth:`restart`.

    Attributes:
        value: the current value.
        task: number of changes since the schedule (re)started; 0 for the first value.
        steps_since_change: environment steps taken under the current value.
        total_steps: environment steps since the schedule (re)started.
    """

    def __init__(
        self,
        change_every: int = 2_000_000,
        value_range: tuple[float, float] = DEFAULT_RANGES["friction"],
        *,
        log_uniform: bool = True,
        immediate: bool = False,
        initial_value: float | None = None,
        seed: int | None = None,
    ) -> None:
        low, high = (float(v) for v in value_range)
        if int(change_every) != change_every or change_every < 1:
            raise ConfigError(f"change_every={change_every} must be an integer ≥ 1")
        if not low <= high or (log_uniform and low <= 0):
            raise ConfigError(
                f"value_range={value_range} must have low ≤ high"
                + (" and low > 0 (log-uniform draws)" if log_uniform else "")
            )
        if log_uniform and initial_value is not None and initial_value <= 0:
            raise ConfigError(f"initial_value={initial_value} must be > 0 (log-uniform schedule)")
        self.change_every = int(change_every)
        self.value_range = (low, high)
        self.log_uniform = log_uniform
        self.immediate = immediate
        self.initial_value = None if initial_value is None else float(initial_value)
        self.restart(seed)

    def restart(self, seed: int | None) -> None:
        """Start again at task 0 with a generator seeded by ``seed`` (``None``: OS entropy).

        The first value is ``initial_value`` if given (the generator is then not consumed),
        else the generator's first draw, so the whole schedule is a function of ``seed``.
        """
        seq = np.random.SeedSequence(seed, spawn_key=(_SPAWN_KEY,))
        self.rng = np.random.Generator(np.random.PCG64(seq))
        self.task = 0
        self.steps_since_change = 0
        self.total_steps = 0
        self.value = self.initial_value if self.initial_value is not None else self.sample()

    def sample(self) -> float:
        """One draw from ``value_range`` (advances the generator)."""
        low, high = self.value_range
        if self.log_uniform:
            return float(np.exp(self.rng.uniform(np.log(low), np.log(high))))
        return float(self.rng.uniform(low, high))

    @property
    def due(self) -> bool:
        """Whether ``change_every`` steps have been taken under the current value."""
        return self.steps_since_change >= self.change_every

    def step(self) -> bool:
        """Count one environment step; in immediate mode change if due. True if it changed."""
        self.steps_since_change += 1
        self.total_steps += 1
        return self.immediate and self._change_if_due()

    def episode_end(self) -> bool:
        """An episode ended (``reset``); by default change if due. True if it changed."""
        return not self.immediate and self._change_if_due()

    def _change_if_due(self) -> bool:
        if not self.due:
            return False
        self.value = self.sample()
        self.task += 1
        self.steps_since_change = 0
        return True

    def state_dict(self) -> dict[str, Any]:
        """Position in the schedule as plain python values (JSON-serialisable)."""
        return {
            "steps_since_change": self.steps_since_change,
            "total_steps": self.total_steps,
            "task": self.task,
            "value": self.value,
            "rng": self.rng.bit_generator.state,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume exactly where :meth:`state_dict` was taken (options stay as constructed)."""
        self.steps_since_change = int(state["steps_since_change"])
        self.total_steps = int(state["total_steps"])
        self.task = int(state["task"])
        self.value = float(state["value"])
        self.rng.bit_generator.state = state["rng"]
