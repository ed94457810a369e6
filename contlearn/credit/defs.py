"""The registered credit rules: each one's options (the ``credit.<param>`` keys), build
function and one-line summary (``contlearn list credit``; docs/credit.md)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from contlearn.agents.networks import BatchedMLP
from contlearn.credit import CreditDef
from contlearn.credit.learned import KolenPollack, LearnedAlignment, WeightMirror
from contlearn.credit.rules import DirectFeedback, FeedbackRule, FixedFeedback, SignSymmetry
from contlearn.spec import param


@dataclass(frozen=True)
class NoOptions:
    """This rule has no options."""


@dataclass(frozen=True)
class SignSymmetrySpec:
    """Options of ``sign-symmetry``."""

    scale: str = param(
        "mean_abs",
        "feedback s·sign(W): s = mean |W| per layer and seed, or 1",
        choices=("mean_abs", "unit"),
    )


@dataclass(frozen=True)
class LearnedOptions:
    """The option every rule with learned feedback has."""

    regularize: bool = param(
        False,
        "the learner's regularisers and shrink-and-perturb also act on B, as on a weight the "
        "loss does not reach (false: on the forward weights only)",
    )


@dataclass(frozen=True)
class KolenPollackSpec(LearnedOptions):
    """Options of ``kolen-pollack``."""

    decay: float = param(1e-4, "λ: W and B both shrink by (1 − λ) each step", low=0.0, high=1.0)


@dataclass(frozen=True)
class WeightMirrorSpec(LearnedOptions):
    """Options of ``weight-mirror``."""

    every: int = param(1, "a mirror step every so many steps", low=1)
    samples: int = param(1, "noise inputs per layer and mirror step", low=1)
    noise_std: float = param(1.0, "σ of the noise inputs", low=0.0, low_open=True)
    rate: float = param(1e-3, "η, the mirror step's rate", low=0.0, low_open=True)
    decay: float = param(1e-3, "λ: B shrinks by (1 − λ) each mirror step", low=0.0, high=1.0)


@dataclass(frozen=True)
class SymmetricSpec(LearnedOptions):
    """Options of ``symmetric-alignment`` (α·decay + β·self)."""

    alpha: float = param(1e-3, "α, the weight of decay", low=0.0)
    beta: float = param(2e-3, "β, the weight of self", low=0.0)
    lr: float = param(0.0, "η of the feedback's step (0: the agent's lr)", low=0.0)


@dataclass(frozen=True)
class ActivationSpec(LearnedOptions):
    """Options of ``activation-alignment`` (α·sparse + β·amp)."""

    alpha: float = param(1e-3, "α, the weight of sparse", low=0.0)
    beta: float = param(2e-3, "β, the weight of amp", low=0.0)
    lr: float = param(0.0, "η of the feedback's step (0: the agent's lr)", low=0.0)


@dataclass(frozen=True)
class InformationSpec(LearnedOptions):
    """Options of ``information-alignment`` (α·amp + β·null + γ·decay)."""

    alpha: float = param(2e-3, "α, the weight of amp", low=0.0)
    beta: float = param(1e-3, "β, the weight of null", low=0.0)
    gamma: float = param(1e-3, "γ, the weight of decay", low=0.0)
    lr: float = param(0.0, "η of the feedback's step (0: the agent's lr)", low=0.0)


def _alignment(rule: str):  # noqa: ANN202 - a build function
    def build(spec: Any, network: BatchedMLP, seeds: list[int], lr: float) -> LearnedAlignment:
        coef = [spec.alpha, spec.beta] + ([spec.gamma] if hasattr(spec, "gamma") else [])
        return LearnedAlignment(network, seeds, rule, coef, spec.lr or lr)

    return build


BP = CreditDef(
    NoOptions,
    lambda spec, net, seeds, lr: FeedbackRule(net, seeds),
    "backprop: δ_l = (W_{l+1}ᵀ δ_{l+1}) ⊙ f'(z_l)",
)
FA = CreditDef(
    NoOptions,
    lambda spec, net, seeds, lr: FixedFeedback(net, seeds),
    "feedback alignment (Lillicrap et al. 2016): a fixed random B_l replaces W_l going down",
)
DFA = CreditDef(
    NoOptions,
    lambda spec, net, seeds, lr: DirectFeedback(net, seeds),
    "direct feedback alignment (Nøkland 2016): hidden layers get the output error through "
    "fixed random matrices, one each",
)
SIGN_SYMMETRY = CreditDef(
    SignSymmetrySpec,
    lambda spec, net, seeds, lr: SignSymmetry(net, seeds, spec.scale),
    "sign symmetry (Liao et al. 2016): feedback s·sign(W_l)",
)
KOLEN_POLLACK = CreditDef(
    KolenPollackSpec,
    lambda spec, net, seeds, lr: KolenPollack(net, seeds, spec.decay),
    "Kolen–Pollack (Akrout et al. 2019): learned B_l with ΔB = ΔW and the same decay on both",
    learned=True,
)
WEIGHT_MIRROR = CreditDef(
    WeightMirrorSpec,
    lambda spec, net, seeds, lr: WeightMirror(
        net, seeds, spec.every, spec.samples, spec.noise_std, spec.rate, spec.decay
    ),
    "weight mirror (Akrout et al. 2019): B_l learned from noise inputs, B += η y xᵀ",
    learned=True,
)
SYMMETRIC_ALIGNMENT = CreditDef(
    SymmetricSpec,
    _alignment("symmetric-alignment"),
    "symmetric alignment (Kunin et al. 2020): B_l learns α·decay + β·self",
    learned=True,
)
ACTIVATION_ALIGNMENT = CreditDef(
    ActivationSpec,
    _alignment("activation-alignment"),
    "activation alignment (Kunin et al. 2020): B_l learns α·sparse + β·amp",
    learned=True,
)
INFORMATION_ALIGNMENT = CreditDef(
    InformationSpec,
    _alignment("information-alignment"),
    "information alignment (Kunin et al. 2020): B_l learns α·amp + β·null + γ·decay",
    learned=True,
)
