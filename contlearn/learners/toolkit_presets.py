"""The named learners from the wider plasticity literature (issue #18): weight clipping, UPGD,
Parseval regularisation, ReGraMa, selective weight reinitialisation, normalize-and-project,
spectral regularisation, self-normalised resets, hare & tortoise and plasticity injection, as
:class:`LearnerDef` values like those of :mod:`contlearn.learners.presets`; formulas in
docs/learners.md."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from contlearn.errors import ConfigError
from contlearn.learners import LearnerDef
from contlearn.learners.base import GradientTransformation, chain
from contlearn.learners.head_injection import head_injection
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
from contlearn.learners.toolkit_resets import (
    add_spectral,
    hare_tortoise,
    hare_tortoise_diagnostics,
    injection_diagnostics,
    plasticity_injection,
    self_normalized_resets,
    snr_diagnostics,
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
class SpectralSpec:
    """Options of ``spectral`` (Lewandowski et al. 2024; k = 2 as the paper's, λ a starting
    point: the paper tunes it per problem)."""

    lam: float = param(1e-4, "λ of Σ_l (σ₁([W_l | b_l])^k − 1)² over every layer", low=0.0)
    power: float = param(
        2.0, "k: the exponent of the largest singular value", low=0.0, low_open=True
    )


def _build_spectral(
    spec: SpectralSpec, base: GradientTransformation, network: Any, seeds: list[int]
) -> GradientTransformation:
    return chain(add_spectral(network, seeds, spec.lam, spec.power), base)


SPECTRAL = LearnerDef(
    SpectralSpec,
    _build_spectral,
    "spectral regularisation: each layer's largest singular value kept near 1",
)


@dataclass(frozen=True)
class SNRSpec:
    """Options of ``snr``, self-normalised resets (Farias & Jozefiak 2025)."""

    eta: float = param(
        0.01,
        "η: reset a unit idle for a inputs when (1 − its firing rate)^a ≤ η",
        low=0.0,
        high=1.0,
        low_open=True,
    )
    l2: float = param(0.0, "λ of coupled L2 added before the optimizer", low=0.0)

    def validate(self) -> None:
        """η must be < 1 (η = 1 would reset every idle unit at once)."""
        if self.eta >= 1.0:
            raise ConfigError(f"learner.eta={self.eta} must be < 1")


def _build_snr(
    spec: SNRSpec, base: GradientTransformation, network: Any, seeds: list[int]
) -> GradientTransformation:
    return self_normalized_resets(_with_l2(base, spec.l2), network, seeds, spec.eta)


SNR = LearnerDef(
    SNRSpec,
    _build_snr,
    "self-normalised resets: units idle improbably long for their own firing rate reset",
    diagnostics=snr_diagnostics,
)


@dataclass(frozen=True)
class HareTortoiseSpec:
    """Options of ``hare-tortoise`` (Lee et al. 2024; ρ as the authors' code; the period maps
    their 10 epochs of CIFAR-10 at batch 256, about 2000 updates)."""

    ema: float = param(0.999, "ρ: the tortoise θ̄ ← ρ θ̄ + (1 − ρ) θ after each update", low=0.0)
    period: int = param(2000, "F: updates between resets of the hare (the network) to θ̄", low=1)

    def validate(self) -> None:
        """ρ must be < 1 (ρ = 1 never moves the tortoise)."""
        if self.ema >= 1.0:
            raise ConfigError(f"learner.ema={self.ema} must be < 1")


def _build_hare_tortoise(
    spec: HareTortoiseSpec, base: GradientTransformation, network: Any, seeds: list[int]
) -> GradientTransformation:
    return hare_tortoise(base, spec.ema, spec.period)


HARE_TORTOISE = LearnerDef(
    HareTortoiseSpec,
    _build_hare_tortoise,
    "hare & tortoise: an EMA of the weights, to which the network is reset every F updates",
    diagnostics=hare_tortoise_diagnostics,
)


@dataclass(frozen=True)
class InjectionSpec:
    """Options of ``plasticity-injection`` (Nikishin et al. 2023): a fresh head injected."""

    at: int = param(10_000, "the update after which a fresh head is injected", low=1)
    every: int = param(
        0, "updates between later injections (0: inject once; head_layers=1 only)", low=0
    )
    l2: float = param(0.0, "λ of coupled L2 added before the optimizer", low=0.0)
    head_layers: int = param(
        1,
        "layers of the injected head: 1 the output layer; 2 (the paper's) the last hidden "
        "layer and the output layer, and so on (> 1: the online agent's MLP only)",
        low=1,
    )

    def validate(self) -> None:
        """A multi-layer head is injected once."""
        if self.head_layers > 1 and self.every:
            raise ConfigError(
                f"plasticity-injection injects a {self.head_layers}-layer head once (every=0); "
                "a second injection would need a third head. Drop every or use head_layers=1"
            )


def _build_injection(
    spec: InjectionSpec, base: GradientTransformation, network: Any, seeds: list[int]
) -> GradientTransformation:
    inner = _with_l2(base, spec.l2)
    if spec.head_layers > 1:
        return head_injection(inner, network, seeds, spec.at)
    return plasticity_injection(inner, network, seeds, spec.at, spec.every)


PLASTICITY_INJECTION = LearnerDef(
    InjectionSpec,
    _build_injection,
    "plasticity injection: a fresh trainable output layer added, output unchanged at injection",
    diagnostics=injection_diagnostics,
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
