"""Shrink-and-perturb and shrink-toward-init: shrink factor, noise statistics, replicas."""

from __future__ import annotations

import pytest
import torch

from contlearn.learners import chain, sgd, shrink_perturb, shrink_toward_init
from contlearn.learners.base import GradientTransformation
from contlearn.seeding import torch_generator


def _params(R: int, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "hidden1.weight": torch.randn(R, 50, 40, generator=gen),
        "hidden1.bias": torch.randn(R, 50, generator=gen),
        "output.weight": torch.randn(R, 3, 50, generator=gen),
        "output.bias": torch.randn(R, 3, generator=gen),
    }


def _step(t: GradientTransformation, state, params, grads):
    updates, state = t.update(grads, state, params)
    for k in params:
        params[k] += updates[k]
    return state


def test_shrink_factor_without_noise() -> None:
    lr, lam = 0.1, 0.01
    params = _params(2)
    grads = {k: torch.randn_like(v) for k, v in params.items()}
    expected = {k: (1 - lam) * (v - lr * grads[k]) for k, v in params.items()}
    t = chain(sgd(lr), shrink_perturb(lam, 0.0, [0, 1]))
    _step(t, t.init(params), params, grads)
    for k in params:
        torch.testing.assert_close(params[k], expected[k])


def test_noise_statistics() -> None:
    sigma, steps = 0.1, 4
    params = _params(2)
    start = {k: v.clone() for k, v in params.items()}
    t = shrink_perturb(0.0, sigma, [0, 1])
    state = t.init(params)
    zeros = {k: torch.zeros_like(v) for k, v in params.items()}
    deltas = []
    for _ in range(steps):
        before = {k: v.clone() for k, v in params.items()}
        state = _step(t, state, params, zeros)
        deltas.append(torch.cat([(params[k] - before[k]).reshape(2, -1) for k in params], 1))
    noise = torch.stack(deltas)  # (steps, R, n)
    assert (noise != 0).all(), "every weight and bias is perturbed every step"
    n = noise.numel()
    assert abs(noise.mean().item()) < 4 * sigma / n**0.5
    assert abs(noise.std().item() / sigma - 1) < 0.03
    # fresh each step and independent across replicas
    assert abs(torch.corrcoef(noise[:2, 0])[0, 1].item()) < 0.05
    assert abs(torch.corrcoef(noise[0])[0, 1].item()) < 0.05
    total = torch.cat([(params[k] - start[k]).reshape(2, -1) for k in params], 1)
    torch.testing.assert_close(total, noise.sum(0), rtol=1e-4, atol=1e-5)


def test_shrink_and_noise_combined() -> None:
    lam, sigma = 0.2, 0.05
    params = _params(1)
    start = {k: v.clone() for k, v in params.items()}
    t = shrink_perturb(lam, sigma, [3])
    zeros = {k: torch.zeros_like(v) for k, v in params.items()}
    _step(t, t.init(params), params, zeros)
    eps = torch.cat([((params[k] - (1 - lam) * start[k]) / sigma).reshape(-1) for k in params])
    assert abs(eps.std().item() - 1) < 0.06 and abs(eps.mean().item()) < 0.1


def test_noise_per_replica_equals_solo_runs() -> None:
    batched = _params(3)
    solo = [{k: v[r : r + 1].clone() for k, v in batched.items()} for r in range(3)]
    seeds = [5, 9, 11]
    t = shrink_perturb(0.01, 0.1, seeds)
    state = t.init(batched)
    zeros = {k: torch.zeros_like(v) for k, v in batched.items()}
    for _ in range(3):
        state = _step(t, state, batched, zeros)
    for r, p in enumerate(solo):
        ts = shrink_perturb(0.01, 0.1, [seeds[r]])
        s = ts.init(p)
        for _ in range(3):
            s = _step(ts, s, p, {k: torch.zeros_like(v) for k, v in p.items()})
        for k in p:
            torch.testing.assert_close(p[k][0], batched[k][r])


def test_noise_stream_differs_from_reset_stream() -> None:
    """S&P draws from its own stream, not the one CBP/ReDo use for fresh weights."""
    params = {"w": torch.zeros(1, 100)}
    t = shrink_perturb(0.0, 1.0, [0])
    _step(t, t.init(params), params, {"w": torch.zeros(1, 100)})
    reset_stream = torch.randn(100, generator=torch_generator(0, "learner"))
    assert not torch.allclose(params["w"][0], reset_stream)


def test_shrink_toward_init_every_step() -> None:
    lam, lr = 0.9, 0.1
    params = _params(2)
    theta0 = {k: v.clone() for k, v in params.items()}
    t = chain(sgd(lr), shrink_toward_init(lam))
    state = t.init(params)
    for _ in range(3):
        grads = {k: torch.randn_like(v) for k, v in params.items()}
        expected = {k: lam * (params[k] - lr * grads[k]) + (1 - lam) * theta0[k] for k in params}
        state = _step(t, state, params, grads)
        for k in params:
            torch.testing.assert_close(params[k], expected[k])


@pytest.mark.parametrize("period", [2, 3])
def test_shrink_toward_init_period(period: int) -> None:
    lam = 0.5
    params = {"w": torch.ones(1, 4)}
    t = shrink_toward_init(lam, period)
    state = t.init(params)  # θ₀ = 1
    params["w"].fill_(3.0)
    for step in range(1, 2 * period + 1):
        state = _step(t, state, params, {"w": torch.zeros(1, 4)})
        shrinks = step // period
        expected = 1.0 + 2.0 * lam**shrinks
        torch.testing.assert_close(params["w"], torch.full((1, 4), expected))


def test_shrink_toward_init_rejects_bad_period() -> None:
    with pytest.raises(ValueError, match="period"):
        shrink_toward_init(0.5, 0)


def test_update_adds_the_definitions_noise_and_counts_updates() -> None:
    """θ ← (1 − λ)θ' + σ ε[r, t, p, e], ε from the counter-based definition (philox.py)."""
    from contlearn.learners import philox

    lam, sigma, seeds = 0.1, 0.5, [3, 4]
    params = _params(2)
    t = shrink_perturb(lam, sigma, seeds)
    state = t.init(params)
    keys = philox.replica_keys(seeds, 1)
    assert torch.equal(state.key, torch.from_numpy(keys)) and int(state.count) == 0
    for step in range(3):
        before = {k: v.clone() for k, v in params.items()}
        state = _step(t, state, params, {k: torch.zeros_like(v) for k, v in params.items()})
        for p, (k, v) in enumerate(before.items()):
            eps = torch.from_numpy(philox.snp_normals(keys, step, p, v[0].numel()))
            torch.testing.assert_close(params[k], (1 - lam) * v + sigma * eps.reshape(v.shape))
    assert int(state.count) == 3


def test_fused_post_adds_the_same_noise_as_the_update() -> None:
    params = _params(3)
    t = shrink_perturb(0.0, 0.3, [1, 2, 3])
    plan = t.fused
    assert plan is not None and plan.post is not None and plan.noise is not None
    ref, fused = (
        {k: v.clone() for k, v in params.items()},
        {k: v.clone() for k, v in params.items()},
    )
    s_ref, s_fused = t.init(ref), t.init(fused)
    for _ in range(2):
        s_ref = _step(t, s_ref, ref, {k: torch.zeros_like(v) for k, v in ref.items()})
        s_fused = plan.post(s_fused, fused)
    for k in params:
        torch.testing.assert_close(fused[k], ref[k])  # (θ + (u − λθ' + σε) vs θ + σε)
    assert int(s_ref.count) == int(s_fused.count) == 2


def test_a_checkpoint_of_the_old_generator_state_layout_fails_in_one_clear_line() -> None:
    from contlearn.state import load_tree, tree_leaves

    t = chain(sgd(0.1), shrink_perturb(0.01, 0.1, [0, 1]))
    state = t.init(_params(2))
    old = [torch.zeros(2, 5056, dtype=torch.uint8)]  # (R, S) torch generator states
    with pytest.raises(ValueError, match="older contlearn") as err:
        load_tree(state, old)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="older contlearn"):  # other layout
        load_tree(state, [torch.zeros(2, 2, dtype=torch.uint8), torch.zeros((), dtype=torch.int64)])
    # the first counter-based noise (Philox words and a double Box–Muller): key and count only,
    # no version; its noise is not this one's, so it must not resume
    first = [torch.zeros(2, 2, dtype=torch.int64), torch.zeros((), dtype=torch.int64)]
    with pytest.raises(ValueError, match="noise definition's version"):
        load_tree(state, first)
    load_tree(state, [t.clone() for t in tree_leaves(state)])  # (its own layout loads)


def test_the_noise_form_composes_as_a_chains_only_post() -> None:
    """L2 and SGD before S&P keep its kernel form (the block loop takes it); CBP over it, a
    second post, does not (that runs the fused path's posts in Python)."""
    from contlearn.learners import add_l2
    from contlearn.learners.fused import fused_plan

    params = _params(2)
    t = chain(add_l2(1e-3), sgd(0.1), shrink_perturb(0.01, 0.2, [0, 1]))
    plan = fused_plan(t)
    assert plan is not None and plan.noise is not None and plan.noise.sigma == 0.2
    state = t.init(params)
    assert plan.noise.state(state) is state.inner[2]
    assert plan.grad_scale == pytest.approx(-0.1 * 0.99)
    two_posts = chain(sgd(0.1), shrink_perturb(0.01, 0.2, [0, 1]), shrink_perturb(0, 0.1, [0, 1]))
    plan2 = fused_plan(two_posts)
    assert plan2 is not None and plan2.post is not None and plan2.noise is None
