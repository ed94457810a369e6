"""The PPO agent's probe statistics: gradient magnitudes and weight changes of its updates.

The statistics are a plain dict (checkpointed as it is): per parameter, Σ|g| of the sampled
minibatches (the first of every epoch) and Σ|Δθ| of every update phase, ``(R,)`` float64, and
the counts of both.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch


def zero_stats(keys: Sequence[str], replicas: int, device: torch.device | None) -> dict[str, Any]:
    """Empty statistics for parameters ``keys``."""

    def zeros() -> dict[str, torch.Tensor]:
        return {k: torch.zeros(replicas, dtype=torch.float64, device=device) for k in keys}

    return {"grad_sum": zeros(), "change_sum": zeros(), "minibatches": 0, "rollouts": 0}


def count_change(
    stats: dict[str, Any], views: Mapping[str, torch.Tensor], before: Mapping[str, torch.Tensor]
) -> None:
    """Add one update phase's Σ|Δθ| (``before``: the parameters before it)."""
    for k, old in before.items():
        stats["change_sum"][k] += (views[k] - old).abs().flatten(1).sum(1, dtype=torch.float64)
    stats["rollouts"] += 1


def probe_means(
    stats: Mapping[str, Any], views: Mapping[str, torch.Tensor]
) -> dict[str, dict[str, torch.Tensor]]:
    """``{metric: {layer: (R,)}}`` (layer ``""``: all parameters): ``grad_magnitude``, mean |g|
    of the sampled minibatches, and ``weight_change``, mean |Δθ| per update phase; a metric
    with nothing counted is left out."""
    out = {}
    for metric, key, n in (
        ("grad_magnitude", "grad_sum", stats["minibatches"]),
        ("weight_change", "change_sum", stats["rollouts"]),
    ):
        if n:
            out[metric] = _per_layer(stats[key], n, views)
    return out


def _per_layer(
    sums: Mapping[str, torch.Tensor], n: int, views: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Per-parameter sums of |x| to per-layer means (weights and biases together)."""
    totals: dict[str, Any] = {}
    counts: dict[str, int] = {}
    for k, total in sums.items():
        layer = k.rsplit(".", 1)[0] if k.endswith((".weight", ".bias")) else k
        totals[layer] = totals.get(layer, 0) + total
        counts[layer] = counts.get(layer, 0) + views[k][0].numel()
    out = {layer: totals[layer] / (counts[layer] * n) for layer in totals}
    out[""] = sum(totals.values()) / (sum(counts.values()) * n)
    return out
