"""More methods from the plasticity literature (issue #18): spectral regularisation,
self-normalised resets, plasticity injection and hare & tortoise, as transforms; formulas,
papers, defaults and how each maps onto an online stream in docs/learners.md.

- :func:`add_spectral` (Lewandowski et al. 2024, "Learning continually by spectral
  regularization"): the gradient of ``λ Σ_l (σ₁(W̃_l)^k − 1)²`` added before the optimizer,
  ``W̃_l = [W_l | b_l]`` (the bias as one more column), σ₁ its largest singular value, estimated
  by one power-iteration step per update from the persisted right singular vector.
- :func:`self_normalized_resets` (Farias & Jozefiak 2025, "Self-normalized resets for
  plasticity in continual learning"): a unit whose run of inputs without firing (h ≤ 0) is
  improbably long under a geometric law with its own firing rate, ``(1 − μ̂_i)^{a_i} ≤ η``
  (μ̂_i by Laplace's rule from its firings so far), is reset (fresh incoming weights, zero
  outgoing weights, cleared optimizer state).
- :func:`hare_tortoise` (Lee et al. 2024, "Slow and steady wins the race: maintaining
  plasticity with hare and tortoise networks"): the tortoise ``θ̄ ← ρ θ̄ + (1 − ρ) θ`` after
  every update, and every F updates the hare (the network) is set to the tortoise.
- :func:`plasticity_injection` (Nikishin et al. 2023, "Deep reinforcement learning with
  plasticity injection"), on the output layer: ``W = W_frozen + W'₁ − W'₂`` with ``W'₁`` (trained)
  and ``W'₂`` (frozen) a fresh draw, equal at the injection; kept as one offset
  ``c = W_frozen − W'₂`` so the network's own ``W`` stays the effective weight.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial
from typing import Any, NamedTuple

import torch

from contlearn.learners.base import GradientTransformation, Params, find_states, per_param_state
from contlearn.learners.resets import reset_units
from contlearn.learners.rng import draw, replica_rng_states


def _augmented(params: Params, layer: str) -> torch.Tensor:
    """``[W | b]``: ``(R, out, in + 1)`` (a conv's kernel flattened into its rows)."""
    w, b = params[f"{layer}.weight"], params[f"{layer}.bias"]
    return torch.cat([w.flatten(2), b.unsqueeze(2)], 2)


class SpectralState(NamedTuple):
    """The persisted right singular vector of each layer's ``[W | b]``, ``(R, in + 1)``."""

    v: Params


def add_spectral(
    network: Any, seeds: Sequence[int], lam: float, power: float = 2.0, rng_stream: int = 4
) -> GradientTransformation:
    """Spectral regularisation's gradient term (module docstring), before the optimizer.

    Per layer and replica, one power-iteration step on ``W̃ = [W | b]`` from the persisted
    ``v``: ``u = W̃ v / ‖W̃ v‖``, ``v ← W̃ᵀ u / ‖W̃ᵀ u‖``, ``σ = ‖W̃ᵀ u‖``; then
    ``g_W̃ += 2λk (σ^k − 1) σ^{k−1} u vᵀ``, the gradient of ``λ (σ₁^k − 1)²`` at the estimate
    (∂σ₁/∂W̃ = u vᵀ).

    Args:
        network: has ``layers`` (each with a ``name``).
        seeds: the replicas' root seeds (the initial ``v``, drawn N(0, I) and normalised).
        lam: λ ≥ 0.
        power: k > 0.
        rng_stream: which independent learner stream the initial ``v`` comes from.
    """
    names = [str(layer.name) for layer in network.layers]

    def init(params: Params) -> SpectralState:
        rng = replica_rng_states(seeds, rng_stream)
        out = {}
        for name in names:
            n = _augmented(params, name).shape[2]
            v = torch.stack([draw(rng, r, partial(_randn, n)) for r in range(len(seeds))]).to(
                params[f"{name}.weight"]
            )
            out[name] = v / v.norm(dim=1, keepdim=True)
        return SpectralState(out)

    def update(grads: Params, state: SpectralState, params: Params, **extra: Any):
        out = dict(grads)
        for name in names:
            wt = _augmented(params, name)  # (R, out, in + 1)
            u = torch.bmm(wt, state.v[name].unsqueeze(2)).squeeze(2)  # (R, out)
            u = u / u.norm(dim=1, keepdim=True).clamp_min(1e-30)
            v = torch.bmm(wt.transpose(1, 2), u.unsqueeze(2)).squeeze(2)  # (R, in + 1)
            sigma = v.norm(dim=1, keepdim=True).clamp_min(1e-30)  # (R, 1)
            state.v[name].copy_(v / sigma)
            coef = 2 * lam * power * (sigma**power - 1) * sigma ** (power - 1)  # (R, 1)
            term = coef.unsqueeze(2) * u.unsqueeze(2) * state.v[name].unsqueeze(1)
            w, b = f"{name}.weight", f"{name}.bias"
            out[w] = grads[w] + term[:, :, :-1].reshape(grads[w].shape)
            out[b] = grads[b] + term[:, :, -1]
        return out, state

    return GradientTransformation(init, update)


def _randn(n: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(n, generator=generator, dtype=torch.float64)


class SNRState(NamedTuple):
    """Self-normalised resets' state.

    Attributes:
        inner: the wrapped chain's state.
        idle: ``{layer: (R, H) int64}`` inputs since each unit last fired (a_i).
        fired: ``{layer: (R, H) int64}`` inputs on which it fired since its (re)initialisation.
        lived: ``{layer: (R, H) int64}`` inputs it saw until its last firing (since then).
        replacements: ``{layer: (R,) int64}`` cumulative units reset.
        rng: ``(R, S)`` generator states (fresh incoming weights).
    """

    inner: Any
    idle: Params
    fired: Params
    lived: Params
    replacements: Params
    rng: torch.Tensor


def snr_reset_mask(
    idle: torch.Tensor, fired: torch.Tensor, lived: torch.Tensor, eta: float
) -> torch.Tensor:
    """The units to reset, ``(R, H)`` bool: ``a ≥ 1`` and ``a · log(1 − μ̂) ≤ log η``.

    ``μ̂_i = (n_i + 1) / (s_i + 2)`` (Laplace's rule of succession), with n_i the inputs on
    which unit i fired and s_i the inputs it saw until its last firing, both since its
    (re)initialisation: its firing rate, not lowered by the silence being tested, and ½ for a
    unit that has not fired yet (so one dead from its start is reset after
    ⌈log η / log ½⌉ inputs).
    """
    rate = (fired.to(torch.float64) + 1) / (lived.to(torch.float64) + 2)
    a = idle.to(torch.float64)
    return (a > 0) & (a * torch.log1p(-rate) <= math.log(eta))


def self_normalized_resets(
    inner: GradientTransformation,
    network: Any,
    seeds: Sequence[int],
    eta: float = 0.01,
    rng_stream: int = 0,
) -> GradientTransformation:
    """Wrap ``inner`` into self-normalised resets (module docstring; docs/learners.md).

    After the inner update, per hidden layer and replica, from this step's activations
    ``h (R, B, H)``: a unit fired if ``h > 0`` on some input of the batch; then ``a_i ← 0``
    (fired) or ``a_i ← a_i + B``; the units :func:`snr_reset_mask` picks are reset
    (:func:`~contlearn.learners.resets.reset_units`: fresh incoming weights, zero incoming bias,
    zero outgoing weights, cleared optimizer state) and their counts start again.

    Args:
        inner: the wrapped chain.
        network: ``hidden_layers``, ``by_name``, ``sample_init``.
        seeds: the replicas' root seeds.
        eta: η in (0, 1), the rejection level of the test.
        rng_stream: which independent learner stream fresh weights come from.
    """
    layers = [str(layer.name) for layer in network.hidden_layers]

    def init(params: Params) -> SNRState:
        def zeros(n: int) -> Params:
            return {
                name: torch.zeros(
                    params[f"{name}.bias"].shape[:n],
                    dtype=torch.int64,
                    device=params[f"{name}.bias"].device,
                )
                for name in layers
            }

        return SNRState(
            inner.init(params),
            zeros(2),
            zeros(2),
            zeros(2),
            zeros(1),
            replica_rng_states(seeds, rng_stream),
        )

    def update(grads: Params, state: SNRState, params: Params, **extra: Any):
        updates, inner_state = inner.update(grads, state.inner, params, **extra)
        features = extra.get("features") or {}
        masks = {}
        for name in layers:
            if name not in features:
                continue
            h = features[name].detach()  # (R, B, H)
            fired_now = h > 0
            any_fired = fired_now.any(1)  # (R, H)
            batch = h.shape[1]
            idle, fired, lived = state.idle[name], state.fired[name], state.lived[name]
            fired.add_(fired_now.sum(1).to(fired))
            lived.add_(torch.where(any_fired, idle + batch, torch.zeros_like(idle)))
            idle.copy_(torch.where(any_fired, torch.zeros_like(idle), idle + batch))
            masks[name] = snr_reset_mask(idle, fired, lived, eta)
        for name, mask in masks.items():
            if not bool(mask.any()):
                continue
            updates = reset_units(
                params,
                updates,
                inner_state,
                network,
                name,
                mask,
                state.rng,
                feedback=extra.get("feedback"),
            )
            for t in (state.idle[name], state.fired[name], state.lived[name]):
                t[mask] = 0
            state.replacements[name].add_(mask.sum(1))
        return updates, state._replace(inner=inner_state)

    return GradientTransformation(init, update)


def snr_diagnostics(state: Any) -> dict[str, dict[str, torch.Tensor]]:
    """``{layer: {"replacements": (R,), "mean_idle": (R,)}}`` from every SNR state."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for s in find_states(state, SNRState):
        for name, idle in s.idle.items():
            out[name] = {
                "replacements": s.replacements[name].clone(),
                "mean_idle": idle.to(torch.float64).mean(1),
            }
    return out


class HareTortoiseState(NamedTuple):
    """The inner chain's state, the tortoise (one tensor per parameter, in the parameters'
    order; a tuple, so resets do not take it for optimizer state), the update count and the
    cumulative hare resets ``(R,)``."""

    inner: Any
    slow: tuple[torch.Tensor, ...]
    count: torch.Tensor  # type: ignore[assignment]  # shadows tuple.count, as optax names it
    resets: torch.Tensor


def hare_tortoise(
    inner: GradientTransformation, ema: float = 0.999, period: int = 2000
) -> GradientTransformation:
    """Wrap ``inner`` into hare & tortoise (module docstring).

    After the inner update, on the post-update values θ' (the hare): ``θ̄ ← ρ θ̄ + (1 − ρ) θ'``
    for every parameter; on updates F, 2F, … the hare is set to the tortoise, returned as the
    update ``u' = θ̄ − θ`` (so θ + u' = θ̄ up to the rounding of that addition). The optimizer's
    state is kept, as in the authors' code. θ̄ starts as the initial parameters.

    Args:
        inner: the wrapped chain.
        ema: ρ in [0, 1).
        period: F ≥ 1, updates between hare resets.
    """

    def init(params: Params) -> HareTortoiseState:
        bias = next(iter(params.values()))
        return HareTortoiseState(
            inner.init(params),
            tuple(v.detach().clone() for v in params.values()),
            torch.zeros((), dtype=torch.int64),
            torch.zeros(bias.shape[0], dtype=torch.int64),
        )

    def update(grads: Params, state: HareTortoiseState, params: Params, **extra: Any):
        updates, inner_state = inner.update(grads, state.inner, params, **extra)
        state.count.add_(1)
        for k, slow in zip(params, state.slow, strict=True):
            slow.mul_(ema).add_(params[k] + updates[k], alpha=1.0 - ema)
        if int(state.count) % period == 0:
            updates = {k: slow - params[k] for k, slow in zip(params, state.slow, strict=True)}
            state.resets.add_(1)
        return updates, state._replace(inner=inner_state)

    return GradientTransformation(init, update)


def hare_tortoise_diagnostics(state: Any) -> dict[str, dict[str, torch.Tensor]]:
    """``{"": {"hare_resets": (R,)}}``."""
    found = find_states(state, HareTortoiseState)
    return {"": {"hare_resets": found[0].resets.clone()}} if found else {}


class InjectionState(NamedTuple):
    """Plasticity injection's state.

    Attributes:
        inner: the wrapped chain's state (it sees the trained copy ``W'₁ = W − c``).
        offset: ``c = W_frozen − W'₂`` per output-layer parameter, in order (zeros before the
            first injection).
        count: updates so far.
        rng: ``(R, S)`` generator states (the fresh copies).
        injections: ``(R,)`` cumulative injections.
    """

    inner: Any
    offset: tuple[torch.Tensor, ...]
    count: torch.Tensor  # type: ignore[assignment]  # shadows tuple.count, as optax names it
    rng: torch.Tensor
    injections: torch.Tensor


def plasticity_injection(
    inner: GradientTransformation,
    network: Any,
    seeds: Sequence[int],
    at: int = 10_000,
    every: int = 0,
    rng_stream: int = 5,
) -> GradientTransformation:
    """Wrap ``inner`` into plasticity injection on the output layer(s) (module docstring).

    The network's output weights are the effective ``W = c + W'₁``. ``inner`` is handed
    ``W'₁ = W − c`` in their place (the loss gradient is the same for ``W`` and ``W'₁``), so
    its state and regularisers act on the trained copy. After the update numbered ``at`` (and
    every ``every`` updates after it, if > 0), per replica a fresh ``W'`` is drawn from the
    layer's init; ``c ← W − W'`` (so ``W'₁ = W'₂ = W'`` and the output is unchanged) and the
    inner optimizer state of the output layer is cleared (the new parameters' own state).

    Args:
        inner: the wrapped chain.
        network: ``layers`` (those with ``next`` None are injected), ``sample_init``.
        seeds: the replicas' root seeds.
        at: the update after which the first injection happens (≥ 1).
        every: updates between later injections (0: inject once).
        rng_stream: which independent learner stream the fresh copies come from.
    """
    heads = [str(layer.name) for layer in network.layers if layer.next is None]
    keys = [f"{h}.{p}" for h in heads for p in ("weight", "bias")]

    def init(params: Params) -> InjectionState:
        bias = next(iter(params.values()))
        return InjectionState(
            inner.init(params),
            tuple(torch.zeros_like(params[k]) for k in keys),
            torch.zeros((), dtype=torch.int64),
            replica_rng_states(seeds, rng_stream),
            torch.zeros(bias.shape[0], dtype=torch.int64),
        )

    def due(n: int) -> bool:
        return n == at or (every > 0 and n > at and (n - at) % every == 0)

    def update(grads: Params, state: InjectionState, params: Params, **extra: Any):
        view = dict(params)
        for k, c in zip(keys, state.offset, strict=True):
            view[k] = params[k] - c  # W'₁
        updates, inner_state = inner.update(grads, state.inner, view, **extra)
        state.count.add_(1)
        if due(int(state.count)):
            offsets = dict(zip(keys, state.offset, strict=True))
            for head in heads:
                w, b = f"{head}.weight", f"{head}.bias"
                rows = params[w].shape[1]
                for r in range(params[w].shape[0]):
                    fw, fb = draw(state.rng, r, partial(network.sample_init, head, rows))
                    offsets[w][r] = params[w][r] + updates[w][r] - fw.to(params[w])
                    offsets[b][r] = params[b][r] + updates[b][r] - fb.to(params[b])
            for s in per_param_state(inner_state, view):
                for k in keys:
                    s[k].zero_()
            state.injections.add_(1)
        return updates, state._replace(inner=inner_state)

    return GradientTransformation(init, update)


def injection_diagnostics(state: Any) -> dict[str, dict[str, torch.Tensor]]:
    """``{"": {"injections": (R,)}}``."""
    found = find_states(state, InjectionState)
    return {"": {"injections": found[0].injections.clone()}} if found else {}
