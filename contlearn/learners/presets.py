"""The named learners of ``contlearn list learners``, as :class:`LearnerDef` values."""

from __future__ import annotations

from dataclasses import dataclass

from contlearn.learners import LearnerDef


@dataclass(frozen=True)
class NoOptions:
    """This learner has no options of its own."""


def _base_only(spec, base, network, seeds):
    return base


BP = LearnerDef(NoOptions, _base_only, "plain backprop with the base optimizer")
ADAM = LearnerDef(NoOptions, _base_only, "backprop with Adam (torch defaults)",
                  {"optimizer": "adam"})
PROPER_ADAM = LearnerDef(NoOptions, _base_only,
                         "backprop with Adam, β1 = β2 = 0.99 (Dohare et al. 2024)",
                         {"optimizer": "adam", "beta1": 0.99, "beta2": 0.99})
