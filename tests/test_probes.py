"""Probes against hand-built matrices with known answers, and the no-side-effect property."""

from __future__ import annotations

import pytest
import torch

import contlearn
from contlearn.errors import ConfigError
from contlearn.probes.measures import (
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
from contlearn.running.config import resolve


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
    assert float(
        stable_rank_of(singular_values(torch.eye(6, dtype=torch.float64)[None]))
    ) == pytest.approx(6.0)


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
        3, 12, generator=gen, dtype=torch.float64
    )  # rank 3, no zero column: tiny σ unknown
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
    params = {
        "hidden1.weight": torch.tensor([[[1.0, -3.0]]]),
        "hidden1.bias": torch.tensor([[2.0]]),
        "output.weight": torch.tensor([[[-4.0]]]),
        "output.bias": torch.tensor([[0.0]]),
    }
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
    register_probe(
        "mean_activation", lambda ctx: {k: v.mean((1, 2)).double() for k, v in ctx.features.items()}
    )
    assert parse_probes("mean_activation") == ["mean_activation"]


def _trajectory(tmp_path, name, probes, stream="permuted-mnist", **extra):
    res = contlearn.run(
        stream,
        seeds=2,
        tasks=3,
        learner=extra.pop("learner", "bp"),
        config={
            "examples_per_task": 150,
            "hidden": "12,12",
            "probes": probes,
            "probe_size": 64,
            **extra,
        },
        out=tmp_path / name,
    )
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
    assert df[df.metric == "effective_rank"].step.tolist()[:2] == [0, 0]


def test_probes_every_n_steps(tmp_path):
    _, df = _trajectory(tmp_path, "n", "weight_magnitude", probe_every=100)
    steps = sorted(set(df[df.metric == "weight_magnitude"].step))
    assert steps == [0, 100, 200, 300, 400]


def test_probe_per_replica_independence(tmp_path):
    _, both = _trajectory(tmp_path, "both", "effective_rank")
    res = contlearn.run(
        "permuted-mnist",
        seed=1,
        tasks=3,
        config={
            "examples_per_task": 150,
            "hidden": "12,12",
            "probe_size": 64,
            "probes": "effective_rank",
        },
        out=tmp_path / "one",
    )
    one = res.metrics().query("metric == 'effective_rank'").value.to_numpy()
    mine = both.query("metric == 'effective_rank' and seed == 1").value.to_numpy()
    assert one == pytest.approx(mine, rel=1e-6)


def _plain_sgd_replay(stream, params: dict, lr: float, steps: int, classification: bool):
    """Per replica, per step: plain autograd SGD on a copy of the initial parameters, with its
    own forward pass. Yields ``(step, loss before (R,), loss after (R,), {layer: Σ|g|} (R,))``."""
    names = list(dict.fromkeys(k.rsplit(".", 1)[0] for k in params))

    def loss_of(w, x, y):
        h = x
        for i, name in enumerate(names):
            h = torch.nn.functional.linear(h, w[f"{name}.weight"], w[f"{name}.bias"])
            if i < len(names) - 1:
                h = torch.relu(h)
        if classification:
            return torch.nn.functional.cross_entropy(h, y)
        return (h - y).pow(2).sum(-1).mean()

    replicas = [
        {k: v[r].detach().clone() for k, v in params.items()}
        for r in range(next(iter(params.values())).shape[0])
    ]
    for step in range(1, steps + 1):
        batch = stream.next()
        before, after = torch.zeros(len(replicas)), torch.zeros(len(replicas))
        g1 = {n: torch.zeros(len(replicas), dtype=torch.float64) for n in names}
        for r, w in enumerate(replicas):
            x, y = batch.obs[r].reshape(batch.obs.shape[1], -1), batch.target[r]
            for v in w.values():
                v.requires_grad_(True)
            loss = loss_of(w, x, y)
            grads = torch.autograd.grad(loss, list(w.values()))
            with torch.no_grad():
                for (k, v), g in zip(w.items(), grads, strict=True):
                    g1[k.rsplit(".", 1)[0]][r] += g.abs().sum().double()
                    v.requires_grad_(False)
                    v -= lr * g
                before[r] = loss.detach()
                after[r] = loss_of(w, x, y)
        yield step, before, after, g1


@pytest.mark.parametrize(
    "stream,path",
    [("permuted-mnist", "blocks"), ("permuted-mnist", "steps"), ("bit-flipping", "reference")],
)
def test_plasticity_and_grad_magnitude_against_plain_sgd(monkeypatch, stream, path):
    # docs/design.md §5: grad_magnitude is mean |g| per layer averaged over the training steps since
    # the last probe; plasticity is 1 − L_after/L_before of the probe step's own sample and
    # update. The run's values against a plain autograd SGD replay of the same samples.
    from contlearn.agents.online import OnlineAgent
    from contlearn.envs import make_stream
    from contlearn.loop.engine import ProbeSchedule, SupervisedLoop

    extra = {"examples_per_task": 1000} if "mnist" in stream else {}
    cfg = resolve(
        {"stream": stream, "hidden": "12,8", "lr": 0.05, "fast": path != "reference", **extra}
    )
    seeds = [0, 1]
    run_stream, twin = (make_stream(stream, cfg.stream_spec, seeds) for _ in range(2))
    agent = OnlineAgent(run_stream.info, seeds, cfg.agent_spec, cfg.learner)
    if path == "steps":
        monkeypatch.setattr(OnlineAgent, "block_ready", lambda self, batch_size: False)
    elif path == "blocks":
        assert agent.block_ready(1)
    initial = {k: v.detach().clone() for k, v in agent.net.params.items()}
    records = []
    schedule = ProbeSchedule(("grad_magnitude", "plasticity"), every=40, size=8)
    SupervisedLoop(run_stream, agent, records.append, probes=schedule).run(100)
    got = {
        (m, r.step, r.layer): v for r in records if r.kind == "probe" for m, v in r.values.items()
    }
    assert {k[1] for k in got if k[0] == "plasticity"} == {0, 40, 80}
    assert {k[1] for k in got if k[0] == "grad_magnitude"} == {40, 80}  # none before step 1
    sizes = {
        n: initial[f"{n}.weight"][0].numel() + initial[f"{n}.bias"][0].numel()
        for n in ("hidden1", "hidden2", "output")
    }
    sums = {n: torch.zeros(2, dtype=torch.float64) for n in sizes}
    replay = _plain_sgd_replay(twin, initial, 0.05, 81, run_stream.info.kind == "classification")
    for step, before, after, g1 in replay:
        if (step - 1) % 40 == 0:  # the step right after a probe point
            want = 1 - after.double() / before.double()
            torch.testing.assert_close(
                got[("plasticity", step - 1, "")], want, rtol=1e-3, atol=1e-5
            )
        for n in sums:
            sums[n] += g1[n]
        if step % 40 == 0:
            for n, total in sums.items():
                torch.testing.assert_close(
                    got[("grad_magnitude", step, n)], total / (sizes[n] * 40), rtol=1e-4, atol=1e-7
                )
            overall = sum(sums.values()) / (sum(sizes.values()) * 40)
            torch.testing.assert_close(
                got[("grad_magnitude", step, "")], overall, rtol=1e-4, atol=1e-7
            )
            sums = {n: torch.zeros(2, dtype=torch.float64) for n in sizes}


def test_concurrent_probes_give_the_numbers_of_synchronous_ones(monkeypatch):
    # the engine runs the built-in probes on a copy of the network while blocks learn on
    from contlearn.agents.online import OnlineAgent
    from contlearn.envs import make_stream
    from contlearn.loop import engine
    from contlearn.loop.engine import ProbeSchedule, SupervisedLoop
    from contlearn.probes.measures import DEFAULT_PROBES

    submitted = []
    submit = engine.submit_probes
    monkeypatch.setattr(engine, "submit_probes", lambda *a: submitted.append(1) or submit(*a))
    cfg = resolve(
        {
            "stream": "permuted-mnist",
            "learner": "cbp",
            "hidden": "16,12",
            "examples_per_task": 200,
            "learner.replacement_rate": 0.01,
            "learner.maturity": 20,
        }
    )
    runs = []
    for concurrent in (True, False):
        stream = make_stream("permuted-mnist", cfg.stream_spec, [3, 4])
        agent = OnlineAgent(stream.info, [3, 4], cfg.agent_spec, cfg.learner)
        records = []
        loop = SupervisedLoop(
            stream, agent, records.append, probes=ProbeSchedule(tuple(DEFAULT_PROBES), 0, 64)
        )
        assert loop._concurrent  # (built-in probes, a small network)
        loop._concurrent = concurrent
        loop.run(1000)
        loop.finish()
        runs.append(
            sorted(
                (
                    (r.kind, r.step, r.layer, name, v.tolist())
                    for r in records
                    for name, v in r.values.items()
                ),
                key=lambda row: row[:4],
            )
        )
    assert len(submitted) == 5  # every task start of the concurrent run
    # plasticity alone needs no probe batch: in line, so no path draws one
    alone = SupervisedLoop(
        stream, agent, records.append, probes=ProbeSchedule(("plasticity",), 0, 64)
    )
    assert not alone._concurrent
    assert runs[0] == runs[1]  # the same numbers, bit for bit
    assert {row[3] for row in runs[0] if row[0] == "probe"} >= {
        "effective_rank",
        "dead_fraction",
        "grad_magnitude",
        "plasticity",
        "weight_magnitude",
    }


def test_networks_too_large_to_copy_are_probed_in_line(monkeypatch):
    from contlearn.agents import online
    from contlearn.envs import make_stream
    from contlearn.loop.engine import ProbeSchedule, SupervisedLoop

    cfg = resolve({"stream": "permuted-mnist", "hidden": "16", "examples_per_task": 100})
    stream = make_stream("permuted-mnist", cfg.stream_spec, [0])
    agent = online.OnlineAgent(stream.info, [0], cfg.agent_spec, cfg.learner)
    monkeypatch.setattr(online, "SNAPSHOT_MAX_BYTES", 1000)  # (the network: ~51 kB)
    assert agent.probe_snapshot() is None
    records = []
    loop = SupervisedLoop(
        stream,
        agent,
        records.append,
        probes=ProbeSchedule(("effective_rank", "grad_magnitude"), 0, 32),
    )
    loop.run(300)
    assert loop._in_flight is None
    steps = sorted({r.step for r in records if r.kind == "probe"})
    assert steps == [0, 100, 200]  # grad_magnitude from step 100 on, effective_rank at each
    assert sum(r.kind == "probe" and "grad_magnitude" in r.values for r in records) == 3 * 2
