"""Class-incremental CIFAR-100 (Dohare et al. 2024, Nature; reference code
``lop/incremental_cifar/incremental_cifar_experiment.py``).

Per replica, a random order of the 100 classes is drawn from its own generator when the
stream is built. Task t (an *increment*) trains on the first ``min(C₀ + t·C, 100)`` classes of
that order for ``epochs`` epochs of mini-batches (:mod:`contlearn.envs.epoch_stream`); a class
is labelled by its position in the order, so the classes seen so far are labels 0 … n−1 and
the agent answers over all 100 outputs. Per class the train split is the class's CIFAR-100
training images after the first ``validation_per_class`` (reserved, as the reference's
validation set; not shown), at most ``train_per_class`` of them, in file order; the held-out
split is the class's first ``test_per_class`` CIFAR-100 test images. Every score — the online
accuracy of each mini-batch and the held-out ``test_accuracy`` at each increment's end — takes
the arg-max over the classes seen so far only, as the reference's evaluation does.

Increments get longer as classes are added; ``steps_until`` says how long
(:class:`~contlearn.envs.protocol.ScheduledTaskStream`). With the defaults, 20 increments
reach all 100 classes: the paper's 4000 epochs.

Version History:
    * v0: initial version.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from contlearn.data.images import indices_by_class
from contlearn.envs.cifar import load_cifar_split
from contlearn.envs.epoch_stream import EpochStream, TaskSets, check_class_sizes, first_rows
from contlearn.errors import ConfigError
from contlearn.spec import param

#: CIFAR-100's per-channel mean and std of pixels in [0, 1], as the reference normalises
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
_CLASSES = 100


@dataclass(frozen=True)
class IncrementalSpec:
    """Options of ``incremental-cifar100`` (defaults: the paper's protocol)."""

    initial_classes: int = param(5, "classes in the first increment (reference: 5)", low=1)
    classes_per_increment: int = param(5, "classes added per increment (reference: 5)", low=1)
    epochs: int = param(200, "epochs per increment (reference: 200)", low=1)
    batch_size: int = param(90, "examples per mini-batch step (reference: 90)", low=1)
    train_per_class: int = param(450, "train images per class (reference: 450)", low=1)
    validation_per_class: int = param(
        50, "train-set images per class held back unseen (reference's validation: 50)", low=0
    )
    test_per_class: int = param(100, "held-out test images per class (reference: 100)", low=1)
    augment: bool = param(True, "random crop (pad 4, reflect) and flip of training images")
    normalize: bool = param(True, "per-channel CIFAR-100 mean/std (else pixels in [0, 1])")
    data_dir: str = param("", "folder with cifar-100-python.tar.gz (empty: $CONTLEARN_DATA)")
    boundaries_visible: bool = param(True, "tell the agent when an increment starts")
    held_out: bool = param(True, "score the held-out split at each increment's end")

    def validate(self) -> None:
        """Check cross-option constraints."""
        if self.initial_classes > _CLASSES:
            raise ConfigError(f"initial_classes={self.initial_classes} is more than 100")
        if self.batch_size > self.initial_classes * self.train_per_class:
            raise ConfigError(
                f"batch_size={self.batch_size} is more than the first increment's "
                f"{self.initial_classes * self.train_per_class} training images; lower it"
            )


class IncrementalCIFAR100Stream(EpochStream):
    """Class-incremental CIFAR-100: C₀ classes, then C more every ``epochs`` epochs."""

    Spec: ClassVar[type] = IncrementalSpec
    name = "incremental-cifar100"
    check_settings: ClassVar[dict] = {
        "initial_classes": 2,
        "classes_per_increment": 1,
        "train_per_class": 3,
        "validation_per_class": 1,
        "test_per_class": 2,
        "epochs": 2,
        "batch_size": 2,
    }

    def __init__(self, spec: IncrementalSpec, seeds: Any) -> None:
        self.spec = spec
        train, test = (load_cifar_split("cifar100", s, spec.data_dir) for s in ("train", "test"))
        self.by_class = indices_by_class(train[1], _CLASSES)
        self.test_by_class = [rows + len(train[1]) for rows in indices_by_class(test[1], _CLASSES)]
        need = spec.validation_per_class + spec.train_per_class
        check_class_sizes(
            self.by_class, need, "train_per_class or validation_per_class", "the train split"
        )
        check_class_sizes(
            self.test_by_class, spec.test_per_class, "test_per_class", "the test split"
        )
        mean, std = (CIFAR100_MEAN, CIFAR100_STD) if spec.normalize else ((0.0,) * 3, (1.0,) * 3)
        super().__init__(
            seeds,
            np.concatenate([train[0], test[0]]),
            _CLASSES,
            spec.epochs,
            spec.batch_size,
            spec.boundaries_visible,
            mean,
            std,
            augment=spec.augment,
            held_out=spec.held_out,
        )
        #: each replica's class order (R, 100), a function of its seed alone
        orders = [rng.permutation(_CLASSES) for rng in self.rngs]
        self.class_order = torch.from_numpy(np.stack(orders))
        self.seen = 0  # classes of the current increment

    def classes_at(self, task: int) -> int:
        """The number of classes of increment ``task``."""
        return min(self.spec.initial_classes + task * self.spec.classes_per_increment, _CLASSES)

    def _train_size(self, task: int) -> int:
        return self.classes_at(task) * self.spec.train_per_class

    def steps_until(self, tasks: int) -> int:
        """The steps of the first ``tasks`` increments together."""
        full = next((t for t in range(tasks) if self.classes_at(t) == _CLASSES), tasks)
        return sum(self._task_length(t) for t in range(full)) + (tasks - full) * (
            self._task_length(full) if full < tasks else 0
        )

    def _task_sets(self, replica: int, rng: np.random.Generator) -> TaskSets:
        spec = self.spec
        self.seen = self.classes_at(self.task)
        classes = [int(c) for c in self.class_order[replica, : self.seen]]
        n, m = spec.train_per_class, spec.test_per_class
        train = first_rows(self.by_class, classes, spec.validation_per_class, n, "train")
        test = first_rows(self.test_by_class, classes, 0, m, "test")
        labels = np.arange(self.seen, dtype=np.int64)
        return train, np.repeat(labels, n), test, np.repeat(labels, m)

    def score(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """1.0 where the arg-max over the classes seen so far is the label: ``(R, B)`` (or
        ``(T, R, B)``)."""
        return (pred[..., : self.seen].argmax(-1) == target).to(torch.float32)

    def _extra_state(self) -> dict[str, Any]:
        return {**super()._extra_state(), "class_order": self.class_order.clone()}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        super()._load_extra_state(state)
        self.class_order.copy_(state["class_order"])
        self.seen = self.classes_at(self.task) if self.task >= 0 else 0
