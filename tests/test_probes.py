"""Probes against hand-built matrices with known answers, and the no-side-effect property."""

from __future__ import annotations

import math

import pytest
import torch

import contlearn
from contlearn.config import resolve
from contlearn.errors import ConfigError
from contlearn.probes import (
    ProbeContext,
    approx_rank_of,
    dead_fraction,
    dormant_fraction,
    effective_rank_of,
    gram_singular_values,
    parse_probes,
    register_probe,
    saturation,
    singular_values,
    stable_rank_of,
    weight_magnitude,
)


def _ctx(features, activation="relu", params=None):
    return ProbeContext(features=features, params=params or {}, activation=activation)


def test_effective_rank_of_equal_singular_values_is_k():
    for k in (1, 3, 7):
        s = torch.tensor([[1.0] * k + [0.0] * (10 - k)], dtype=torch.float64)
        assert float(effective_rank_of(s)) == pytest.approx(k)


def test_ranks_of_a_constructed_low_rank_matrix():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(200, 4, generator=gen, dtype=torch.float64)
    b = torch.randn(4, 30, generator=gen, dtype=torch.float64)
    s = singular_values((a @ b)[None])
    assert float(approx_rank_of(s)) <= 4
    assert float(effective_rank_of(s)) <= 4 + 1e-6
    assert int((s > 1e-8).sum()) == 4


def test_approx_rank_hand_computed():
    # squares 81, 9, 1 (total 91): top-1 holds 89%, top-2 holds 98.9% < 99%, so 3
    assert float(approx_rank_of(torch.tensor([[9.0, 3.0, 1.0]], dtype=torch.float64))) == 3
    # squares 100, 0.25: top-1 holds 99.75% >= 99%
    assert float(approx_rank_of(torch.tensor([[10.0, 0.5]], dtype=torch.float64))) == 1


def test_stable_rank_of_rank_one_is_one_and_identity_is_n():
    u = torch.randn(50, 1, dtype=torch.float64)
    v = torch.randn(1, 8, dtype=torch.float64)
    assert float(stable_rank_of(singular_values((u @ v)[None]))) == pytest.approx(1.0)
    assert float(stable_rank_of(singular_values(torch.eye(6, dtype=torch.float64)[None]))) == \
        pytest.approx(6.0)


def _features(R, P, H, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.relu(torch.randn(R, P, H, generator=gen))  # (R, P, H) float32, like a layer's


def _ranks(s):
    return [f(s) for f in (effective_rank_of, approx_rank_of, stable_rank_of)]


@pytest.mark.parametrize("R,P,H", [(3, 60, 20), (1, 500, 100), (2, 40, 40)])
def test_gram_singular_values_equal_the_svd(R, P, H):
    a = _features(R, P, H)
    a[0, :, :3] = 0  # dead units: exactly zero singular values
    a[-1, :, 5] = 0
    svd = torch.linalg.svdvals(a.double())
    s, exact = gram_singular_values(a.double())
    assert exact.all()
    torch.testing.assert_close(s, svd, rtol=1e-9, atol=1e-12 * float(svd.max()))
    assert torch.equal(singular_values(a), s)
    for mine, ref in zip(_ranks(s), _ranks(svd), strict=True):
        torch.testing.assert_close(mine, ref, rtol=1e-10, atol=0)


def test_gram_route_leaves_unresolved_replicas_to_the_svd():
    a = _features(3, 80, 12).double()
    gen = torch.Generator().manual_seed(1)
    a[1] = torch.randn(80, 3, generator=gen, dtype=torch.float64) @ torch.randn(
        3, 12, generator=gen, dtype=torch.float64)  # rank 3, no zero column: tiny σ unknown
    a[2, :, :6] *= 1e-7  # σ ~1e-7 σ_max: λ below the Gram matrix's rounding
    exact = gram_singular_values(a)[1]
    assert exact.tolist() == [True, False, False]
    s = singular_values(a)
    torch.testing.assert_close(s, torch.linalg.svdvals(a), rtol=1e-9, atol=1e-15)
    assert int((s[1] > 1e-8).sum()) == 3
    a[0, 0, 0] = float("nan")
    assert not gram_singular_values(a)[1].any()


def test_wide_features_take_the_svd():
    a = _features(2, 10, 30)
    assert torch.equal(singular_values(a), torch.linalg.svdvals(a.double()))


def test_zero_matrix_has_rank_zero():
    s = singular_values(torch.zeros(1, 10, 5))
    assert float(effective_rank_of(s)) == 0 and float(stable_rank_of(s)) == 0
    assert float(approx_rank_of(s)) == 0


def test_dead_units_planted_by_hand_per_replica():
    h = torch.rand(2, 50, 10) + 0.1  # (R, P, H) all alive
    h[0, :, [1, 4]] = 0.0  # replica 0: units 1 and 4 dead
    h[1, :, 7] = 0.0  # replica 1: unit 7 dead
    h[1, :49, 2] = 0.0  # unit 2 is zero on all but one input: alive
    out = dead_fraction(_ctx({"hidden1": h}))
    assert out["hidden1"].tolist() == [0.2, 0.1]
    assert out[""].tolist() == [0.2, 0.1]


def test_dead_means_saturated_for_tanh_and_sigmoid():
    h = torch.zeros(1, 20, 4)
    h[0, :, 0] = 0.995
    h[0, :, 1] = -0.999
    h[0, :10, 2] = 0.999  # saturated on half the inputs only
    assert dead_fraction(_ctx({"l": h}, "tanh"))["l"].tolist() == [0.5]
    sat = saturation(_ctx({"l": h}, "tanh"))["l"]
    assert float(sat) == pytest.approx((20 + 20 + 10) / 80)
    sig = torch.full((1, 5, 2), 0.5)
    sig[0, :, 1] = 0.005
    assert dead_fraction(_ctx({"l": sig}, "sigmoid"))["l"].tolist() == [0.5]
    assert saturation(_ctx({"l": sig}, "relu")) == {}


def test_dormant_fraction_uses_the_redo_score():
    h = torch.ones(1, 10, 4)
    h[0, :, 3] = 0.005  # score = 0.005 / mean(1,1,1,0.005) ≈ 0.0067 <= 0.01
    h[0, :, 2] = 0.02  # score ≈ 0.0264 > 0.01
    assert dormant_fraction(_ctx({"l": h}))["l"].tolist() == [0.25]


def test_aggregate_weights_layers_by_units():
    a = torch.zeros(1, 5, 2)  # 2 of 2 dead
    b = torch.ones(1, 5, 6)  # 0 of 6 dead
    assert dead_fraction(_ctx({"a": a, "b": b}))[""].tolist() == [0.25]


def test_weight_magnitude_hand_computed():
    params = {"hidden1.weight": torch.tensor([[[1.0, -3.0]]]),
              "hidden1.bias": torch.tensor([[2.0]]),
              "output.weight": torch.tensor([[[-4.0]]]), "output.bias": torch.tensor([[0.0]])}
    out = weight_magnitude(_ctx({}, params=params))
    assert float(out["hidden1"]) == 2.0 and float(out["output"]) == 2.0
    assert float(out[""]) == 2.0


def test_parse_probes_and_custom_registration():
    assert "effective_rank" in parse_probes("default")
    assert parse_probes("none") == []
    with pytest.raises(ConfigError, match="unknown probe"):
        parse_probes("effective_rank,nope")
    with pytest.raises(ConfigError, match="unknown probe"):
        resolve({"stream": "bit-flipping", "probes": "nope"})
    register_probe("mean_activation", lambda ctx: {
        k: v.mean((1, 2)).double() for k, v in ctx.features.items()})
    assert parse_probes("mean_activation") == ["mean_activation"]


def _trajectory(tmp_path, name, probes, stream="permuted-mnist", **extra):
    res = contlearn.run(stream, seeds=2, tasks=3, learner=extra.pop("learner", "bp"), config={
        "examples_per_task": 150, "hidden": "12,12", "probes": probes, "probe_size": 64,
        **extra}, out=tmp_path / name)
    df = res.metrics()
    return df[df.metric.isin(["accuracy", "squared_error", "loss"])].value.tolist(), df


@pytest.mark.parametrize("stream", ["permuted-mnist", "bit-flipping"])
def test_probes_never_change_the_run(tmp_path, stream):
    plain, _ = _trajectory(tmp_path, "off", "none", stream)
    probed, df = _trajectory(tmp_path, "on", "default", stream, optimizer="adam")
    adam_plain, _ = _trajectory(tmp_path, "off-adam", "none", stream, optimizer="adam")
    assert probed == adam_plain and plain != adam_plain
    assert {"effective_rank", "dead_fraction", "plasticity", "grad_magnitude"} <= set(df.metric)
    ranks = df[df.metric == "effective_rank"]
    assert set(ranks.layer) == {"hidden1", "hidden2"} and len(ranks) == 2 * 3 * 2
    assert (df[df.metric == "effective_rank"].step.tolist()[:2] == [0, 0])


def test_probes_every_n_steps(tmp_path):
    _, df = _trajectory(tmp_path, "n", "weight_magnitude", probe_every=100)
    steps = sorted(set(df[df.metric == "weight_magnitude"].step))
    assert steps == [0, 100, 200, 300, 400]


def test_probe_per_replica_independence(tmp_path):
    _, both = _trajectory(tmp_path, "both", "effective_rank")
    res = contlearn.run("permuted-mnist", seed=1, tasks=3, config={
        "examples_per_task": 150, "hidden": "12,12", "probe_size": 64,
        "probes": "effective_rank"}, out=tmp_path / "one")
    one = res.metrics().query("metric == 'effective_rank'").value.to_numpy()
    mine = both.query("metric == 'effective_rank' and seed == 1").value.to_numpy()
    assert one == pytest.approx(mine, rel=1e-6)


def test_plasticity_probe_is_one_minus_loss_ratio():
    from contlearn.agents.online import OnlineAgent, OnlineAgentSpec
    from contlearn.envs import make_stream
    from contlearn.probes import run_probes

    cfg = resolve({"stream": "bit-flipping"})
    stream = make_stream("bit-flipping", cfg.stream_spec, [0])
    stream.next()
    agent = OnlineAgent(stream.info, [0], OnlineAgentSpec(hidden="5", lr=0.05), cfg.learner)
    obs, target = stream.probe_batch(32)
    before_params = {k: v.clone() for k, v in agent.net.params.items()}
    out = run_probes(["plasticity"], agent, obs, target)["plasticity"][""]
    with torch.no_grad():
        l0 = agent.loss(agent.net.forward(obs)[0], target)
    for k, v in agent.net.params.items():  # undone
        assert torch.equal(v, before_params[k])
    # independent check: one SGD step by hand
    params = {k: v.clone().requires_grad_(True) for k, v in before_params.items()}
    loss = agent.loss(agent.net.forward(obs, params)[0], target).sum()
    grads = torch.autograd.grad(loss, list(params.values()))
    stepped = {k: (v - 0.05 * g).detach() for (k, v), g in zip(params.items(), grads, strict=True)}
    with torch.no_grad():
        l1 = agent.loss(agent.net.forward(obs, stepped)[0], target)
    assert float(out) == pytest.approx(1 - float(l1) / float(l0), rel=1e-4)
    assert math.isfinite(float(out))
