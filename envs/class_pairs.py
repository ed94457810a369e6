"""Continual ImageNet and its offline twin on MNIST: binary tasks over pairs of classes.

The protocol of Dohare et al. 2024 (Nature, "Continual ImageNet"; reference code
``lop/imagenet/online_batch_expr.py``, ``cfg/bp.json``): a long sequence of tasks, each a new
group of ``classes_per_task`` classes (2: binary classification) labelled 0, 1 in the order
drawn; per class a fixed train split (the class's first ``train_per_class`` images in file
order) and a fixed held-out test split (the next ``test_per_class``); each task trained for
``epochs`` epochs of mini-batches (:mod:`contlearn.envs.epoch_stream`); at its end the
held-out accuracy (``test_accuracy``) is recorded beside the online accuracy.

How the groups are drawn, per replica from its own generator (``pairing``):

- ``disjoint`` (Continual ImageNet's default, the reference's): a random permutation of the
  classes cut into consecutive groups, so no class repeats until all have been used (500
  tasks for ImageNet's 1000 classes); ``repeat=same`` then goes through the same sequence
  again (the reference concatenates its class order), ``repeat=redraw`` draws a new one.
- ``all`` (``classes_per_task=2`` only; the MNIST default): every one of the C(K, 2) pairs once,
  in random order, each with a random label order (45 tasks for the 10 digits); then
  ``repeat=redraw`` (default) draws a new order and new label orders, ``same`` repeats.

Version History:
    * v0: initial version.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations
from math import comb
from typing import Any, ClassVar

import numpy as np
import torch

from contlearn.data.datasets import load_mnist
from contlearn.data.images import indices_by_class, load_imagenet32_first
from contlearn.envs.epoch_stream import EpochStream, TaskSets, check_class_sizes, first_rows
from contlearn.errors import ConfigError
from contlearn.spec import param


@dataclass(frozen=True)
class ClassPairsSpec:
    """Options of the class-pair streams (defaults: the paper's Continual ImageNet)."""

    classes_per_task: int = param(2, "classes per task (2: binary tasks)", low=2)
    train_per_class: int = param(600, "fixed train images per class (reference: 600)", low=1)
    test_per_class: int = param(100, "fixed held-out images per class (reference: 100)", low=1)
    epochs: int = param(250, "epochs per task (reference: 250)", low=1)
    batch_size: int = param(100, "examples per mini-batch step (reference: 100)", low=1)
    pairing: str = param(
        "disjoint",
        "disjoint (no class repeats within a cycle) or all (every pair once; 2 classes only)",
        choices=("disjoint", "all"),
    )
    repeat: str = param(
        "same",
        "after a cycle: same (the same sequence again) or redraw",
        choices=("same", "redraw"),
    )
    data_dir: str = param("", "folder with the unzipped ImageNet32 batch files")
    boundaries_visible: bool = param(True, "tell the agent when a task starts")
    held_out: bool = param(True, "score the held-out split at each task's end")

    def validate(self) -> None:
        """Check cross-option constraints."""
        if self.pairing == "all" and self.classes_per_task != 2:
            raise ConfigError(
                f"pairing=all takes pairs; classes_per_task={self.classes_per_task}: set "
                "classes_per_task=2 or pairing=disjoint"
            )
        if self.batch_size > self.classes_per_task * self.train_per_class:
            raise ConfigError(
                f"batch_size={self.batch_size} is more than a task's "
                f"{self.classes_per_task * self.train_per_class} training images; lower it"
            )


@dataclass(frozen=True)
class MNISTPairsSpec(ClassPairsSpec):
    """Options of ``continual-mnist-pairs`` (the Continual ImageNet protocol on MNIST)."""

    pairing: str = param(
        "all",
        "all (every pair of digits once per cycle) or disjoint (2 classes only for all)",
        choices=("disjoint", "all"),
    )
    repeat: str = param(
        "redraw",
        "after a cycle: redraw (new order and label orders) or same",
        choices=("same", "redraw"),
    )
    dataset: str = param(
        "test",
        "MNIST split: test (10k, shipped), train (60k) or full (70k)",
        choices=("test", "train", "full"),
    )
    data_dir: str = param("", "folder with the MNIST gzip files (empty: shipped / cache dir)")


class _ClassPairsStream(EpochStream):
    """Tasks over groups of classes with fixed per-class splits (see the module)."""

    Spec: ClassVar[type] = ClassPairsSpec
    check_settings: ClassVar[dict] = {
        "train_per_class": 4,
        "test_per_class": 2,
        "epochs": 2,
        "batch_size": 4,
    }
    num_classes: ClassVar[int] = 0

    def __init__(self, spec: ClassPairsSpec, seeds: Any) -> None:
        self.spec = spec
        images, labels = self._load(spec)
        self.by_class = indices_by_class(labels, self.num_classes)
        need = spec.train_per_class + spec.test_per_class
        check_class_sizes(self.by_class, need, "train_per_class or test_per_class")
        k = spec.classes_per_task
        if k > self.num_classes:
            raise ConfigError(f"classes_per_task={k} is more than the {self.num_classes} classes")
        per_cycle = comb(self.num_classes, 2) if spec.pairing == "all" else self.num_classes // k
        super().__init__(
            seeds,
            images,
            k,
            spec.epochs,
            spec.batch_size,
            spec.boundaries_visible,
            *self._normalisation(),
            held_out=spec.held_out,
        )
        self.cycle = torch.zeros(self.num_replicas, per_cycle, k, dtype=torch.int64)  # (R, P, k)

    def _load(self, spec: ClassPairsSpec) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def _normalisation(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel mean and std after scaling to [0, 1] (default none: [0, 1])."""
        return (0.0,) * 3, (1.0,) * 3

    def _train_size(self, task: int) -> int:
        return self.spec.classes_per_task * self.spec.train_per_class

    def _new_cycle(self, rng: np.random.Generator) -> np.ndarray:
        k, K = self.spec.classes_per_task, self.num_classes
        if self.spec.pairing == "all":
            pairs = np.array(list(combinations(range(K), 2)), dtype=np.int64)  # (P, 2)
            pairs = pairs[rng.permutation(len(pairs))]
            flip = rng.random(len(pairs)) < 0.5  # (a random label order per pair)
            return np.where(flip[:, None], pairs[:, ::-1], pairs)
        return rng.permutation(K)[: (K // k) * k].reshape(-1, k)

    def _task_sets(self, replica: int, rng: np.random.Generator) -> TaskSets:
        P = self.cycle.shape[1]
        at = self.task % P
        if at == 0 and (self.task == 0 or self.spec.repeat == "redraw"):
            self.cycle[replica] = torch.from_numpy(np.ascontiguousarray(self._new_cycle(rng)))
        group = [int(c) for c in self.cycle[replica, at]]
        spec = self.spec
        n, m = spec.train_per_class, spec.test_per_class
        train = first_rows(self.by_class, group, 0, n, "train")
        test = first_rows(self.by_class, group, n, m, "test")
        labels = np.arange(len(group), dtype=np.int64)
        return train, np.repeat(labels, n), test, np.repeat(labels, m)

    def _extra_state(self) -> dict[str, Any]:
        return {**super()._extra_state(), "cycle": self.cycle.clone()}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        super()._load_extra_state(state)
        self.cycle.copy_(state["cycle"])


class ContinualImageNetStream(_ClassPairsStream):
    """Continual ImageNet: binary tasks over pairs of the 1000 ImageNet32 classes."""

    name = "continual-imagenet"
    num_classes = 1000

    def _load(self, spec: ClassPairsSpec) -> tuple[np.ndarray, np.ndarray]:
        per_class = spec.train_per_class + spec.test_per_class
        return load_imagenet32_first(per_class, spec.data_dir or None, "train")


class ContinualMNISTPairsStream(_ClassPairsStream):
    """The Continual ImageNet protocol on MNIST (default: the shipped test set, offline)."""

    Spec = MNISTPairsSpec
    name = "continual-mnist-pairs"
    num_classes = 10

    def _load(self, spec: ClassPairsSpec) -> tuple[np.ndarray, np.ndarray]:
        assert isinstance(spec, MNISTPairsSpec)
        images, labels = load_mnist(spec.dataset, spec.data_dir or None)
        return images.reshape(-1, 1, 28, 28), labels

    def _normalisation(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        return (0.0,), (1.0,)
