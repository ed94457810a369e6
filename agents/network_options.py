"""Network options of the MLP beyond its elementwise activations (issue #18).

- ``layer_norm``: layer normalisation of each hidden layer's pre-activations, before the
  activation (Ba et al. 2016): ``ẑ = (z − mean(z)) / √(var(z) + ε) ⊙ γ + β`` over the layer's
  units, per example, with the biased variance and ε = 1e-5 (``torch.nn.LayerNorm``'s); the
  gain γ and offset β are parameters ``<layer>.ln_weight`` and ``<layer>.ln_bias`` ``(R, H)``,
  initialised to 1 and 0 (a unit reset sets them back to 1 and 0).
- ``crelu`` (concatenated ReLU; Shang et al. 2016, as used for plasticity by Abbas et al. 2023,
  "Loss of plasticity in continual deep reinforcement learning"):
  ``h = [relu(z), relu(−z)]``.
- ``fourier`` (deep Fourier features; Lewandowski et al. 2025, "Plastic learning with deep
  Fourier features"): ``h = [sin(z), cos(z)]``.

Width: a hidden width H counts *units* (pre-activations, rows of W); a concatenating
activation gives 2H features, so the next layer's fan-in is 2H and a width-H crelu network has
about twice the weights of a width-H relu one above the first layer. (Abbas et al. compare at
a comparable parameter count: pass a smaller ``hidden`` for that, e.g. ``71`` where relu has
``100`` for a square hidden-to-hidden matrix.) Feature ``i`` and ``H + i`` both belong to unit
``i``: its outgoing weights are two columns of the next layer.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

#: layer norm's ε (torch.nn.LayerNorm's default)
LN_EPS = 1e-5
#: parameter-name suffixes of a hidden layer's layer-norm gain and offset
LN_WEIGHT, LN_BIAS = "ln_weight", "ln_bias"


def crelu(z: torch.Tensor) -> torch.Tensor:
    """``[relu(z), relu(−z)]`` along the last dim: ``(…, H) → (…, 2H)``."""
    return torch.cat([torch.relu(z), torch.relu(-z)], -1)


def fourier(z: torch.Tensor) -> torch.Tensor:
    """``[sin(z), cos(z)]`` along the last dim: ``(…, H) → (…, 2H)``."""
    return torch.cat([torch.sin(z), torch.cos(z)], -1)


#: activations that concatenate two features per unit (the network doubles its fan-ins)
CONCAT_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "crelu": crelu,
    "fourier": fourier,
}
#: Kaiming gains of the concatenating activations: crelu's halves are ReLUs (√2); a unit's
#: sin and cos together carry sin² + cos² = 1 (gain 1)
CONCAT_GAINS = {"crelu": math.sqrt(2.0), "fourier": 1.0}
#: registered learners that score or reset hidden units by their features (the feature of
#: unit i is not one column under a concatenating activation)
UNIT_LEARNERS = ("cbp", "redo", "regrama", "snr")


def features_per_unit(activation: str) -> int:
    """Features each hidden unit gives the next layer: 2 for crelu and fourier, else 1."""
    return 2 if activation in CONCAT_ACTIVATIONS else 1


def layer_norm(z: torch.Tensor, gain: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Layer norm of ``z (R, B, H)`` over H with per-replica ``gain``, ``bias`` ``(R, H)``."""
    mean = z.mean(-1, keepdim=True)
    var = z.var(-1, unbiased=False, keepdim=True)
    return (z - mean) * torch.rsqrt(var + LN_EPS) * gain.unsqueeze(1) + bias.unsqueeze(1)


def options_problem(activation: str, use_layer_norm: bool, learner: str, credit: str) -> str | None:
    """Why the online agent cannot run this combination (None: it can), naming the fix."""
    opts = [f"activation={activation}"] if activation in CONCAT_ACTIVATIONS else []
    opts += ["layer_norm=true"] if use_layer_norm else []
    if learner == "normalize-and-project" and not use_layer_norm:
        return "learner normalize-and-project needs layer_norm=true (drop layer_norm=false)"
    if activation in CONCAT_ACTIVATIONS and learner in UNIT_LEARNERS:
        return (
            f"learner {learner} scores one feature per unit, and under activation={activation} "
            "a unit has two; choose an elementwise activation (relu, ...) or another learner"
        )
    if opts and credit != "bp":
        return (
            f"credit={credit}'s error path is written for elementwise activations without layer "
            f"norm, so not for {' and '.join(opts)}; use credit=bp or drop the option"
        )
    return None
