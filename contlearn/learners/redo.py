"""ReDo: recycling dormant neurons (Sokar et al. 2023, "The dormant neuron phenomenon in deep
reinforcement learning", ICML), as defined in docs/design.md §4.

Every F updates (updates F, 2F, ...), per hidden layer and replica, after the inner update and
on the post-update parameters: score each unit by

    s_i = E|h_i| / ((1/H) Σ_j E|h_j|),

E over the activations of the last ``window`` updates before the check (each update's
activations averaged over its mini-batch first, so with a constant batch size every example
weighs the same). Units with ``s_i ≤ τ`` get fresh incoming weights from the layer's init,
zero incoming bias, zero outgoing weights and zeroed optimizer state (:func:`reset_units`, the
helper continual backprop uses). If every unit of a layer has ``E|h| = 0`` all are dormant
(s = 0). The score is a plain mean over a window, not an EMA: the state keeps only the running
sum ``Σ |h|`` of the current window (no activation buffer).

``score="gradient"`` is ReGraMa (Liu et al. 2025, "Measure gradients not activations!
Enhancing neuronal activity in deep reinforcement learning"): the same recycling, scored by the
gradient magnitude instead, ``s_i = E|g_i| / ((1/H) Σ_j E|g_j|)`` with ``|g_i|`` the mean
absolute loss gradient of unit i's incoming weights ``W_l[i, :]`` on an update (the gradient
the learner receives, before the optimizer), E over the window.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

from contlearn.errors import ConfigError
from contlearn.learners.adam_form import AdamPlan, adam_plan
from contlearn.learners.base import GradientTransformation, Params
from contlearn.learners.block_forms import ReDoForm
from contlearn.learners.fused import FusedPlan, fused_plan
from contlearn.learners.resets import UnitStats, reset_units, unit_stats
from contlearn.learners.rng import replica_rng_states


class ReDoState(NamedTuple):
    """ReDo's state.

    Attributes:
        inner: the wrapped chain's state.
        rng: ``(R, S)`` generator states.
        count: updates so far (0-d int64).
        act_sum: ``{layer: (R, H)}`` sum of the per-update mean |h| (ReGraMa: mean |g| of the
            incoming weights) in the current window.
        stats: ages, last scores s, units scored, cumulative replacements.
    """

    inner: Any
    rng: torch.Tensor
    count: torch.Tensor  # type: ignore[assignment]  # optax's name; shadows tuple.count
    act_sum: Params
    stats: UnitStats


def redo(
    inner: GradientTransformation,
    network: Any,
    seeds: Sequence[int],
    *,
    threshold: float = 0.01,
    period: int = 1000,
    window: int = 1000,
    rng_stream: int = 0,
    score: str = "activation",
) -> GradientTransformation:
    """Wrap ``inner`` into ReDo (see the module docstring).

    ``update`` needs the keyword extra ``features={layer: (R, B, H)}``.

    Args:
        inner: the wrapped chain (optimizer and regularisers).
        network: the network (``hidden_layers``, ``by_name``, ``sample_init``).
        seeds: the replicas' root seeds.
        threshold: τ; units with score ≤ τ are recycled.
        period: F, updates between checks.
        window: updates (the last ones before each check) whose activations are scored;
            1 ≤ window ≤ period.
        rng_stream: which independent learner stream of each seed to draw from.
        score: ``activation`` (ReDo's E|h|) or ``gradient`` (ReGraMa's incoming-weight
            gradient magnitude).

    Raises:
        ConfigError: an option is out of range.
    """
    if threshold < 0:
        raise ConfigError(f"threshold={threshold} must be >= 0")
    if period < 1 or not 1 <= window <= period:
        raise ConfigError(
            f"need period >= 1 and 1 <= window <= period; got period={period}, window={window}"
        )
    if score not in ("activation", "gradient"):
        raise ConfigError(f"score={score!r} must be activation or gradient")
    impl = _ReDo(inner, network, list(seeds), threshold, period, window, rng_stream, score)
    return GradientTransformation(impl.init, impl.update, impl.block_form())


class _ReDo:
    """The transform behind :func:`redo` (options fixed at construction)."""

    def __init__(
        self,
        inner: GradientTransformation,
        network: Any,
        seeds: list[int],
        threshold: float,
        period: int,
        window: int,
        rng_stream: int,
        score: str = "activation",
    ) -> None:
        self.inner, self.network, self.seeds = inner, network, seeds
        self.score = score
        self.threshold, self.period, self.window = threshold, period, window
        self.rng_stream = rng_stream
        self.layers = [layer.name for layer in network.hidden_layers]

    def init(self, params: Params) -> ReDoState:
        """Zero statistics, the inner chain's state and the replicas' generators."""
        return ReDoState(
            self.inner.init(params),
            replica_rng_states(self.seeds, self.rng_stream),
            torch.zeros((), dtype=torch.int64),
            {n: torch.zeros_like(params[f"{n}.bias"]) for n in self.layers},
            unit_stats(params, self.layers),
        )

    def update(
        self,
        grads: Params,
        state: ReDoState,
        params: Params,
        *,
        features: dict[str, torch.Tensor] | None = None,
        **extra: Any,
    ) -> tuple[Params, ReDoState]:
        """The inner update; accumulate |h| (or |g|) in the window; every F updates, recycle."""
        if features is None:
            raise ValueError("redo needs the hidden activations: update(..., features=...)")
        magnitude = (  # (before the inner chain, which may reuse the gradient's memory)
            {n: grads[f"{n}.weight"].abs().flatten(2).mean(2) for n in self.layers}  # (R, H)
            if self.score == "gradient"
            else None
        )
        updates, inner_state = self.inner.update(
            grads, state.inner, params, features=features, **extra
        )
        t = int(state.count.add_(1))
        in_window = (t - 1) % self.period >= self.period - self.window
        for name in self.layers:
            state.stats.age[name].add_(1)
            if in_window and magnitude is not None:
                state.act_sum[name].add_(magnitude[name])
            elif in_window:
                state.act_sum[name].add_(features[name].abs().mean(1))  # (R, H)
        if t % self.period == 0:
            updates = self._recycle(state, params, updates, inner_state, extra.get("feedback"))
        return updates, state._replace(inner=inner_state)

    def _recycle(
        self,
        state: ReDoState,
        params: Params,
        updates: Params | None,
        inner_state: Any,
        feedback: Any = None,
    ) -> Any:
        """The check: score every layer's units, reset those with s ≤ τ (``updates`` None:
        ``params`` hold the post-update values already, as on the block loop)."""
        masks = [self._score(state, name) <= self.threshold for name in self.layers]
        for name, mask in zip(self.layers, masks, strict=True):
            updates = reset_units(
                params, updates, inner_state, self.network, name, mask, state.rng,
                feedback=feedback,
            )  # fmt: skip
            state.stats.age[name].masked_fill_(mask, 0)
            state.stats.replacements[name].add_(mask.sum(1))
        return updates

    def block_form(self) -> ReDoForm | None:
        """ReDo's form for the block loop (:mod:`contlearn.learners.block_forms`) over an inner
        chain that is affine (SGD's family, no post-update edit) or Adam between affine maps
        (without a replacer); None otherwise."""
        fused = fused_plan(self.inner)
        plan: FusedPlan | AdamPlan | None = fused if fused is None or fused.post is None else None
        if fused is None:
            plan = adam_plan(self.inner)
        if plan is None or (isinstance(plan, AdamPlan) and plan.replacer is not None):
            return None

        def recycle(state: ReDoState, params: Params) -> None:
            self._recycle(state, params, None, state.inner)

        return ReDoForm(plan, self.period, self.window, self.score, recycle)

    def _score(self, state: ReDoState, name: str) -> torch.Tensor:
        """s ``(R, H)`` from the window's mean |h|; records it and clears the window's sum."""
        mean_abs = state.act_sum[name] / self.window  # (R, H)
        layer_mean = mean_abs.mean(1, keepdim=True)  # (R, 1)
        s = torch.where(layer_mean > 0, mean_abs / layer_mean, torch.zeros_like(mean_abs))
        state.stats.utility[name].copy_(s)
        state.stats.eligible[name].fill_(s.shape[1])
        state.act_sum[name].zero_()
        return s
