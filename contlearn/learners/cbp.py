"""Continual backpropagation (Dohare et al. 2024, Nature, "Loss of plasticity in deep
continual learning", Methods and Algorithm 1), as defined in docs/design.md §4a.

Per hidden layer l, per replica, once per update, **after** the inner chain's update and on the
post-update parameters ``θ + u``, using this step's activations ``h`` (``features[l]``,
``(R, B, H)``, the forward pass the gradients came from):

1. ``a_i ← a_i + 1``.
2. ``f_i ← η f_i + (1−η) mean_b h_i``; ``f̂_i = f_i / (1 − η^{a_i})``.
3. ``y_i = mean_b |h_i| · Σ_k |W_{l+1}[k, i]|`` (``contribution``, the paper's), or
   ``y_i = mean_b |h_i − f̂_i| · Σ_k |W_{l+1}[k, i]| / mean_j |W_l[i, j]|``
   (``adaptable_contribution``, Dohare et al. 2021; the reference's MNIST setting), or
   ``y_i = mean_b h_i²`` (``goodness``: unit i's term of its layer's Forward-Forward goodness
   G = Σ_i h_i², for local learning; reads no next layer).
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

Speed: steps 1–5 run for all layers at once (``torch._foreach_*``); resets touch only the
replaced rows and columns; a fusable inner chain (:mod:`contlearn.learners.fused`) makes the
transform fusable too (steps 1–7 on weights updated in place, with their ``col_l1``).

(Over 400 lines: one algorithm, its torch form and its kernel form side by side, so that the
two can be read against each other.)
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple, cast

import torch

from contlearn.backends import block_kernel, kernels
from contlearn.errors import ConfigError
from contlearn.learners.base import GradientTransformation, Params
from contlearn.learners.cbp_adam import adam_form
from contlearn.learners.fused import FusedPlan, UnitReplacer, fused_plan
from contlearn.learners.resets import FeedbackReset, UnitStats, reset_units, unit_stats
from contlearn.learners.rng import draw, replica_rng_states
from contlearn.state import tree_leaves

UTILITIES = ("contribution", "adaptable_contribution", "goodness")
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


def _check(
    replacement_rate: float, maturity: int, decay: float, utility: str, rounding: str
) -> None:
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


def continual_backprop(
    inner: GradientTransformation,
    network: Any,
    seeds: Sequence[int],
    *,
    replacement_rate: float = 1e-4,
    maturity: int = 100,
    decay: float = 0.99,
    utility: str = "contribution",
    bias_folding: bool = True,
    rounding: str = "carry",
    rng_stream: int = 0,
) -> GradientTransformation:
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
        utility: ``contribution``, ``adaptable_contribution`` or ``goodness``.
        bias_folding: fold a replaced unit's mean contribution into the next layer's bias.
        rounding: ``carry`` (deterministic) or ``stochastic``.
        rng_stream: which independent learner stream of each seed to draw from.

    Raises:
        ConfigError: an option is out of range or unknown.
    """
    _check(replacement_rate, maturity, decay, utility, rounding)
    cbp = _ContinualBackprop(
        inner,
        network,
        list(seeds),
        replacement_rate,
        maturity,
        decay,
        utility,
        bias_folding,
        rounding,
        rng_stream,
    )
    return GradientTransformation(cbp.init, cbp.update, cbp.fused() or adam_form(cbp))


def _need_features(features: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    if features is None:
        raise ValueError("continual_backprop needs update(..., features={layer: (R, B, H)})")
    return features


def _batch_mean(h: torch.Tensor) -> torch.Tensor:
    """The mean over the batch dim of ``(..., B, H)``; a view when B = 1 (the mean of one
    value is itself)."""
    return h.select(-2, 0) if h.shape[-2] == 1 else h.mean(-2)


class _ContinualBackprop:
    """The transform behind :func:`continual_backprop` (options fixed at construction)."""

    def __init__(
        self,
        inner: GradientTransformation,
        network: Any,
        seeds: list[int],
        replacement_rate: float,
        maturity: int,
        decay: float,
        utility: str,
        bias_folding: bool,
        rounding: str,
        rng_stream: int,
    ) -> None:
        self.inner, self.network, self.seeds = inner, network, seeds
        self.rate, self.maturity, self.decay = replacement_rate, maturity, decay
        self.utility, self.bias_folding, self.rounding = utility, bias_folding, rounding
        self.rng_stream = rng_stream
        self.layers = [(layer.name, layer.next) for layer in network.hidden_layers]
        self.names = [n for n, _ in self.layers]
        self.nonnegative = getattr(network, "activation", None) == "relu"
        self._tables: dict[tuple, torch.Tensor] = {}
        self.adam_inner = False  # the block kernel runs the inner Adam (cbp_adam.adam_form)

    def init(self, params: Params) -> CBPState:
        """Zero statistics, the inner chain's state and the replicas' generators. When every
        hidden layer has the same width, each per-layer dict holds views into one stacked
        tensor, so that steps 1–5 are a few ops for all layers together."""
        bias = params[f"{self.names[0]}.bias"]  # (R, H)
        stacked = len({params[f"{n}.bias"].shape for n in self.names}) == 1

        def per_layer(shape: Sequence[int], dtype: torch.dtype) -> Params:
            if stacked:
                buf = torch.zeros(len(self.names), *shape, dtype=dtype, device=bias.device)
                return {n: buf[i] for i, n in enumerate(self.names)}
            return {
                n: torch.zeros(
                    params[f"{n}.bias"].shape[: len(shape)], dtype=dtype, device=bias.device
                )
                for n in self.names
            }

        return CBPState(
            self.inner.init(params),
            replica_rng_states(self.seeds, self.rng_stream),
            per_layer(bias.shape, bias.dtype),
            per_layer(bias.shape, bias.dtype),
            per_layer(bias.shape[:1], torch.float64),
            unit_stats(params, self.names, stacked),
        )

    def update(
        self,
        grads: Params,
        state: CBPState,
        params: Params,
        *,
        features: dict[str, torch.Tensor] | None = None,
        **extra: Any,
    ) -> tuple[Params, CBPState]:
        """The inner update, then steps 1–7 on the post-update parameters."""
        features = _need_features(features)
        updates, inner_state = self.inner.update(
            grads, state.inner, params, features=features, **extra
        )
        # given updates, _steps returns them (edited), never None
        state, feedback = state._replace(inner=inner_state), extra.get("feedback")
        steps = self._steps(state, params, updates, features, None, feedback)
        return cast("tuple[Params, CBPState]", steps)

    def fused(self) -> FusedPlan | None:
        """The fused form: the inner chain's, with steps 1–7 as the post (None if the inner
        chain has no fused form)."""
        inner = fused_plan(self.inner)
        if inner is None:
            return None
        inner_post = inner.post

        def post(
            state: CBPState,
            params: Params,
            *,
            features: dict | None = None,
            col_l1: dict | None = None,
            **extra: Any,
        ) -> CBPState:
            features = _need_features(features)
            if inner_post is not None:  # e.g. noise: the magnitudes computed before are stale
                state = state._replace(
                    inner=inner_post(state.inner, params, features=features, col_l1=col_l1, **extra)
                )
                col_l1 = None
            return self._steps(state, params, None, features, col_l1, extra.get("feedback"))[1]

        if inner_post is not None:
            return FusedPlan(inner.grad_scale, inner.param_scale, post)
        col = tuple(f"{nxt}.weight" for _, nxt in self.layers if nxt is not None)
        replacer = None
        # the whole-step kernel takes the paper's utility with carry rounding, with corrections
        # from a table (η for which 1 − η^a reaches 1 in float32)
        if (
            self.utility == "contribution"
            and self.rounding == "carry"
            and len(self._correction_table(torch.float32, torch.device("cpu")))
        ):
            replacer = UnitReplacer(self._kernel_state, self._replace_counts)
        return FusedPlan(inner.grad_scale, inner.param_scale, post, col, replacer)

    def _kernel_state(self, state: CBPState) -> block_kernel.CBPKernelState | None:
        """The per-layer tensors of ``state`` for the whole-step kernel, or None if they are
        not CPU float32 (int64 ages, float64 carries) and contiguous, or the inner chain keeps
        state the kernel's resets would not clear (Adam's: :mod:`~contlearn.learners.cbp_adam`)."""
        f = state.mean_act[self.names[0]]
        inner = tree_leaves(state.inner) and not self.adam_inner
        if f.device.type != "cpu" or f.dtype != torch.float32 or inner:
            return None
        table = self._correction_table(f.dtype, f.device)
        s = state.stats
        lists = (
            [s.age[m] for m in self.names],
            [state.mean_act[m] for m in self.names],
            [state.utility[m] for m in self.names],
            [s.utility[m] for m in self.names],
            [state.carry[m] for m in self.names],
            [s.eligible[m] for m in self.names],
        )
        dtypes = (
            torch.int64,
            torch.float32,
            torch.float32,
            torch.float32,
            torch.float64,
            torch.int64,
        )
        if not len(table) or not all(
            t.is_contiguous() and t.dtype == dt
            for ts, dt in zip(lists, dtypes, strict=True)
            for t in ts
        ):
            return None
        return block_kernel.CBPKernelState(
            *lists, self.decay, self.maturity, self.rate, table, self.nonnegative
        )

    def _replace_counts(
        self, state: CBPState, params: Params, counts: list[torch.Tensor], skip: torch.Tensor
    ) -> None:
        """Steps 6–7 on ``params`` as the whole-step kernel left them, for ``counts`` (one
        ``(R,)`` per layer): the fresh rows drawn here, the rest in one compiled call, which
        marks replaced input-layer units in ``skip`` (see ``block_kernel.Pending1``)."""
        kernel_state = self._kernel_state(state)
        assert kernel_state is not None
        layers = self.network.layers
        fresh = []
        for name, k in zip(self.names, counts, strict=True):
            rows = [
                draw(state.rng, r, functools.partial(self.network.sample_init, name, n))[0]
                for r, n in enumerate(k.tolist())
                if n
            ]
            fresh.append(torch.cat(rows) if rows else torch.empty(0))
        block_kernel.cbp_replace_(
            [params[f"{layer.name}.weight"] for layer in layers],
            [params[f"{layer.name}.bias"] for layer in layers],
            torch.stack(counts, 1),
            fresh,
            kernel_state,
            [state.stats.replacements[n] for n in self.names],
            self.bias_folding,
            skip,
        )

    def _steps(
        self,
        state: CBPState,
        params: Params,
        updates: Params | None,
        features: dict[str, torch.Tensor],
        col_l1: dict | None,
        feedback: FeedbackReset | None = None,
    ) -> tuple[Params | None, CBPState]:
        """Steps 1–7 on ``params + updates`` (``updates=None``: params are already updated);
        ``feedback``: learned feedback reset with the units (:func:`reset_units`)."""
        if self._compiled(state, features):
            counts = self._compiled_steps(state, params, updates, features, col_l1 or {})
        else:
            self._test(state, params, updates, features, col_l1 or {})
            uniforms = self._uniforms(state.rng) if self.rounding == "stochastic" else None
            counts = self._counts(state, uniforms)
        if counts is None:
            return updates, state
        return self._replace(state, params, updates, counts, feedback), state

    def _replace(
        self,
        state: CBPState,
        params: Params,
        updates: Params | None,
        counts: list[torch.Tensor],
        feedback: FeedbackReset | None = None,
    ) -> Params | None:
        """Steps 6–7, layer by layer from the input side: replace ``counts[l]`` (``(R,)``)
        units of hidden layer l; returns the (edited) updates."""
        for name, k in zip(self.names, counts, strict=True):
            mask = self._select(state, name, k)
            if mask is None:
                continue
            correction = self._correction(state.stats.age[name], state.mean_act[name].dtype)
            fold = state.mean_act[name] / correction if self.bias_folding else None  # f̂
            updates = reset_units(
                params,
                updates,
                state.inner,
                self.network,
                name,
                mask,
                state.rng,
                fold=fold,
                feedback=feedback,
            )
            for t in (
                state.stats.age[name],
                state.mean_act[name],
                state.utility[name],
                state.stats.utility[name],
            ):
                t.masked_fill_(mask, 0)
            state.stats.replacements[name].add_(mask.sum(1))
        return updates

    def _compiled(self, state: CBPState, features: dict[str, torch.Tensor]) -> bool:
        """Whether steps 1–5 can run in the compiled kernel (default utility, carry rounding,
        CPU float32 contiguous state)."""
        if self.utility != "contribution" or self.rounding != "carry" or kernels.library() is None:
            return False
        n = self.names[0]
        f, h = state.mean_act[n], features[n]
        return (
            f.device.type == "cpu"
            and f.dtype == torch.float32
            and h.dtype == f.dtype
            and len(self._correction_table(f.dtype, f.device)) > 0
            and all(
                state.mean_act[m].is_contiguous()
                and state.utility[m].is_contiguous()
                and state.stats.utility[m].is_contiguous()
                and state.stats.age[m].is_contiguous()
                for m in self.names
            )
        )

    def _compiled_steps(
        self,
        state: CBPState,
        params: Params,
        updates: Params | None,
        features: dict[str, torch.Tensor],
        col_l1: dict,
    ) -> list[torch.Tensor] | None:
        """Steps 1–5 with :func:`contlearn.backends.kernels.cbp_stats_`, one call per layer
        (the same formulas as :meth:`_test` and :meth:`_counts`)."""
        counts, total = [], 0
        for name, nxt in self.layers:
            table = self._correction_table(state.mean_act[name].dtype, state.mean_act[name].device)
            out = self._out_mag(params, updates, f"{nxt}.weight", col_l1)
            k, n = kernels.cbp_stats_(
                state.stats.age[name],
                state.mean_act[name],
                state.utility[name],
                state.stats.utility[name],
                features[name],
                out,
                state.carry[name],
                state.stats.eligible[name],
                self.decay,
                self.maturity,
                self.rate,
                table,
                self.nonnegative,
            )
            counts.append(k)
            total += n
        return counts if total else None

    def _out_mag(
        self, params: Params, updates: Params | None, key: str, col_l1: dict
    ) -> torch.Tensor:
        """``Σ_k |W[k, i]|`` of the post-update weight ``key`` ``(R, K, H)``: ``(R, H)`` (a
        weight ``(R, K, H, S)``, e.g. a conv kernel's positions, also sums over S)."""
        if key in col_l1:
            return col_l1[key]
        w = params[key] if updates is None else torch.add(params[key], updates[key])
        return w.abs().sum(1) if w.dim() == 3 else w.abs().sum((1, 3))

    def _correction(self, age: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``1 − η^a`` for integer ages, read from a table of its values for a = 0, 1, ... up to
        the first age where it is exactly 1 in ``dtype`` (it stays 1 after); the same numbers
        as computing it per unit, without a ``pow`` per unit and step."""
        table = self._correction_table(dtype, age.device)
        if not len(table):
            return torch.rsub(torch.pow(self.decay, age.to(dtype)), 1.0)
        return torch.take(table, age.clamp(max=len(table) - 1))

    def _correction_table(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """``1 − η^a`` for a = 0, 1, ... up to where it is 1 for good (empty if it never is
        within 2¹⁶ steps)."""
        table = self._tables.get((dtype, device))
        if table is None:
            n = torch.arange(1 << 16, dtype=dtype, device=device)
            table = torch.rsub(torch.pow(self.decay, n), 1.0)
            ones = (table == 1.0).nonzero()
            if len(ones) and bool((table[int(ones[0]) :] == 1.0).all()):
                table = table[: int(ones[0]) + 1].clone()
            else:
                table = torch.empty(0, dtype=dtype, device=device)  # no plateau: use pow
            self._tables[(dtype, device)] = table
        return table

    def _group(self, d: Params) -> list[torch.Tensor]:
        """``d``'s tensors for foreach ops: ``[stacked (L, ...)]`` if there are several layers
        and they are consecutive views of one tensor (see :meth:`init`), else one per layer."""
        ts = [d[n] for n in self.names]
        base = ts[0]._base
        if (
            len(ts) > 1
            and base is not None
            and base.shape[0] == len(ts)
            and all(
                t._base is base and t.storage_offset() == i * base.stride(0)
                for i, t in enumerate(ts)
            )
        ):
            return [base]
        return ts

    def _like(self, group: list[torch.Tensor], ts: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per-layer tensors ``ts`` grouped as ``group`` is (stacked or not)."""
        return [torch.stack(ts)] if len(group) < len(ts) else ts

    def _split(self, group: list[torch.Tensor]) -> list[torch.Tensor]:
        """The inverse of :meth:`_like`: one tensor per layer."""
        return list(group[0].unbind(0)) if len(group) < len(self.names) else group

    def _test(
        self,
        state: CBPState,
        params: Params,
        updates: Params | None,
        features: dict[str, torch.Tensor],
        col_l1: dict,
    ) -> list[torch.Tensor]:
        """Steps 1–4 for every layer; returns the bias corrections ``1 − η^a`` ``(R, H)``."""
        decay, names = self.decay, self.names
        ages, f = self._group(state.stats.age), self._group(state.mean_act)
        u, u_hat = self._group(state.utility), self._group(state.stats.utility)
        h = self._like(ages, [features[n] for n in names])  # (R, B, H) each, or stacked
        torch._foreach_add_(ages, 1)
        torch._foreach_lerp_(f, [_batch_mean(x) for x in h], 1.0 - decay)
        correction = [self._correction(a, f[0].dtype) for a in ages]  # 1 − η^a
        y: tuple[torch.Tensor, ...] | list[torch.Tensor]
        nexts = [] if self.utility == "goodness" else [n for _, n in self.layers]  # goodness: none
        out_mag = [self._out_mag(params, updates, f"{n}.weight", col_l1) for n in nexts]
        if self.utility == "goodness":
            y = [_batch_mean(x * x) for x in h]
        elif self.utility == "contribution":
            act = h if self.nonnegative else [x.abs() for x in h]  # relu: |h| = h
            y = torch._foreach_mul([_batch_mean(x) for x in act], self._like(ages, out_mag))
        else:
            f_hat = self._split(list(torch._foreach_div(f, correction)))
            y = self._like(
                ages,
                [
                    self._adaptable(params, updates, n, features[n], fh, om)
                    for n, fh, om in zip(names, f_hat, out_mag, strict=True)
                ],
            )
        torch._foreach_lerp_(u, y, 1.0 - decay)
        for uh, uu, c in zip(u_hat, u, correction, strict=True):
            torch.div(uu, c, out=uh)
        return self._split(correction)

    def _adaptable(
        self,
        params: Params,
        updates: Params | None,
        name: str,
        h: torch.Tensor,
        f_hat: torch.Tensor,
        out_mag: torch.Tensor,
    ) -> torch.Tensor:
        """``mean_b |h − f̂| · Σ_k |W_{l+1}[k, i]| / mean_j |W_l[i, j]|``: ``(R, H)``."""
        key = f"{name}.weight"
        w_in = params[key] if updates is None else params[key] + updates[key]  # (R, H, D[, S])
        in_mag = w_in.abs().flatten(2).mean(2).clamp_min(torch.finfo(w_in.dtype).tiny)
        return (h - f_hat.unsqueeze(1)).abs().mean(1) * out_mag / in_mag

    def _uniforms(self, rng: torch.Tensor) -> torch.Tensor:
        """One U[0, 1) per hidden layer per replica for stochastic rounding: ``(R, L)``."""
        L = len(self.names)
        return torch.stack(
            [
                draw(rng, r, lambda g: torch.rand(L, generator=g, dtype=torch.float64))
                for r in range(rng.shape[0])
            ]
        )

    def _counts(self, state: CBPState, uniforms: torch.Tensor | None) -> list[torch.Tensor] | None:
        """Step 5 for every layer: ``(R,)`` int64 units to replace per layer, or None if no
        layer of any replica replaces anything this step. (``k ≤ |E|`` always: the carry is
        below 1 before it grows by ``ρ|E| ≤ |E|``.)"""
        ages, eligible = self._group(state.stats.age), self._group(state.stats.eligible)
        for a, e in zip(ages, eligible, strict=True):
            torch.sum(a > self.maturity, -1, out=e)  # (R,) each, or (L, R)
        grown = [e.to(torch.float64).mul_(self.rate) for e in eligible]
        if uniforms is None:
            carry = self._group(state.carry)
            torch._foreach_add_(carry, grown)
            k = torch._foreach_floor(carry)
            torch._foreach_sub_(carry, k)
        else:
            uni = uniforms.to(grown[0].device).T.contiguous()  # (L, R)
            k = torch._foreach_floor(torch._foreach_add(grown, self._like(ages, list(uni))))
        if not any(bool(t.any()) for t in k):
            return None
        return self._split([t.to(torch.int64) for t in k])

    def _select(self, state: CBPState, name: str, k: torch.Tensor) -> torch.Tensor | None:
        """Step 6 for one layer: the ``(R, H)`` mask of the k lowest-û eligible units (ties:
        lowest index), or None if ``k`` is 0 everywhere."""
        most = int(k.max())
        if most == 0:
            return None
        age = state.stats.age[name]  # (R, H)
        scores = state.stats.utility[name].masked_fill(age <= self.maturity, float("inf"))
        mask = torch.zeros(age.shape, dtype=torch.bool, device=age.device)
        if most == 1:  # the usual case: argmin returns the first (lowest-index) minimum
            return mask.scatter_(1, scores.argmin(1, keepdim=True), (k > 0).unsqueeze(1))
        order = torch.sort(scores, dim=1, stable=True).indices  # ties: lowest index first
        ranks = torch.arange(age.shape[1], device=k.device).unsqueeze(0) < k.unsqueeze(1)
        return mask.scatter_(1, order, ranks)
