"""Plasticity injection of a multi-layer head (``learner.head_layers`` > 1,
contlearn/learners/head_injection.py on agents/injected_head.py) against an independent
per-replica torch.optim reference that builds the paper's three heads as separate modules; the
plain MLP's numbers to the bit before the injection, the output unchanged at it, resumes, and
every refusal."""

from __future__ import annotations

from functools import partial

import pandas as pd
import pytest
import torch

import contlearn
from contlearn.agents.injected_head import FROZEN, TRAINED, InjectedHeadMLP
from contlearn.agents.networks import BatchedMLP
from contlearn.errors import ConfigError
from contlearn.learners.head_injection import head_injection
from contlearn.learners.optim import adam, sgd
from contlearn.learners.rng import draw, replica_rng_states

HIDDEN, IN, OUT = [4, 3, 3], 5, 2


def _nets(R: int, head: int, act: str = "relu") -> tuple[InjectedHeadMLP, BatchedMLP]:
    gens = [torch.Generator().manual_seed(10 + s) for s in range(R)]
    plain_gens = [torch.Generator().manual_seed(10 + s) for s in range(R)]
    injected = InjectedHeadMLP(IN, HIDDEN, OUT, act, "kaiming_uniform", gens, head)
    return injected, BatchedMLP(IN, HIDDEN, OUT, act, "kaiming_uniform", plain_gens)


def _mlp(x: torch.Tensor, layers: list[tuple[torch.Tensor, torch.Tensor]], act) -> torch.Tensor:
    """A plain per-replica MLP: ``act`` after every layer but the last."""
    h = x
    for i, (w, b) in enumerate(layers):
        h = h @ w.T + b
        if i + 1 < len(layers):
            h = act(h)
    return h


@pytest.mark.parametrize("head", [2, 3, 4])
@pytest.mark.parametrize("opt", ["sgd", "adam"])
@pytest.mark.parametrize("act", ["relu", "tanh"])
def test_head_injection_against_three_heads_under_torch_optim(head, opt, act) -> None:
    R, lr, at, steps = 2, 0.05, 4, 9
    net, _ = _nets(R, head, act)
    inner = sgd(lr) if opt == "sgd" else adam(lr, 0.9, 0.999, 1e-8)
    t = head_injection(inner, net, list(range(R)), at=at)
    params = {k: v.clone() for k, v in net.params.items()}
    state = t.init(params)
    names = [layer.name for layer in net.layers]
    trunk, head_names = names[: len(names) - head], names[len(names) - head :]
    act_fn = torch.relu if act == "relu" else torch.tanh
    make = torch.optim.SGD if opt == "sgd" else partial(torch.optim.Adam, eps=1e-8)
    # the reference, replica by replica: the trunk and the head as separate parameters, each
    # under its own torch optimizer (per-parameter, so the same as one); at the injection the
    # head is frozen and a fresh copy W'1 (trained, a new optimizer) and W'2 = W'1 (frozen) join
    ref = []
    rng = replica_rng_states(list(range(R)), 5)
    for r in range(R):
        own = {
            n: [torch.nn.Parameter(net.params[f"{n}.{p}"][r].clone()) for p in ("weight", "bias")]
            for n in names
        }
        ref.append(
            {
                "own": own,
                "trunk_opt": make([p for n in trunk for p in own[n]], lr=lr) if trunk else None,
                "head_opt": make([p for n in head_names for p in own[n]], lr=lr),
                "new": None,
            }
        )
    g = torch.Generator().manual_seed(3)
    for step in range(1, steps + 1):
        x = torch.randn(R, 6, IN, generator=g)
        y = torch.randn(R, 6, OUT, generator=g)
        live = {k: v.clone().requires_grad_(True) for k, v in params.items()}
        out, _ = net.forward(x, live)
        loss = (out - y).pow(2).sum(-1).mean(1).sum()
        grads = dict(zip(live, torch.autograd.grad(loss, list(live.values())), strict=True))
        updates, state = t.update(grads, state, params)
        params = {k: params[k] + updates[k] for k in params}
        for r, m in enumerate(ref):
            own = m["own"]
            layers = [(w, b) for n in names for w, b in [own[n]]]
            trunk_out = x[r]
            for n in trunk:
                trunk_out = act_fn(trunk_out @ own[n][0].T + own[n][1])
            head_layers = [tuple(own[n]) for n in head_names]
            if m["new"] is None:
                pred = _mlp(x[r], layers, act_fn)
            else:
                pred = _mlp(trunk_out, head_layers, act_fn) + (
                    _mlp(trunk_out, m["new"], act_fn) - _mlp(trunk_out, m["frozen"], act_fn)
                )
            for o in (m["trunk_opt"], m["head_opt"], m.get("new_opt")):
                if o is not None:
                    o.zero_grad()
            (pred - y[r]).pow(2).sum(-1).mean().backward()
            if m["trunk_opt"] is not None:
                m["trunk_opt"].step()
            if m["new"] is None:
                m["head_opt"].step()
            else:
                m["new_opt"].step()
            if step == at:
                fresh = []
                for n in head_names:
                    rows = net.params[f"{n}.weight"].shape[1]
                    fresh.append(draw(rng, r, partial(net.sample_init, n, rows)))
                m["new"] = [
                    (torch.nn.Parameter(w.clone()), torch.nn.Parameter(b.clone())) for w, b in fresh
                ]
                m["frozen"] = [(w.clone(), b.clone()) for w, b in fresh]
                m["new_opt"] = make([p for pair in m["new"] for p in pair], lr=lr)
        for r, m in enumerate(ref):
            for n in names:
                for p, want in zip(("weight", "bias"), m["own"][n], strict=True):
                    torch.testing.assert_close(params[f"{n}.{p}"][r], want.detach())
            if m["new"] is not None:
                for i, n in enumerate(head_names):
                    for j, p in enumerate(("weight", "bias")):
                        got_t, got_f = params[f"{TRAINED}{n}.{p}"][r], params[f"{FROZEN}{n}.{p}"][r]
                        torch.testing.assert_close(got_t, m["new"][i][j].detach())
                        torch.testing.assert_close(got_f, m["frozen"][i][j])
        if step == at:  # the output is unchanged by the injection, to the bit
            probe = torch.randn(R, 7, IN, generator=g)
            own = {k: v for k, v in params.items() if not k.startswith(("inject",))}
            plain = BatchedMLP(IN, HIDDEN, OUT, act, "kaiming_uniform", [torch.Generator()] * R)
            assert torch.equal(net.forward(probe, params)[0], plain.forward(probe, own)[0])
            assert params[f"{TRAINED}output.weight"].abs().sum() > 0
    assert state.injections.tolist() == [1] * R


def test_the_network_is_the_plain_mlp_to_the_bit_before_the_injection() -> None:
    net, plain = _nets(3, 2, "sigmoid")
    x = torch.randn(3, 5, IN)
    for k in plain.params:
        assert torch.equal(net.params[k], plain.params[k])
    out, feats = net.forward(x)
    want, want_feats = plain.forward(x)
    assert torch.equal(out, want)
    assert feats.keys() == want_feats.keys()
    assert all(torch.equal(feats[k], want_feats[k]) for k in feats)
    hs = net.forward_train(x)[1]
    assert all(
        torch.equal(h, want_feats[n.name]) for h, n in zip(hs, net.hidden_layers, strict=True)
    )


def _frame(path) -> pd.DataFrame:
    df = contlearn.load_runs(path).drop(columns=["run", "learner"])
    return df.sort_values(["seed", "step", "metric", "layer"]).reset_index(drop=True)


def test_runs_equal_bp_until_the_injection_then_differ_and_resume_exactly(tmp_path) -> None:
    config = {"examples_per_task": 100, "hidden": "10,10", "probe_size": 16, "fast": False}
    inj = {**config, "learner.at": 150, "learner.head_layers": 2, "checkpoint_every": 60}
    bp = contlearn.run(
        "bit-flipping", learner="bp", seeds=2, tasks=3, config=config, out=tmp_path / "bp"
    )
    full = contlearn.run(
        "bit-flipping",
        learner="plasticity-injection",
        seeds=2,
        tasks=3,
        config=inj,
        out=tmp_path / "pi",
    )
    a, b = _frame(bp.path), _frame(full.path)
    loss_a, loss_b = (d[d["metric"] == "loss"].reset_index(drop=True) for d in (a, b))
    before = loss_a["step"] <= 150
    pd.testing.assert_frame_equal(loss_a[before], loss_b[before])
    assert not loss_a[~before]["value"].equals(loss_b[~before]["value"])  # SGD: not a no-op
    part = tmp_path / "part"
    contlearn.run(
        "bit-flipping", learner="plasticity-injection", seeds=2, steps=130, config=inj, out=part
    )
    contlearn.resume(part, tasks=3)
    pd.testing.assert_frame_equal(_frame(part), b)


@pytest.mark.parametrize(
    ("agent", "extra", "match"),
    [
        ("online", {"learner.every": 100}, "injects a 2-layer head once"),
        ("online", {"learner.head_layers": 4}, "exceeds the network's 3 layers"),
        ("online", {"network": "convnet"}, "needs network=mlp"),
        ("online", {"credit": "fa"}, "learns by backprop only"),
        ("online", {"layer_norm": True}, "has no layer_norm"),
        pytest.param(
            "ppo", {}, "needs the network that carries the head", marks=pytest.mark.mujoco
        ),
    ],
)
def test_refusals_name_the_problem_and_the_fix(agent, extra, match, tmp_path) -> None:
    config = {"learner.head_layers": 2, "hidden": "8,8", **extra}
    stream = "slippery-ant" if agent == "ppo" else "permuted-mnist"
    if agent != "ppo":
        config["examples_per_task"] = 10
    with pytest.raises(ConfigError, match=match):
        contlearn.run(
            stream,
            agent=agent,
            learner="plasticity-injection",
            steps=20,
            config=config,
            out=tmp_path / "r",
        )
    assert not (tmp_path / "r").exists()


def test_features_are_the_units_that_learn_theta_before_the_injection_the_copy_after() -> None:
    net, plain = _nets(2, 2, "tanh")
    x = torch.randn(2, 5, IN)
    assert not net.injected()
    t = head_injection(sgd(0.0), net, [0, 1], at=1)  # lr 0: only the injection moves θ
    params = {k: v.clone() for k, v in net.params.items()}
    grads = {k: torch.zeros_like(v) for k, v in params.items()}
    updates, _ = t.update(grads, t.init(params), params)
    params = {k: params[k] + updates[k] for k in params}
    assert net.injected(params)
    out, feats = net.forward(x, params)
    _, plain_feats = plain.forward(x)
    assert torch.equal(out, plain.forward(x)[0])  # the output unchanged
    assert torch.equal(feats["hidden2"], plain_feats["hidden2"])  # the trunk: θ's own units
    w, b = params[f"{TRAINED}hidden3.weight"], params[f"{TRAINED}hidden3.bias"]
    want = torch.tanh(plain_feats["hidden2"] @ w.transpose(1, 2) + b.unsqueeze(1))
    torch.testing.assert_close(feats["hidden3"], want)  # the head: the trained copy's units
    assert not torch.allclose(feats["hidden3"], plain_feats["hidden3"])
