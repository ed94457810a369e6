"""The stream Protocols: what the engine and the runner need of a stream.

No base class to inherit (:class:`contlearn.envs.base.SupervisedStream` and
:class:`contlearn.envs.rl_stream.MujocoRLStream` are conveniences): every contract is a
``typing.Protocol`` checked at run time. Every stream has the :class:`Stream` lifecycle: its
replicas' ``seeds``, ``info``, a ``step`` count, ``steps_per_task``, checkpointable state, and
``close()``, which releases what it holds (worker processes of ``vector=split``/``async``) and
may be called more than once. A run builds each stream once and closes it when the run ends,
however it ends (:func:`contlearn.running.runner.open_streams`).

- :class:`SupervisedStreamProtocol` (``info.kind`` ``classification``/``regression``): ``next()``
  gives a :class:`~contlearn.envs.base.Batch`, ``score`` rates the answers, ``probe_batch`` draws
  probe inputs of the current task; optionally :class:`BlockStream` (``next_block``,
  ``batch_size``: T steps at once for agents that learn in blocks) and
  :class:`DeferredProbeStream` (``probe_batch_later``: the draws now, the gathering later, on
  the probe thread), :class:`HeldOutStream` (``held_out_batches``: the current task's
  held-out test split, which the loop scores without learning at each task's end) and
  :class:`ScheduledTaskStream` (``steps_until``: tasks of different lengths, e.g. the growing
  increments of ``incremental-cifar100``; ``steps_per_task`` is then the first task's length).
- :class:`RLStreamProtocol` (``info.kind == "rl"``): ``obs`` to act on, ``advance(action)``
  steps every env copy and returns the feedback and the episodes that ended, ``task`` is each
  replica's friction index, ``probe_batch()`` the observations of the recent window.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
import torch

if TYPE_CHECKING:
    from contlearn.envs.base import Batch, StreamInfo


@runtime_checkable
class Stream(Protocol):
    """What every stream has: identity, counters, state and a lifecycle."""

    info: StreamInfo
    seeds: list[int]
    step: int
    steps_per_task: int

    def state_dict(self) -> dict[str, Any]:
        """The stream's position (counters, generators, env states)."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        ...

    def close(self) -> None:
        """Release what the stream holds (worker processes); harmless to call again."""
        ...


@runtime_checkable
class SupervisedStreamProtocol(Stream, Protocol):
    """A supervised stream: inputs, then the targets as feedback."""

    task: int

    def next(self) -> Batch:
        """The next batch ``(R, B, ...)``; its ``new_task`` marks a task's first step."""
        ...

    def score(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-example score ``(R, B)`` (or ``(T, R, B)``) of answers given before updates."""
        ...

    def probe_batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``size`` examples of the current task per replica; the stream does not move."""
        ...


@runtime_checkable
class BlockStream(SupervisedStreamProtocol, Protocol):
    """A supervised stream that gives T steps at once (for agents with ``learn_block``)."""

    batch_size: int

    def next_block(self, max_steps: int) -> Batch:
        """Up to ``max_steps`` next batches of one task, stacked ``(T, R, B, ...)``: the same
        examples as T calls of ``next``."""
        ...


@runtime_checkable
class DeferredProbeStream(Protocol):
    """Draws a probe batch now and gathers it later (on the probe thread)."""

    def probe_batch_later(self, size: int) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
        """The random draws now; the examples when the returned function is called."""
        ...


@runtime_checkable
class HeldOutStream(SupervisedStreamProtocol, Protocol):
    """A supervised stream with a held-out test split per task (docs/image_streams.md).

    At the end of each task (after the step that makes ``step == task_ends_at``) the loop
    scores the agent's ``outputs`` on every held-out example with ``score``, without learning,
    and records the mean as ``held_out_metric`` (``""``: the stream has none this run).
    """

    held_out_metric: str

    @property
    def task_ends_at(self) -> int:
        """The step count at which the current task ends."""
        ...

    def held_out_batches(self, size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The current task's held-out examples in a fixed order, ``size`` per replica at a
        time: ``(obs (R, n, *input_shape), target (R, n))``; the stream does not move."""
        ...


@runtime_checkable
class ScheduledTaskStream(Protocol):
    """A stream whose tasks differ in length (the runner counts ``--tasks`` with it)."""

    def steps_until(self, tasks: int) -> int:
        """The steps of the first ``tasks`` tasks together."""
        ...


@runtime_checkable
class RLStreamProtocol(Stream, Protocol):
    """An RL stream: env copies whose dynamics change on a schedule."""

    obs: torch.Tensor

    @property
    def task(self) -> np.ndarray:
        """Each replica's task (friction index) ``(R,)``."""
        ...

    def advance(self, action: torch.Tensor) -> tuple[Any, Sequence[Any]]:
        """Step every copy with ``action`` ``(R, E, act_dim)``: the feedback ``(reward,
        next_obs, terminated, truncated)`` and the episodes that ended (``EpisodeEnd``)."""
        ...

    def probe_batch(self, size: int | None = None) -> torch.Tensor:
        """The observations acted on in the recent window, ``(R, P, obs_dim)``."""
        ...


__all__ = [
    "BlockStream",
    "DeferredProbeStream",
    "HeldOutStream",
    "RLStreamProtocol",
    "ScheduledTaskStream",
    "Stream",
    "SupervisedStreamProtocol",
]
