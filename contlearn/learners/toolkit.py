"""Methods from the wider plasticity literature (issue #18), as transforms; formulas, papers
and defaults in docs/learners.md.

- :func:`clip_weights` (Elsayed et al. 2024, "Weight clipping for deep continual and
  reinforcement learning"): after the update, every weight of layer l into
  ``[−κ b_l, κ b_l]``, ``b_l`` the bound of the layer's uniform init distribution; biases into
  ``±κ`` times the layer's bias bound, or ``1/√fan_in`` (``torch.nn.Linear``'s bias bound,
  the authors' choice) where the init sets biases to zero.
- :func:`upgd` (Elsayed & Mahmood 2024, "Addressing loss of plasticity and catastrophic
  forgetting in continual learning"), first-order utility-based perturbed gradient descent with
  the global (per replica) utility scaling: each weight's utility ``−g ⊙ θ`` is traced,
  ``ũ ← β ũ + (1 − β)(−g ⊙ θ)``; with ``ū = σ((ũ / (1 − β^t)) / max ũ)`` (the max over every
  parameter of the replica) the direction handed to the base optimizer is
  ``(g + σ_n ε)(1 − ū) + λθ``, so with plain SGD (step α)
  ``θ ← (1 − αλ)θ − α (g + σ_n ε)(1 − ū)``: the paper's update.
- :func:`add_parseval` (Chung et al. 2024, "Parseval regularization for continual reinforcement
  learning"): the gradient of ``λ Σ_l ‖W_l W_lᵀ − s I‖_F²`` over the hidden layers' weight
  matrices (rows, the units' incoming weights, pushed toward orthogonal rows of squared norm
  s), ``4λ (W Wᵀ − s I) W``, added to the gradient before the optimizer; the output layer is
  left free, as in the paper.
- :func:`project_norms` (Lyle et al. 2024, "Normalization and effective learning rates in
  reinforcement learning", normalize-and-project's projection): after the update, each weight
  matrix rescaled to the Frobenius norm it had at init, per replica,
  ``W ← W ‖W₀‖_F / ‖W‖_F``, so that behind layer norm (scale-invariant in W) the effective
  learning rate stays constant.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

from contlearn.agents.networks import init_bounds
from contlearn.learners.base import (
    AnchorState,
    GradientTransformation,
    Params,
    find_states,
    per_param_state,
    stateless,
)
from contlearn.learners.fused import FusedPlan
from contlearn.learners.resets import materialize
from contlearn.learners.rng import draw, replica_randn, replica_rng_states


def clip_bounds(network: Any, kappa: float) -> dict[str, float]:
    """``{parameter: κ · bound}`` for every weight and bias of ``network`` (module docstring)."""
    out = {}
    for layer in network.layers:
        w_bound, b_bound = init_bounds(network.init, layer)
        out[f"{layer.name}.weight"] = kappa * w_bound
        out[f"{layer.name}.bias"] = kappa * (b_bound or 1.0 / math.sqrt(layer.fan_in))
    return out


def clip_weights(network: Any, kappa: float) -> GradientTransformation:
    """Weight clipping after the update: ``u' = clamp(θ + u, −c, c) − θ`` per parameter, ``c``
    from :func:`clip_bounds` (put it after the optimizer).

    Args:
        network: has ``layers`` (each with ``name``, ``fan_in``, ``fan_out``, ``activation``)
            and ``init``.
        kappa: κ > 0, the clipping range in units of the init bound.
    """
    bounds = clip_bounds(network, kappa)

    def fn(grads: Params, params: Params, **extra: Any) -> Params:
        out = dict(grads)
        for k, u in grads.items():
            if k in bounds:
                c = bounds[k]
                out[k] = (params[k] + u).clamp_(-c, c).sub_(params[k])
        return out

    def clip_(state: Any, params: Params, **extra: Any) -> Any:
        """Fused form: the agent applied θ + u in place; clamp θ (``θ + u'`` up to rounding)."""
        for k, c in bounds.items():
            if k in params:
                params[k].clamp_(-c, c)
        return state

    return stateless(fn, FusedPlan(1.0, 0.0, clip_))


class UPGDState(NamedTuple):
    """UPGD's traced utilities (one per parameter), its update count and noise generators."""

    utility: Params
    count: torch.Tensor  # type: ignore[assignment]  # shadows tuple.count, as optax names it
    rng: torch.Tensor


def upgd(
    seeds: Sequence[int], beta: float, sigma: float, weight_decay: float, rng_stream: int = 2
) -> GradientTransformation:
    """First-order global UPGD's direction (module docstring), before the base optimizer.

    Args:
        seeds: the replicas' root seeds (each replica's noise from its own generator).
        beta: β of the utility trace, in [0, 1).
        sigma: σ_n, the noise standard deviation (≥ 0).
        weight_decay: λ (≥ 0), added as λθ to the direction.
        rng_stream: which independent learner stream the noise comes from.
    """

    def init(params: Params) -> UPGDState:
        return UPGDState(
            {k: torch.zeros_like(v) for k, v in params.items()},
            torch.zeros((), dtype=torch.int64),
            replica_rng_states(seeds, rng_stream),
        )

    def update(grads: Params, state: UPGDState, params: Params, **extra: Any):
        keys = list(grads)
        state.count.add_(1)
        for k in keys:
            state.utility[k].mul_(beta).add_(-grads[k] * params[k], alpha=1.0 - beta)
        R = params[keys[0]].shape[0]
        top = torch.stack([state.utility[k].reshape(R, -1).amax(1) for k in keys]).amax(
            0
        )  # (R,), the max over the replica's parameters
        correction = 1.0 - beta ** int(state.count)
        noise = replica_randn(state.rng, params, keys) if sigma else None
        out = {}
        for i, k in enumerate(keys):
            shape = (R,) + (1,) * (params[k].dim() - 1)
            scaled = state.utility[k] / correction
            denom = top.view(shape)
            ratio = torch.where(denom != 0, scaled / denom, torch.zeros_like(scaled))
            gate = 1.0 - torch.sigmoid(ratio)
            g = grads[k] if noise is None else grads[k] + sigma * noise[i]
            out[k] = g * gate + weight_decay * params[k]
        return out, state

    return GradientTransformation(init, update)


def add_parseval(network: Any, lam: float, scale: float) -> GradientTransformation:
    """``g_W += 4λ (W Wᵀ − s I) W`` for each hidden layer's weights (put it before the
    optimizer).

    Args:
        network: has ``hidden_layers`` (each with a ``name``).
        lam: λ ≥ 0.
        scale: s > 0, the rows' target squared norm.
    """
    names = [f"{layer.name}.weight" for layer in network.hidden_layers]

    def fn(grads: Params, params: Params, **extra: Any) -> Params:
        out = dict(grads)
        for k in names:
            if k not in grads:
                continue
            w = params[k].flatten(2)  # (R, out, in) (a conv's (R, out, in, k): its rows)
            gram = torch.bmm(w, w.transpose(1, 2))  # (R, out, out)
            gram.diagonal(dim1=1, dim2=2).sub_(scale)
            out[k] = grads[k] + (4.0 * lam) * torch.bmm(gram, w).view_as(grads[k])
        return out

    return stateless(fn)


class SWRState(NamedTuple):
    """Selective weight reinitialisation's state.

    Attributes:
        inner: the wrapped chain's state.
        utility: traced utility per parameter (zeros when the trace is off).
        count: updates so far (0-d int64).
        rng: ``(R, S)`` generator states (fractional counts, fresh values).
        replaced: ``(R,)`` int64, cumulative weights reinitialised.
    """

    inner: Any
    utility: Params
    count: torch.Tensor  # type: ignore[assignment]  # shadows tuple.count, as optax names it
    rng: torch.Tensor
    replaced: torch.Tensor


def selective_reinit(
    inner: GradientTransformation,
    network: Any,
    seeds: Sequence[int],
    *,
    utility: str = "gradient",
    method: str = "proportional",
    rate: float = 1e-4,
    every: int = 1,
    decay: float = 0.0,
    rng_stream: int = 3,
) -> GradientTransformation:
    """Wrap ``inner`` into selective weight reinitialisation (SWR; Hernandez-Garcia, Dohare et
    al. 2025, "Reinitializing weights vs units for maintaining plasticity"): weight-level
    resets (docs/learners.md).

    After the inner update, on the post-update values θ': each weight's utility is ``|g ⊙ θ'|``
    (``gradient``) or ``|θ'|`` (``magnitude``), traced ``ū ← d ū + (1 − d) u`` when ``decay``
    d > 0. Every ``every`` updates, per parameter tensor and replica, the weights to
    reinitialise are (``proportional``) the ``⌊n ρ⌋`` (plus one with probability of the
    fraction) lowest-utility ones, or (``threshold``) those with utility ≤ ρ × the tensor's mean
    utility. They get fresh values from their layer's init distribution (weights
    U(±bound), biases as the init sets them), their optimizer state cleared and anchors set to
    the new values; the trace of a tensor with a reinitialised weight restarts at zero.

    Args:
        inner: the wrapped chain.
        network: ``layers`` (``name``, ``fan_in``, ``fan_out``, ``activation``) and ``init``.
        seeds: the replicas' root seeds.
        utility: ``gradient`` or ``magnitude``.
        method: ``proportional`` or ``threshold``.
        rate: ρ.
        every: updates between reinitialisations.
        decay: d of the utility trace (0: this update's utility).
        rng_stream: which independent learner stream to draw from.
    """
    bounds = {}
    for layer in network.layers:
        w_bound, b_bound = init_bounds(network.init, layer)
        bounds[f"{layer.name}.weight"], bounds[f"{layer.name}.bias"] = w_bound, b_bound

    def init(params: Params) -> SWRState:
        bias = next(iter(params.values()))
        return SWRState(
            inner.init(params),
            {k: torch.zeros_like(v) for k, v in params.items()},
            torch.zeros((), dtype=torch.int64),
            replica_rng_states(seeds, rng_stream),
            torch.zeros(bias.shape[0], dtype=torch.int64),
        )

    def chosen(u: torch.Tensor, r: int, state: SWRState) -> torch.Tensor:
        """Flat indices of the weights of one replica's tensor to reinitialise."""
        if method == "threshold":
            return torch.nonzero(u <= rate * u.mean()).flatten()
        want = u.numel() * rate
        extra = draw(state.rng, r, lambda g: float(torch.rand((), generator=g)))
        k = int(want) + int(extra < want % 1)
        return torch.argsort(u, stable=True)[:k]

    def update(grads: Params, state: SWRState, params: Params, **extra: Any):
        updates, inner_state = inner.update(grads, state.inner, params, **extra)
        state = state._replace(inner=inner_state)
        state.count.add_(1)
        keys = [k for k in grads if k in bounds]
        post = {k: params[k] + updates[k] for k in keys}  # θ'
        now = {
            k: (grads[k] * post[k]).abs() if utility == "gradient" else post[k].abs() for k in keys
        }
        if decay > 0:
            for k in keys:
                state.utility[k].mul_(decay).add_(now[k], alpha=1.0 - decay)
        if int(state.count) % every:
            return updates, state
        scores = {k: state.utility[k] for k in keys} if decay > 0 else now
        picks: dict[str, list[torch.Tensor]] = {}
        for k in keys:
            picks[k] = [chosen(scores[k][r].flatten(), r, state) for r in range(len(seeds))]
        touched = [k for k in keys if any(len(i) for i in picks[k])]
        if not touched:
            return updates, state
        updates = materialize(params, updates, touched)
        states = per_param_state(state.inner, params)
        anchors = find_states(state.inner, AnchorState)
        for k in touched:
            b = bounds[k]
            for r, idx in enumerate(picks[k]):
                if not len(idx):
                    continue
                n = len(idx)
                fresh = draw(state.rng, r, functools.partial(_uniform, n, b))
                flat = params[k][r].view(-1)
                flat[idx] = fresh.to(flat)
                for s in states:
                    s[k][r].view(-1)[idx] = 0
                for a in anchors:
                    a.anchor[k][r].view(-1)[idx] = flat[idx]
                if decay > 0:
                    state.utility[k][r].zero_()
                state.replaced[r] += n
        return updates, state

    return GradientTransformation(init, update)


def _uniform(n: int, bound: float, generator: torch.Generator) -> torch.Tensor:
    """``n`` draws of U(−bound, bound)."""
    return (torch.rand(n, generator=generator) * 2 - 1) * bound


def swr_diagnostics(state: Any) -> dict[str, dict[str, torch.Tensor]]:
    """``{"": {"replacements": (R,)}}``: cumulative weights reinitialised by SWR."""
    found = find_states(state, SWRState)
    return {"": {"replacements": found[0].replaced.clone()}} if found else {}


class ProjectState(NamedTuple):
    """Normalize-and-project's target norms: ``{weight name: (R,)}``, ``‖W₀‖_F`` at init."""

    norms: Params


def project_norms(names: Sequence[str]) -> GradientTransformation:
    """``u' = (θ + u) ‖θ₀‖_F / ‖θ + u‖_F − θ`` for the weights ``names`` (put it after the
    optimizer); ``θ₀`` is what ``init`` sees. A matrix of norm 0 is left as it is.

    Args:
        names: the parameters to project (``<layer>.weight``, ``(R, out, in)``).
    """

    def init(params: Params) -> ProjectState:
        return ProjectState({k: _frobenius(params[k]) for k in names})

    def update(grads: Params, state: ProjectState, params: Params, **extra: Any):
        out = dict(grads)
        for k in names:
            if k not in grads:
                continue
            new = params[k] + grads[k]  # (R, out, in)
            norm = _frobenius(new)  # (R,)
            ratio = torch.where(norm > 0, state.norms[k] / norm, torch.ones_like(norm))
            out[k] = new.mul_(ratio.view(-1, *([1] * (new.dim() - 1)))).sub_(params[k])
        return out, state

    return GradientTransformation(init, update)


def _frobenius(w: torch.Tensor) -> torch.Tensor:
    """``‖w[r]‖_F`` per replica ``(R,)``."""
    return torch.linalg.vector_norm(w.flatten(1), dim=1)
