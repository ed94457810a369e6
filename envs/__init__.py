"""contlearn's streams: the registry of never-ending non-stationary tasks.

Streams are registered by id with a string entry point, so importing this package is cheap
(no torch model, no mujoco) until a stream is built with :func:`make_stream`. A user's own
stream is named ``module:Class`` or ``file.py:Class`` (:mod:`contlearn.envs.plugins`);
:func:`check_stream` checks any stream against its protocol.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from contlearn.registry import Registry

streams = Registry("stream")
streams.register(
    "permuted-mnist",
    "contlearn.envs.mnist:PermutedMNISTStream",
    "MNIST with a new random pixel permutation per task",
)
streams.register(
    "label-shuffled-mnist",
    "contlearn.envs.mnist:LabelShuffledMNISTStream",
    "MNIST with a new random permutation of the labels per task",
)
streams.register(
    "permuted-cifar10",
    "contlearn.envs.cifar:PermutedCIFAR10Stream",
    "CIFAR-10 with a new random permutation of the pixel positions per task",
)
streams.register(
    "permuted-cifar100",
    "contlearn.envs.cifar:PermutedCIFAR100Stream",
    "CIFAR-100 with a new random permutation of the pixel positions per task",
)
streams.register(
    "label-shuffled-cifar10",
    "contlearn.envs.cifar:LabelShuffledCIFAR10Stream",
    "CIFAR-10 with a new random permutation of the labels per task",
)
streams.register(
    "label-shuffled-cifar100",
    "contlearn.envs.cifar:LabelShuffledCIFAR100Stream",
    "CIFAR-100 with a new random permutation of the labels per task",
)
streams.register(
    "continual-imagenet",
    "contlearn.envs.class_pairs:ContinualImageNetStream",
    "binary tasks over pairs of ImageNet32 classes, E epochs each (Dohare et al. 2024)",
)
streams.register(
    "continual-mnist-pairs",
    "contlearn.envs.class_pairs:ContinualMNISTPairsStream",
    "the Continual ImageNet protocol on pairs of MNIST digits (offline)",
)
streams.register(
    "incremental-cifar100",
    "contlearn.envs.incremental:IncrementalCIFAR100Stream",
    "class-incremental CIFAR-100: 5 classes, +5 every 200 epochs (Dohare et al. 2024)",
)
streams.register(
    "bit-flipping",
    "contlearn.envs.bit_flipping:BitFlippingStream",
    "slowly changing regression: one slow input bit flips every T examples",
)
streams.register(
    "slippery-ant",
    "contlearn.envs.rl_stream:SlipperyAntStream",
    "RL: MuJoCo Ant whose friction changes every 2M steps (Dohare et al. 2024)",
)
streams.seal()  # (the built-in entries; later ones are the user's)


def make_stream(name: str | type, spec: Any, seeds: Sequence[int]) -> Any:
    """Build the stream ``name`` (a registered id, ``module:Class``, ``file.py:Class`` or a
    class) with a validated ``spec`` for replicas ``seeds``."""
    from contlearn.envs.plugins import build_stream, resolve_stream

    cls, ref = resolve_stream(name, portable=False)
    if cls.__module__.startswith("contlearn."):  # (built in: trusted, its errors its own)
        return cls(spec, list(seeds))
    return build_stream(cls, spec, list(seeds), ref)


def __getattr__(attr: str) -> Any:
    if attr in ("check_stream", "StreamCheckError"):  # (imports torch: only when asked)
        from contlearn.envs import checker

        return getattr(checker, attr)
    raise AttributeError(f"module 'contlearn.envs' has no attribute {attr!r}")


__all__ = ["StreamCheckError", "check_stream", "make_stream", "streams"]

from contlearn.envs.gym_registration import register_envs as _register_envs  # noqa: E402

_register_envs()
