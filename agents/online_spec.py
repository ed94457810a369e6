"""Options of the online supervised agent (:class:`~contlearn.agents.online.OnlineAgent`) and
the combinations of them it refuses."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from contlearn.agents.conv_networks import NETWORKS
from contlearn.agents.network_options import CONCAT_ACTIVATIONS, options_problem
from contlearn.agents.networks import ACTIVATIONS, INITS
from contlearn.learners.optim import OptimizerOptions
from contlearn.spec import param, parse_int_list

#: learners that do not apply to the conv networks, and why (every other registered learner
#: acts on the conv layers' presented weights; docs/conv_networks.md)
CONV_UNSUPPORTED: dict[str, str] = {
    "normalize-and-project": "it projects the gains of layer norms, which the conv networks "
    "lack; use network=mlp with layer_norm=true",
}
#: the learner whose ``head_layers`` > 1 needs an MLP that carries the head's copies
INJECTION = "plasticity-injection"


@dataclass(frozen=True)
class OnlineAgentSpec(OptimizerOptions):
    """Options of the online supervised agent (network; the base optimizer's are inherited)."""

    network: str = param(
        "mlp",
        "mlp (hidden= widths); for images (C, H, W): convnet (the paper's conv net for "
        "Continual ImageNet) or resnet18 (its ResNet-18 for CIFAR-100; docs/conv_networks.md)",
        choices=NETWORKS,
    )
    hidden: str = param("100,100,100", "hidden widths, comma-separated (paper: 2000,2000,2000)")
    activation: str = param(
        "relu",
        "hidden nonlinearity (crelu, fourier: two features per unit, the next fan-in 2×)",
        choices=(*ACTIVATIONS, *CONCAT_ACTIVATIONS),
    )
    init: str = param("kaiming_uniform", "weight init distribution", choices=INITS)
    layer_norm: bool = param(False, "layer norm before each hidden activation (gain, offset)")
    fast: bool = param(
        True,
        "hand-written backward and fused updates (false: the autograd "
        "reference path; same results to float rounding)",
    )

    def validate(self) -> None:
        """Check the hidden widths parse."""
        parse_int_list(self.hidden, "hidden")


def injected_head_layers(learner: Any) -> int:
    """The layers of the head ``learner`` injects (plasticity injection's ``head_layers``;
    1 for every other learner): above 1 the MLP carries the head's copies
    (:class:`~contlearn.agents.injected_head.InjectedHeadMLP`)."""
    return int(getattr(learner.spec, "head_layers", 1)) if learner.name == INJECTION else 1


def network_options(spec: OnlineAgentSpec, learner: Any) -> frozenset[str]:
    """The network's structural options, as the backends see them (``StepConfig``)."""
    opts = {"layer_norm"} if spec.layer_norm else set()
    if injected_head_layers(learner) > 1:
        opts.add("injection_head")
    return frozenset(opts)


def _injection_problem(spec: OnlineAgentSpec, learner: Any) -> str | None:
    """Why a multi-layer injected head cannot run here (None: it can)."""
    k = injected_head_layers(learner)
    if k == 1:
        return None
    layers = len(parse_int_list(spec.hidden, "hidden")) + 1
    if spec.network != "mlp":
        return (
            f"plasticity-injection with head_layers={k} needs network=mlp (the conv networks "
            "carry no head copies); use network=mlp or head_layers=1"
        )
    if k > layers:
        return (
            f"learner.head_layers={k} exceeds the network's {layers} layers (hidden="
            f"{spec.hidden} and the output layer); choose 1 to {layers}"
        )
    if spec.layer_norm:
        return f"plasticity-injection with head_layers={k} has no layer_norm; drop layer_norm"
    if learner.credit.name != "bp":
        return (
            f"plasticity-injection with head_layers={k} learns by backprop only (credit="
            f"{learner.credit.name}'s error path has no injected head); use credit=bp"
        )
    return None


def spec_problem(spec: OnlineAgentSpec, learner: Any) -> str | None:
    """Why ``spec``'s network options cannot run with ``learner`` (None: they can)."""
    if why := _injection_problem(spec, learner):
        return why
    if spec.network == "mlp":
        return options_problem(spec.activation, spec.layer_norm, learner.name, learner.credit.name)
    if learner.name in CONV_UNSUPPORTED:
        return (
            f"learner {learner.name} does not apply to network={spec.network}: "
            f"{CONV_UNSUPPORTED[learner.name]}"
        )
    if spec.layer_norm or spec.activation in CONCAT_ACTIVATIONS:
        opt = "layer_norm=true" if spec.layer_norm else f"activation={spec.activation}"
        return f"network={spec.network} has no {opt}; drop it or use network=mlp"
    if learner.credit.name != "bp":
        return (
            f"network={spec.network} learns by backprop only (credit={learner.credit.name} is "
            "defined for MLPs); use credit=bp or network=mlp"
        )
    return None
