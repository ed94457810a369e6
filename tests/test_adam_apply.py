"""Adam applied in place in one compiled call (contlearn/backends/adam_apply.py): the same bits
as the learner's update followed by adding it to the weights, for each learner it applies to,
standalone and inside PPO's minibatch updates (with and without the value worker)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from contlearn.backends import kernels
from contlearn.backends.adam_apply import AdamApply, adam_apply_form
from contlearn.learners import learners
from contlearn.learners.base import find_states
from contlearn.learners.optim import ScaleByAdamState, adam, sgd
from contlearn.state import tree_leaves
from tests.test_ppo_backends import make, play

pytestmark = pytest.mark.skipif(kernels.library() is None, reason="no compiled kernels")


def _params(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = {"a.weight": (2, 7, 300), "a.bias": (2, 7), "b": (2, 3)}  # (chunks of 256 and tails)
    return {k: torch.randn(s, generator=g) for k, s in shapes.items()}


@pytest.mark.parametrize("reset", [False, True], ids=["uniform-counts", "per-element-counts"])
def test_in_place_adam_is_the_update_then_the_add(reset: bool) -> None:
    learner = adam(3e-3)
    assert adam_apply_form(learner) is not None
    ours, theirs = _params(0), _params(0)
    s_ours, s_theirs = learner.init(ours), learner.init(theirs)
    fused = AdamApply(learner, s_ours)
    g = torch.Generator().manual_seed(1)
    for step in range(6):
        grads = {k: torch.randn(v.shape, generator=g) * 10.0**-step for k, v in ours.items()}
        if reset and step == 3:  # counts differ within a tensor (as after a unit reset)
            for st in (s_ours, s_theirs):
                find_states(st, ScaleByAdamState)[0].count["a.weight"][0, 2].zero_()
        fused.apply_(grads, ours)
        updates, s_theirs = learner.update(grads, s_theirs, theirs)
        torch._foreach_add_(list(theirs.values()), [updates[k] for k in theirs])
        for k in ours:
            assert torch.equal(ours[k], theirs[k]), (step, k)
        for a, b in zip(tree_leaves(s_ours), tree_leaves(s_theirs), strict=True):
            assert torch.equal(a, b)


def test_the_form_is_plain_adam_only() -> None:
    from contlearn.learners.base import chain
    from contlearn.learners.regularizers import add_decayed_weights, add_l2

    assert adam_apply_form(adam(1e-3)) is not None
    assert adam_apply_form(sgd(1e-3)) is None
    assert adam_apply_form(chain(add_l2(1e-2), adam(1e-3))) is None
    assert adam_apply_form(chain(adam(1e-3), add_decayed_weights(-1e-4))) is None


def test_errors_name_the_tensor_and_moved_tensors_are_bound_again() -> None:
    learner = adam(1e-3)
    params = _params(2)
    state = learner.init(params)
    fused = AdamApply(learner, state)
    grads = {k: torch.ones_like(v) for k, v in params.items()}
    with pytest.raises(TypeError, match=r"b \(gradient\): dtype float64"):
        fused.apply_({**grads, "b": grads["b"].double()}, params)
    with pytest.raises(ValueError, match=r"a.bias \(gradient\): shape \(2, 8\)"):
        fused.apply_({**grads, "a.bias": torch.ones(2, 8)}, params)
    ref = {k: v.clone() for k, v in params.items()}
    ref_state = learner.init(ref)
    fused.apply_(grads, params)
    u, ref_state = learner.update(grads, ref_state, ref)
    torch._foreach_add_(list(ref.values()), [u[k] for k in ref])
    for t in [*params.values(), *tree_leaves(state)]:
        t.share_memory_()  # (moves each tensor's memory: the binding must notice)
    fused.apply_(grads, params)
    u, ref_state = learner.update(grads, ref_state, ref)
    torch._foreach_add_(list(ref.values()), [u[k] for k in ref])
    assert all(torch.equal(params[k], ref[k]) for k in params)


def _agent(learner: str, **options: Any):
    """test_ppo_backends' tiny PPO (2 replicas, 2 env copies)."""
    return make(learner, **options)


LEARNERS = [n for n in learners.names() if n in ("bp", "adam", "proper-adam")]


@pytest.mark.parametrize("value_worker", [False, True])
@pytest.mark.parametrize("learner", LEARNERS)
def test_ppo_updates_are_the_same_bits_with_and_without_it(learner: str, value_worker) -> None:
    fast = _agent(learner, optimizer="adam", value_worker=value_worker)
    plain = _agent(learner, optimizer="adam", value_worker=value_worker)
    plain._adam_apply = None  # (the learner's update and the add)
    try:
        assert fast._adam_apply is not None
        for a, b in zip(play(fast, 3), play(plain, 3), strict=True):
            assert all(torch.equal(a[k], b[k]) for k in a)
        assert all(torch.equal(fast._views[k], plain._views[k]) for k in fast._keys)
        leaves = zip(tree_leaves(fast.learner_state), tree_leaves(plain.learner_state), strict=True)
        for a, b in leaves:
            assert torch.equal(a, b)
    finally:
        fast.close()
        plain.close()


def test_ppo_uses_it_only_for_plain_adam_on_the_cpu() -> None:
    assert _agent("bp", optimizer="adam")._adam_apply is not None
    assert _agent("bp", optimizer="sgd")._adam_apply is None
    assert _agent("l2", optimizer="adam")._adam_apply is None
    assert _agent("bp", optimizer="adam", fast=False)._adam_apply is None
    stopped = _agent("bp", optimizer="adam")
    stopped.stop_replicas(torch.tensor([True, False]))  # (the learner's update: zeroes a row)
    before = {k: v.clone() for k, v in stopped._views.items()}
    play(stopped, 1)
    assert all(torch.equal(stopped._views[k][0], before[k][0]) for k in before)
