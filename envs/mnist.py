"""Permuted-input and label-shuffled MNIST streams.

Both show MNIST examples one batch at a time, sampled without replacement within a pass over
the data (each replica in its own order, reshuffled at each new pass). A task lasts
``examples_per_task`` examples; at each task start every replica draws, from its own generator,

- ``permuted-mnist``: a new fixed random permutation of the 784 pixels (Goodfellow et al. 2013;
  the online protocol of Dohare et al. 2024);
- ``label-shuffled-mnist``: a new random permutation of the 10 labels.

Pixels are scaled to [0, 1]. The offline default data is the MNIST test set shipped in the
package; ``dataset=full`` uses the 70k set from ``contlearn data download mnist``.

The classes are written over the data set (``_load``, ``input_shape``, ``num_classes``,
``_new_permutation``): :mod:`contlearn.envs.cifar` gives the CIFAR-10/100 streams with them.

Speed: examples are gathered for up to a few hundred steps at once (never past the end of the
task or of the pass over the data, so no random number is drawn early); each step then hands
out a view. The stream's state (``order``, ``pos``) stays that of the steps actually taken.

Version History:
    * v0: initial version.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from contlearn.data.datasets import load_mnist
from contlearn.envs.base import StreamInfo, SupervisedStream
from contlearn.errors import ConfigError
from contlearn.spec import param

_PIXELS = 784
#: at most this many steps, and this many bytes of inputs, are gathered at once.
_AHEAD_STEPS = 256
_AHEAD_BYTES = 16 << 20


@dataclass(frozen=True)
class MNISTStreamSpec:
    """Options shared by the MNIST streams."""

    examples_per_task: int = param(10_000, "examples shown per task", low=1)
    batch_size: int = param(1, "examples per step (1 = the online protocol)", low=1)
    dataset: str = param(
        "test",
        "MNIST split: test (10k, shipped), train (60k) or full (70k)",
        choices=("test", "train", "full"),
    )
    data_dir: str = param("", "folder with the MNIST gzip files (empty: shipped / cache dir)")
    boundaries_visible: bool = param(False, "tell the agent when a task starts")

    def validate(self) -> None:
        """Check cross-option constraints."""
        if self.examples_per_task % self.batch_size:
            raise ConfigError(
                f"examples_per_task={self.examples_per_task} is not a multiple of "
                f"batch_size={self.batch_size}; make it one"
            )


class _MNISTStream(SupervisedStream):
    Spec: ClassVar[type] = MNISTStreamSpec
    #: small settings for :func:`contlearn.envs.check_stream`
    check_settings: ClassVar[dict] = {"examples_per_task": 8, "batch_size": 2}
    #: one example's shape, and its number of values D
    input_shape: ClassVar[tuple[int, ...]] = (_PIXELS,)
    pixels: ClassVar[int] = _PIXELS
    num_classes: ClassVar[int] = 10

    def __init__(self, spec: Any, seeds) -> None:
        super().__init__(seeds, spec.examples_per_task, spec.batch_size, spec.boundaries_visible)
        self.spec = spec
        images, labels = self._load(spec)
        self.images = torch.from_numpy(np.ascontiguousarray(images)).reshape(-1)  # (N*D,) u8
        self.labels = torch.from_numpy(labels)  # (N,)
        self.num_examples = len(labels)
        R = self.num_replicas
        self.order = torch.empty(R, self.num_examples, dtype=torch.int64)  # (R, N)
        self.pos = self.num_examples  # forces a shuffle on the first draw
        self.info = StreamInfo(
            self.name,
            "classification",
            self.input_shape,
            self.num_classes,
            spec.boundaries_visible,
            R,
            "accuracy",
            spec.batch_size,
        )
        self._ahead: tuple[torch.Tensor, torch.Tensor] | None = None  # (n, R, B, ...) each
        self._ahead_at = 0

    def _load(self, spec: Any) -> tuple[np.ndarray, np.ndarray]:
        """The data set: ``(images (N, D) uint8, labels (N,) int64)``."""
        return load_mnist(spec.dataset, spec.data_dir or None)

    def _new_permutation(self, rng: np.random.Generator) -> np.ndarray:
        """A task's permutation of the D input values (MNIST: of the 784 pixels)."""
        return rng.permutation(self.pixels)

    def _shaped(self, obs: torch.Tensor) -> torch.Tensor:
        """Inputs ``(..., D)`` as ``(..., *input_shape)``."""
        return obs.view(*obs.shape[:-1], *self.input_shape)

    def _indices(self, batch_size: int) -> torch.Tensor:
        """Next ``batch_size`` example indices per replica: ``(R, B)``."""
        chunks, need = [], batch_size
        while need:
            if self.pos == self.num_examples:
                for r, rng in enumerate(self.rngs):
                    self.order[r] = torch.from_numpy(rng.permutation(self.num_examples))
                self.pos = 0
            take = min(need, self.num_examples - self.pos)
            # clone: a reshuffle later in this loop rewrites ``order`` in place
            chunks.append(self.order[:, self.pos : self.pos + take].clone())
            self.pos += take
            need -= take
        return chunks[0] if len(chunks) == 1 else torch.cat(chunks, dim=1)

    def _probe_indices(self, size: int) -> torch.Tensor:
        """Distinct random example indices per replica from the probe generators: ``(R, P)``."""
        size = min(size, self.num_examples)
        return torch.from_numpy(
            np.stack(
                [rng.choice(self.num_examples, size, replace=False) for rng in self.probe_rngs]
            )
        )

    def _probe_later(self, size: int) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
        idx, task = self._probe_indices(size), self._task_tensor().clone()
        return lambda: self._examples(idx, task)

    def _task_tensor(self) -> torch.Tensor:
        """What :meth:`_examples` reads of the current task (``(R, ...)``)."""
        raise NotImplementedError

    def _draw(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._ahead is None or self._ahead_at == self._ahead[0].shape[0]:
            self._ahead, self._ahead_at = self._gather_ahead(batch_size), 0
        if self._ahead is None:
            return self._examples(self._indices(batch_size))
        i = self._ahead_at
        self._ahead_at += 1
        self.pos += batch_size
        return self._ahead[0][i], self._ahead[1][i]

    def _draw_block(self, steps: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._ahead is None or self._ahead_at == self._ahead[0].shape[0]:
            self._ahead, self._ahead_at = self._gather_ahead(batch_size), 0
        if self._ahead is None:
            obs, target = self._examples(self._indices(batch_size))
            return obs.unsqueeze(0), target.unsqueeze(0)
        i = self._ahead_at
        n = min(steps, self._ahead[0].shape[0] - i)
        self._ahead_at += n
        self.pos += n * batch_size
        return self._ahead[0][i : i + n], self._ahead[1][i : i + n]

    def _gather_ahead(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The examples of the next steps of this task and pass, ``((n, R, B, 784), (n, R, B))``
        gathered at once from ``order`` (no random draws), or None if fewer than 2 steps fit."""
        left_in_task = self.steps_per_task - self.step % self.steps_per_task
        per_step = self.num_replicas * batch_size * self.pixels * 4
        n = min(
            _AHEAD_STEPS,
            left_in_task,
            (self.num_examples - self.pos) // batch_size,
            max(1, _AHEAD_BYTES // per_step),
        )
        if n < 2:
            return None
        idx = self.order[:, self.pos : self.pos + n * batch_size]  # (R, n·B)
        return self._examples(idx.reshape(self.num_replicas, n, batch_size).transpose(0, 1))

    def _examples(
        self, idx: torch.Tensor, task: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The examples ``idx (..., R, B)`` of the current task (or of ``task``, a copy of
        :meth:`_task_tensor`)."""
        raise NotImplementedError

    def _rows(self, idx: torch.Tensor) -> torch.Tensor:
        """The unpermuted images of ``idx (...)``: ``(..., D)`` uint8 (``index_select``: ~15x
        faster than advanced indexing)."""
        D = self.pixels
        return self.images.view(-1, D).index_select(0, idx.reshape(-1)).view(*idx.shape, D)

    def _extra_state(self) -> dict[str, Any]:
        return {"order": self.order.clone(), "pos": self.pos}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self.order.copy_(state["order"])
        self.pos = int(state["pos"])
        self._ahead = None


class PermutedMNISTStream(_MNISTStream):
    """MNIST with a new random pixel permutation per task and replica."""

    name = "permuted-mnist"

    def __init__(self, spec: MNISTStreamSpec, seeds) -> None:
        super().__init__(spec, seeds)
        self.perm = torch.zeros(self.num_replicas, self.pixels, dtype=torch.int64)  # (R, D)

    def _begin_task(self, replica: int, rng: np.random.Generator) -> None:
        self.perm[replica] = torch.from_numpy(self._new_permutation(rng))

    def _task_tensor(self) -> torch.Tensor:
        return self.perm

    def _examples(
        self, idx: torch.Tensor, task: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # idx: (..., R, B); pixel j of a permuted example is pixel perm[j] of the original.
        # Whole rows first, then the 784 columns of each replica's rows: 4x faster than one
        # gather with an (..., R, B, 784) int64 index, same bytes.
        rows = self._rows(idx)  # (..., R, B, 784) u8
        cols = (self.perm if task is None else task).unsqueeze(1).expand(rows.shape)
        obs = torch.gather(rows, -1, cols).to(torch.float32).div_(255.0)
        return self._shaped(obs), self.labels[idx]

    def _extra_state(self) -> dict[str, Any]:
        return {**super()._extra_state(), "perm": self.perm.clone()}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        super()._load_extra_state(state)
        self.perm.copy_(state["perm"])


class LabelShuffledMNISTStream(_MNISTStream):
    """MNIST with a new random permutation of the 10 labels per task and replica."""

    name = "label-shuffled-mnist"

    def __init__(self, spec: MNISTStreamSpec, seeds) -> None:
        super().__init__(spec, seeds)
        self.label_map = torch.arange(self.num_classes).repeat(self.num_replicas, 1)  # (R, K)

    def _begin_task(self, replica: int, rng: np.random.Generator) -> None:
        self.label_map[replica] = torch.from_numpy(rng.permutation(self.num_classes))

    def _task_tensor(self) -> torch.Tensor:
        return self.label_map

    def _examples(
        self, idx: torch.Tensor, task: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        obs = self._shaped(self._rows(idx).to(torch.float32).div_(255.0))  # (..., R, B, ...)
        rows = torch.arange(self.num_replicas).unsqueeze(1)  # (R, 1)
        label_map = self.label_map if task is None else task
        target = label_map[rows, self.labels[idx]]  # (..., R, B): map of each replica
        return obs, target

    def _extra_state(self) -> dict[str, Any]:
        return {**super()._extra_state(), "label_map": self.label_map.clone()}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        super()._load_extra_state(state)
        self.label_map.copy_(state["label_map"])
