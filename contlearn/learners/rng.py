"""Per-replica random streams for learners, kept *in* the learner state.

A transform that draws random numbers (fresh weights of reset units, UPGD's noise, stochastic
rounding) draws replica r's numbers from replica r's own generator only, so that
replica r of a batch behaves exactly as its seed run alone (docs/design.md §2). The generators'
states live in the transform's state as a ``(R, S)`` uint8 tensor, so checkpoints restore them
and a resumed run draws the same numbers as an uninterrupted one.

Stream 0 of seed s is :func:`contlearn.seeding.torch_generator` ``(s, "learner")``; stream
k > 0 is the k-th independent child of the same seed sequence. Transforms composed into one
learner should draw from different streams (``rng_stream`` arguments), so that, say, UPGD's
noise is not correlated with the weights CBP draws. Shrink-and-perturb's noise is counter-based
instead (:mod:`contlearn.learners.philox`): its state is a key per replica, taken from the same
streams (default 1), and an update count.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import numpy as np
import torch

from contlearn.seeding import child_seed, torch_generator

T = TypeVar("T")


def _generator(seed: int, stream: int) -> torch.Generator:
    if stream == 0:
        return torch_generator(seed, "learner")
    state = child_seed(seed, "learner").spawn(stream + 1)[stream].generate_state(1, np.uint64)[0]
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int(state) & 0x7FFF_FFFF_FFFF_FFFF)
    return gen


def replica_rng_states(seeds: Sequence[int], stream: int = 0) -> torch.Tensor:
    """The initial generator states of every replica: ``(R, S)`` uint8.

    Args:
        seeds: the replicas' root seeds.
        stream: which independent stream of each seed's ``learner`` randomness (0, 1, ...).
    """
    if stream < 0:
        raise ValueError(f"rng stream must be >= 0, got {stream}")
    return torch.stack([_generator(int(s), stream).get_state() for s in seeds])


def draw(states: torch.Tensor, replica: int, fn: Callable[[torch.Generator], T]) -> T:
    """Run ``fn(generator)`` with replica ``replica``'s generator and save its new state.

    Args:
        states: the ``(R, S)`` states from :func:`replica_rng_states` (updated in place).
        replica: the replica index r.
        fn: draws with the generator it is given, e.g. ``lambda g: torch.randn(n, generator=g)``.
    """
    gen = torch.Generator(device="cpu")
    gen.set_state(states[replica].clone())  # a row view (non-zero offset) crashes set_state
    out = fn(gen)
    states[replica].copy_(gen.get_state())
    return out


def replica_randn(states: torch.Tensor, like: dict[str, torch.Tensor], keys: list[str]):
    """Fresh N(0, 1) noise shaped like ``like[k]`` for every key, replica by replica: one
    ``randn`` of all of replica r's tensors (in ``keys`` order) from its generator, drawn on
    the CPU (so every device sees the same numbers) and moved to the tensors' device (UPGD's
    noise; shrink-and-perturb's is counter-based: :mod:`contlearn.learners.philox`).

    Args:
        states: the ``(R, S)`` generator states (updated in place).
        like: tensors ``(R, ...)`` by name.
        keys: the names to draw for, in draw order.

    Returns:
        One tensor per key, of ``like[k]``'s shape, dtype and device.
    """
    sizes = [like[k][0].numel() for k in keys]
    R = states.shape[0]
    flat = torch.empty(R, sum(sizes))  # (R, total), float32 as randn's default
    for r in range(R):

        def fill(g: torch.Generator, row: torch.Tensor = flat[r]) -> torch.Tensor:
            return torch.randn(row.shape, generator=g, out=row)

        draw(states, r, fill)
    first = like[keys[0]]
    flat = flat.to(device=first.device, dtype=first.dtype)
    return [
        c.reshape(like[k].shape) for c, k in zip(torch.split(flat, sizes, dim=1), keys, strict=True)
    ]
