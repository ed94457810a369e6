"""One root seed per replica, spawned into independent streams of randomness.

Every replica r has a root seed s_r. ``numpy.random.SeedSequence(s_r)`` is spawned into named
children (stream, agent, probe, ...) so that a replica's stream, initialisation and resets depend
only on its own seed: running seed 7 inside a batch of replicas gives the same numbers as
running seed 7 alone.
"""

from __future__ import annotations

import numpy as np
import torch

#: The children spawned from each replica's root seed, in a fixed order (child k depends on k
#: only, so purposes are appended, never reordered).
PURPOSES = (
    "stream",
    "agent",
    "probe",
    "learner",
    "credit",
    "credit-noise",
    "credit-policy",
    "credit-value",
    "ff-negatives",
    "ff-probe",
)


def child_seed(seed: int, purpose: str) -> np.random.SeedSequence:
    """The seed sequence for one purpose of one replica.

    Args:
        seed: the replica's root seed (a non-negative integer).
        purpose: one of :data:`PURPOSES`.

    Returns:
        A ``SeedSequence`` that depends only on ``seed`` and ``purpose``.
    """
    if purpose not in PURPOSES:
        raise ValueError(f"unknown seed purpose {purpose!r}; expected one of {PURPOSES}")
    return np.random.SeedSequence(seed).spawn(len(PURPOSES))[PURPOSES.index(purpose)]


def numpy_rng(seed: int, purpose: str) -> np.random.Generator:
    """A numpy Generator for one purpose of one replica."""
    return np.random.Generator(np.random.PCG64(child_seed(seed, purpose)))


def torch_generator(seed: int, purpose: str) -> torch.Generator:
    """A CPU torch Generator for one purpose of one replica."""
    state = child_seed(seed, purpose).generate_state(1, dtype=np.uint64)[0]
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int(state) & 0x7FFF_FFFF_FFFF_FFFF)
    return gen


def purpose_seed(seed: int, purpose: str) -> int:
    """An integer root seed for one part of one replica that is itself seeded like a replica
    (PPO's policy and value nets each get a credit rule built for ``purpose_seed(s,
    "credit-policy")`` and ``purpose_seed(s, "credit-value")``): it depends only on ``seed``
    and ``purpose``, and differs between purposes.

    Args:
        seed: the replica's root seed.
        purpose: one of :data:`PURPOSES`.
    """
    return int(child_seed(seed, purpose).generate_state(1, dtype=np.uint64)[0])
