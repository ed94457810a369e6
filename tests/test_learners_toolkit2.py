"""The learners of contlearn/learners/toolkit_resets.py against independent implementations:
spectral regularisation against autograd of its penalty at the exact largest singular value,
self-normalised resets against a per-unit loop, hare & tortoise against torch.optim.SGD with a
hand-kept EMA, plasticity injection against torch.optim.Adam on the three-copy head; and each
registered learner run on the streams, resumed exactly, listed."""

from __future__ import annotations

import json
import math
from functools import partial

import pandas as pd
import pytest
import torch

import contlearn
from contlearn.agents.networks import BatchedMLP
from contlearn.learners import Learner, build_learner, learner_def
from contlearn.learners.base import per_param_state
from contlearn.learners.optim import adam, sgd
from contlearn.learners.rng import draw, replica_rng_states
from contlearn.learners.toolkit_resets import (
    add_spectral,
    hare_tortoise,
    plasticity_injection,
    self_normalized_resets,
)
from contlearn.spec import build_spec

NAMES = ["spectral", "snr", "hare-tortoise", "plasticity-injection"]
#: options that make each learner act within a few hundred steps
FAST = {
    "spectral": {"learner.lam": 1e-2},
    "snr": {},
    "hare-tortoise": {"learner.period": 40, "learner.ema": 0.9},
    "plasticity-injection": {"learner.at": 50, "learner.every": 70, "optimizer": "adam"},
}


def _net(R: int = 2, init: str = "kaiming_uniform") -> BatchedMLP:
    gens = [torch.Generator().manual_seed(s) for s in range(R)]
    return BatchedMLP(5, [4, 3], 2, "relu", init, gens)


def _grads(params: dict, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) for k, v in params.items()}


def _params(net: BatchedMLP) -> dict:
    return {k: v.clone() for k, v in net.params.items()}


@pytest.mark.parametrize("power", [2.0, 1.0])
def test_spectral_converges_to_the_penalty_gradient_at_the_top_singular_value(power) -> None:
    net, lam = _net(), 0.03
    params = _params(net)
    t = add_spectral(net, [0, 1], lam, power)
    state = t.init(params)
    zero = {k: torch.zeros_like(v) for k, v in params.items()}
    for _ in range(300):  # power iteration on fixed weights converges
        out, state = t.update(zero, state, params)
    for layer in ("hidden1", "hidden2", "output"):
        w = params[f"{layer}.weight"].clone().requires_grad_(True)
        b = params[f"{layer}.bias"].clone().requires_grad_(True)
        wt = torch.cat([w, b.unsqueeze(2)], 2)
        sigma = torch.linalg.matrix_norm(wt, ord=2)  # (R,), exact
        penalty = lam * ((sigma**power - 1) ** 2).sum()
        gw, gb = torch.autograd.grad(penalty, [w, b])
        torch.testing.assert_close(out[f"{layer}.weight"], gw, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(out[f"{layer}.bias"], gb, rtol=1e-4, atol=1e-6)


def test_spectral_one_step_is_one_power_iteration_by_hand() -> None:
    net, lam = _net(R=1), 0.1
    params = _params(net)
    t = add_spectral(net, [0], lam)
    state = t.init(params)
    v0 = state.v["output"][0].clone()
    grads = _grads(params, 3)
    out, state = t.update(grads, state, params)
    wt = torch.cat([params["output.weight"][0], params["output.bias"][0].unsqueeze(1)], 1)
    u = wt @ v0
    u = u / u.norm()
    v = wt.T @ u
    sigma = float(v.norm())
    v = v / sigma
    term = 2 * lam * 2 * (sigma**2 - 1) * sigma * torch.outer(u, v)
    torch.testing.assert_close(out["output.weight"][0], grads["output.weight"][0] + term[:, :-1])
    torch.testing.assert_close(out["output.bias"][0], grads["output.bias"][0] + term[:, -1])


def _snr_loop(feats: list[dict], eta: float, R: int, widths: dict) -> dict:
    """Per replica, layer and unit, plain Python: which steps reset the unit."""
    resets: dict = {}
    for name, H in widths.items():
        for r in range(R):
            for i in range(H):
                idle = fired = lived = 0
                for step, f in enumerate(feats):
                    h = f[name][r, :, i]
                    batch = len(h)
                    if bool((h > 0).any()):
                        fired += int((h > 0).sum())
                        lived += idle + batch
                        idle = 0
                    else:
                        idle += batch
                    rate = (fired + 1) / (lived + 2)
                    if idle > 0 and (1 - rate) ** idle <= eta:
                        resets.setdefault((name, r, i), []).append(step)
                        idle = fired = lived = 0
    return resets


@pytest.mark.parametrize("batch", [1, 3])
def test_snr_resets_the_units_a_per_unit_loop_picks(batch: int) -> None:
    net, eta, R = _net(init="torch_default"), 0.05, 2  # biases ≠ 0: a reset shows in b_l[i]
    t = self_normalized_resets(sgd(0.0, momentum=0.9), net, [0, 1], eta)
    params = _params(net)
    state = t.init(params)
    g = torch.Generator().manual_seed(7)
    feats = []
    for step in range(40):
        f = {
            "hidden1": torch.randn(R, batch, 4, generator=g),
            "hidden2": torch.randn(R, batch, 3, generator=g),
        }
        f["hidden1"][0, :, 1] = -1.0  # never fires
        if step > 10:
            f["hidden2"][1, :, 2] = -1.0  # stops firing
        feats.append(f)
    want = _snr_loop(feats, eta, R, {"hidden1": 4, "hidden2": 3})
    got: dict = {}
    for step, f in enumerate(feats):
        before = {k: v.clone() for k, v in params.items()}
        updates, state = t.update(_grads(params, step), state, params, features=f)
        params = {k: params[k] + updates[k] for k in params}
        momentum = per_param_state(state.inner, params)[0]
        now = {  # only a reset zeroes all three counts
            (name, r, i)
            for name, H in (("hidden1", 4), ("hidden2", 3))
            for r in range(R)
            for i in range(H)
            if all(
                int(c[r, i]) == 0 for c in (state.idle[name], state.fired[name], state.lived[name])
            )
        }
        for name, r, i in sorted(now):
            got.setdefault((name, r, i), []).append(step)
            w, b = f"{name}.weight", f"{name}.bias"
            assert float(params[b][r, i]) == 0.0
            assert torch.all(momentum[w][r, i] == 0)
            nxt = "hidden2" if name == "hidden1" else "output"
            kept = [k for k in range(params[f"{nxt}.bias"].shape[1]) if (nxt, r, k) not in now]
            assert torch.all(params[f"{nxt}.weight"][r, kept, i] == 0)  # outgoing weights
            if len(got[name, r, i]) == 1:  # fresh incoming weights
                assert not torch.equal(params[w][r, i], before[w][r, i])
    assert got == want
    assert want[("hidden1", 0, 1)][0] == math.ceil(math.log(eta) / math.log(0.5) / batch) - 1
    assert ("hidden2", 1, 2) in want
    total = sum(len(v) for v in want.values())
    assert int(sum(v.sum() for v in state.replacements.values())) == total


def test_snr_replicas_draw_only_from_their_own_seed() -> None:
    net = _net()
    feats = {"hidden1": -torch.ones(2, 1, 4), "hidden2": torch.ones(2, 1, 3)}
    both = self_normalized_resets(sgd(0.1), net, [0, 1], 0.3)
    p2 = _params(net)
    s2 = both.init(p2)
    alone = self_normalized_resets(sgd(0.1), net, [1], 0.3)
    p1 = {k: v[1:].clone() for k, v in net.params.items()}
    s1 = alone.init(p1)
    for step in range(4):
        grads = _grads(p2, step)
        u2, s2 = both.update(grads, s2, p2, features=feats)
        u1, s1 = alone.update(
            {k: v[1:] for k, v in grads.items()},
            s1,
            p1,
            features={k: v[1:] for k, v in feats.items()},
        )
        p2 = {k: p2[k] + u2[k] for k in p2}
        p1 = {k: p1[k] + u1[k] for k in p1}
    for k in p1:
        torch.testing.assert_close(p2[k][1:], p1[k])
    assert int(s2.replacements["hidden1"][0]) > 0


def test_hare_tortoise_is_sgd_with_an_ema_and_periodic_copies() -> None:
    net, lr, ema, period = _net(), 0.1, 0.8, 3
    t = hare_tortoise(sgd(lr, momentum=0.9), ema, period)
    params = _params(net)
    state = t.init(params)
    hare = [torch.nn.Parameter(v.clone()) for v in params.values()]
    opt = torch.optim.SGD(hare, lr=lr, momentum=0.9)
    slow = [v.clone() for v in params.values()]
    for step in range(1, 8):
        grads = _grads(params, step)
        updates, state = t.update(grads, state, params)
        params = {k: params[k] + updates[k] for k in params}
        for p, g in zip(hare, grads.values(), strict=True):
            p.grad = g.clone()
        opt.step()
        with torch.no_grad():
            for s, p in zip(slow, hare, strict=True):
                s.mul_(ema).add_(p, alpha=1 - ema)
            if step % period == 0:
                for s, p in zip(slow, hare, strict=True):
                    p.copy_(s)  # the optimizer's momentum is kept, as in the authors' code
        for k, p in zip(params, hare, strict=True):
            torch.testing.assert_close(params[k], p.detach(), rtol=1e-5, atol=1e-6)
    assert int(state.resets[0]) == 2


def test_plasticity_injection_under_plain_sgd_changes_nothing() -> None:
    net = _net()
    t = plasticity_injection(sgd(0.1), net, [0, 1], at=2, every=2)
    plain = sgd(0.1)
    p, q = _params(net), _params(net)
    s, sp = t.init(p), plain.init(q)
    for step in range(7):
        grads = _grads(p, step)
        u, s = t.update(grads, s, p)
        v, sp = plain.update(grads, sp, q)
        p = {k: p[k] + u[k] for k in p}
        q = {k: q[k] + v[k] for k in q}
    assert int(s.injections[0]) == 3
    for k in p:
        torch.testing.assert_close(p[k], q[k], rtol=1e-5, atol=1e-6)


def test_plasticity_injection_trains_a_fresh_head_copy_with_its_own_adam() -> None:
    net, lr, at = _net(R=1), 0.05, 3
    t = plasticity_injection(adam(lr, 0.9, 0.999, 1e-8), net, [0], at=at)
    params = _params(net)
    state = t.init(params)
    # the reference: every parameter under torch's Adam; at the injection, the head becomes
    # W_frozen + W'₁ − W'₂ with W'₁ a new parameter (its own Adam) and W'₂ = W'₁ frozen
    theta = {k: torch.nn.Parameter(v.clone()) for k, v in params.items()}
    head = ("output.weight", "output.bias")
    opt = torch.optim.Adam([theta[k] for k in theta if k not in head], lr=lr)  # per parameter:
    head_opt = torch.optim.Adam([theta[k] for k in head], lr=lr)  # the same as one Adam
    frozen: dict = {}
    rng = replica_rng_states([0], 5)
    for step in range(1, 8):
        grads = _grads(params, step)
        updates, state = t.update(grads, state, params)
        params = {k: params[k] + updates[k] for k in params}
        for k, p in theta.items():
            p.grad = grads[k].clone()
        opt.step()
        head_opt.step()
        if step == at:  # inject: output unchanged, the head's trained copy fresh
            fw, fb = draw(rng, 0, partial(net.sample_init, "output", 2))
            with torch.no_grad():
                for k, fresh in (("output.weight", fw), ("output.bias", fb)):
                    frozen[k] = theta[k].detach().clone() - fresh.unsqueeze(0)  # W_frozen − W'₂
                    theta[k] = torch.nn.Parameter(fresh.unsqueeze(0).clone())  # W'₁
            head_opt = torch.optim.Adam([theta[k] for k in head], lr=lr)
        for k, p in theta.items():
            want = p.detach() + frozen.get(k, 0.0)
            torch.testing.assert_close(params[k], want, rtol=1e-4, atol=1e-5)
    assert int(state.injections[0]) == 1


@pytest.mark.parametrize("name", NAMES)
def test_the_presets_build_on_the_online_and_ppo_networks(name: str) -> None:
    from contlearn.agents.actor_critic import ActorCritic

    spec = build_spec(learner_def(name).Spec, {}, "learner.")
    gens = [torch.Generator().manual_seed(0)]
    for net in (_net(R=1), ActorCritic(3, 2, [4], "tanh", "kaiming_uniform", gens, 0.0)):
        t = build_learner(Learner(name, spec), sgd(0.1), net, [0])
        params = {k: v.clone() for k, v in net.params.items()}
        feats = {layer.name: torch.randn(1, 2, layer.fan_out) for layer in net.hidden_layers}
        updates, _ = t.update(_grads(params, 1), t.init(params), params, features=feats)
        assert set(updates) == set(params)


@pytest.mark.parametrize("stream", ["permuted-mnist", "bit-flipping"])
@pytest.mark.parametrize("name", NAMES)
def test_the_learners_run_on_the_streams_on_the_reference_path(name, stream, tmp_path) -> None:
    config = {"examples_per_task": 120, "hidden": "10,10", "probe_size": 32, **FAST[name]}
    contlearn.run(stream, learner=name, seeds=2, tasks=2, config=config, out=tmp_path / "r")
    df = contlearn.load_runs([tmp_path / "r"])
    assert len(df) and df["value"].notna().all()
    # no fused form is declared: the fast fused/block paths refuse, the hand-written
    # backward hands its gradients to learner.update (checked against the reference in
    # tests/test_backends.py)
    assert json.loads((tmp_path / "r" / "meta.json").read_text())["backend"] == "backward"
    acted = {
        "snr": "replacements",
        "hare-tortoise": "hare_resets",
        "plasticity-injection": "injections",
    }
    if name in acted:
        assert df[df["metric"] == acted[name]]["value"].max() > 0


@pytest.mark.mujoco
@pytest.mark.parametrize("name", NAMES)
def test_the_learners_run_on_slippery_ant(name: str, tmp_path) -> None:
    extra = {k: v for k, v in FAST[name].items() if k != "optimizer"}
    contlearn.run(
        "slippery-ant",
        learner=name,
        seeds=1,
        steps=2048,
        config={"hidden": "8,8", **extra},
        out=tmp_path / "run",
        progress=False,
    )
    df = contlearn.load_runs([tmp_path / "run"])
    assert len(df) and df["value"].notna().any()


def _frame(path) -> pd.DataFrame:
    df = contlearn.load_runs(path).drop(columns=["run"])
    return df.sort_values(["seed", "step", "metric", "layer"]).reset_index(drop=True)


@pytest.mark.parametrize("name", NAMES)
def test_resume_equals_uninterrupted(name: str, tmp_path) -> None:
    base = {"examples_per_task": 150, "hidden": "10,10", "probe_size": 32, "checkpoint_every": 40}
    config = {**base, **FAST[name]}
    full = contlearn.run(
        "permuted-mnist", learner=name, seeds=2, tasks=4, config=config, out=tmp_path / "full"
    )
    part = tmp_path / "part"
    contlearn.run("permuted-mnist", learner=name, seeds=2, steps=213, config=config, out=part)
    contlearn.resume(part, tasks=4)
    pd.testing.assert_frame_equal(_frame(part), _frame(full.path))


def test_contlearn_list_learners_shows_each_with_one_line() -> None:
    import contextlib
    import io

    from contlearn.cli import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        main(["list", "learners"])
    lines = buf.getvalue().splitlines()
    for name in NAMES:
        (line,) = [ln for ln in lines if ln.strip().startswith(name + " ")]
        assert len(line.split(name, 1)[1].strip()) > 10


def test_plasticity_injection_is_refused_on_forward_forward(tmp_path) -> None:
    from contlearn.errors import ConfigError

    with pytest.raises(ConfigError, match="plasticity-injection does not apply to agent ff"):
        contlearn.run(
            "permuted-mnist",
            agent="ff",
            learner="plasticity-injection",
            tasks=1,
            config={"examples_per_task": 10},
            out=tmp_path / "r",
        )
