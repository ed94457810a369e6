"""The named learners of ``contlearn list learners``, as :class:`LearnerDef` values.

Each preset wraps the agent's base optimizer (``--set optimizer=sgd|adam``, ``lr``, ``momentum``,
``beta1``, ``beta2``, ``eps``: the ``base`` argument of ``build``) into its chain; its own
options are the fields of its Spec, set as ``learner.<field>`` (``--set
learner.replacement_rate=1e-5``). Defaults are the settings of the papers cited per field;
docs/learners.md gives the formulas.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from contlearn.errors import ConfigError
from contlearn.learners import LearnerDef
from contlearn.learners.base import GradientTransformation, chain
from contlearn.learners.cbp import ROUNDINGS, UTILITIES, continual_backprop
from contlearn.learners.redo import redo
from contlearn.learners.regularizers import (
    add_decayed_weights,
    add_l2,
    add_l2_init,
    shrink_perturb,
    shrink_toward_init,
)
from contlearn.learners.resets import head_reset, head_reset_diagnostics, reset_diagnostics
from contlearn.spec import param


@dataclass(frozen=True)
class NoOptions:
    """This learner has no options of its own."""


def _base_only(
    spec: Any, base: GradientTransformation, network: Any, seeds: list[int]
) -> GradientTransformation:
    return base


def _with_l2(base: GradientTransformation, l2: float) -> GradientTransformation:
    """``chain(add_l2(λ), base)``, or ``base`` when λ = 0."""
    return chain(add_l2(l2), base) if l2 > 0 else base


BP = LearnerDef(NoOptions, _base_only, "plain backprop with the base optimizer")
ADAM = LearnerDef(
    NoOptions, _base_only, "backprop with Adam (torch defaults)", {"optimizer": "adam"}
)
PROPER_ADAM = LearnerDef(
    NoOptions,
    _base_only,
    "backprop with Adam, β1 = β2 = 0.99 (Dohare et al. 2024)",
    {"optimizer": "adam", "beta1": 0.99, "beta2": 0.99},
)


@dataclass(frozen=True)
class L2Spec:
    """Options of ``l2``: coupled L2 and/or decoupled weight decay."""

    l2: float = param(
        1e-4,
        "λ: coupled L2, g ← g + λθ before the optimizer (torch weight_decay;"
        " Dohare et al. 2024 permuted MNIST: 1e-4)",
        low=0.0,
    )
    decoupled: float = param(
        0.0,
        "δ: decoupled decay per update, u ← u − δθ after the optimizer"
        " (AdamW with weight_decay = δ/lr)",
        low=0.0,
    )


def _build_l2(
    spec: L2Spec, base: GradientTransformation, network: Any, seeds: list[int]
) -> GradientTransformation:
    chained = _with_l2(base, spec.l2)
    return chain(chained, add_decayed_weights(spec.decoupled)) if spec.decoupled > 0 else chained


L2 = LearnerDef(L2Spec, _build_l2, "L2 regularisation: coupled g += λθ, optional decoupled decay")


@dataclass(frozen=True)
class L2InitSpec:
    """Options of ``l2-init`` (Kumar et al. 2023)."""

    l2_init: float = param(1e-4, "λ: g ← g + λ(θ − θ₀) before the optimizer", low=0.0)


def _build_l2_init(
    spec: L2InitSpec, base: GradientTransformation, network: Any, seeds: list[int]
) -> GradientTransformation:
    return chain(add_l2_init(spec.l2_init), base)


L2_INIT = LearnerDef(L2InitSpec, _build_l2_init, "L2 toward the initial weights, g += λ(θ − θ₀)")


@dataclass(frozen=True)
class ShrinkPerturbSpec:
    """Options of ``snp`` (Ash & Adams 2020, as used by Dohare et al. 2024)."""

    shrink: float = param(
        3e-7,
        "λ: per-update shrink, θ ← (1−λ)θ + σε (3e-7 = the reference's"
        " weight decay 1e-4 × step size 0.003)",
        low=0.0,
        high=1.0,
    )
    sigma: float = param(
        1e-5,
        "σ: std of the N(0, 1) noise added to every weight and bias each"
        " update (reference grid 1e-4, 1e-5, 1e-6)",
        low=0.0,
    )


def _build_snp(
    spec: ShrinkPerturbSpec, base: GradientTransformation, network: Any, seeds: list[int]
) -> GradientTransformation:
    return chain(base, shrink_perturb(spec.shrink, spec.sigma, seeds))


SNP = LearnerDef(
    ShrinkPerturbSpec, _build_snp, "shrink-and-perturb after every update, θ ← (1−λ)θ + σε"
)


@dataclass(frozen=True)
class ShrinkTowardInitSpec:
    """Options of ``snp-init``: shrink toward the initial weights."""

    lam: float = param(
        0.9999, "λ: θ ← λθ + (1−λ)θ₀ (share of the current value kept)", low=0.0, high=1.0
    )
    period: int = param(1, "apply every this many updates", low=1)


def _build_snp_init(
    spec: ShrinkTowardInitSpec, base: GradientTransformation, network: Any, seeds: list[int]
) -> GradientTransformation:
    return chain(base, shrink_toward_init(spec.lam, spec.period))


SNP_INIT = LearnerDef(
    ShrinkTowardInitSpec,
    _build_snp_init,
    "shrink toward the initial weights, θ ← λθ + (1−λ)θ₀ every F updates",
)


@dataclass(frozen=True)
class CBPSpec:
    """Options of ``cbp``, continual backprop (Dohare et al. 2024; docs/design.md §4a)."""

    replacement_rate: float = param(
        1e-4,
        "ρ: units replaced per eligible unit per update"
        " (paper: 1e-4 … 1e-6 permuted MNIST, 1e-4 Ant)",
        low=0.0,
        high=1.0,
    )
    maturity: int = param(
        100, "m: updates a new unit is protected (paper: 100 MNIST, 10000 Ant)", low=0
    )
    decay: float = param(
        0.99, "η: decay of the running utility and mean activation", low=0.0, high=1.0
    )
    utility: str = param("contribution", "utility measure", choices=UTILITIES)
    bias_folding: bool = param(
        True, "move a replaced unit's mean contribution into the next layer's bias"
    )
    rounding: str = param(
        "carry", "carry fractional replacements over, or round stochastically", choices=ROUNDINGS
    )
    l2: float = param(
        0.0, "λ of coupled L2 added before the optimizer (Ant setting: 1e-4)", low=0.0
    )

    def validate(self) -> None:
        """η must be < 1 (the bias correction divides by 1 − η^a)."""
        if self.decay >= 1.0:
            raise ConfigError(f"learner.decay={self.decay} must be < 1")


def _build_cbp(
    spec: CBPSpec, base: GradientTransformation, network: Any, seeds: list[int]
) -> GradientTransformation:
    return continual_backprop(
        _with_l2(base, spec.l2),
        network,
        seeds,
        replacement_rate=spec.replacement_rate,
        maturity=spec.maturity,
        decay=spec.decay,
        utility=spec.utility,
        bias_folding=spec.bias_folding,
        rounding=spec.rounding,
    )


CBP = LearnerDef(
    CBPSpec,
    _build_cbp,
    "continual backprop: replace low-utility mature units",
    diagnostics=reset_diagnostics,
)


@dataclass(frozen=True)
class ReDoSpec:
    """Options of ``redo`` (Sokar et al. 2023)."""

    threshold: float = param(
        0.01,
        "τ: units with score s ≤ τ are recycled (Dohare et al.'s ReDo baseline: 0.01)",
        low=0.0,
    )
    period: int = param(1000, "F: updates between checks", low=1)
    window: int = param(
        1000, "updates (the last before each check) whose activations are scored; ≤ period", low=1
    )
    l2: float = param(0.0, "λ of coupled L2 added before the optimizer", low=0.0)

    def validate(self) -> None:
        """The scored window lies within one period."""
        if self.window > self.period:
            raise ConfigError(
                f"learner.window={self.window} must be <= learner.period={self.period}"
            )


def _build_redo(
    spec: ReDoSpec,
    base: GradientTransformation,
    network: Any,
    seeds: list[int],
    score: str = "activation",
) -> GradientTransformation:
    """ReDo (``score="gradient"``: ReGraMa, :mod:`contlearn.learners.toolkit_presets`)."""
    return redo(
        _with_l2(base, spec.l2),
        network,
        seeds,
        threshold=spec.threshold,
        period=spec.period,
        window=spec.window,
        score=score,
    )


REDO = LearnerDef(
    ReDoSpec,
    _build_redo,
    "ReDo: recycle dormant units every F updates",
    diagnostics=reset_diagnostics,
)


def _build_head_reset(
    spec: NoOptions, base: GradientTransformation, network: Any, seeds: list[int]
) -> GradientTransformation:
    return head_reset(base, network, seeds)


HEAD_RESET = LearnerDef(
    NoOptions,
    _build_head_reset,
    "re-initialise the output layer at each visible task start (boundaries_visible)",
    diagnostics=head_reset_diagnostics,
)
