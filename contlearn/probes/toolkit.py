"""Probes the wider plasticity literature compares with (issue #18): feature and parameter
norms, linearised and duplicate units. Each reads only the probe batch's features and the
parameters, so it runs on a snapshot of the network like the built-in probes, and is selected
with ``--set probes=...`` (not in ``probes=default``).

- ``feature_norm``: per hidden layer, the mean over probe inputs of ‖h‖₂, the Euclidean norm of
  the layer's activation vector (Lyle et al. 2024 track it as a sign of growing features);
  layer ``""``: the mean over layers.
- ``param_norm``: per layer, ‖θ_l‖₂ over its weights and bias together; ``""``: ‖θ‖₂ of the
  whole network.
- ``distance_from_init``: per layer ‖θ_l − θ₀_l‖₂, θ₀ the parameters the run started from (the
  agent's ``initial_parameters()``, redrawn from the seeds; resets do not move θ₀); ``""``:
  ‖θ − θ₀‖₂ of the whole network.
- ``hessian_trace`` (costly: one gradient and :data:`HESSIAN_SAMPLES` Hessian-vector products
  on the probe batch, about 2·S + 1 backward passes per probe point; not snapshot-safe): the
  Hutchinson estimate ``(1/S) Σ_s vᵀ ∇²L v`` of the trace of the probe batch's loss Hessian, v
  Rademacher, per replica (layer ``""`` only); agents with ``hessian_trace``.
- ``linearised_fraction`` (ReLU-like activations: relu, leaky_relu, elu, whose positive side
  is the identity): share of a layer's units whose pre-activation is positive (h > 0) on at
  least 90% of probe inputs, units that act as linear maps on the data (Lyle et al. 2024).
- ``duplicate_fraction``: share of a layer's unit pairs (i < j) whose activations over the probe
  batch have |Pearson correlation| ≥ 0.95; a pair with a constant unit (a dead one) has no
  correlation and does not count; the denominator is every pair, H(H − 1)/2.
"""

from __future__ import annotations

import torch

from contlearn.agents.protocol import SupportsHessianTrace, SupportsInitialParameters
from contlearn.probes.measures import (
    FEATURES,
    PARAMETERS,
    ProbeContext,
    register_probe,
    with_layer_mean,
)

#: Rademacher vectors per ``hessian_trace`` estimate
HESSIAN_SAMPLES = 10
#: the share of probe inputs on which a unit must be active to count as linearised
LINEARISED_SHARE = 0.9
#: |correlation| at or above which two units count as duplicates
DUPLICATE_CORR = 0.95
#: activations whose positive side is the identity (a unit active everywhere is linear)
_PIECEWISE_LINEAR = ("relu", "leaky_relu", "elu")


def feature_norm(ctx: ProbeContext) -> dict[str, torch.Tensor]:
    """Mean ‖h‖₂ over probe inputs, per hidden layer, and their mean."""
    out = {
        layer: h.detach().to(torch.float64).norm(dim=2).mean(1) for layer, h in ctx.features.items()
    }
    return with_layer_mean(out)


def param_norm(ctx: ProbeContext) -> dict[str, torch.Tensor]:
    """‖θ‖₂ per layer (weights and bias together) and of the whole network."""
    return _layer_norms(ctx.params)


def distance_from_init(ctx: ProbeContext) -> dict[str, torch.Tensor]:
    """‖θ − θ₀‖₂ per layer and of the whole network (agents that give ``initial_parameters``;
    the agent here may be its probe snapshot, which gives them too)."""
    agent = ctx.agent
    if not ctx.params or not isinstance(agent, SupportsInitialParameters):
        return {}
    start = agent.initial_parameters()
    return _layer_norms({k: v - start[k] for k, v in ctx.params.items() if k in start})


def _layer_norms(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """‖·‖₂ per layer (``<layer>.weight`` and ``<layer>.bias`` together) and over all."""
    if not tensors:
        return {}
    squares: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        layer = name.rsplit(".", 1)[0]
        sq = t.detach().to(torch.float64).reshape(t.shape[0], -1).pow(2).sum(1)
        squares[layer] = squares[layer] + sq if layer in squares else sq
    out = {k: v.sqrt() for k, v in squares.items()}
    out[""] = torch.stack(list(squares.values())).sum(0).sqrt()
    return out


def linearised_fraction(ctx: ProbeContext) -> dict[str, torch.Tensor]:
    """Share of units active (h > 0) on ≥ 90% of probe inputs (ReLU-like activations only)."""
    if ctx.activation not in _PIECEWISE_LINEAR:
        return {}
    out = {}
    for layer, h in ctx.features.items():  # (R, P, H)
        active = (h > 0).to(torch.float64).mean(1)  # (R, H)
        out[layer] = (active >= LINEARISED_SHARE).to(torch.float64).mean(1)
    return with_layer_mean(out)


def duplicate_fraction(ctx: ProbeContext) -> dict[str, torch.Tensor]:
    """Share of unit pairs with |corr| ≥ 0.95 over the probe batch, per layer."""
    out = {}
    for layer, h in ctx.features.items():
        x = h.detach().to(torch.float64)
        x = x - x.mean(1, keepdim=True)  # (R, P, H)
        norm = x.norm(dim=1)  # (R, H)
        live = norm > 0
        corr = (x.transpose(1, 2) @ x) / (norm.unsqueeze(2) * norm.unsqueeze(1)).clamp_min(
            1e-300
        )  # (R, H, H)
        H = x.shape[2]
        upper = torch.triu(torch.ones(H, H, dtype=torch.bool, device=x.device), diagonal=1)
        pair_live = live.unsqueeze(2) & live.unsqueeze(1)
        dup = (corr.abs() >= DUPLICATE_CORR) & pair_live & upper
        pairs = H * (H - 1) / 2
        out[layer] = dup.sum((1, 2)).to(torch.float64) / pairs if pairs else norm[:, 0] * 0
    return with_layer_mean(out)


def hessian_trace(ctx: ProbeContext) -> dict[str, torch.Tensor]:
    """Hutchinson's estimate of tr(∇²L) on the probe batch (agents that give it)."""
    agent = ctx.agent
    if not isinstance(agent, SupportsHessianTrace) or ctx.obs is None or ctx.target is None:
        return {}
    return {"": agent.hessian_trace(ctx.obs, ctx.target, HESSIAN_SAMPLES)}


def _has_start(agent: object) -> bool:
    return PARAMETERS[1](agent) and isinstance(agent, SupportsInitialParameters)


START = ("parameters() and initial_parameters() (the parameters it started from)", _has_start)
HESSIAN = (
    "hessian_trace(obs, target, samples)",
    lambda agent: isinstance(agent, SupportsHessianTrace),
)
for _name, _fn, _needs in [
    ("feature_norm", feature_norm, FEATURES),
    ("param_norm", param_norm, PARAMETERS),
    ("distance_from_init", distance_from_init, START),
    ("linearised_fraction", linearised_fraction, FEATURES),
    ("duplicate_fraction", duplicate_fraction, FEATURES),
]:
    register_probe(_name, _fn, snapshot_safe=True, needs=_needs)
register_probe("hessian_trace", hessian_trace, needs=HESSIAN)
