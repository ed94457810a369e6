"""The shape every supervised stream shares: replicas, tasks, seeded randomness, state.

A stream carries a leading replica dimension R (docs/design.md §2): replica r draws everything
(sample order, permutations, fast bits) from its own generator seeded by its own seed, so a
replica's data is the same whether it runs alone or in a batch. All replicas switch task at the
same step; ``task`` counts tasks from 0.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import numpy as np
import torch

from contlearn.envs.protocol import Stream  # noqa: F401  (the Protocol, once defined here)
from contlearn.seeding import numpy_rng


@dataclass(frozen=True)
class StreamInfo:
    """What an agent may know of a stream before it starts.

    Attributes:
        name: the registered stream id.
        kind: ``"classification"``, ``"regression"`` or ``"rl"``.
        input_shape: shape of one example (without replica and batch dims).
        num_outputs: number of classes, or of regression targets.
        boundaries_visible: whether agents are told when a task starts.
        num_replicas: R, the leading dimension of every tensor the stream yields.
        metric: the per-task score the engine records (``accuracy`` or ``squared_error``).
        batch_size: examples per step (1: the online protocol).
        action_low, action_high: RL streams: the bounds of each action dimension (actions
            are clipped to them); empty for supervised streams.
    """

    name: str
    kind: str
    input_shape: tuple[int, ...]
    num_outputs: int
    boundaries_visible: bool
    num_replicas: int
    metric: str
    batch_size: int = 1
    action_low: tuple[float, ...] = ()
    action_high: tuple[float, ...] = ()


class Batch(NamedTuple):
    """One step of a supervised stream.

    Attributes:
        obs: inputs, ``(R, B, *input_shape)`` float32.
        target: labels ``(R, B)`` int64, or regression targets ``(R, B, num_outputs)`` float32.
        task: index of the task this batch belongs to.
        new_task: True on the first batch of a task.
    """

    obs: torch.Tensor
    target: torch.Tensor
    task: int
    new_task: bool


class SupervisedStream:
    """Base class: task counting, per-replica generators and checkpointable state.

    Subclasses define ``kind``, ``metric``, ``_begin_task(r, rng)`` (draw replica r's task from
    its generator) and ``_draw(batch_size)`` (the next batch for all replicas).
    """

    kind: ClassVar[str] = "classification"
    metric: ClassVar[str] = "accuracy"
    name: ClassVar[str] = ""

    def __init__(
        self,
        seeds: Sequence[int],
        examples_per_task: int,
        batch_size: int,
        boundaries_visible: bool,
    ) -> None:
        self.seeds = [int(s) for s in seeds]
        self.batch_size = batch_size
        self.steps_per_task = examples_per_task // batch_size
        self.boundaries_visible = boundaries_visible
        self.rngs = [numpy_rng(s, "stream") for s in self.seeds]
        # probes draw their inputs from generators of their own, so probing never moves the
        # stream: a run with probes sees exactly the examples of a run without.
        self.probe_rngs = [numpy_rng(s, "probe") for s in self.seeds]
        self.step = 0  # steps taken so far
        self.task = -1  # becomes 0 on the first batch

    @property
    def num_replicas(self) -> int:
        """R, the number of replicas."""
        return len(self.seeds)

    def next(self) -> Batch:
        """The next batch; starts a new task every ``steps_per_task`` steps."""
        new_task = self.step % self.steps_per_task == 0
        if new_task:
            self.task += 1
            for r, rng in enumerate(self.rngs):
                self._begin_task(r, rng)
        obs, target = self._draw(self.batch_size)
        self.step += 1
        return Batch(obs, target, self.task, new_task)

    def next_block(self, max_steps: int) -> Batch:
        """Up to ``max_steps`` next batches of one task at once (at least one): ``obs``
        ``(T, R, B, *input_shape)`` and ``target`` with a leading T dim; ``new_task`` is about
        the first of them. The same examples, and the same random draws, as T calls of
        :meth:`next`; streams that cannot gather ahead return one step."""
        new_task = self.step % self.steps_per_task == 0
        if new_task:
            self.task += 1
            for r, rng in enumerate(self.rngs):
                self._begin_task(r, rng)
        left = self.steps_per_task - self.step % self.steps_per_task
        obs, target = self._draw_block(max(1, min(max_steps, left)), self.batch_size)
        self.step += obs.shape[0]
        return Batch(obs, target, self.task, new_task)

    def _draw_block(self, steps: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The next ``1 … steps`` batches of the current task, stacked; must not change
        ``step`` (default: one step)."""
        obs, target = self._draw(batch_size)
        return obs.unsqueeze(0), target.unsqueeze(0)

    def score(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-example score of predictions made before the update: ``(R, B)`` (or
        ``(T, R, B)`` for a block of steps).

        Classification: 1.0 where the arg-max class equals the label. Regression: squared
        error summed over outputs.
        """
        if self.kind == "classification":
            return (pred.argmax(-1) == target).to(torch.float32)
        return (pred - target).pow(2).sum(-1)

    def probe_batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``size`` examples of the current task per replica, drawn with the probe generators.

        Returns:
            ``(obs (R, P, *input_shape), target)``; the stream's own position is untouched.
        """
        return self.probe_batch_later(size)()

    def probe_batch_later(self, size: int) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
        """:meth:`probe_batch` in two halves: the random draws now (so the probe generators
        advance in order), the examples when the returned function is called, which may be
        on another thread while the stream goes on (the engine's concurrent probes)."""
        if self.task < 0:
            raise RuntimeError("probe_batch needs a current task; call next() first")
        return self._probe_later(size)

    def _probe_draw(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _probe_later(self, size: int) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
        batch = self._probe_draw(size)  # (subclasses defer the gathering)
        return lambda: batch

    def _begin_task(self, replica: int, rng: np.random.Generator) -> None:
        raise NotImplementedError

    def _draw(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """Counters, every generator's state and the subclass's task state (plain types)."""
        return {
            "step": self.step,
            "task": self.task,
            "rngs": [rng.bit_generator.state for rng in self.rngs],
            "probe_rngs": [rng.bit_generator.state for rng in self.probe_rngs],
            "extra": self._extra_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.step = int(state["step"])
        self.task = int(state["task"])
        for rng, rng_state in zip(self.rngs, state["rngs"], strict=True):
            rng.bit_generator.state = rng_state
        for rng, rng_state in zip(self.probe_rngs, state["probe_rngs"], strict=True):
            rng.bit_generator.state = rng_state
        self._load_extra_state(state["extra"])

    def close(self) -> None:
        """Nothing to release (the data are in memory); part of the stream lifecycle."""

    def __enter__(self) -> SupervisedStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        pass
