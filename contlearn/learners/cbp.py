"""Continual backpropagation (Dohare et al. 2024, Nature, "Loss of plasticity in deep
continual learning", Methods and Algorithm 1), as defined in DESIGN.md §4a.

Per hidden layer l, per replica, once per update, **after** the inner chain's update and on the
post-update parameters ``θ + u``, using this step's activations ``h`` (``features[l]``,
``(R, B, H)``, the forward pass the gradients came from):

1. ``a_i ← a_i + 1``.
2. ``f_i ← η f_i + (1−η) mean_b h_i``; ``f̂_i = f_i / (1 − η^{a_i})``.
3. ``y_i = mean_b |h_i| · Σ_k |W_{l+1}[k, i]|`` (``contribution``, the paper's), or
   ``y_i = mean_b |h_i − f̂_i| · Σ_k |W_{l+1}[k, i]| / mean_j |W_l[i, j]|``
   (``adaptable_contribution``, Dohare et al. 2021; the reference's MNIST setting).
4. ``u_i ← η u_i + (1−η) y_i``; units are ranked by ``û_i = u_i / (1 − η^{a_i})``.
5. Eligible ``E = {i : a_i > m}``; ``c ← c + ρ|E|``, ``k = ⌊c⌋``, ``c ← c − k`` (carry; no
   debt builds while no unit is mature), or ``k = ⌊ρ|E| + U⌋`` with ``U ~ U[0, 1)``
   (stochastic rounding).
6. The k eligible units with the lowest û are replaced (ties: lowest index).
7. Replaced units: fresh incoming weights from the layer's init, zero incoming bias, optional
   bias folding ``b_{l+1} += W_{l+1}[:, i] · f̂_i``, zero outgoing weights, ``u = f = a = 0``,
   and the inner optimizer state of their weights cleared (:func:`reset_units`).

Steps 1–4 run for every layer first (all utilities see the same post-update weights, as in the
reference code), then steps 5–7 layer by layer from the input side. The replica's generator
draws, per step: the stochastic-rounding uniforms (one per hidden layer, if used), then the
fresh rows of each layer in layer order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

from contlearn.errors import ConfigError
from contlearn.learners.base import GradientTransformation, Params
from contlearn.learners.resets import UnitStats, reset_units, unit_stats
from contlearn.learners.rng import draw, replica_rng_states

UTILITIES = ("contribution", "adaptable_contribution")
ROUNDINGS = ("carry", "stochastic")


class CBPState(NamedTuple):
    """Continual backprop's state (all per hidden layer, per replica).

    Attributes:
        inner: the wrapped chain's state.
        rng: ``(R, S)`` generator states.
        mean_act: ``{layer: (R, H)}`` running mean activation f (not bias-corrected).
        utility: ``{layer: (R, H)}`` running utility u (not bias-corrected).
        carry: ``{layer: (R,) float64}`` fractional replacements carried over.
        stats: ages, bias-corrected utilities û, eligible counts, cumulative replacements.
    """

    inner: Any
    rng: torch.Tensor
    mean_act: Params
    utility: Params
    carry: Params
    stats: UnitStats


def _check(replacement_rate: float, maturity: int, decay: float, utility: str,
           rounding: str) -> None:
    if not 0.0 <= replacement_rate <= 1.0:
        raise ConfigError(f"replacement_rate={replacement_rate} must be in [0, 1]")
    if maturity < 0:
        raise ConfigError(f"maturity={maturity} must be >= 0")
    if not 0.0 <= decay < 1.0:
        raise ConfigError(f"decay={decay} must be in [0, 1)")
    if utility not in UTILITIES:
        raise ConfigError(f"utility={utility!r} is unknown; choose one of {', '.join(UTILITIES)}")
    if rounding not in ROUNDINGS:
        raise ConfigError(f"rounding={rounding!r} is unknown; choose one of {', '.join(ROUNDINGS)}")


def continual_backprop(inner: GradientTransformation, network: Any, seeds: Sequence[int], *,
                       replacement_rate: float = 1e-4, maturity: int = 100, decay: float = 0.99,
                       utility: str = "contribution", bias_folding: bool = True,
                       rounding: str = "carry", rng_stream: int = 0) -> GradientTransformation:
    """Wrap ``inner`` (any chain: SGD, Adam, with regularisers) into continual backprop.

    See the module docstring for the exact algorithm. ``update`` needs the keyword extra
    ``features={layer: (R, B, H)}`` (this step's hidden activations).

    Args:
        inner: the wrapped chain; its state is reset for replaced units' weights.
        network: the network (``hidden_layers``, ``by_name``, ``sample_init``).
        seeds: the replicas' root seeds (replica r draws from its own generator).
        replacement_rate: ρ, units replaced per eligible unit per update (paper: 1e-4).
        maturity: m, updates a unit is protected after (re)initialisation (paper: 100).
        decay: η of the running averages (paper: 0.99).
        utility: ``contribution`` or ``adaptable_contribution``.
        bias_folding: fold a replaced unit's mean contribution into the next layer's bias.
        rounding: ``carry`` (deterministic) or ``stochastic``.
        rng_stream: which independent learner stream of each seed to draw from.

    Raises:
        ConfigError: an option is out of range or unknown.
    """
    _check(replacement_rate, maturity, decay, utility, rounding)
    cbp = _ContinualBackprop(inner, network, list(seeds), replacement_rate, maturity, decay,
                             utility, bias_folding, rounding, rng_stream)
    return GradientTransformation(cbp.init, cbp.update)


class _ContinualBackprop:
    """The transform behind :func:`continual_backprop` (options fixed at construction)."""

    def __init__(self, inner: GradientTransformation, network: Any, seeds: list[int],
                 replacement_rate: float, maturity: int, decay: float, utility: str,
                 bias_folding: bool, rounding: str, rng_stream: int) -> None:
        self.inner, self.network, self.seeds = inner, network, seeds
        self.rate, self.maturity, self.decay = replacement_rate, maturity, decay
        self.utility, self.bias_folding, self.rounding = utility, bias_folding, rounding
        self.rng_stream = rng_stream
        self.layers = [(layer.name, layer.next) for layer in network.hidden_layers]
        self.names = [n for n, _ in self.layers]

    def init(self, params: Params) -> CBPState:
        """Zero statistics, the inner chain's state and the replicas' generators."""
        zeros = lambda: {n: torch.zeros_like(params[f"{n}.bias"]) for n in self.names}  # noqa: E731
        carry = {n: torch.zeros(params[f"{n}.bias"].shape[0], dtype=torch.float64)
                 for n in self.names}
        return CBPState(self.inner.init(params), replica_rng_states(self.seeds, self.rng_stream),
                        zeros(), zeros(), carry, unit_stats(params, self.names))

    def update(self, grads: Params, state: CBPState, params: Params, *,
               features: dict[str, torch.Tensor] | None = None, **extra: Any
               ) -> tuple[Params, CBPState]:
        """The inner update, then steps 1–7 on the post-update parameters."""
        if features is None:
            raise ValueError("continual_backprop needs the hidden activations: "
                             "update(..., features={layer: (R, B, H)})")
        updates, inner_state = self.inner.update(grads, state.inner, params, features=features,
                                                 **extra)
        f_hats = [self._test(state, params, updates, n, nxt, features[n])
                  for n, nxt in self.layers]
        uniforms = self._uniforms(state.rng) if self.rounding == "stochastic" else None
        for i, (name, f_hat) in enumerate(zip(self.names, f_hats, strict=True)):
            mask = self._select(state, name, None if uniforms is None else uniforms[:, i])
            if bool(mask.any()):
                updates = reset_units(params, updates, inner_state, self.network, name, mask,
                                      state.rng, fold=f_hat if self.bias_folding else None)
                for t in (state.stats.age[name], state.mean_act[name], state.utility[name],
                          state.stats.utility[name]):
                    t.masked_fill_(mask, 0)
                state.stats.replacements[name].add_(mask.sum(1))
        return updates, state._replace(inner=inner_state)

    def _test(self, state: CBPState, params: Params, updates: Params, name: str, nxt: str,
              h: torch.Tensor) -> torch.Tensor:
        """Steps 1–4 for one layer (``h``: ``(R, B, H)``); returns f̂ ``(R, H)``."""
        decay = self.decay
        age, f, u = state.stats.age[name], state.mean_act[name], state.utility[name]
        age.add_(1)
        f.mul_(decay).add_(h.mean(1), alpha=1.0 - decay)
        correction = 1.0 - torch.pow(decay, age.to(f.dtype))  # (R, H)
        f_hat = f / correction
        w_next = params[f"{nxt}.weight"] + updates[f"{nxt}.weight"]  # (R, K, H)
        out_mag = w_next.abs().sum(1)  # (R, H)
        if self.utility == "contribution":
            y = h.abs().mean(1) * out_mag
        else:
            w_in = params[f"{name}.weight"] + updates[f"{name}.weight"]  # (R, H, D)
            in_mag = w_in.abs().mean(2).clamp_min(torch.finfo(w_in.dtype).tiny)
            y = (h - f_hat.unsqueeze(1)).abs().mean(1) * out_mag / in_mag
        u.mul_(decay).add_(y, alpha=1.0 - decay)
        torch.div(u, correction, out=state.stats.utility[name])
        return f_hat

    def _uniforms(self, rng: torch.Tensor) -> torch.Tensor:
        """One U[0, 1) per hidden layer per replica for stochastic rounding: ``(R, L)``."""
        L = len(self.names)
        return torch.stack([draw(rng, r, lambda g: torch.rand(L, generator=g, dtype=torch.float64))
                            for r in range(rng.shape[0])])

    def _count(self, state: CBPState, name: str, n_eligible: torch.Tensor,
               uniform: torch.Tensor | None) -> torch.Tensor:
        """Step 5: how many units each replica replaces, ``(R,)`` int64."""
        grown = self.rate * n_eligible.to(torch.float64)
        if uniform is None:
            carry = state.carry[name]
            carry.add_(grown)
            k = carry.floor()
            carry.sub_(k)
        else:
            k = (grown + uniform).floor()
        return torch.minimum(k.to(torch.int64), n_eligible)

    def _select(self, state: CBPState, name: str, uniform: torch.Tensor | None) -> torch.Tensor:
        """Steps 5–6 for one layer: the ``(R, H)`` mask of units to replace."""
        eligible = state.stats.age[name] > self.maturity  # (R, H)
        n_eligible = eligible.sum(1)
        state.stats.eligible[name].copy_(n_eligible)
        k = self._count(state, name, n_eligible, uniform)
        if not bool(k.any()):
            return torch.zeros_like(eligible)
        scores = state.stats.utility[name].masked_fill(~eligible, float("inf"))
        order = torch.sort(scores, dim=1, stable=True).indices  # ties: lowest index first
        ranks = torch.arange(eligible.shape[1]).unsqueeze(0) < k.unsqueeze(1)
        return torch.zeros_like(eligible).scatter_(1, order, ranks)
