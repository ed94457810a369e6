"""The epoch protocol of the image streams: fixed per-task splits, E epochs of mini-batches.

A task is a set of classes with, per class, a fixed train split and a fixed held-out test
split (docs/image_streams.md). The task lasts ``epochs`` epochs over its train split; each epoch
is a fresh shuffle of the split drawn from the replica's own generator, cut into mini-batches
of ``batch_size`` (an epoch's last ``n mod batch_size`` examples are left out, as a
``DataLoader`` with ``drop_last``); one step is one mini-batch. The online score is that of
each mini-batch predicted before its update; at the task's end the loop scores the agent on
the held-out split without learning (:class:`~contlearn.envs.protocol.HeldOutStream`,
``test_accuracy``).

Subclasses hold the images of a pool (``(N, C·H·W)`` uint8, every split of the data set one
after the other) and say, per task and replica, which pool rows form the train and test
splits and which label each gets (:meth:`EpochStream._task_sets`).

Randomness per replica, in order: the subclass's task draws at each task start, each epoch's
shuffle, then each step's augmentation (random crop and flip, where on). Blocks of steps
(``next_block``) never cross an epoch's end and draw the same numbers in the same order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from contlearn.envs.base import Batch, StreamInfo, SupervisedStream
from contlearn.errors import ConfigError

#: at most this many bytes of inputs are gathered for one block of steps
_AHEAD_BYTES = 32 << 20
#: random-crop padding (pixels per side, reflected), as the reference's CIFAR augmentation
CROP_PAD = 4
TaskSets = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # train rows, labels, test …


class EpochStream(SupervisedStream):
    """Base of the image streams: tasks of E epochs over fixed splits, held-out scores.

    Args:
        seeds: the replicas' seeds.
        pool: every image ``(N, C, H, W)`` uint8.
        num_outputs: classes the agent answers over.
        epochs: epochs per task.
        batch_size: examples per step.
        boundaries_visible: tell the agent when a task starts.
        mean, std: per-channel normalisation of pixels scaled to [0, 1], ``(C,)``.
        augment: random crop (padding :data:`CROP_PAD`, reflected) and horizontal flip of
            every training example.
        held_out: score the held-out split at each task's end.
    """

    def __init__(
        self,
        seeds: Sequence[int],
        pool: np.ndarray,
        num_outputs: int,
        epochs: int,
        batch_size: int,
        boundaries_visible: bool,
        mean: Sequence[float],
        std: Sequence[float],
        augment: bool = False,
        held_out: bool = True,
    ) -> None:
        # (the base's examples_per_task is moot here: task lengths come from _task_length)
        super().__init__(seeds, batch_size, batch_size, boundaries_visible)
        self.epochs = epochs
        self.shape = tuple(int(d) for d in pool.shape[1:])  # (C, H, W)
        self.pool = torch.from_numpy(np.ascontiguousarray(pool).reshape(len(pool), -1))
        C = self.shape[0]
        self.mean = torch.tensor(mean, dtype=torch.float32).view(C, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(C, 1, 1)
        self.augment = augment
        self.held_out_metric = "test_accuracy" if held_out else ""
        self.steps_per_task = self._task_length(0)
        self.info = StreamInfo(
            self.name,
            "classification",
            self.shape,
            num_outputs,
            boundaries_visible,
            self.num_replicas,
            "accuracy",
            batch_size,
        )
        R = self.num_replicas
        self.train_rows = torch.zeros(R, 0, dtype=torch.int64)  # (R, n) pool rows
        self.train_labels = torch.zeros(R, 0, dtype=torch.int64)  # (R, n)
        self.test_rows = torch.zeros(R, 0, dtype=torch.int64)  # (R, m)
        self.test_labels = torch.zeros(R, 0, dtype=torch.int64)  # (R, m)
        self.order = torch.zeros(R, 0, dtype=torch.int64)  # (R, n) this epoch's shuffle
        self.pos = 0  # examples of this epoch shown
        self._ends_at = 0

    # -- what subclasses define ------------------------------------------------------------
    def _task_sets(self, replica: int, rng: np.random.Generator) -> TaskSets:
        """Replica ``replica``'s next task: ``(train rows, train labels, test rows, test
        labels)`` (pool rows and the labels they get); may draw from ``rng``."""
        raise NotImplementedError

    def _train_size(self, task: int) -> int:
        """The number of training examples of task ``task`` (the same for every replica)."""
        raise NotImplementedError

    # -- the schedule ----------------------------------------------------------------------
    def _task_length(self, task: int) -> int:
        return self.epochs * (self._train_size(task) // self.batch_size)

    def steps_until(self, tasks: int) -> int:
        """The steps of the first ``tasks`` tasks together."""
        return sum(self._task_length(t) for t in range(tasks))

    @property
    def task_ends_at(self) -> int:
        """The step count at which the current task ends."""
        return self._ends_at

    @property
    def epoch_steps(self) -> int:
        """Steps per epoch of the current task."""
        return self.train_rows.shape[1] // self.batch_size

    # -- stepping --------------------------------------------------------------------------
    def _start_task_if_due(self) -> bool:
        if self.step != self._ends_at:
            return False
        self.task += 1
        sets = [self._task_sets(r, rng) for r, rng in enumerate(self.rngs)]
        self.train_rows, self.train_labels, self.test_rows, self.test_labels = (
            torch.from_numpy(np.stack([s[i] for s in sets]).astype(np.int64)) for i in range(4)
        )
        self.pos = self.train_rows.shape[1]  # (a fresh shuffle on the first step)
        self._ends_at = self.step + self._task_length(self.task)
        return True

    def _shuffle_if_due(self) -> None:
        if self.pos + self.batch_size <= self.epoch_steps * self.batch_size:
            return
        n = self.train_rows.shape[1]
        self.order = torch.from_numpy(np.stack([rng.permutation(n) for rng in self.rngs]))
        self.pos = 0

    def next(self) -> Batch:
        """The next mini-batch; a new task after the last epoch of the current one."""
        new_task = self._start_task_if_due()
        obs, target = self._draw_block(1, self.batch_size)
        self.step += 1
        return Batch(obs[0], target[0], self.task, new_task)

    def next_block(self, max_steps: int) -> Batch:
        """Up to ``max_steps`` next mini-batches of one epoch, stacked ``(T, R, B, ...)``:
        the same examples and random draws as T calls of :meth:`next`."""
        new_task = self._start_task_if_due()
        obs, target = self._draw_block(max(1, max_steps), self.batch_size)
        self.step += obs.shape[0]
        return Batch(obs, target, self.task, new_task)

    def _draw_block(self, steps: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        self._shuffle_if_due()
        R, B = self.num_replicas, batch_size
        per_step = R * B * self.pool.shape[1] * 4
        left = (self.epoch_steps * B - self.pos) // B
        n = max(1, min(steps, left, _AHEAD_BYTES // per_step))
        where = self.order[:, self.pos : self.pos + n * B]  # (R, n·B) positions in the split
        self.pos += n * B
        rows = self.train_rows.gather(1, where).view(R, n, B).transpose(0, 1)  # (n, R, B)
        target = self.train_labels.gather(1, where).view(R, n, B).transpose(0, 1)
        obs = self._pixels(rows)
        if self.augment:
            obs = self._augmented(obs)
        return obs, target

    def _pixels(self, rows: torch.Tensor) -> torch.Tensor:
        """Normalised images of pool rows ``(...)``: ``(..., C, H, W)`` float32."""
        flat = self.pool.index_select(0, rows.reshape(-1)).view(*rows.shape, *self.shape)
        return flat.to(torch.float32).div_(255.0).sub_(self.mean).div_(self.std)

    def _augmented(self, obs: torch.Tensor) -> torch.Tensor:
        """Random crops (reflect-padded by :data:`CROP_PAD`) and horizontal flips of ``obs``
        ``(n, R, B, C, H, W)``; each replica draws, per step, B flips then B (dy, dx)."""
        n, R, B, C, H, W = obs.shape
        flips = np.zeros((n, R, B), dtype=bool)
        shifts = np.zeros((n, R, B, 2), dtype=np.int64)
        for t in range(n):
            for r, rng in enumerate(self.rngs):
                flips[t, r] = rng.random(B) < 0.5
                shifts[t, r] = rng.integers(0, 2 * CROP_PAD + 1, size=(B, 2))
        x = obs.reshape(-1, C, H, W)
        x = torch.where(torch.from_numpy(flips).view(-1, 1, 1, 1), x.flip(-1), x)
        padded = F.pad(x, (CROP_PAD,) * 4, mode="reflect")  # (N, C, H+2p, W+2p)
        s = torch.from_numpy(shifts).view(-1, 2)
        ys = (s[:, 0:1] + torch.arange(H)).view(-1, 1, H, 1).expand(-1, C, H, W + 2 * CROP_PAD)
        cropped = padded.gather(2, ys)  # (N, C, H, W+2p)
        xs = (s[:, 1:2] + torch.arange(W)).view(-1, 1, 1, W).expand(-1, C, H, W)
        return cropped.gather(3, xs).view(n, R, B, C, H, W)

    # -- held-out and probes ---------------------------------------------------------------
    def held_out_batches(self, size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The current task's test split in order, ``size`` examples per replica at a time:
        ``(obs (R, n, C, H, W), target (R, n))`` (never augmented)."""
        if self.task < 0:
            raise RuntimeError("held_out_batches needs a current task; call next() first")
        rows, labels = self.test_rows.clone(), self.test_labels.clone()
        for start in range(0, rows.shape[1], size):
            yield self._pixels(rows[:, start : start + size]), labels[:, start : start + size]

    def _probe_later(self, size: int) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
        n = self.train_rows.shape[1]
        size = min(size, n)
        where = torch.from_numpy(
            np.stack([rng.choice(n, size, replace=False) for rng in self.probe_rngs])
        )
        rows, labels = self.train_rows.gather(1, where), self.train_labels.gather(1, where)
        return lambda: (self._pixels(rows), labels)

    # -- state -----------------------------------------------------------------------------
    def _extra_state(self) -> dict[str, Any]:
        return {
            "sets": [
                t.clone()
                for t in (self.train_rows, self.train_labels, self.test_rows, self.test_labels)
            ],
            "order": self.order.clone(),
            "pos": self.pos,
            "ends_at": self._ends_at,
        }

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self.train_rows, self.train_labels, self.test_rows, self.test_labels = (
            t.clone() for t in state["sets"]
        )
        self.order = state["order"].clone()
        self.pos = int(state["pos"])
        self._ends_at = int(state["ends_at"])


def check_class_sizes(
    by_class: Sequence[np.ndarray], need: int, what: str, where: str = "the data set"
) -> None:
    """Refuse, when the stream is built, a class with fewer than ``need`` rows.

    Raises:
        ConfigError: names the smallest class, its size and the options to lower.
    """
    sizes = np.array([len(rows) for rows in by_class])
    small = int(sizes.argmin()) if len(sizes) else 0
    if len(sizes) and sizes[small] < need:
        raise ConfigError(
            f"class {small} has {sizes[small]} images in {where}, fewer than the {need} each "
            f"class needs; lower {what}"
        )


def first_rows(
    by_class: Sequence[np.ndarray], classes: Sequence[int], start: int, count: int, what: str
) -> np.ndarray:
    """Rows ``start … start+count-1`` (in file order) of each class in ``classes``, one class
    after the other: the fixed splits.

    Raises:
        ConfigError: a class has fewer rows (names it, and the option to lower).
    """
    out = []
    for c in classes:
        rows = by_class[c]
        if len(rows) < start + count:
            raise ConfigError(
                f"class {c} has {len(rows)} images, fewer than the {start + count} its {what} "
                f"split needs; lower {what}_per_class"
            )
        out.append(rows[start : start + count])
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)
