"""The toolkit learners (contlearn/learners/toolkit.py) against independent implementations:
weight clipping against a clamp with bounds computed by hand, UPGD against a per-replica loop
written as the authors' optimizer step, Parseval against autograd of its penalty."""

from __future__ import annotations

import math

import pytest
import torch

from contlearn.agents.networks import BatchedMLP
from contlearn.learners import Learner, build_learner, learner_def
from contlearn.learners.base import chain
from contlearn.learners.optim import sgd
from contlearn.learners.toolkit import add_parseval, clip_weights, upgd
from contlearn.spec import build_spec


def _net(init: str = "kaiming_uniform", R: int = 2) -> BatchedMLP:
    gens = [torch.Generator().manual_seed(s) for s in range(R)]
    return BatchedMLP(5, [4, 3], 2, "relu", init, gens)


def _grads(params: dict, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) for k, v in params.items()}


@pytest.mark.parametrize("init", ["kaiming_uniform", "torch_default"])
def test_weight_clipping_clamps_to_kappa_times_the_init_bound(init: str) -> None:
    net, kappa, lr = _net(init), 0.7, 0.5
    t = chain(sgd(lr), clip_weights(net, kappa))
    params = {k: v.clone() for k, v in net.params.items()}
    state = t.init(params)
    for step in range(3):
        grads = _grads(params, step)
        updates, state = t.update(grads, state, params)
        for name, fan_in in (("hidden1", 5), ("hidden2", 4), ("output", 3)):
            gain = math.sqrt(2.0) if name != "output" else 1.0
            w_bound = (
                gain * math.sqrt(3 / fan_in) if init == "kaiming_uniform" else 1 / math.sqrt(fan_in)
            )
            b_bound = 1 / math.sqrt(fan_in)
            for k, bound in ((f"{name}.weight", w_bound), (f"{name}.bias", b_bound)):
                want = (params[k] - lr * grads[k]).clamp(-kappa * bound, kappa * bound)
                torch.testing.assert_close(params[k] + updates[k], want)
        params = {k: params[k] + updates[k] for k in params}


def _upgd_loop(theta: list, grads_seq: list, lr: float, beta: float, wd: float) -> list:
    """One replica, the authors' first-order global UPGD step (σ = 0) over parameter lists."""
    avg = [torch.zeros_like(p) for p in theta]
    theta = [p.clone() for p in theta]
    for t, grads in enumerate(grads_seq, start=1):
        top = -math.inf
        for a, g, p in zip(avg, grads, theta, strict=True):
            a.mul_(beta).add_(-g * p, alpha=1 - beta)
            top = max(top, float(a.max()))
        corr = 1 - beta**t
        for a, g, p in zip(avg, grads, theta, strict=True):
            u = torch.sigmoid((a / corr) / top)
            p.mul_(1 - lr * wd).add_(g * (1 - u), alpha=-lr)
    return theta


def test_upgd_with_sgd_is_the_authors_update() -> None:
    net, lr, beta, wd = _net(), 0.1, 0.9, 0.01
    t = chain(upgd([0, 1], beta, 0.0, wd), sgd(lr))
    params = {k: v.clone() for k, v in net.params.items()}
    start = {k: v.clone() for k, v in params.items()}
    state = t.init(params)
    seq = []
    for step in range(5):
        grads = _grads(params, step)
        seq.append(grads)
        updates, state = t.update(grads, state, params)
        params = {k: params[k] + updates[k] for k in params}
    keys = list(params)
    for r in range(2):
        want = _upgd_loop(
            [start[k][r] for k in keys], [[g[k][r] for k in keys] for g in seq], lr, beta, wd
        )
        for k, w in zip(keys, want, strict=True):
            torch.testing.assert_close(params[k][r], w, rtol=1e-5, atol=1e-6)


def test_upgd_noise_is_gated_and_per_replica() -> None:
    net = _net(R=2)
    params = {k: v.clone() for k, v in net.params.items()}
    zero = {k: torch.zeros_like(v) for k, v in params.items()}
    t = upgd([0, 1], 0.0, 1.0, 0.0)
    out, _ = t.update(zero, t.init(params), params)  # utility 0 everywhere: gate 1 − σ(0) = ½
    noise = torch.cat([v.reshape(2, -1) for v in out.values()], 1) * 2
    assert abs(float(noise.std()) - 1.0) < 0.3 and not torch.equal(noise[0], noise[1])
    alone = upgd([1], 0.0, 1.0, 0.0)
    p1 = {k: v[1:].clone() for k, v in params.items()}
    out1, _ = alone.update({k: v[1:] for k, v in zero.items()}, alone.init(p1), p1)
    for k in out:
        torch.testing.assert_close(out[k][1:], out1[k])


def test_parseval_adds_the_penalty_gradient_of_the_hidden_layers() -> None:
    net, lam, s = _net(), 0.05, 0.8
    params = {k: v.clone() for k, v in net.params.items()}
    grads = _grads(params, 0)
    out, _ = add_parseval(net, lam, s).update(grads, None, params)
    for k in params:
        if k in ("hidden1.weight", "hidden2.weight"):
            w = params[k].clone().requires_grad_(True)
            eye = torch.eye(w.shape[1])
            penalty = lam * ((w @ w.transpose(1, 2) - s * eye) ** 2).sum()
            (auto,) = torch.autograd.grad(penalty, [w])
            torch.testing.assert_close(out[k], grads[k] + auto, rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(out[k], grads[k])


@pytest.mark.parametrize("name", ["weight-clipping", "upgd", "parseval", "swr"])
def test_the_presets_build_on_the_online_and_ppo_networks(name: str) -> None:
    from contlearn.agents.actor_critic import ActorCritic

    spec = build_spec(learner_def(name).Spec, {}, "learner.")
    gens = [torch.Generator().manual_seed(0)]
    for net in (_net(R=1), ActorCritic(3, 2, [4], "tanh", "kaiming_uniform", gens, 0.0)):
        t = build_learner(Learner(name, spec), sgd(0.1), net, [0])
        params = {k: v.clone() for k, v in net.params.items()}
        updates, _ = t.update(_grads(params, 1), t.init(params), params)
        assert set(updates) == set(params)


@pytest.mark.mujoco
@pytest.mark.parametrize("name", ["weight-clipping", "upgd", "parseval", "swr"])
def test_the_presets_run_on_slippery_ant(name: str, tmp_path) -> None:
    import contlearn

    contlearn.run(
        "slippery-ant",
        learner=name,
        seeds=1,
        steps=2048,
        config={"hidden": "8,8"},
        out=tmp_path / "run",
        progress=False,
    )
    df = contlearn.load_runs([tmp_path / "run"])
    assert len(df) and df["value"].notna().any()


def test_regrama_recycles_the_units_a_per_unit_gradient_loop_picks() -> None:
    from contlearn.learners.redo import redo

    net, lr, tau = _net(), 0.1, 0.6
    t = redo(sgd(lr), net, [0, 1], threshold=tau, period=3, window=2, score="gradient")
    params = {k: v.clone() for k, v in net.params.items()}
    state = t.init(params)
    feats = {"hidden1": torch.ones(2, 1, 4), "hidden2": torch.ones(2, 1, 3)}
    seq = []
    g = torch.Generator().manual_seed(5)
    for _ in range(3):
        grads = {k: torch.randn(v.shape, generator=g) for k, v in params.items()}
        grads["hidden1.weight"][0, 2] *= 0.01  # unit 2 of replica 0 barely gets a gradient
        grads["hidden2.weight"][1, 0] *= 0.01
        seq.append(grads)
        before = {k: v.clone() for k, v in params.items()}
        updates, state = t.update(
            {k: v.clone() for k, v in grads.items()}, state, params, features=feats
        )
        params = {k: params[k] + updates[k] for k in params}
    resets: dict[tuple[str, int], set[int]] = {}
    for name, H in (("hidden1", 4), ("hidden2", 3)):
        for r in range(2):
            mags = [
                sum(float(seq[s][f"{name}.weight"][r, i].abs().mean()) for s in (1, 2)) / 2
                for i in range(H)
            ]
            mean = sum(mags) / H
            resets[name, r] = {i for i in range(H) if mags[i] / mean <= tau}
            # columns zeroed by resets of the layer below are not this layer's to check
            cols = [j for j in range(4 if name == "hidden2" else 5)]
            if name == "hidden2":
                cols = [j for j in cols if j not in resets["hidden1", r]]
            for i in range(H):
                plain = before[f"{name}.weight"][r, i] - lr * seq[2][f"{name}.weight"][r, i]
                same = torch.allclose(params[f"{name}.weight"][r, i, cols], plain[cols])
                assert same != (i in resets[name, r]), (name, r, i, mags[i] / mean)
    assert not torch.allclose(
        params["hidden1.weight"][0, 2],
        before["hidden1.weight"][0, 2] - lr * seq[2]["hidden1.weight"][0, 2],
    )


@pytest.mark.parametrize("utility", ["gradient", "magnitude"])
def test_swr_threshold_reinitialises_exactly_the_low_utility_weights(utility: str) -> None:
    from contlearn.learners.base import per_param_state
    from contlearn.learners.toolkit import selective_reinit

    net, lr, rho = _net("torch_default"), 0.1, 0.3
    t = selective_reinit(
        sgd(lr, momentum=0.9), net, [0, 1], utility=utility, method="threshold", rate=rho
    )
    params = {k: v.clone() for k, v in net.params.items()}
    state = t.init(params)
    fan_in = {"hidden1": 5, "hidden2": 4, "output": 3}
    buffers = {k: torch.zeros_like(v) for k, v in params.items()}  # the loop's momentum
    total = 0
    for step in range(2):
        grads = _grads(params, step)
        before = {k: v.clone() for k, v in params.items()}  # (a reset writes θ + u in place)
        updates, state = t.update(grads, state, params)
        new = {k: params[k] + updates[k] for k in params}
        momentum = per_param_state(state.inner, params)[0]
        for k in params:
            bound = 1 / math.sqrt(fan_in[k.split(".")[0]])
            buffers[k] = 0.9 * buffers[k] + grads[k] if step else grads[k].clone()
            plain = before[k] - lr * buffers[k]
            u = (grads[k] * plain).abs() if utility == "gradient" else plain.abs()
            for r in range(2):
                pick = u[r] <= rho * u[r].mean()
                total += int(pick.sum())
                torch.testing.assert_close(new[k][r][~pick], plain[r][~pick])
                assert torch.all(new[k][r][pick].abs() <= bound)
                assert torch.all(momentum[k][r][pick] == 0)
                buffers[k][r][pick] = 0  # the reset clears those entries' momentum
        assert int(state.replaced.sum()) == total
        params = new
    assert total > 0


def test_swr_proportional_takes_the_lowest_utility_fraction() -> None:
    from contlearn.learners.toolkit import selective_reinit

    net, rho = _net(), 0.25
    t = selective_reinit(
        sgd(0.0), net, [0, 1], utility="magnitude", method="proportional", rate=rho
    )
    params = {k: v.clone() for k, v in net.params.items()}
    old = {k: v.clone() for k, v in params.items()}
    updates, state = t.update(_grads(params, 0), t.init(params), params)
    new = {k: params[k] + updates[k] for k in params}
    for k in ("hidden1.weight", "hidden2.weight", "output.weight"):
        for r in range(2):
            changed = new[k][r] != old[k][r]
            n = old[k][r].numel()
            assert int(changed.sum()) in (int(n * rho), int(n * rho) + 1)
            if changed.any():  # every changed weight had a utility no higher than any kept one
                assert float(old[k][r][changed].abs().max()) <= float(
                    old[k][r][~changed].abs().min()
                )
