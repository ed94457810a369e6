"""What a backend is: a fast path that says, in one function, which configurations it computes
exactly.

Every network has one *reference* step (autograd, or plainly written torch): the definition that
every other path is tested against, run by ``fast=false`` and by every configuration no backend
supports. A backend is a faster way to compute the same step. It has a name, a one-line
description and one function, :meth:`Backend.supports`, that looks at the run's resolved
configuration (:class:`StepConfig`) and returns True only where its result equals the
reference's up to float rounding. An agent asks its backends in order (:func:`choose`) and runs
the first that supports the configuration; nothing else chooses paths. The chosen backend's
name is recorded in ``meta.json`` (``backend``) and printed when a run starts.

Adding a learner, an activation or any network option therefore cannot make a fast path compute
something else silently: a backend that was not told about it does not declare it supported,
and the reference runs. ``tests/test_backends.py`` enumerates the registries and checks every
backend choice against the reference (docs/design.md).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar, runtime_checkable

#: the name every agent's reference step is recorded under
REFERENCE = "reference"


@dataclass(frozen=True)
class StepConfig:
    """The resolved configuration of one network's learning step: everything a backend may
    base its :meth:`~Backend.supports` answer on.

    Attributes:
        network: the network family (``mlp``, ``actor-critic``).
        activation: the hidden nonlinearity.
        depth: hidden layers.
        task: ``classification``, ``regression`` or ``rl``.
        learner: the registered learner name.
        optimizer: the base optimizer (``sgd``, ``adam``).
        credit: the credit-assignment rule (``bp``: backprop).
        credit_learned: whether the rule's feedback is learned (it changes with the updates:
            Kolen–Pollack's ``ΔB = ΔW``), as :class:`~contlearn.credit.CreditDef` declares.
        credit_options: the rule's options (``credit.<param>`` without the prefix), e.g.
            ``scale``, ``decay``, ``regularize`` (the learner also acts on learned feedback).
        batch_size: examples per step (for PPO: per minibatch).
        device: the device type (``cpu``, ``cuda``, ...).
        dtype: the parameters' dtype name (``float32``).
        fused: the learner chain's declared fused form
            (:func:`contlearn.learners.fused.fused_plan`; None: it has none).
        adam: the learner chain's declared Adam form, Adam between affine maps
            (:func:`contlearn.learners.adam_form.adam_plan`; None: it has none).
        kernels: whether the compiled kernels are available (:mod:`contlearn.backends.kernels`).
        options: other agent options a backend may need to see (PPO: ``clip_grad``, ...).
        network_options: the network's structural options (``layer_norm``); a backend
            supports a configuration only if it declares every one of them (:func:`declares`).
        block_form: the learner's form only the block loop takes, where it has no fused nor
            Adam form (:func:`contlearn.learners.block_forms.block_form`: L2-Init's anchored
            affine update, ReDo over an affine chain; None: none).
    """

    network: str
    activation: str
    depth: int
    task: str
    learner: str
    optimizer: str
    credit: str = "bp"
    credit_learned: bool = False
    credit_options: Mapping[str, Any] = field(default_factory=dict)
    batch_size: int = 1
    device: str = "cpu"
    dtype: str = "float32"
    fused: Any = None
    adam: Any = None
    kernels: bool = False
    options: Mapping[str, Any] = field(default_factory=dict)
    network_options: frozenset[str] = frozenset()
    block_form: Any = None


def declares(cfg: StepConfig, known: frozenset[str] = frozenset()) -> bool:
    """Whether a backend that computes the network options ``known`` may run ``cfg``: every
    option ``cfg`` has is among them (a backend told of none refuses every option)."""
    return cfg.network_options <= known


@runtime_checkable
class Backend(Protocol):
    """A fast path (see the module docstring)."""

    #: short name, recorded in ``meta.json``
    name: str
    #: one line for the start of a run and for ``docs/design.md``
    description: str

    def supports(self, cfg: StepConfig) -> bool:
        """Whether this backend computes exactly the reference step for ``cfg``."""
        ...


B = TypeVar("B", bound=Backend)


def choose(backends: Sequence[B], cfg: StepConfig) -> B | None:
    """The first of ``backends`` that supports ``cfg`` (None: run the reference)."""
    for backend in backends:
        if backend.supports(cfg):
            return backend
    return None
