"""Fused updates: a learner whose chain is affine in (g, θ) can be applied in place.

Many learners are, per step, an affine map of the gradient and the parameters followed by an
in-place edit of the result::

    u = α g + β θ            (scale, add_l2, add_decayed_weights, the shrink of
                              shrink-and-perturb, and chains of them)
    θ ← θ + u, then post     (the noise of shrink-and-perturb; continual backprop's steps 1–7)

For those the agent need not materialise ``g`` nor ``u``: it can apply
``θ ← (1 + β) θ + α g`` as one in-place rank-B update per weight matrix while it back-propagates
(``baddbmm_`` with ``beta = 1 + β`` and ``alpha = α``), then call ``post``. The result equals
``learner.update`` followed by ``θ += u`` up to float rounding (the same products, summed in
another order). A transform declares its form as data (the ``fused`` field of
:class:`~contlearn.learners.base.GradientTransformation`); :func:`fused_plan` composes the
declarations of a chain's parts and returns None when any part has none (momentum, Adam,
L2-Init, ReDo, ...), in which case no fused backend supports the learner.

A post may ask for the column L1 norms ``Σ_k |W[k, i]|`` of some weights *after* the affine
update (continual backprop's outgoing-weight magnitudes): the agent computes them while the
weights are in cache and passes them as the keyword extra ``col_l1={weight name: (R, H)}``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from contlearn.learners.base import ChainState, GradientTransformation

PostFn = Callable[..., Any]


class UnitReplacer(NamedTuple):
    """A post that is continual backprop's steps 1–7 and can run inside the agent's whole-step
    kernel (:func:`contlearn.backends.block_kernel.online_block_`): the kernel does steps 1–5
    and stops a replica at a step where units must be replaced; ``replace`` does steps 6–7.

    Attributes:
        kernel_state: ``kernel_state(state)``, the per-layer tensors the kernel updates in
            place (:class:`contlearn.backends.block_kernel.CBPKernelState`), or None if it cannot
            take them.
        replace: ``replace(state, params, counts, skip)`` with ``counts`` one ``(R,)`` int64
            tensor per hidden layer (units to replace, 0 for replicas without an event) and
            ``skip`` the kernel's ``Pending1.skip``.
    """

    kernel_state: Callable[[Any], Any]
    replace: Callable[[Any, dict, list, Any], None]


class NoiseForm(NamedTuple):
    """A post that is shrink-and-perturb's noise alone (``θ ← θ + σ ε[r, t, p, e]``, the
    counter-based definition of :mod:`contlearn.learners.philox`), which the whole-step kernel
    can draw itself.

    Attributes:
        sigma: σ.
        state: ``state(transform_state)``, the :class:`~contlearn.learners.regularizers.
            ShrinkPerturbState` (keys and update count) in it; whoever adds the noise of
            ``n`` updates adds ``n`` to its count.
    """

    sigma: float
    state: Callable[[Any], Any]


class FusedPlan(NamedTuple):
    """How to apply a transform in place.

    Attributes:
        grad_scale: α in ``θ ← (1 + β) θ + α g``.
        param_scale: β.
        post: ``post(state, params, **extra) -> state``, run on the updated parameters (which
            it may edit in place), or None.
        col_l1: names of weights whose post-update column L1 norms ``post`` reads from the
            ``col_l1`` extra (it must also work without them).
        replacer: set when ``post`` is continual backprop's steps alone
            (:class:`UnitReplacer`).
        noise: set when ``post`` is shrink-and-perturb's noise alone (:class:`NoiseForm`).
    """

    grad_scale: float
    param_scale: float
    post: PostFn | None = None
    col_l1: tuple[str, ...] = ()
    replacer: UnitReplacer | None = None
    noise: NoiseForm | None = None


def fused_plan(transform: GradientTransformation) -> FusedPlan | None:
    """The fused form of ``transform``: its declared one, or for a chain the composition of
    its parts' (None if it, or any part of it, has none)."""
    if not transform.parts:  # (another kind of declaration, e.g. Adam's: not affine)
        return transform.fused if isinstance(transform.fused, FusedPlan) else None
    plans = [fused_plan(t) for t in transform.parts]
    if any(p is None for p in plans):
        return None
    return _compose([p for p in plans if p is not None])


def _compose(plans: list[FusedPlan]) -> FusedPlan | None:
    """Compose the plans of a chain's transforms, left to right.

    ``u' = a u + b θ`` after ``u = α g + β θ`` gives ``α' = a α``, ``β' = a β + b``. A post is
    an edit of θ after the affine step, so a later transform may not rescale it (None then).
    """
    alpha, beta = 1.0, 0.0
    posts: list[tuple[int, PostFn]] = []
    for i, p in enumerate(plans):
        if posts and (p.grad_scale != 1.0 or p.param_scale != 0.0):
            return None
        alpha, beta = p.grad_scale * alpha, p.grad_scale * beta + p.param_scale
        if p.post is not None:
            posts.append((i, p.post))
    if not posts:
        return FusedPlan(alpha, beta)
    first = posts[0][0]

    def post(state: ChainState, params: dict, **extra: Any) -> ChainState:
        inner = list(state.inner)
        for i, fn in posts:
            # only the first post sees the affine result untouched: later ones get no col_l1
            kw = extra if i == first else {k: v for k, v in extra.items() if k != "col_l1"}
            inner[i] = fn(inner[i], params, **kw)
        return ChainState(tuple(inner))

    replacer = None
    inner = plans[first].replacer
    if len(posts) == 1 and inner is not None:

        def kernel_state(state: ChainState) -> Any:
            return inner.kernel_state(state.inner[first])

        def replace(state: ChainState, params: dict, counts: list, skip: Any) -> None:
            inner.replace(state.inner[first], params, counts, skip)

        replacer = UnitReplacer(kernel_state, replace)
    return FusedPlan(alpha, beta, post, plans[first].col_l1, replacer, _noise(posts, plans))


def _noise(posts: list[tuple[int, PostFn]], plans: list[FusedPlan]) -> NoiseForm | None:
    """A chain's noise form: its one post's, reached through the chain's state."""
    first = posts[0][0]
    inner = plans[first].noise
    if len(posts) != 1 or inner is None:
        return None
    return NoiseForm(inner.sigma, lambda state: inner.state(state.inner[first]))
