"""Gradient transformations: the optax shape, in torch.

A transform is a pair of functions::

    state = t.init(params)
    updates, state = t.update(grads, state, params, **extra)

``params``, ``grads`` and ``updates`` are dicts of named tensors with a leading replica dim
``(R, ...)``; layers are addressed by name. State is a NamedTuple whose leaves are tensors (or
dicts/tuples of them), so it checkpoints with ``torch.save`` and loads with
``weights_only=True``. Extras (activations for utilities, the step's loss) are keyword-only and
every transform ignores those it does not use. :func:`chain` composes transforms left to right
and keeps its parts (:attr:`GradientTransformation.parts`).

A transform whose update is affine in (g, θ) declares that form as data
(:attr:`GradientTransformation.fused`, a :class:`contlearn.learners.fused.FusedPlan`), so a
fast backend can apply it in place; nothing inspects closures
(:func:`contlearn.learners.fused.fused_plan`).

For speed the state tensors are updated in place and the same NamedTuple is returned; callers
must treat the state they passed in as consumed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch

Params = dict[str, torch.Tensor]


class GradientTransformation(NamedTuple):
    """An ``init``/``update`` pair (see the module docstring).

    Attributes:
        init: ``init(params) -> state``.
        update: ``update(grads, state, params, **extra) -> (updates, state)``.
        fused: the transform's declared fused form (a
            :class:`~contlearn.learners.fused.FusedPlan`), or None if it has none. A chain
            leaves it None: its form is composed from its parts.
        parts: the transforms of a :func:`chain`, in order (empty for any other transform).
    """

    init: Callable[[Params], Any]
    update: Callable[..., tuple[Params, Any]]
    fused: Any = None
    parts: tuple[GradientTransformation, ...] = ()


class EmptyState(NamedTuple):
    """State of a stateless transform."""


def stateless(fn: Callable[..., Params], fused: Any = None) -> GradientTransformation:
    """A transform with no state from ``fn(grads, params, **extra) -> updates`` (``fused``:
    its declared fused form, if it is affine)."""

    def init(params: Params) -> EmptyState:
        return EmptyState()

    def update(grads: Params, state: EmptyState, params: Params, **extra: Any):
        return fn(grads, params, **extra), state

    return GradientTransformation(init, update, fused)


class ChainState(NamedTuple):
    """The states of a chain's transforms, in order."""

    inner: tuple


def chain(*transforms: GradientTransformation) -> GradientTransformation:
    """Compose transforms: each one's updates are the next one's gradients."""

    def init(params: Params) -> ChainState:
        return ChainState(tuple(t.init(params) for t in transforms))

    def update(grads: Params, state: ChainState, params: Params, **extra: Any):
        states = []
        for t, s in zip(transforms, state.inner, strict=True):
            grads, s = t.update(grads, s, params, **extra)
            states.append(s)
        return grads, ChainState(tuple(states))

    return GradientTransformation(init, update, parts=tuple(transforms))


class AnchorState(NamedTuple):
    """Reference parameters a transform pulls toward (θ₀ of L2-Init, shrink-toward-init).

    Not optimizer state: :func:`per_param_state` skips it, so a reset does not zero θ₀;
    instead a reset sets the anchor of the re-initialised weights to their new values (see
    :func:`contlearn.learners.resets.reset_units`).
    """

    anchor: Params


def per_param_state(state: Any, params: Params) -> list[Params]:
    """Every dict in ``state`` that holds one tensor per parameter (same names, same shapes).

    Reset transforms use this to find optimizer moments, momentum buffers and per-element step
    counts without knowing which optimizer produced them. Anchors (:class:`AnchorState`) are
    not optimizer state and are skipped.
    """
    found: list[Params] = []
    if isinstance(state, AnchorState):
        return found
    if isinstance(state, dict):
        if (
            state
            and set(state) == set(params)
            and all(
                isinstance(v, torch.Tensor) and v.shape == params[k].shape for k, v in state.items()
            )
        ):
            found.append(state)
        else:
            for v in state.values():
                found.extend(per_param_state(v, params))
    elif isinstance(state, (tuple, list)):
        for v in state:
            found.extend(per_param_state(v, params))
    return found


def find_states(state: Any, kind: type) -> list[Any]:
    """Every node of the state tree that is an instance of ``kind``, depth first.

    Used to find anchors (:class:`AnchorState`) and the bookkeeping of reset transforms
    wherever they sit in a composed learner.
    """
    if isinstance(state, kind):
        return [state]
    if isinstance(state, dict):
        return [s for v in state.values() for s in find_states(v, kind)]
    if isinstance(state, (tuple, list)):
        return [s for v in state for s in find_states(v, kind)]
    return []
