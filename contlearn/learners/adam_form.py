"""Adam's declared form: a learner that is Adam between affine maps, applied in one pass.

Many learners run by Dohare et al. are, per step::

    g' = a g + b θ               (the affine parts before Adam: coupled L2, add_l2)
    d  = adam(g')                (scale_by_adam: moments, per-element counts, bias correction)
    θ ← θ + lr d + β θ           (the affine parts after: the step size, decoupled decay)

optionally followed by continual backprop's steps 1–7. ``scale_by_adam`` declares
:class:`AdamForm` (its β1, β2, ε) in its ``fused`` slot, where affine transforms declare a
:class:`~contlearn.learners.fused.FusedPlan`; :func:`adam_plan` composes a chain's parts into
one :class:`AdamPlan` (None when any part is something else: momentum, noise, L2-Init, a
second Adam, a post-update edit before the end), which the block backend runs in its C loop
(:class:`contlearn.backends.block_kernel.BlockAdam`). Continual backprop over such a chain
declares the composed plan with its :class:`~contlearn.learners.fused.UnitReplacer`.

:func:`~contlearn.learners.fused.fused_plan` reads only ``FusedPlan`` declarations, so an
Adam chain still has no affine fused form (Adam is not affine in g).
"""

from __future__ import annotations

from typing import NamedTuple

from contlearn.learners.base import GradientTransformation
from contlearn.learners.fused import FusedPlan, UnitReplacer


class AdamForm(NamedTuple):
    """``scale_by_adam``'s declaration: its options (docs/design.md §4, as torch.optim)."""

    b1: float
    b2: float
    eps: float


class AdamPlan(NamedTuple):
    """A chain that is Adam between affine maps (the module docstring).

    Attributes:
        pre_a, pre_b: ``g' = pre_a g + pre_b θ``.
        adam: Adam's options.
        lr, post_b: ``θ ← θ + lr d + post_b θ``.
        replacer: continual backprop's steps in the kernel's form, when the chain is wrapped
            by it (None: no post-update edit).
    """

    pre_a: float
    pre_b: float
    adam: AdamForm
    lr: float = 1.0
    post_b: float = 0.0
    replacer: UnitReplacer | None = None


def _leaves(transform: GradientTransformation) -> list[GradientTransformation]:
    if not transform.parts:
        return [transform]
    return [leaf for part in transform.parts for leaf in _leaves(part)]


def adam_plan(transform: GradientTransformation) -> AdamPlan | None:
    """The Adam form of ``transform`` (its own declaration, or its chain's parts composed left
    to right), or None if it is not Adam between affine maps."""
    plan: AdamPlan | None = None
    pre_a, pre_b = 1.0, 0.0
    for leaf in _leaves(transform):
        form = leaf.fused
        if isinstance(form, AdamForm):
            form = AdamPlan(1.0, 0.0, form)
        if isinstance(form, AdamPlan):
            if plan is not None or (form.replacer is not None and transform.parts):
                return None  # a second Adam; a replacer's state is the whole learner's only
            # affine parts before this one act on its gradient: g' = a (pre_a g + pre_b θ) + b θ
            plan = form._replace(pre_a=form.pre_a * pre_a, pre_b=form.pre_a * pre_b + form.pre_b)
            continue
        if not isinstance(form, FusedPlan) or form.post is not None:
            return None
        if plan is None:
            pre_a, pre_b = form.grad_scale * pre_a, form.grad_scale * pre_b + form.param_scale
        elif plan.replacer is not None:  # nothing may rescale a post-update edit
            return None
        else:  # u' = c u + e θ after u = lr d + post_b θ
            plan = plan._replace(
                lr=form.grad_scale * plan.lr,
                post_b=form.grad_scale * plan.post_b + form.param_scale,
            )
    return plan
