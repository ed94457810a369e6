"""The named learners from the wider plasticity literature (issue #18): weight clipping, UPGD,
Parseval regularisation, ReGraMa, selective weight reinitialisation and normalize-and-project,
as :class:`LearnerDef` values like those of :mod:`contlearn.learners.presets`; formulas in
docs/learners.md."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from contlearn.errors import ConfigError
from contlearn.learners import LearnerDef
from contlearn.learners.base import GradientTransformation, chain
from contlearn.learners.presets import ReDoSpec, _build_redo, _with_l2
from contlearn.learners.resets import reset_diagnostics
from contlearn.learners.toolkit import (
    add_parseval,
    clip_weights,
    project_norms,
    selective_reinit,
    swr_diagnostics,
    upgd,
)
from contlearn.spec import param


@dataclass(frozen=True)
class WeightClippingSpec:
    """Options of ``weight-clipping`` (Elsayed et al. 2024)."""

    kappa: float = param(
        1.0,
        "κ: weights clipped to ±κ × the layer's init bound after each update (authors' default)",
        low=0.0,
        low_open=True,
    )


def _build_weight_clipping(
    spec: WeightClippingSpec, base: GradientTransformation, network: Any, seeds: list[int]
) -> GradientTransformation:
    return chain(base, clip_weights(network, spec.kappa))


WEIGHT_CLIPPING = LearnerDef(
    WeightClippingSpec,
    _build_weight_clipping,
    "weight clipping: every weight kept within ±κ × its layer's init bound",
)


@dataclass(frozen=True)
class UPGDSpec:
    """Options of ``upgd`` (Elsayed & Mahmood 2024; defaults of the authors' code)."""

    beta: float = param(0.999, "β of the traced utility −g ⊙ θ", low=0.0, high=1.0)
    sigma: float = param(1e-3, "σ of the N(0, σ²) perturbation", low=0.0)
    weight_decay: float = param(
        1e-3, "λ: the direction gets + λθ (decay per update: lr·λ)", low=0.0
    )

    def validate(self) -> None:
        """β must be < 1 (the bias correction divides by 1 − β^t)."""
        if self.beta >= 1.0:
            raise ConfigError(f"learner.beta={self.beta} must be < 1")


def _build_upgd(
    spec: UPGDSpec, base: GradientTransformation, network: Any, seeds: list[int]
) -> GradientTransformation:
    return chain(upgd(seeds, spec.beta, spec.sigma, spec.weight_decay), base)


UPGD = LearnerDef(
    UPGDSpec,
    _build_upgd,
    "utility-based perturbed gradient descent: useful weights protected, the rest perturbed",
)


@dataclass(frozen=True)
class ParsevalSpec:
    """Options of ``parseval`` (Chung et al. 2024)."""

    lam: float = param(1e-3, "λ of Σ_l ‖W_l W_lᵀ − s I‖² over the hidden layers", low=0.0)
    scale: float = param(
        1.0, "s: the target squared norm of each unit's incoming weights", low=0.0, low_open=True
    )


def _build_parseval(
    spec: ParsevalSpec, base: GradientTransformation, network: Any, seeds: list[int]
) -> GradientTransformation:
    return chain(add_parseval(network, spec.lam, spec.scale), base)


PARSEVAL = LearnerDef(
    ParsevalSpec,
    _build_parseval,
    "Parseval regularisation: hidden layers' weight rows pushed toward orthonormal",
)


@dataclass(frozen=True)
class ReGraMaSpec(ReDoSpec):
    """Options of ``regrama`` (Liu et al. 2025): ReDo's, scoring gradient magnitudes."""

    threshold: float = param(
        0.01, "τ: units with gradient score s ≤ τ are recycled (as ReDo's default)", low=0.0
    )
    window: int = param(
        1000, "updates (the last before each check) whose gradients are scored; ≤ period", low=1
    )


REGRAMA = LearnerDef(
    ReGraMaSpec,
    functools.partial(_build_redo, score="gradient"),
    "ReGraMa: ReDo's recycling scored by the units' gradient magnitude",
    diagnostics=reset_diagnostics,
)


@dataclass(frozen=True)
class SWRSpec:
    """Options of ``swr``, selective weight reinitialisation (Hernandez-Garcia, Dohare et al.
    2025; the authors' code sweeps rate and period, so these are starting points)."""

    utility: str = param(
        "gradient", "weight utility: |g ⊙ θ| or |θ|", choices=("gradient", "magnitude")
    )
    method: str = param(
        "proportional",
        "which weights: the fraction ρ with the lowest utility, or those ≤ ρ × mean utility",
        choices=("proportional", "threshold"),
    )
    rate: float = param(1e-4, "ρ (fraction of each tensor, or threshold factor)", low=0.0)
    every: int = param(1, "updates between reinitialisations", low=1)
    decay: float = param(
        0.0, "d of the utility trace (0: this update's utility)", low=0.0, high=1.0
    )
    l2: float = param(0.0, "λ of coupled L2 added before the optimizer", low=0.0)

    def validate(self) -> None:
        """The trace's decay must be < 1 and a proportion ≤ 1."""
        if self.decay >= 1.0:
            raise ConfigError(f"learner.decay={self.decay} must be < 1")
        if self.method == "proportional" and self.rate > 1.0:
            raise ConfigError(f"learner.rate={self.rate} must be <= 1 with method=proportional")


def _build_swr(
    spec: SWRSpec, base: GradientTransformation, network: Any, seeds: list[int]
) -> GradientTransformation:
    return selective_reinit(
        _with_l2(base, spec.l2),
        network,
        seeds,
        utility=spec.utility,
        method=spec.method,
        rate=spec.rate,
        every=spec.every,
        decay=spec.decay,
    )


SWR = LearnerDef(
    SWRSpec,
    _build_swr,
    "selective weight reinitialisation: the lowest-utility weights redrawn from the init",
    diagnostics=swr_diagnostics,
)


@dataclass(frozen=True)
class NormalizeAndProjectSpec:
    """Options of ``normalize-and-project`` (Lyle et al. 2024); it turns on the agent's
    ``layer_norm`` and refuses ``layer_norm=false``."""

    output: bool = param(
        True, "project the output layer's weights too (false: the hidden layers' only)"
    )


def _build_nap(
    spec: NormalizeAndProjectSpec, base: GradientTransformation, network: Any, seeds: list[int]
) -> GradientTransformation:
    layers = network.layers if spec.output else network.hidden_layers
    return chain(base, project_norms([f"{layer.name}.weight" for layer in layers]))


NORMALIZE_AND_PROJECT = LearnerDef(
    NormalizeAndProjectSpec,
    _build_nap,
    "normalize-and-project: layer norm, and weight matrices rescaled to their initial norm",
    agent_defaults={"layer_norm": True},
)
