"""Adam's declared form (contlearn/learners/adam_form.py): which chains are Adam between affine
maps, with the composed coefficients worked out by hand, and which are not."""

from __future__ import annotations

import pytest
import torch

from contlearn.learners.adam_form import AdamForm, AdamPlan, adam_plan
from contlearn.learners.base import chain
from contlearn.learners.fused import fused_plan
from contlearn.learners.optim import adam, scale, scale_by_adam, sgd, trace
from contlearn.learners.regularizers import add_decayed_weights, add_l2, add_l2_init


def test_adam_and_its_affine_neighbours_compose_as_worked_out_by_hand():
    form = AdamForm(0.9, 0.999, 1e-8)
    assert adam_plan(adam(1e-3)) == AdamPlan(1.0, 0.0, form, -1e-3, 0.0)
    # coupled L2: g' = g + λθ before Adam (torch's weight_decay)
    assert adam_plan(chain(add_l2(0.01), adam(1e-3))) == AdamPlan(1.0, 0.01, form, -1e-3, 0.0)
    # decoupled decay after Adam: u = −lr d − δθ (AdamW with weight_decay = δ / lr)
    plan = adam_plan(chain(adam(1e-3, 0.99, 0.99), add_decayed_weights(2e-4)))
    assert plan == AdamPlan(1.0, 0.0, AdamForm(0.99, 0.99, 1e-8), -1e-3, -2e-4)
    # g' = 2 (g + 0.5 θ) + 0 = 2g + θ;  u = 3 (−0.1 d) = −0.3 d
    plan = adam_plan(chain(add_l2(0.5), scale(2.0), scale_by_adam(), scale(-0.1), scale(3.0)))
    assert plan is not None
    assert (plan.pre_a, plan.pre_b) == (2.0, 1.0)
    assert plan.lr == pytest.approx(-0.3) and plan.post_b == 0.0


@pytest.mark.parametrize(
    "learner",
    [
        sgd(0.1),  # no Adam at all
        chain(trace(0.9), adam(1e-3)),  # momentum before Adam
        chain(add_l2_init(1e-3), adam(1e-3)),  # an anchor, not affine in (g, θ)
        chain(adam(1e-3), adam(1e-3)),  # two Adams
    ],
)
def test_chains_that_are_not_adam_between_affine_maps_have_no_form(learner):
    assert adam_plan(learner) is None


def test_adam_has_no_affine_fused_form():
    """fused_plan reads only FusedPlan declarations: Adam is not affine in g."""
    assert fused_plan(adam(1e-3)) is None
    assert fused_plan(chain(add_l2(1e-4), adam(1e-3))) is None
    assert fused_plan(sgd(0.1)) is not None


def test_the_declared_form_computes_the_chain():
    """θ + lr·adam(a g + b θ) + β θ, written out here with torch ops, equals the chain's own
    update (the reference) over a few steps."""
    torch.manual_seed(0)
    learner = chain(add_l2(0.05), adam(1e-2, 0.8, 0.95), add_decayed_weights(1e-3))
    plan = adam_plan(learner)
    assert plan is not None
    theta = {"w": torch.randn(2, 3, 4)}
    state = learner.init(theta)
    mine = theta["w"].clone()
    m, v, n = torch.zeros_like(mine), torch.zeros_like(mine), torch.zeros_like(mine)
    for _ in range(5):
        g = torch.randn_like(mine)
        updates, state = learner.update({"w": g}, state, theta)
        theta["w"] = theta["w"] + updates["w"]
        gp = plan.pre_a * g + plan.pre_b * mine
        n += 1
        m = plan.adam.b1 * m + (1 - plan.adam.b1) * gp
        v = plan.adam.b2 * v + (1 - plan.adam.b2) * gp * gp
        d = (m / (1 - plan.adam.b1**n)) / ((v / (1 - plan.adam.b2**n)).sqrt() + plan.adam.eps)
        mine = mine + plan.lr * d + plan.post_b * mine
        torch.testing.assert_close(theta["w"], mine, rtol=1e-5, atol=1e-6)
