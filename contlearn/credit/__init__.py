"""Credit assignment: how the output error reaches the hidden layers (the ``credit`` option).

``bp`` is backprop. The other rules deliver each hidden layer an error that does not use the
transpose of the forward weights (no weight transport): a fixed random feedback matrix
(``fa``), a direct projection of the output error (``dfa``), the sign of the forward weights
(``sign-symmetry``), or a feedback matrix that is learned (``kolen-pollack``,
``weight-mirror`` and the alignment rules of Kunin et al. 2020). Definitions, defaults and
papers: docs/credit.md; the rules: :mod:`contlearn.credit.rules` (fixed feedback) and
:mod:`contlearn.credit.learned`; their options: :mod:`contlearn.credit.defs`.

A rule is registered by name with a string entry point, like streams and learners; its
options are the ``credit.<param>`` keys. A run's choice is a :class:`Credit` (name and
validated options), carried by the run's :class:`~contlearn.learners.Learner`; an agent builds
the rule for its network with :func:`build_credit`. Agents say which rules they can use with a
``credit_rules`` class attribute (a tuple of names, or ``"*"`` for every registered rule);
an agent without one uses backprop only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from contlearn.errors import ConfigError
from contlearn.registry import Registry

#: every registered rule, by name (``contlearn list credit``)
credit_rules = Registry("credit rule")
credit_rules.register("bp", "contlearn.credit.defs:BP")
credit_rules.register("fa", "contlearn.credit.defs:FA")
credit_rules.register("dfa", "contlearn.credit.defs:DFA")
credit_rules.register("sign-symmetry", "contlearn.credit.defs:SIGN_SYMMETRY")
credit_rules.register("kolen-pollack", "contlearn.credit.defs:KOLEN_POLLACK")
credit_rules.register("weight-mirror", "contlearn.credit.defs:WEIGHT_MIRROR")
credit_rules.register("symmetric-alignment", "contlearn.credit.defs:SYMMETRIC_ALIGNMENT")
credit_rules.register("activation-alignment", "contlearn.credit.defs:ACTIVATION_ALIGNMENT")
credit_rules.register("information-alignment", "contlearn.credit.defs:INFORMATION_ALIGNMENT")
credit_rules.seal()  # (the built-in entries; later ones are the user's)


@dataclass(frozen=True)
class CreditDef:
    """A named credit-assignment rule.

    Attributes:
        Spec: frozen dataclass of the rule's options (the ``credit.<param>`` keys).
        build: ``build(spec, network, seeds, lr) -> rule`` (a
            :class:`~contlearn.credit.rules.FeedbackRule`; ``lr`` is the agent's learning rate).
        summary: one line for ``contlearn list credit``.
        learned: whether the feedback is learned (it has state that changes and is checkpointed).
    """

    Spec: type
    build: Callable[..., Any]
    summary: str
    learned: bool = False


@dataclass(frozen=True)
class Credit:
    """A rule chosen for a run: its registered name and validated options."""

    name: str = "bp"
    spec: Any = None


def credit_def(name: str) -> CreditDef:
    """The registered definition of rule ``name`` (ConfigError naming close matches if unknown)."""
    return credit_rules.get(name)


def build_credit(credit: Credit, network: Any, seeds: Sequence[int], lr: float) -> Any:
    """Rule ``credit`` for ``network`` (a :class:`~contlearn.agents.networks.BatchedMLP`) and
    replicas ``seeds``; ``lr`` is the agent's learning rate (learned feedback's default rate)."""
    cdef = credit_def(credit.name)
    spec = credit.spec if credit.spec is not None else cdef.Spec()
    rule = cdef.build(spec, network, list(seeds), lr)
    rule.regularized = bool(getattr(spec, "regularize", False))
    return rule


def credit_options(credit: Credit) -> dict[str, Any]:
    """The options of ``credit`` as ``{param: value}`` (its Spec's defaults where unset)."""
    spec = credit.spec if credit.spec is not None else credit_def(credit.name).Spec()
    return dict(vars(spec))


def agent_credit_rules(agent_cls: type) -> tuple[str, ...]:
    """The rules an agent class declares it can use (``credit_rules``; backprop if none)."""
    declared = getattr(agent_cls, "credit_rules", ("bp",))
    if declared == "*":
        return tuple(credit_rules.names())
    if not isinstance(declared, (tuple, list)) or not all(isinstance(n, str) for n in declared):
        raise ConfigError(
            f"{getattr(agent_cls, '__name__', agent_cls)}.credit_rules must be a tuple of rule "
            'names or "*"'
        )
    return tuple(declared)


def check_agent_credit(agent_cls: type, agent: str, name: str) -> None:
    """ConfigError unless agent class ``agent_cls`` (named ``agent``) can use rule ``name``."""
    usable = agent_credit_rules(agent_cls)
    if name not in usable:
        raise ConfigError(
            f"credit rule {name} does not apply to agent {agent} (it declares: "
            f"{', '.join(usable)}); choose one of those, or declare credit_rules on the agent"
        )


__all__ = [
    "Credit",
    "CreditDef",
    "agent_credit_rules",
    "build_credit",
    "check_agent_credit",
    "credit_def",
    "credit_options",
    "credit_rules",
]
