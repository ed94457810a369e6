"""The Forward-Forward agent against independent implementations: a hand-written per-sample,
per-replica FF step over plain vectors, an explicit per-label prediction loop, a per-unit loop
for CBP's goodness utility; plus determinism, exact resume, replica independence, negatives,
the closed-form path against the autograd reference, and the run-level refusals."""

from __future__ import annotations

import io
import json

import pytest
import torch
import torch.nn.functional as F

from contlearn.agents.forward_forward import FFAgent, FFAgentSpec
from contlearn.cli import main
from contlearn.envs.base import StreamInfo
from contlearn.learners import Learner, learner_def
from contlearn.learners.cbp import continual_backprop
from contlearn.learners.optim import sgd
from contlearn.spec import build_spec

IN, C = 7, 3


def make_agent(seeds=(0, 1), batch: int = 2, learner: str = "bp", lopts=None, **options):
    info = StreamInfo("test", "classification", (IN,), C, True, len(seeds), "accuracy", batch)
    values = {"hidden": "5,4", "optimizer": "sgd", "lr": 0.05, **options}
    spec = build_spec(FFAgentSpec, values)
    defaults = FFAgent.learner_defaults.get(learner, {})
    lspec = build_spec(learner_def(learner).Spec, {**defaults, **(lopts or {})}, "learner.")
    return FFAgent(info, list(seeds), spec, Learner(learner, lspec))


def batches(R: int, B: int, steps: int, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.rand(R, B, IN, generator=g), torch.randint(C, (R, B), generator=g))
        for _ in range(steps)
    ]


def learn(agent: FFAgent, data) -> list[torch.Tensor]:
    preds = []
    for x, y in data:
        p = agent.act(x)
        preds.append(p)
        agent.observe(x, p, y)
    return preds


def _norm(v: torch.Tensor, kind: str) -> torch.Tensor:
    scale = v.norm() if kind == "length" else v.pow(2).mean().sqrt()
    return v / (scale + 1e-8)


def _embed(x: torch.Tensor, label: int | None, mode: str) -> torch.Tensor:
    code = torch.full((C,), 1.0 / C) if label is None else F.one_hot(torch.tensor(label), C).float()
    return torch.cat([x, code]) if mode == "append" else torch.cat([code, x[C:]])


def per_sample_step(params, x, y, neg, spec: FFAgentSpec, widths, activation):
    """One FF step of one replica, example by example over plain vectors: returns the SGD
    update's new parameters (an independent implementation of docs/design.md §4c)."""
    act = {"relu": torch.relu, "tanh": torch.tanh}[activation]
    B = x.shape[0]
    new = {k: v.clone() for k, v in params.items()}
    inputs = [(_embed(x[b], int(y[b]), spec.embed), True) for b in range(B)]
    inputs += [(_embed(x[b], int(neg[b]), spec.embed), False) for b in range(B)]
    for i, width in enumerate(widths):
        name = f"hidden{i + 1}"
        theta = spec.threshold or (1.0 if spec.goodness == "mean" else float(width))
        w = params[f"{name}.weight"].clone().requires_grad_(True)
        bias = params[f"{name}.bias"].clone().requires_grad_(True)
        loss = torch.zeros(())
        outs = []
        for v, positive in inputs:
            h = act(w @ _norm(v, spec.norm) + bias)
            g = h.pow(2).sum() if spec.goodness == "sum" else h.pow(2).mean()
            # log(1 + e^t), the FF loss on one input, averaged over B per polarity, halved
            t = theta - g if positive else g - theta
            loss = loss + 0.5 / B * torch.log1p(torch.exp(t))
            outs.append((h.detach(), positive))
        gw, gb = torch.autograd.grad(loss, [w, bias])
        new[f"{name}.weight"] -= spec.lr * gw
        new[f"{name}.bias"] -= spec.lr * gb
        inputs = outs
    return new


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"activation": "tanh", "goodness": "mean", "norm": "length"},
        {"embed": "append", "threshold": 2.5},
    ],
)
def test_step_matches_per_sample_loop(options):
    agent = make_agent(**options)
    spec = agent.spec
    ((x, y),) = batches(2, 2, 1)
    before = {k: v.clone() for k, v in agent.views.items()}
    states = [g.get_state() for g in agent.negatives]
    learn(agent, [(x, y)])
    for r, s in enumerate(states):
        g = torch.Generator()
        g.set_state(s)
        neg = (y[r] + 1 + torch.randint(C - 1, (2,), generator=g)) % C
        want = per_sample_step(
            {k: v[r] for k, v in before.items()}, x[r], y[r], neg, spec, (5, 4), spec.activation
        )
        for k, v in want.items():
            torch.testing.assert_close(agent.views[k][r], v, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "options",
    [{}, {"embed": "append", "norm": "length"}, {"activation": "tanh", "fast": False}],
)
def test_goodness_prediction_matches_per_label_loop(options):
    # (the fast path's first layer takes W·x₀ once and adds each label's column)
    agent = make_agent(hidden="5,4,3", from_layer=2, **options)
    act = {"relu": torch.relu, "tanh": torch.tanh}[agent.spec.activation]
    ((x, _),) = batches(2, 3, 1)
    scores = agent.act(x)  # (R, B, C)
    for r in range(2):
        for b in range(3):
            for c in range(C):
                v, total = _embed(x[r, b], c, agent.spec.embed), 0.0
                for i, layer in enumerate(agent.net.hidden_layers):
                    w, bias = (
                        agent.views[f"{layer.name}.weight"][r],
                        agent.views[f"{layer.name}.bias"][r],
                    )
                    h = act(w @ _norm(v, agent.spec.norm) + bias)
                    if i >= 1:
                        total += float(h.pow(2).sum())
                    v = h
                assert scores[r, b, c].item() == pytest.approx(total, rel=1e-5)


@pytest.mark.parametrize(
    ("options", "learner", "backend"),
    [
        ({"peer_norm": 0.03}, "bp", "ff-fused"),
        ({"predict": "head", "goodness": "mean", "activation": "tanh"}, "l2", "ff-fused"),
        ({"predict": "head"}, "cbp", "ff-fused"),
        ({}, "snp", "ff-fused"),
        ({"embed": "append", "norm": "length", "optimizer": "adam", "lr": 1e-3}, "bp", "ff-hand"),
        ({"predict": "head"}, "redo", "ff-hand"),
    ],
)
def test_fast_paths_equal_autograd_reference(options, learner, backend):
    lopts = {"cbp": {"maturity": 1, "replacement_rate": 0.3}, "redo": {"period": 2, "window": 2}}
    data, options = batches(2, 3, 6), {"lr": 0.01, **options}
    fast = make_agent(batch=3, learner=learner, lopts=lopts.get(learner), **options)
    ref = make_agent(batch=3, fast=False, learner=learner, lopts=lopts.get(learner), **options)
    assert (fast.backend, ref.backend) == (backend, "ff-reference")
    fast.watch_gradients()
    ref.watch_gradients()
    # (float32 rounding: the fused update sums the same products in another order, and the
    # goodness, a sum of squares, amplifies the difference)
    for p, q in zip(learn(fast, data), learn(ref, data), strict=True):
        torch.testing.assert_close(p, q, rtol=2e-4, atol=1e-4)
    for k in fast.views:
        torch.testing.assert_close(fast.views[k], ref.views[k], rtol=1e-4, atol=5e-5)
    for k in fast.running:
        torch.testing.assert_close(fast.running[k], ref.running[k], rtol=1e-4, atol=1e-5)
    a, b = fast.update_stats()["grad_magnitude"], ref.update_stats()["grad_magnitude"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-8)


def test_head_learns_on_detached_neutral_features():
    agent = make_agent(predict="head")
    x, y = batches(2, 2, 1)[0]
    feat = agent.net.head_input(agent.neutral_features(x))
    w = agent.views["head.weight"].clone().requires_grad_(True)
    b = agent.views["head.bias"].clone().requires_grad_(True)
    logits = torch.baddbmm(b.unsqueeze(1), feat, w.transpose(1, 2))
    loss = F.cross_entropy(logits.reshape(-1, C), y.reshape(-1), reduction="none").view(2, 2)
    gw, gb = torch.autograd.grad(loss.mean(1).sum(), [w, b])
    metrics = agent.observe(x, agent.act(x), y)
    torch.testing.assert_close(metrics["head_loss"], loss.mean(1).detach())
    torch.testing.assert_close(agent.views["head.weight"], w.detach() - 0.05 * gw)
    torch.testing.assert_close(agent.views["head.bias"], b.detach() - 0.05 * gb)


def test_negatives_never_carry_the_true_label():
    agent = make_agent(seeds=(0, 1, 2))
    labels = torch.randint(C, (3, 5000), generator=torch.Generator().manual_seed(0))
    neg = agent.draw_negatives(labels)
    assert not bool((neg == labels).any())
    for c in range(C):  # the wrong labels of class c are drawn about equally often
        wrong = neg[labels == c]
        counts = torch.bincount(wrong, minlength=C).float()
        assert counts[c] == 0
        assert (counts[torch.arange(C) != c] / len(wrong)).sub(0.5).abs().max() < 0.05
    probe = agent.probe_negatives(labels)
    assert not bool((probe == labels).any())
    assert torch.equal(probe, agent.probe_negatives(labels))  # the same at every probe


def test_deterministic():
    data = batches(2, 2, 8)
    a, b = (
        make_agent(learner="cbp", lopts={"maturity": 2, "replacement_rate": 0.3}),
        make_agent(learner="cbp", lopts={"maturity": 2, "replacement_rate": 0.3}),
    )
    for p, q in zip(learn(a, data), learn(b, data), strict=True):
        assert torch.equal(p, q)
    for k in a.views:
        assert torch.equal(a.views[k], b.views[k])


@pytest.mark.parametrize("learner", ["bp", "cbp", "redo", "snp", "l2-init"])
def test_exact_resume(learner):
    lopts = {"cbp": {"maturity": 2, "replacement_rate": 0.3}, "redo": {"period": 3, "window": 3}}
    data = batches(2, 2, 12)
    whole = make_agent(learner=learner, lopts=lopts.get(learner), peer_norm=0.03)
    whole.watch_gradients()
    learn(whole, data)
    first = make_agent(learner=learner, lopts=lopts.get(learner), peer_norm=0.03)
    first.watch_gradients()
    learn(first, data[:5])
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    second = make_agent(learner=learner, lopts=lopts.get(learner), peer_norm=0.03)
    second.load_state_dict(torch.load(buf, weights_only=True))
    learn(second, data[5:])
    for k in whole.views:
        assert torch.equal(whole.views[k], second.views[k]), k
    assert torch.equal(
        whole.update_stats()["grad_magnitude"][""], second.update_stats()["grad_magnitude"][""]
    )


@pytest.mark.parametrize("learner", ["bp", "cbp"])
def test_replicas_equal_seeds_alone(learner):
    lopts = {"maturity": 2, "replacement_rate": 0.3} if learner == "cbp" else None
    seeds = (4, 9, 11)
    data = batches(3, 2, 8)
    batched = make_agent(seeds=seeds, learner=learner, lopts=lopts, predict="head")
    learn(batched, data)
    for r, s in enumerate(seeds):
        alone = make_agent(seeds=(s,), learner=learner, lopts=lopts, predict="head")
        learn(alone, [(x[r : r + 1], y[r : r + 1]) for x, y in data])
        for k in alone.views:
            torch.testing.assert_close(
                batched.views[k][r : r + 1], alone.views[k], rtol=1e-5, atol=1e-6
            )


def test_cbp_goodness_utility_matches_per_unit_loop():
    torch.manual_seed(0)
    agent = make_agent()
    net, eta = agent.net, 0.9
    t = continual_backprop(sgd(0.0), net, [0, 1], utility="goodness", decay=eta, maturity=10**6)
    params = {k: v.clone() for k, v in agent.views.items()}
    state = t.init(params)
    feats = [{n.name: torch.rand(2, 4, n.fan_out) for n in net.hidden_layers} for _ in range(3)]
    for f in feats:
        grads = {k: torch.zeros_like(v) for k, v in params.items()}
        _, state = t.update(grads, state, params, features=f)
    for layer in net.hidden_layers:
        for r in range(2):
            for i in range(layer.fan_out):
                u = 0.0
                for f in feats:
                    y = sum(float(f[layer.name][r, b, i]) ** 2 for b in range(4)) / 4
                    u = eta * u + (1 - eta) * y
                corrected = u / (1 - eta ** len(feats))
                got = state.stats.utility[layer.name][r, i].item()
                assert got == pytest.approx(corrected, rel=1e-5)


@pytest.mark.parametrize("learner", ["cbp", "redo"])
def test_resets_act_on_ff_layers(learner):
    lopts = {
        "cbp": {"maturity": 1, "replacement_rate": 0.5},
        "redo": {"period": 2, "window": 2, "threshold": 10.0},
    }
    agent = make_agent(learner=learner, lopts=lopts[learner])
    learn(agent, batches(2, 2, 6))
    diag = agent.diagnostics()
    assert all(bool((diag[n.name]["replacements"] > 0).all()) for n in agent.net.hidden_layers)
    assert all(bool(torch.isfinite(v).all()) for v in agent.views.values())


def test_goodness_gap_and_probe_loss():
    agent = make_agent(hidden="5,4,3")
    x, y = batches(2, 6, 1)[0]
    gap = agent.goodness_gap(x, y)
    assert set(gap) == {"hidden1", "hidden2", "hidden3", ""}
    torch.testing.assert_close(gap[""], gap["hidden2"] + gap["hidden3"])
    neg = agent.probe_negatives(y)
    gs = agent._layer_goodness(x, y, neg)
    torch.testing.assert_close(
        gap["hidden1"], (gs[0][:, :6].mean(1) - gs[0][:, 6:].mean(1)).double()
    )
    metrics = agent.observe(x, agent.act(x), y)
    assert metrics["loss"].shape == (2,)
    assert agent.probe_loss(x, y).shape == (2,)


def _cli(capsys, tmp_path, *args):
    code = main(["run", *args, "--out", str(tmp_path / "run")])
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["bit-flipping", "--agent", "ff"], "classification"),
        (["slippery-ant", "--agent", "ff"], "classification"),
        (["permuted-mnist", "--agent", "ff", "--learner", "head-reset"], "head-reset"),
        (
            ["permuted-mnist", "--agent", "ff", "--learner", "cbp", "--set",
             "learner.utility=contribution"],
            "utility=goodness",
        ),
        (["permuted-mnist", "--agent", "ff", "--set", "from_layer=4"], "from_layer"),
        (["permuted-mnist", "--agent", "ff", "--set", "credit=fa"], "credit"),
    ],
)  # fmt: skip
def test_bad_runs_fail_in_one_line_and_write_nothing(capsys, tmp_path, args, needle):
    code, err = _cli(capsys, tmp_path, *args)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and needle in err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_run_records_accuracy_and_goodness_gap_and_plots_with_bp(capsys, tmp_path):
    from contlearn.results.store import load_runs

    common = ["--seeds", "2", "--tasks", "2", "--set", "examples_per_task=60",
              "--set", "probe_size=50"]  # fmt: skip
    ff, bp = tmp_path / "ff", tmp_path / "bp"
    assert main(["run", "permuted-mnist", "--agent", "ff", "--learner", "cbp", *common,
                 "--out", str(ff)]) == 0  # fmt: skip
    assert main(["run", "permuted-mnist", *common, "--out", str(bp)]) == 0
    config = json.loads((ff / "config.json").read_text())
    assert config["agent"] == "ff" and config["learner.utility"] == "goodness"
    df = load_runs([ff])
    metrics = set(df.metric)
    assert {"accuracy", "goodness_gap", "dead_fraction", "effective_rank"} <= metrics
    assert set(df[df.metric == "goodness_gap"].layer) >= {"hidden1", "hidden2", "hidden3", ""}
    assert "goodness_gap" not in set(load_runs([bp]).metric)
    out = tmp_path / "both.png"
    assert main(["plot", str(ff), str(bp), "--by", "agent", "--out", str(out)]) == 0
    assert out.stat().st_size > 0
