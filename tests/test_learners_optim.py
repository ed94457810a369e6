"""Base optimizers and L2 variants against torch.optim and hand-computed updates."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from contlearn.learners import adam, add_decayed_weights, add_l2, add_l2_init, chain, sgd
from contlearn.learners.base import GradientTransformation

SHAPES = {"hidden1.weight": (2, 4, 3), "hidden1.bias": (2, 4), "output.weight": (2, 1, 4)}


def _run_both(
    ours: GradientTransformation,
    theirs: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer],
    steps: int = 12,
    seed: int = 0,
) -> tuple[dict, dict]:
    """Apply the same gradient sequence with our transform and with a torch optimizer."""
    gen = torch.Generator().manual_seed(seed)
    start = {k: torch.randn(s, generator=gen) for k, s in SHAPES.items()}
    params = {k: v.clone() for k, v in start.items()}
    torch_params = {k: torch.nn.Parameter(v.clone()) for k, v in start.items()}
    opt = theirs(list(torch_params.values()))
    state = ours.init(params)
    for _ in range(steps):
        grads = {k: torch.randn(s, generator=gen) for k, s in SHAPES.items()}
        for k, p in torch_params.items():
            p.grad = grads[k].clone()
        opt.step()
        updates, state = ours.update(grads, state, params)
        for k in params:
            params[k] += updates[k]
    return params, {k: p.detach() for k, p in torch_params.items()}


def _assert_close(a: dict, b: dict) -> None:
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("momentum,nesterov", [(0.0, False), (0.9, False), (0.9, True)])
def test_sgd_matches_torch(momentum: float, nesterov: bool) -> None:
    ours, theirs = _run_both(
        sgd(0.05, momentum, nesterov),
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=momentum, nesterov=nesterov),
    )
    _assert_close(ours, theirs)


@pytest.mark.parametrize("b1,b2,eps", [(0.9, 0.999, 1e-8), (0.99, 0.99, 1e-8), (0.0, 0.9, 1e-4)])
def test_adam_matches_torch(b1: float, b2: float, eps: float) -> None:
    ours, theirs = _run_both(
        adam(0.01, b1, b2, eps), lambda p: torch.optim.Adam(p, lr=0.01, betas=(b1, b2), eps=eps)
    )
    _assert_close(ours, theirs)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_coupled_l2_matches_torch_sgd_weight_decay(momentum: float) -> None:
    ours, theirs = _run_both(
        chain(add_l2(0.1), sgd(0.05, momentum)),
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=momentum, weight_decay=0.1),
    )
    _assert_close(ours, theirs)


def test_coupled_l2_matches_torch_adam_weight_decay() -> None:
    ours, theirs = _run_both(
        chain(add_l2(0.1), adam(0.01, 0.99, 0.99)),
        lambda p: torch.optim.Adam(p, lr=0.01, betas=(0.99, 0.99), weight_decay=0.1),
    )
    _assert_close(ours, theirs)


def test_decoupled_decay_matches_torch_adamw() -> None:
    ours, theirs = _run_both(
        chain(adam(0.01, 0.9, 0.999), add_decayed_weights(0.1, lr=0.01)),
        lambda p: torch.optim.AdamW(p, lr=0.01, betas=(0.9, 0.999), weight_decay=0.1),
    )
    _assert_close(ours, theirs)


def test_coupled_l2_hand_computed() -> None:
    # u = -lr (g + λθ) = -0.1 (0.5 + 0.1·θ)
    t = chain(add_l2(0.1), sgd(0.1))
    params = {"w": torch.tensor([[1.0, -2.0]])}
    updates, _ = t.update({"w": torch.tensor([[0.5, 0.5]])}, t.init(params), params)
    torch.testing.assert_close(updates["w"], torch.tensor([[-0.06, -0.03]]))


def test_decoupled_decay_hand_computed() -> None:
    # after the optimizer: u ← u − lr·λ·θ = −0.1·0.5 − 0.1·0.5·θ
    t = chain(sgd(0.1), add_decayed_weights(0.5, lr=0.1))
    params = {"w": torch.tensor([[1.0, -2.0]])}
    updates, _ = t.update({"w": torch.tensor([[0.5, 0.5]])}, t.init(params), params)
    torch.testing.assert_close(updates["w"], torch.tensor([[-0.1, 0.05]]))


def test_l2_init_hand_computed() -> None:
    # g ← g + λ(θ − θ₀) with θ₀ the parameters at init (a copy, not a view)
    t = chain(add_l2_init(0.5), sgd(1.0))
    params = {"w": torch.tensor([[1.0, -2.0]])}
    state = t.init(params)
    params["w"] += torch.tensor([[2.0, 4.0]])  # θ = [3, 2], θ₀ = [1, -2]
    updates, state = t.update({"w": torch.tensor([[0.1, 0.0]])}, state, params)
    torch.testing.assert_close(updates["w"], torch.tensor([[-(0.1 + 1.0), -2.0]]))


def test_l2_init_at_init_is_plain_gradient() -> None:
    t = add_l2_init(0.3)
    params = {"w": torch.randn(2, 3)}
    grads = {"w": torch.randn(2, 3)}
    updates, _ = t.update(grads, t.init(params), params)
    torch.testing.assert_close(updates["w"], grads["w"])
