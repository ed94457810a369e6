"""The toolkit probes (contlearn/probes/toolkit.py) against per-unit and per-pair loops written
with NumPy, on hand-built features."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from contlearn.probes.measures import PROBES, ProbeContext, parse_probes


def _ctx(features: dict, params: dict | None = None, activation: str = "relu") -> ProbeContext:
    return ProbeContext(features=features, params=params or {}, activation=activation)


def test_the_probes_are_registered_and_selectable() -> None:
    names = [
        "feature_norm",
        "param_norm",
        "distance_from_init",
        "linearised_fraction",
        "duplicate_fraction",
    ]
    assert set(names) <= set(PROBES)
    assert parse_probes(",".join(names)) == names
    assert not set(names) & set(parse_probes("default"))
    both = parse_probes("default, feature_norm,dead_fraction")
    assert both == [*parse_probes("default"), "feature_norm"]


def test_feature_norm_by_a_loop() -> None:
    g = torch.Generator().manual_seed(0)
    feats = {
        "hidden1": torch.randn(2, 7, 4, generator=g),
        "hidden2": torch.randn(2, 7, 3, generator=g),
    }
    got = PROBES["feature_norm"](_ctx(feats))
    for layer, h in feats.items():
        for r in range(2):
            want = np.mean([np.sqrt(sum(float(v) ** 2 for v in h[r, p])) for p in range(7)])
            assert float(got[layer][r]) == pytest.approx(want)
    assert float(got[""][0]) == pytest.approx(
        (float(got["hidden1"][0]) + float(got["hidden2"][0])) / 2
    )


def test_param_norm_hand_computed() -> None:
    params = {
        "hidden1.weight": torch.tensor([[[3.0, 0.0]], [[1.0, 1.0]]]),
        "hidden1.bias": torch.tensor([[4.0], [1.0]]),
        "output.weight": torch.tensor([[[0.0, 12.0]], [[0.0, 0.0]]]),
        "output.bias": torch.tensor([[0.0], [1.0]]),
    }
    got = PROBES["param_norm"](_ctx({}, params))
    assert got["hidden1"].tolist() == pytest.approx([5.0, 3**0.5])
    assert got["output"].tolist() == pytest.approx([12.0, 1.0])
    assert got[""].tolist() == pytest.approx([13.0, 2.0])


def test_linearised_fraction_counts_units_active_on_nine_tenths() -> None:
    h = torch.zeros(1, 10, 4)
    h[0, :, 0] = 1.0  # active everywhere
    h[0, :9, 1] = 2.0  # active on 90%
    h[0, :8, 2] = 2.0  # 80%
    got = PROBES["linearised_fraction"](_ctx({"hidden1": h}))
    assert got["hidden1"].tolist() == [0.5]
    assert PROBES["linearised_fraction"](_ctx({"hidden1": h}, activation="tanh")) == {}


def test_duplicate_fraction_against_numpy_corrcoef() -> None:
    g = torch.Generator().manual_seed(3)
    base = torch.randn(2, 50, 6, generator=g)
    base[:, :, 1] = -2.0 * base[:, :, 0] + 0.01 * base[:, :, 2]  # a near-duplicate (negated)
    base[1, :, 4] = base[1, :, 3] * 3 + 1  # a duplicate in replica 1 only
    base[0, :, 5] = 0.0  # a dead unit: no correlation
    got = PROBES["duplicate_fraction"](_ctx({"hidden1": base}))
    for r in range(2):
        x = base[r].double().numpy()
        count = 0
        for i in range(6):
            for j in range(i + 1, 6):
                if x[:, i].std() == 0 or x[:, j].std() == 0:
                    continue
                if abs(np.corrcoef(x[:, i], x[:, j])[0, 1]) >= 0.95:
                    count += 1
        assert float(got["hidden1"][r]) == pytest.approx(count / 15)
    assert got["hidden1"].tolist() == pytest.approx([1 / 15, 2 / 15])


def test_distance_from_init_against_a_fresh_agent_of_the_same_seeds() -> None:
    from contlearn.agents.online import OnlineAgent, OnlineAgentSpec
    from contlearn.envs.base import StreamInfo
    from contlearn.learners import Learner, learner_def

    info = StreamInfo("t", "classification", (5,), 3, True, 2, "accuracy", 1)
    spec = OnlineAgentSpec(hidden="4", lr=0.1)

    def agent() -> OnlineAgent:
        return OnlineAgent(info, [3, 4], spec, Learner("bp", learner_def("bp").Spec()))

    a, fresh = agent(), agent()
    probe = PROBES["distance_from_init"]
    start = probe(ProbeContext(features={}, params=a.parameters(), activation="relu", agent=a))
    assert all(float(v.abs().max()) == 0 for v in start.values())
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        x, y = torch.randn(2, 1, 5, generator=g), torch.randint(0, 3, (2, 1), generator=g)
        a.act(x)
        a.observe(x, None, y)
    got = probe(ProbeContext(features={}, params=a.parameters(), activation="relu", agent=a))
    snap = a.probe_snapshot()
    via_snapshot = probe(
        ProbeContext(features={}, params=snap.parameters(), activation="relu", agent=snap)
    )
    theta, theta0 = a.parameters(), fresh.parameters()
    for r in range(2):
        total = 0.0
        for layer in ("hidden1", "output"):
            sq = sum(
                float(((theta[f"{layer}.{p}"][r] - theta0[f"{layer}.{p}"][r]) ** 2).sum())
                for p in ("weight", "bias")
            )
            total += sq
            assert float(got[layer][r]) == pytest.approx(sq**0.5)
        assert float(got[""][r]) == pytest.approx(total**0.5) and total > 0
    for k in got:
        torch.testing.assert_close(via_snapshot[k], got[k])


def test_a_run_records_the_toolkit_probes(tmp_path) -> None:
    import contlearn

    contlearn.run(
        "permuted-mnist",
        seeds=2,
        tasks=2,
        config={
            "examples_per_task": 50,
            "hidden": "8,8",
            "probe_size": 32,
            "probes": "feature_norm,param_norm,distance_from_init,duplicate_fraction",
        },
        out=tmp_path / "run",
    )
    df = contlearn.load_runs([tmp_path / "run"])
    want = {"feature_norm", "param_norm", "distance_from_init", "duplicate_fraction"}
    assert want <= set(df["metric"])


def test_hessian_trace_is_hutchinsons_estimate_with_the_explicit_hessian() -> None:
    from contlearn.agents.online import OnlineAgent, OnlineAgentSpec
    from contlearn.envs.base import StreamInfo
    from contlearn.learners import Learner, learner_def

    info = StreamInfo("t", "classification", (3,), 2, True, 2, "accuracy", 1)
    agent = OnlineAgent(
        info,
        [0, 1],
        OnlineAgentSpec(hidden="3", activation="tanh"),
        Learner("bp", learner_def("bp").Spec()),
    )
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(2, 5, 3, generator=g), torch.randint(0, 2, (2, 5), generator=g)
    samples = 7
    got = agent.hessian_trace(x, y, samples)
    names = list(agent.views)
    shapes = [agent.views[k].shape[1:] for k in names]
    sizes = [int(torch.Size(s).numel()) for s in shapes]
    # the same Rademacher draws the estimate makes, per parameter tensor of all replicas
    gen = torch.Generator().manual_seed(0)
    draws = [
        [(torch.randint(0, 2, agent.views[k].shape, generator=gen) * 2 - 1).double() for k in names]
        for _ in range(samples)
    ]
    for r in range(2):
        theta0 = torch.cat([agent.views[k][r].reshape(-1).double() for k in names])

        def loss_of(theta: torch.Tensor, r: int = r) -> torch.Tensor:
            parts = dict(zip(names, torch.split(theta, sizes), strict=True))
            h = torch.tanh(
                x[r].double() @ parts["hidden1.weight"].view(3, 3).T + parts["hidden1.bias"]
            )
            out = h @ parts["output.weight"].view(2, 3).T + parts["output.bias"]
            return torch.nn.functional.cross_entropy(out, y[r])

        H = torch.autograd.functional.hessian(loss_of, theta0)
        vs = [torch.cat([d[i][r].reshape(-1) for i in range(len(names))]) for d in draws]
        want = sum(float(v @ H @ v) for v in vs) / samples
        assert float(got[r]) == pytest.approx(want, rel=1e-4, abs=1e-6)
    assert "hessian_trace" not in parse_probes("default")
