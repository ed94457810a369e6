"""Probes: pure functions of (network, probe batch) -> numbers, per layer and per replica.

Each probe takes a :class:`ProbeContext` and returns ``{layer: values (R,)}`` where layer ``""``
is a whole-network value. Definitions (docs/design.md §5; Dohare et al. 2024, Methods):

- ``dead_fraction``: share of units that are dead on *every* probe input: ReLU output exactly 0;
  tanh |h| > 0.99; sigmoid outside [0.01, 0.99]; leaky_relu / elu / swish: negative
  pre-activation region (h < 0).
- ``dormant_fraction``: share of units with ReDo score s_i = E|h_i| / mean_j E|h_j| ≤ τ (0.01).
- ``saturation`` (tanh, sigmoid only): share of (input, unit) activations in the saturated range.
- ``effective_rank``: exp(−Σ p_k log p_k), p_k = σ_k / Σσ (Roy & Vetterli 2007).
- ``approx_rank``: smallest k with Σ_{j≤k} σ_j² ≥ 0.99 Σ σ².
- ``stable_rank``: ‖A‖_F² / ‖A‖_2².
  (σ: singular values of the P × units feature matrix, float64 on CPU.)
- ``weight_magnitude``: mean |w| per layer (weights and biases); whole network over all params.
- ``grad_magnitude``: mean |g| per layer of the training loss's gradient, averaged over the
  training steps since the last probe (the agent sums them: ``update_stats()``).
- ``plasticity``: 1 − L_after / L_before on the sample of the step right after the probe:
  its loss before and after its own (real) update.
- ``feedback_alignment``, ``weight_alignment`` (credit rules other than backprop): the angle in
  degrees between the error a rule delivers to each hidden layer and backprop's on the probe
  batch, and between each feedback matrix and the forward weights it stands in for
  (:mod:`contlearn.credit.alignment`; the agent's ``credit_alignment``).
- ``goodness_gap`` (Forward-Forward agents): per hidden layer, the mean goodness on positive
  inputs (true label embedded) minus on negative ones (a wrong label) of the probe batch;
  layer ``""``: summed over the layers the agent predicts from (the agent's ``goodness_gap``).

Users add their own with :func:`register_probe`. Probes read the network; the engine gives them
inputs drawn with the probe generators, and ``plasticity`` only evaluates a loss after an update
the run makes anyway, so a run with probes has exactly the trajectory of a run without.

(Over 400 lines: every built-in probe next to the others, so that their definitions above
read against one shared :class:`ProbeContext` and its helpers.)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import torch

from contlearn.agents.protocol import (
    SupportsCreditAlignment,
    SupportsFeatures,
    SupportsGoodnessGap,
    SupportsNetwork,
    SupportsParameters,
    SupportsProbeLoss,
    SupportsUpdateStats,
)
from contlearn.errors import ConfigError

ProbeFn = Callable[["ProbeContext"], dict[str, torch.Tensor]]

DORMANT_TAU = 0.01
_BOUNDED = {"tanh": (-0.99, 0.99), "sigmoid": (0.01, 0.99)}


@dataclass
class ProbeContext:
    """What a probe may read.

    Attributes:
        features: hidden activations on the probe batch, ``{layer: (R, P, H)}``.
        params: the network's parameters ``{"<layer>.weight": (R, out, in), ...}``.
        activation: the hidden nonlinearity's name.
        agent: the agent (for probes that need to evaluate losses or gradients).
        obs, target: the probe batch.
        stats: the agent's statistics of the training steps since the last probe
            (``update_stats()``: ``{metric: {layer: (R,)}}``, e.g. ``grad_magnitude``).
        step_loss: for probes run after the step (:func:`register_probe` ``after_step``): the
            loss ``(R,)`` of that step's sample before and after its update.
        cache: scratch space shared by the probes of one call (e.g. singular values).
        memory: tensors probes keep across probe points (``churn``'s); the loop checkpoints it.
    """

    features: dict[str, torch.Tensor]
    params: dict[str, torch.Tensor]
    activation: str
    agent: Any = None
    obs: torch.Tensor | None = None
    target: torch.Tensor | None = None
    stats: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    step_loss: tuple[torch.Tensor, torch.Tensor] | None = None
    cache: dict[str, Any] = field(default_factory=dict)
    memory: dict[str, torch.Tensor] = field(default_factory=dict)


PROBES: dict[str, ProbeFn] = {}
#: probes that run after the probe step's update (:attr:`ProbeContext.step_loss`)
AFTER_STEP: set[str] = set()
#: probes that read nothing but ``features``, ``params``, ``activation`` and ``stats``: they
#: can run on a snapshot of the network while learning goes on (the engine does so)
SNAPSHOT_SAFE: set[str] = set()
#: probes that apply only to some agents: ``{name: applies(agent) -> bool}`` (the engine
#: leaves out the others before it decides how to run them)
APPLIES: dict[str, Callable[[Any], bool]] = {}
#: what a probe needs of an agent: ``{name: (what, has(agent) -> bool)}``; ``what`` completes
#: "it needs ..." in the error a run gives when the probe is asked for by name and the agent
#: lacks it (probes that apply only to some agents without saying what: "what it measures")
NEEDS: dict[str, tuple[str, Callable[[Any], bool]]] = {}
#: Probes run by default (``--set probes=default``).
DEFAULT_PROBES = (
    "dead_fraction",
    "dormant_fraction",
    "saturation",
    "effective_rank",
    "approx_rank",
    "stable_rank",
    "weight_magnitude",
    "grad_magnitude",
    "plasticity",
    "feedback_alignment",
    "weight_alignment",
    "goodness_gap",
)


def register_probe(
    name: str,
    fn: ProbeFn,
    after_step: bool = False,
    snapshot_safe: bool = False,
    applies: Callable[[Any], bool] | None = None,
    needs: tuple[str, Callable[[Any], bool]] | None = None,
) -> None:
    """Make ``fn`` available as probe ``name`` (selectable with ``--set probes=...``).

    Args:
        name: the probe's name (the ``metric`` of its rows).
        fn: ``fn(ctx) -> {layer: values (R,)}``.
        after_step: run it after the update of the step that follows the probe point, with
            :attr:`ProbeContext.step_loss` set (and the network as that update left it),
            instead of before it on the probe batch.
        snapshot_safe: ``fn`` reads only ``ctx.features``, ``ctx.params``, ``ctx.activation``
            and ``ctx.stats`` (of ``ctx.agent`` at most ``initial_parameters()``, which a probe
            snapshot gives too), so the engine may run it on a copy of the network while the
            agent learns on.
        applies: ``applies(agent)``: whether the probe measures anything on ``agent`` (None:
            on every agent); where it does not, the run skips it.
        needs: ``(what, has)``: what the probe needs of an agent, in words, and
            ``has(agent)``; a run skips it on agents without, unless it is named in
            ``probes``, where it is an error naming ``what``.
    """
    PROBES[name] = fn
    if applies is None:
        APPLIES.pop(name, None)
    else:
        APPLIES[name] = applies
    if needs is None:
        NEEDS.pop(name, None)
    else:
        NEEDS[name] = needs
    for flag, names in ((after_step, AFTER_STEP), (snapshot_safe, SNAPSHOT_SAFE)):
        if flag:
            names.add(name)
        else:
            names.discard(name)


def probes_for(names: Sequence[str], agent: Any) -> list[str]:
    """The probes among ``names`` that apply to ``agent`` (:func:`register_probe`)."""
    return [n for n in names if not probe_needs(n, agent)]


def probe_needs(name: str, agent: Any) -> str:
    """What probe ``name`` needs of ``agent`` and it lacks, in words ("" if nothing)."""
    if name in NEEDS and not NEEDS[name][1](agent):
        return NEEDS[name][0]
    if name in APPLIES and not APPLIES[name](agent):
        return "what it measures (it does not apply to this agent)"
    return ""


def explicit_probes(text: str) -> list[str]:
    """The probe names given one by one in a ``probes`` value (not through ``default``)."""
    names = [n.strip() for n in text.split(",")]
    return [n for n in names if n and n not in ("default", "none")]


def parse_probes(text: str) -> list[str]:
    """``"default"``, ``"none"`` or a comma-separated list of probe names (``default`` in the
    list stands for the default probes: ``default,feature_norm``).

    Raises:
        ConfigError: an unknown probe name.
    """
    text = text.strip()
    if text in ("", "none"):
        return []
    names: list[str] = []
    for n in (n.strip() for n in text.split(",")):  # "default" may open a list
        for name in DEFAULT_PROBES if n == "default" else (n,) if n else ():
            if name not in names:
                names.append(name)
    unknown = [n for n in names if n not in PROBES]
    if unknown:
        raise ConfigError(
            f"unknown probe {unknown[0]!r}; choose from {', '.join(PROBES)}, default or none"
        )
    return names


def _with_aggregate(
    per_layer: dict[str, torch.Tensor], weights: dict[str, float]
) -> dict[str, torch.Tensor]:
    if not per_layer:
        return {}
    total = sum(weights.values())
    agg = cast(torch.Tensor, sum(per_layer[k] * (weights[k] / total) for k in per_layer))
    return {**per_layer, "": agg}


def with_layer_mean(per_layer: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``per_layer`` plus ``""``: the plain mean of its layers' values (empty stays empty)."""
    if not per_layer:
        return {}
    return {**per_layer, "": torch.stack(list(per_layer.values())).mean(0)}


def dead_fraction(ctx: ProbeContext) -> dict[str, torch.Tensor]:
    """Share of units dead (or saturated) on every probe input, per layer and overall."""
    out = {}
    for layer, h in ctx.features.items():  # (R, P, H)
        if ctx.activation in _BOUNDED:
            lo, hi = _BOUNDED[ctx.activation]
            dead = ((h < lo) | (h > hi)).all(1)
        elif ctx.activation == "relu":
            dead = h.amax(1) == 0  # (all zero: ReLU is never negative; ~8x faster than all())
        else:
            dead = h.amax(1) < 0
        out[layer] = dead.to(torch.float64).mean(1)
    return _with_aggregate(out, {k: v.shape[-1] for k, v in ctx.features.items()})


def dormant_fraction(ctx: ProbeContext, tau: float = DORMANT_TAU) -> dict[str, torch.Tensor]:
    """Share of units with ReDo score E|h_i| / mean_j E|h_j| ≤ τ (Sokar et al. 2023)."""
    out = {}
    for layer, h in ctx.features.items():
        act = h.abs().to(torch.float64).mean(1)  # (R, H)
        score = act / act.mean(1, keepdim=True).clamp_min(1e-12)
        out[layer] = (score <= tau).to(torch.float64).mean(1)
    return _with_aggregate(out, {k: v.shape[-1] for k, v in ctx.features.items()})


def saturation(ctx: ProbeContext) -> dict[str, torch.Tensor]:
    """Share of activations in the saturated range (tanh, sigmoid; nothing for others)."""
    if ctx.activation not in _BOUNDED:
        return {}
    lo, hi = _BOUNDED[ctx.activation]
    out = {
        layer: ((h < lo) | (h > hi)).to(torch.float64).mean((1, 2))
        for layer, h in ctx.features.items()
    }
    return _with_aggregate(out, {k: v.shape[-1] for k, v in ctx.features.items()})


def singular_values(a: torch.Tensor) -> torch.Tensor:
    """Singular values of ``(R, P, H)`` in float64 on the CPU, descending: ``(R, min(P, H))``.

    When ``H ≤ P``, from the eigenvalues of the ``H × H`` Gram matrix AᵀA (about half the time of
    an SVD; :func:`gram_singular_values`) for every replica where that is exact up to rounding;
    the SVD for the others. The SVD falls back to NumPy's LAPACK driver, then to eigenvalues of
    AᵀA, if it fails to converge. A replica whose features are not finite (it diverged) gets
    NaN values, and so does one where every solver fails: the other replicas are unaffected.
    """
    a64 = a.detach().to("cpu", torch.float64)
    finite = torch.isfinite(a64).flatten(1).all(1)  # (R,)
    if not bool(finite.all()):  # a diverged replica: NaN values, the others as usual
        s = a64.new_full((a64.shape[0], min(a64.shape[1:])), float("nan"))
        if bool(finite.any()):
            s[finite] = singular_values(a64[finite])
        return s
    if 0 < a64.shape[2] <= a64.shape[1]:
        s, exact = gram_singular_values(a64)
        if bool(exact.all()):
            return s
        if bool(exact.any()):
            s[~exact] = _svdvals(a64[~exact])
            return s
    return _svdvals(a64)


def _svdvals(a64: torch.Tensor) -> torch.Tensor:
    try:
        return torch.linalg.svdvals(a64)
    except RuntimeError:
        pass
    try:
        return torch.from_numpy(np.linalg.svd(a64.numpy(), compute_uv=False))
    except np.linalg.LinAlgError:
        pass
    gram = a64.transpose(1, 2) @ a64
    try:
        eig = torch.linalg.eigvalsh(gram).clamp_min(0).sqrt().flip(-1)
    except RuntimeError:  # (not even the eigensolver converges: no value rather than a crash)
        return a64.new_full((a64.shape[0], min(a64.shape[1:])), float("nan"))
    return eig[:, : min(a64.shape[1:])]


#: the largest relative error of the effective rank :func:`gram_singular_values` may leave.
GRAM_MAX_ERROR = 1e-8


def gram_singular_values(a64: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Singular values of float64 ``(R, P, H)`` as √λ of AᵀA, and where they are exact.

    The eigenvalues λ of the computed AᵀA are off by at most δ = (P + H) ε λ_max (rounding of
    the products and of the eigensolver), so λ ≤ δ is taken as σ = 0 and the others give √λ.
    A replica's values are *exact* (equal to the SVD's up to rounding) when every λ ≤ δ belongs
    to an all-zero column of A (a dead unit: σ = 0 exactly; other tiny σ cannot be told from
    rounding) and errors of δ in the kept λ move the effective rank by at most
    :data:`GRAM_MAX_ERROR` (bounded by Σ_k |log p_k + entropy| Δσ_k / Σσ). Stable and approx
    rank depend on σ² and are off by ~Hδ / Σσ² at most.

    Returns:
        ``(σ (R, H) descending, exact (R,) bool)``; ``exact`` is all False if AᵀA is not finite
        or the eigensolver fails.
    """
    R, P, H = a64.shape
    gram = a64.transpose(1, 2) @ a64  # (R, H, H)
    none = torch.zeros(R, dtype=torch.bool)
    if not bool(torch.isfinite(gram).all()):
        return gram.new_zeros(R, H), none
    try:
        lam = torch.linalg.eigvalsh(gram).flip(-1)  # (R, H) descending
    except RuntimeError:
        return gram.new_zeros(R, H), none
    delta = (P + H) * torch.finfo(torch.float64).eps * lam[:, :1].clamp_min(0)  # (R, 1)
    kept = lam > delta
    s = torch.where(kept, lam, 0.0).sqrt()
    dead = (gram.diagonal(dim1=1, dim2=2) == 0).sum(-1)  # exactly-zero columns
    total = s.sum(-1, keepdim=True).clamp_min(1e-300)
    logp = torch.log((s / total).clamp_min(1e-300))
    entropy = -(s / total * logp).sum(-1, keepdim=True)
    spread = (lam.clamp_min(0) + delta).sqrt() - (lam - delta).clamp_min(0).sqrt()  # Δσ_k
    bound = torch.where(kept, (logp + entropy).abs() * spread, 0.0).sum(-1) / total[:, 0]
    return s, ((~kept).sum(-1) == dead) & (bound <= GRAM_MAX_ERROR)


def _svals(ctx: ProbeContext) -> dict[str, torch.Tensor]:
    """Every layer's singular values, computed once per context; layers of one shape in one
    batched call (fewer, larger LAPACK and BLAS calls)."""
    if "svals" not in ctx.cache:
        shapes: dict[tuple[int, ...], list[str]] = {}
        for k, h in ctx.features.items():
            shapes.setdefault(tuple(h.shape), []).append(k)
        out = {}
        for (R, *_), names in shapes.items():
            s = singular_values(torch.cat([ctx.features[k] for k in names]))
            out.update({k: s[i * R : (i + 1) * R] for i, k in enumerate(names)})
        ctx.cache["svals"] = {k: out[k] for k in ctx.features}
    return ctx.cache["svals"]


def effective_rank_of(s: torch.Tensor) -> torch.Tensor:
    """exp(entropy of σ / Σσ) per row of singular values ``(R, K)``; 0 for a zero matrix."""
    total = s.sum(-1, keepdim=True)
    p = s / total.clamp_min(1e-300)
    ent = -(p * torch.log(p.clamp_min(1e-300))).sum(-1)
    return torch.where(total.squeeze(-1) > 0, torch.exp(ent), torch.zeros_like(ent))


def approx_rank_of(s: torch.Tensor, threshold: float = 0.99) -> torch.Tensor:
    """Smallest k whose top-k squared singular values hold ``threshold`` of the total."""
    sq = s.pow(2)
    cum = sq.cumsum(-1)
    need = threshold * sq.sum(-1, keepdim=True)
    return ((cum < need * (1 - 1e-12)).sum(-1) + 1).to(torch.float64) * (sq.sum(-1) > 0)


def stable_rank_of(s: torch.Tensor) -> torch.Tensor:
    """‖A‖_F² / ‖A‖_2² from singular values; 0 for a zero matrix."""
    top = s[..., 0].pow(2)
    return torch.where(top > 0, s.pow(2).sum(-1) / top.clamp_min(1e-300), torch.zeros_like(top))


def _nan_where_unknown(s: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``values`` (R,), NaN for the replicas whose singular values ``s`` (R, K) are unknown."""
    return torch.where(s.isnan().any(-1), torch.nan, values)


def effective_rank(ctx: ProbeContext) -> dict[str, torch.Tensor]:
    """Effective rank of each hidden layer's features."""
    return {k: _nan_where_unknown(s, effective_rank_of(s)) for k, s in _svals(ctx).items()}


def approx_rank(ctx: ProbeContext) -> dict[str, torch.Tensor]:
    """99%-energy rank of each hidden layer's features."""
    return {k: _nan_where_unknown(s, approx_rank_of(s)) for k, s in _svals(ctx).items()}


def stable_rank(ctx: ProbeContext) -> dict[str, torch.Tensor]:
    """Stable rank of each hidden layer's features."""
    return {k: _nan_where_unknown(s, stable_rank_of(s)) for k, s in _svals(ctx).items()}


def _layer_means(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Mean |x| per layer (weight and bias together) and over everything, per replica."""
    if not tensors:
        return {}
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, float] = {}
    for name, t in tensors.items():
        layer = name.rsplit(".", 1)[0]
        flat = t.detach().abs().reshape(t.shape[0], -1).to(torch.float64)
        sums[layer] = sums.get(layer, 0) + flat.sum(1)
        counts[layer] = counts.get(layer, 0) + flat.shape[1]
    out = {k: sums[k] / counts[k] for k in sums}
    total = cast(torch.Tensor, sum(sums.values()))  # sums is not empty: a tensor, not 0
    out[""] = total / sum(counts.values())
    return out


def weight_magnitude(ctx: ProbeContext) -> dict[str, torch.Tensor]:
    """Mean absolute parameter value per layer and overall."""
    return _layer_means(ctx.params)


def grad_magnitude(ctx: ProbeContext) -> dict[str, torch.Tensor]:
    """Mean |∂L/∂θ| of the training steps since the last probe, per layer and overall (from
    the agent's ``update_stats()``; nothing for agents that do not report it)."""
    return ctx.stats.get("grad_magnitude", {})


def plasticity(ctx: ProbeContext) -> dict[str, torch.Tensor]:
    """1 − L_after / L_before of the probe step's sample around its update (an after-step
    probe)."""
    if ctx.step_loss is None:
        return {}
    before, after = (t.to(torch.float64) for t in ctx.step_loss)
    return {"": 1.0 - after / before.clamp_min(1e-12)}


def _credit_alignment(ctx: ProbeContext) -> dict[str, dict[str, torch.Tensor]]:
    """The agent's ``credit_alignment`` on the probe batch, once per call (both probes)."""
    if "credit_alignment" not in ctx.cache:
        agent, found = ctx.agent, {}
        if _has_feedback(agent) and ctx.obs is not None:
            found = agent.credit_alignment(ctx.obs, ctx.target)
        ctx.cache["credit_alignment"] = found
    return ctx.cache["credit_alignment"]


def feedback_alignment(ctx: ProbeContext) -> dict[str, torch.Tensor]:
    """Angle (degrees) between the rule's error at each hidden layer and backprop's."""
    return _credit_alignment(ctx).get("feedback_alignment", {})


def weight_alignment(ctx: ProbeContext) -> dict[str, torch.Tensor]:
    """Angle (degrees) between each feedback matrix and the forward weights it replaces."""
    return _credit_alignment(ctx).get("weight_alignment", {})


def _has_features(agent: Any) -> bool:
    return isinstance(agent, SupportsFeatures)


def _has_parameters(agent: Any) -> bool:
    return isinstance(agent, SupportsParameters | SupportsNetwork)


def _has_stats(agent: Any) -> bool:
    return isinstance(agent, SupportsUpdateStats)


def _has_loss(agent: Any) -> bool:
    return isinstance(agent, SupportsProbeLoss)


#: what the built-in probes need (:func:`register_probe` ``needs``)
FEATURES = ("features(obs) returning {layer: (B, H) activations}", _has_features)
PARAMETERS = (
    "parameters() returning {name: tensor} (or to be, or have as net, a torch.nn.Module)",
    _has_parameters,
)
STATS = ("update_stats() returning {'grad_magnitude': {layer: value}}", _has_stats)
LOSS = ("probe_loss(obs, target) returning the loss without learning", _has_loss)

for _name, _fn, _needs in [
    ("dead_fraction", dead_fraction, FEATURES),
    ("dormant_fraction", dormant_fraction, FEATURES),
    ("saturation", saturation, FEATURES),
    ("effective_rank", effective_rank, FEATURES),
    ("approx_rank", approx_rank, FEATURES),
    ("stable_rank", stable_rank, FEATURES),
    ("weight_magnitude", weight_magnitude, PARAMETERS),
    ("grad_magnitude", grad_magnitude, STATS),
]:
    register_probe(_name, _fn, snapshot_safe=True, needs=_needs)
register_probe("plasticity", plasticity, after_step=True, needs=LOSS)


def _has_feedback(agent: Any) -> bool:
    return isinstance(agent, SupportsCreditAlignment) and agent.has_feedback()


FEEDBACK = (
    "a credit rule other than bp (credit=fa, dfa, ...) and credit_alignment()",
    _has_feedback,
)
register_probe("feedback_alignment", feedback_alignment, needs=FEEDBACK)
register_probe("weight_alignment", weight_alignment, needs=FEEDBACK)


def _has_goodness(agent: Any) -> bool:
    return isinstance(agent, SupportsGoodnessGap)


def goodness_gap(ctx: ProbeContext) -> dict[str, torch.Tensor]:
    """Mean positive minus mean negative goodness per layer on the probe batch (agents with
    ``goodness_gap(obs, target)``, i.e. Forward-Forward)."""
    if not isinstance(ctx.agent, SupportsGoodnessGap) or ctx.obs is None or ctx.target is None:
        return {}
    return ctx.agent.goodness_gap(ctx.obs, ctx.target)


register_probe(
    "goodness_gap",
    goodness_gap,
    needs=("goodness_gap(obs, target) (Forward-Forward agents, e.g. agent=ff)", _has_goodness),
)


def run_probes(
    names: Sequence[str],
    agent: Any,
    obs: torch.Tensor,
    target: torch.Tensor,
    stats: dict[str, dict[str, torch.Tensor]] | None = None,
    memory: dict[str, torch.Tensor] | None = None,
) -> dict[str, dict[str, torch.Tensor]]:
    """Run the probes that look at the network before the probe step (all but the
    :data:`AFTER_STEP` ones) on an agent and a probe batch.

    Args:
        names: probe names (see :data:`PROBES`); after-step ones are skipped.
        agent: needs ``features(obs)``; ``net.params``/``net.activation`` for weight probes.
        obs, target: the probe batch ``(R, P, ...)``.
        stats: the agent's ``update_stats()`` since the last probe (for ``grad_magnitude``).
        memory: :attr:`ProbeContext.memory` (edited in place; None: a fresh one).

    Returns:
        ``{metric: {layer: values (R,)}}``; probes the agent cannot support are left out.
    """
    names = [n for n in names if n not in AFTER_STEP]
    if not names:
        return {}
    params, activation = network_of(agent)
    ctx = ProbeContext(
        features=agent.features(obs) if isinstance(agent, SupportsFeatures) else {},
        params=params,
        activation=activation,
        agent=agent,
        obs=obs,
        target=target,
        stats=stats or {},
        memory=memory if memory is not None else {},
    )
    return _collect(names, ctx)


def network_of(agent: Any) -> tuple[dict[str, torch.Tensor], str]:
    """The parameters ``{name: tensor}`` and hidden activation the weight probes read of an
    agent (or of a probe snapshot): its ``parameters()`` and ``activation``
    (:class:`SupportsParameters`; a ``torch.nn.Module``'s generator of that name does not
    count), else its ``net``'s (:class:`SupportsNetwork`), else none."""
    if isinstance(agent, SupportsParameters):
        params = agent.parameters()
        if isinstance(params, Mapping):
            return dict(params), str(agent.activation)
    if not isinstance(agent, SupportsNetwork):
        return {}, ""
    net = agent.net
    return getattr(net, "params", {}), getattr(net, "activation", "")


def run_step_probes(
    names: Sequence[str], agent: Any, before: torch.Tensor, after: torch.Tensor
) -> dict[str, dict[str, torch.Tensor]]:
    """Run the :data:`AFTER_STEP` probes among ``names``, given the probe step's loss
    ``(R,)`` before and after its update."""
    names = [n for n in names if n in AFTER_STEP]
    params, activation = network_of(agent)
    ctx = ProbeContext(
        features={}, params=params, activation=activation, agent=agent, step_loss=(before, after)
    )
    return _collect(names, ctx)


def _collect(names: Sequence[str], ctx: ProbeContext) -> dict[str, dict[str, torch.Tensor]]:
    out = {}
    for name in names:
        values = PROBES[name](ctx)
        if values:
            out[name] = values
    return out
