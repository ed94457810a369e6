"""Plasticity injection of a multi-layer head (Nikishin et al. 2023, "Deep reinforcement
learning with plasticity injection"), on a network that carries the head's two copies
(:class:`~contlearn.agents.injected_head.InjectedHeadMLP`; docs/learners.md).

Until the injection the copies θ′₁, θ′₂ are frozen at 0 (the network is the plain MLP) and
every other parameter learns. After the update numbered ``at``, per replica one fresh head is
drawn from the layers' init (layer by layer, first to last, weights before biases, from the
replica's own generator) into both copies, so the output is unchanged; the trained copy's
optimizer state is cleared (its own state, as a new parameter's). From then on the original
head θ and the frozen copy θ′₂ get neither gradient nor update, and the trunk and θ′₁ learn.
The injection happens once: a second would need a third head (the paper injects once).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import torch

from contlearn.errors import ConfigError
from contlearn.learners.base import GradientTransformation, Params, per_param_state
from contlearn.learners.rng import draw, replica_rng_states
from contlearn.learners.toolkit_resets import InjectionState


def head_injection(
    inner: GradientTransformation,
    network: Any,
    seeds: Sequence[int],
    at: int,
    rng_stream: int = 5,
) -> GradientTransformation:
    """Wrap ``inner`` into the injection of ``network``'s multi-layer head (module docstring).

    Args:
        inner: the wrapped chain (it sees every parameter; the frozen ones' gradients are 0
            and their updates are discarded).
        network: an injected-head network (``head``, ``copy_keys``, ``sample_init``).
        seeds: the replicas' root seeds.
        at: the update after which the head is injected (≥ 1).
        rng_stream: which independent learner stream the fresh head comes from.
    """
    from contlearn.agents.injected_head import FROZEN, TRAINED

    if not getattr(network, "injected_head", False):
        raise ConfigError(
            "plasticity-injection with head_layers > 1 needs the network that carries the "
            "head's copies (the online agent's MLP builds it); use head_layers=1 here"
        )
    own, trained, frozen = (network.copy_keys(p) for p in ("", TRAINED, FROZEN))

    def init(params: Params) -> InjectionState:
        first = next(iter(params.values()))
        return InjectionState(
            inner.init(params),
            (),
            torch.zeros((), dtype=torch.int64),
            replica_rng_states(seeds, rng_stream),
            torch.zeros(first.shape[0], dtype=torch.int64),
        )

    def update(grads: Params, state: InjectionState, params: Params, **extra: Any):
        still = [*own, *frozen] if int(state.injections.max()) else [*trained, *frozen]
        grads = {**grads, **{k: torch.zeros_like(grads[k]) for k in still}}
        updates, inner_state = inner.update(grads, state.inner, params, **extra)
        updates = {**updates, **{k: torch.zeros_like(params[k]) for k in still}}
        state.count.add_(1)
        if int(state.count) == at:
            for r in range(state.injections.shape[0]):
                for name in network.head:
                    rows = params[f"{name}.weight"].shape[1]
                    fw, fb = draw(state.rng, r, partial(network.sample_init, name, rows))
                    for prefix in (TRAINED, FROZEN):
                        for part, fresh in (("weight", fw), ("bias", fb)):
                            k = f"{prefix}{name}.{part}"
                            updates[k][r] = fresh.to(params[k]) - params[k][r]
            for s in per_param_state(inner_state, params):
                for k in trained:
                    s[k].zero_()
            state.injections.add_(1)
        return updates, state._replace(inner=inner_state)

    return GradientTransformation(init, update)
