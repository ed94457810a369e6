"""contlearn's streams: the registry of never-ending non-stationary tasks.

Streams are registered by id with a string entry point, so importing this package is cheap
(no torch model, no mujoco) until a stream is built with :func:`make_stream`.
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
    "bit-flipping",
    "contlearn.envs.bit_flipping:BitFlippingStream",
    "slowly changing regression: one slow input bit flips every T examples",
)
streams.register(
    "slippery-ant",
    "contlearn.envs.rl_stream:SlipperyAntStream",
    "RL: MuJoCo Ant whose friction changes every 2M steps (Dohare et al. 2024)",
)


def make_stream(name: str, spec: Any, seeds: Sequence[int]) -> Any:
    """Build the registered stream ``name`` with a validated ``spec`` for replicas ``seeds``."""
    return streams.get(name)(spec, list(seeds))


__all__ = ["make_stream", "streams"]

from contlearn.envs.gym_registration import register_envs as _register_envs  # noqa: E402

_register_envs()
