"""Forms only the block loop takes: L2-Init's anchored affine update and ReDo's periodic resets.

Two learners are not affine in (g, θ) alone, so they have no
:class:`~contlearn.learners.fused.FusedPlan`, yet the whole-step kernel computes them exactly:

- **L2-Init** over SGD's family (``add_l2_init`` declares :class:`L2InitForm`): with
  ``g' = g + λ(θ − θ₀)`` before an affine chain, the update is affine in (g, θ, θ₀),
  ``θ ← (1 + β) θ + α g + γ θ₀`` (:class:`AnchorPlan`), and the kernel reads the anchors θ₀.
- **ReDo** (and ReGraMa) over SGD's family, an affine chain without a post-update edit, or
  over Adam between affine maps (``redo`` declares :class:`ReDoForm`): the kernel
  adds each step's per-unit ``|h|`` (ReGraMa: the mean ``|g|`` of the unit's incoming weights)
  to the state's window sums while it steps; the block loop stops at the updates where ReDo
  checks, and ReDo's own code scores and resets the units there.

These declarations sit in the ``fused`` slot of a transform, as Adam's does; neither
:func:`~contlearn.learners.fused.fused_plan` nor :func:`~contlearn.learners.adam_form.adam_plan`
reads them, so only the block backend (``StepConfig.block_form``) takes them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from contlearn.learners.adam_form import AdamPlan
from contlearn.learners.base import GradientTransformation
from contlearn.learners.fused import FusedPlan


class L2InitForm(NamedTuple):
    """``add_l2_init``'s declaration: ``g ← g + λ(θ − θ₀)`` with λ = ``weight_decay``."""

    weight_decay: float


class AnchorPlan(NamedTuple):
    """``θ ← (1 + β) θ + α g + γ θ₀``: an affine chain with one L2-Init term in it.

    Attributes:
        grad_scale: α.
        param_scale: β.
        anchor_scale: γ (the anchors are the learner state's one
            :class:`~contlearn.learners.base.AnchorState`).
    """

    grad_scale: float
    param_scale: float
    anchor_scale: float


class ReDoForm(NamedTuple):
    """ReDo as the block loop runs it.

    Attributes:
        inner: the wrapped chain's form: a :class:`FusedPlan` without a post, or an
            :class:`~contlearn.learners.adam_form.AdamPlan` without a replacer.
        period, window: F and the scored window (:func:`contlearn.learners.redo.redo`).
        score: ``activation`` (ReDo) or ``gradient`` (ReGraMa).
        recycle: ``recycle(state, params)``: ReDo's check on the post-update parameters (its
            scores from the window sums, the resets, the window cleared), the code its
            ``update`` runs.
    """

    inner: FusedPlan | AdamPlan
    period: int
    window: int
    score: str
    recycle: Callable[[Any, dict], None]


def _leaves(transform: GradientTransformation) -> list[GradientTransformation]:
    if not transform.parts:
        return [transform]
    return [leaf for part in transform.parts for leaf in _leaves(part)]


def anchor_plan(transform: GradientTransformation) -> AnchorPlan | None:
    """The anchored affine form of ``transform``: affine parts (no post-update edit) and
    exactly one L2-Init term, composed left to right; None otherwise.

    ``u = a g + b θ + c θ₀``; L2-Init adds ``λ θ − λ θ₀`` to it (it acts on the gradient so
    far); an affine part ``(s, p)`` maps it to ``s u + p θ``."""
    a, b, c = 1.0, 0.0, 0.0
    anchored = False
    for leaf in _leaves(transform):
        form = leaf.fused
        if isinstance(form, L2InitForm) and not anchored:
            b, c, anchored = b + form.weight_decay, c - form.weight_decay, True
        elif isinstance(form, FusedPlan) and form.post is None:
            a, b, c = (
                form.grad_scale * a,
                form.grad_scale * b + form.param_scale,
                form.grad_scale * c,
            )
        else:  # momentum, Adam, noise, a reset, a second anchor: not this form
            return None
    return AnchorPlan(a, b, c) if anchored else None


def block_form(transform: GradientTransformation) -> AnchorPlan | ReDoForm | None:
    """What the block loop may run of ``transform`` beyond its fused and Adam forms: ReDo's
    own declaration (ReDo the whole learner), or the anchored affine form."""
    if isinstance(transform.fused, ReDoForm):
        return transform.fused
    return anchor_plan(transform)


def redo_segments(
    count: int, steps: int, period: int, window: int
) -> list[tuple[int, int, bool, bool]]:
    """The next ``steps`` updates after ``count`` split where ReDo's bookkeeping changes:
    ``(first, end, in_window, check)`` per piece of the block, ``check`` when ReDo checks
    after the piece's last update. Update n (1-based) is in the window when
    ``(n − 1) mod F ≥ F − window`` and is a check when ``n mod F = 0``."""
    out = []
    j = 0
    while j < steps:
        pos = (count + j) % period  # (update count + j + 1 − 1) mod F
        in_window = pos >= period - window
        length = min((period if in_window else period - window) - pos, steps - j)
        out.append((j, j + length, in_window, in_window and pos + length == period))
        j += length
    return out
