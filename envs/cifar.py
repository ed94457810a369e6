"""Permuted-input and label-shuffled CIFAR-10/100: the MNIST streams over CIFAR.

The same stream classes as ``permuted-mnist`` and ``label-shuffled-mnist``
(:mod:`contlearn.envs.mnist`), on the CIFAR images (Krizhevsky 2009) from
``contlearn data download cifar10|cifar100`` (:func:`contlearn.data.images.load_cifar`):
examples in a fresh per-replica order at each pass over the data, ``examples_per_task`` of
them per task, pixels scaled to [0, 1], inputs ``(3, 32, 32)``.

- ``permuted-cifar10``/``-cifar100``: per task, one random permutation of the 1024 pixel
  positions, the same for the three colour planes (a pixel keeps its colour).
- ``label-shuffled-cifar10``/``-cifar100``: per task, a random permutation of the 10 (100)
  labels.

Version History:
    * v0: initial version.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from contlearn.data.images import CIFAR, load_cifar
from contlearn.envs.mnist import LabelShuffledMNISTStream, PermutedMNISTStream
from contlearn.errors import ConfigError
from contlearn.spec import param

_PLANE = 32 * 32


@dataclass(frozen=True)
class CIFARStreamSpec:
    """Options shared by the permuted and label-shuffled CIFAR streams."""

    examples_per_task: int = param(10_000, "examples shown per task", low=1)
    batch_size: int = param(1, "examples per step (1 = the online protocol)", low=1)
    dataset: str = param(
        "train", "split: train (50k), test (10k) or full (60k)", choices=("train", "test", "full")
    )
    data_dir: str = param(
        "", "folder with the official archive (empty: $CONTLEARN_DATA/<cifar10|cifar100>)"
    )
    boundaries_visible: bool = param(False, "tell the agent when a task starts")

    def validate(self) -> None:
        """Check cross-option constraints."""
        if self.examples_per_task % self.batch_size:
            raise ConfigError(
                f"examples_per_task={self.examples_per_task} is not a multiple of "
                f"batch_size={self.batch_size}; make it one"
            )


def load_cifar_split(name: str, dataset: str, data_dir: str) -> tuple[np.ndarray, np.ndarray]:
    """A CIFAR split (``full``: train then test) as ``(images (N, 3, 32, 32), labels)``."""
    directory = data_dir or None
    if dataset == "full":
        train, test = load_cifar(name, "train", directory), load_cifar(name, "test", directory)
        return np.concatenate([train[0], test[0]]), np.concatenate([train[1], test[1]])
    return load_cifar(name, dataset, directory)


class _CIFARData:
    """What makes an MNIST stream class a CIFAR one (listed first among the bases)."""

    Spec: ClassVar[type] = CIFARStreamSpec
    cifar: ClassVar[str] = "cifar10"
    input_shape: ClassVar[tuple[int, ...]] = (3, 32, 32)
    pixels: ClassVar[int] = 3 * _PLANE

    def _load(self, spec: Any) -> tuple[np.ndarray, np.ndarray]:
        images, labels = load_cifar_split(self.cifar, spec.dataset, spec.data_dir)
        return images.reshape(len(images), -1), labels  # (N, 3072): R, G, B planes

    def _new_permutation(self, rng: np.random.Generator) -> np.ndarray:
        plane = rng.permutation(_PLANE)  # (1024,) pixel positions
        return (np.arange(3)[:, None] * _PLANE + plane[None, :]).reshape(-1)


class PermutedCIFAR10Stream(_CIFARData, PermutedMNISTStream):
    """CIFAR-10 with a new random permutation of the pixel positions per task and replica."""

    name = "permuted-cifar10"


class PermutedCIFAR100Stream(_CIFARData, PermutedMNISTStream):
    """CIFAR-100 with a new random permutation of the pixel positions per task and replica."""

    name = "permuted-cifar100"
    cifar = "cifar100"
    num_classes = CIFAR["cifar100"].num_classes["fine"]


class LabelShuffledCIFAR10Stream(_CIFARData, LabelShuffledMNISTStream):
    """CIFAR-10 with a new random permutation of the 10 labels per task and replica."""

    name = "label-shuffled-cifar10"


class LabelShuffledCIFAR100Stream(_CIFARData, LabelShuffledMNISTStream):
    """CIFAR-100 with a new random permutation of the 100 labels per task and replica."""

    name = "label-shuffled-cifar100"
    cifar = "cifar100"
    num_classes = CIFAR["cifar100"].num_classes["fine"]
