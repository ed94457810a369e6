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
    names = ["feature_norm", "param_norm", "linearised_fraction", "duplicate_fraction"]
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
            "probes": "feature_norm,param_norm,linearised_fraction,duplicate_fraction",
        },
        out=tmp_path / "run",
    )
    df = contlearn.load_runs([tmp_path / "run"])
    assert {"feature_norm", "param_norm", "linearised_fraction", "duplicate_fraction"} <= set(
        df["metric"]
    )
