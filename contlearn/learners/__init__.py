"""Learners: composable gradient transformations, selectable by name.

A learner *definition* (:class:`LearnerDef`) has a Spec dataclass of options (the
``learner.<param>`` keys), an optional set of defaults it imposes on the agent's base optimizer
(e.g. ``proper-adam`` sets ``optimizer=adam, beta1=beta2=0.99``), and a ``build`` function that
wraps the agent's base optimizer transform into the learner's chain. Definitions are registered
by name with string entry points; see ``contlearn list learners``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from contlearn.credit import Credit
from contlearn.learners.base import GradientTransformation, chain
from contlearn.learners.cbp import continual_backprop
from contlearn.learners.module_learner import ModuleLearner, attach
from contlearn.learners.optim import adam, scale, scale_by_adam, sgd, trace
from contlearn.learners.redo import redo
from contlearn.learners.regularizers import (
    add_decayed_weights,
    add_l2,
    add_l2_init,
    shrink_perturb,
    shrink_toward_init,
)
from contlearn.learners.resets import head_reset, reset_units
from contlearn.registry import Registry


@dataclass(frozen=True)
class LearnerDef:
    """A named learner recipe.

    Attributes:
        Spec: frozen dataclass of the learner's options.
        build: ``build(spec, base, network, seeds) -> GradientTransformation``; ``base`` is the
            agent's optimizer transform, ``network`` exposes ``layers``/``sample_init`` (for
            resets), ``seeds`` the replicas' root seeds.
        summary: one line for ``contlearn list learners``.
        agent_defaults: defaults this learner sets on agent options (users may still override).
        diagnostics: optional ``diagnostics(state) -> {layer: {metric: (R,) tensor}}`` with the
            learner's bookkeeping (``replacements``, ``eligible_units``, ``mean_age``, ...);
            layer ``""`` for whole-network values. Recorded at every task end.
    """

    Spec: type
    build: Callable[..., GradientTransformation]
    summary: str = ""
    agent_defaults: Mapping[str, Any] = field(default_factory=dict)
    diagnostics: Callable[[Any], dict[str, dict[str, Any]]] | None = None


@dataclass(frozen=True)
class Learner:
    """A learner chosen for a run: its registered name and validated options, and the
    credit-assignment rule whose gradients it turns into updates (:mod:`contlearn.credit`;
    backprop unless the run sets ``credit``)."""

    name: str
    spec: Any
    credit: Credit = field(default_factory=Credit)


learners = Registry("learner")
# (each one-line summary lives in its LearnerDef, which `contlearn list learners` shows)
learners.register("bp", "contlearn.learners.presets:BP")
learners.register("adam", "contlearn.learners.presets:ADAM")
learners.register("proper-adam", "contlearn.learners.presets:PROPER_ADAM")
learners.register("l2", "contlearn.learners.presets:L2")
learners.register("l2-init", "contlearn.learners.presets:L2_INIT")
learners.register("snp", "contlearn.learners.presets:SNP")
learners.register("snp-init", "contlearn.learners.presets:SNP_INIT")
learners.register("cbp", "contlearn.learners.presets:CBP")
learners.register("redo", "contlearn.learners.presets:REDO")
learners.register("head-reset", "contlearn.learners.presets:HEAD_RESET")
learners.register("weight-clipping", "contlearn.learners.toolkit_presets:WEIGHT_CLIPPING")
learners.register("upgd", "contlearn.learners.toolkit_presets:UPGD")
learners.register("parseval", "contlearn.learners.toolkit_presets:PARSEVAL")
learners.register("regrama", "contlearn.learners.toolkit_presets:REGRAMA")
learners.register("swr", "contlearn.learners.toolkit_presets:SWR")
learners.register("spectral", "contlearn.learners.toolkit_presets:SPECTRAL")
learners.register("snr", "contlearn.learners.toolkit_presets:SNR")
learners.register("hare-tortoise", "contlearn.learners.toolkit_presets:HARE_TORTOISE")
learners.register("plasticity-injection", "contlearn.learners.toolkit_presets:PLASTICITY_INJECTION")
learners.register(
    "normalize-and-project", "contlearn.learners.toolkit_presets:NORMALIZE_AND_PROJECT"
)
learners.seal()  # (the built-in entries; later ones are the user's)


def learner_def(name: str) -> LearnerDef:
    """The registered definition of learner ``name`` (ConfigError if unknown)."""
    return learners.get(name)


def learner_diagnostics(learner: Learner, state: Any) -> dict[str, dict[str, Any]]:
    """The learner's bookkeeping for ``state`` (empty if it keeps none)."""
    fn = learner_def(learner.name).diagnostics
    return fn(state) if fn is not None else {}


def build_learner(
    learner: Learner, base: GradientTransformation, network: Any, seeds: Sequence[int]
) -> GradientTransformation:
    """Wrap ``base`` into the chain of ``learner`` for ``network`` and replicas ``seeds``."""
    return learner_def(learner.name).build(learner.spec, base, network, list(seeds))


__all__ = [
    "GradientTransformation",
    "Learner",
    "LearnerDef",
    "ModuleLearner",
    "adam",
    "add_decayed_weights",
    "add_l2",
    "add_l2_init",
    "attach",
    "build_learner",
    "chain",
    "continual_backprop",
    "head_reset",
    "learner_def",
    "learner_diagnostics",
    "learners",
    "redo",
    "reset_units",
    "scale",
    "scale_by_adam",
    "sgd",
    "shrink_perturb",
    "shrink_toward_init",
    "trace",
]
