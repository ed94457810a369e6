"""Named learners end to end: every learner on every stream, config errors, replicas."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import pytest
import torch

import contlearn
from contlearn.envs import make_stream
from contlearn.errors import ConfigError
from contlearn.learners import learner_def, learners
from contlearn.loop.engine import run_loop
from contlearn.results.store import load_runs
from contlearn.running.config import resolve
from contlearn.spec import spec_fields
from tests.test_streams import STREAMS  # (every registered supervised stream)


@pytest.fixture(autouse=True)
def _generated_image_data(image_data):
    """The CIFAR streams among STREAMS read generated archives (tests/conftest.py)."""


LEARNERS = [
    "bp",
    "adam",
    "proper-adam",
    "l2",
    "l2-init",
    "snp",
    "snp-init",
    "cbp",
    "redo",
    "head-reset",
    "weight-clipping",
    "upgd",
    "parseval",
    "regrama",
    "swr",
]
TINY = {"examples_per_task": 200, "batch_size": 20, "hidden": "16,16"}


def test_all_presets_are_registered_with_documented_options() -> None:
    assert set(LEARNERS) <= set(learners.names())
    for name in LEARNERS:
        ldef = learner_def(name)
        assert ldef.summary
        assert dataclasses.is_dataclass(ldef.Spec) and ldef.Spec.__dataclass_params__.frozen
        for f in spec_fields(ldef.Spec):
            assert f.help, f"{name}: learner.{f.name} has no help text"


#: STREAMS but the CIFAR-100 twins of the CIFAR-10 streams (the same classes, more labels)
LEARNER_STREAMS = [s for s in STREAMS if not s.endswith("-cifar100")]


@pytest.mark.parametrize("stream", LEARNER_STREAMS)
@pytest.mark.parametrize("learner", LEARNERS)
def test_every_learner_runs_on_every_stream(learner: str, stream: str, tmp_path: Path) -> None:
    result = contlearn.run(
        stream, learner=learner, seeds=2, tasks=2, config=TINY, out=tmp_path / "run", progress=False
    )
    df = load_runs(result.path)
    score = "squared_error" if stream == "bit-flipping" else "accuracy"
    rows = df[(df.metric == score) & (df.layer == "")]
    assert sorted(rows.seed.unique()) == [0, 1] and sorted(rows.task.unique()) == [0, 1]
    assert rows.value.notna().all()
    if learner in ("cbp", "redo", "regrama", "snr"):
        for metric in (
            "replacements",
            "eligible_units",
            "mean_age",
            "utility_q10",
            "utility_q50",
            "utility_q90",
        ):
            layers = set(df[df.metric == metric].layer)
            assert layers == {"hidden1", "hidden2"}, metric


def test_cbp_paper_defaults_replace_units_on_permuted_mnist(tmp_path: Path) -> None:
    """m = 100, ρ = 1e-4, 100 units: ρ|E| ≈ 0.01 per update once mature (|E| drops by one per
    replaced unit), so updates 101–400 carry Σρ|E| ≈ 2.98–3.0: 2 or 3 replacements per layer."""
    result = contlearn.run(
        "permuted-mnist",
        learner="cbp",
        seeds=2,
        tasks=2,
        config={"examples_per_task": 200},
        out=tmp_path / "run",
        progress=False,
    )
    df = load_runs(result.path)
    last = df[(df.metric == "replacements") & (df.task == 1)]
    assert set(last.layer) == {"hidden1", "hidden2", "hidden3"}
    assert last.value.isin([2.0, 3.0]).all()


@pytest.mark.slow
def test_done_when_cbp_records_replacements(tmp_path: Path) -> None:
    result = contlearn.run(
        "permuted-mnist",
        learner="cbp",
        seeds=2,
        tasks=3,
        config={"examples_per_task": 2000},
        out=tmp_path / "run",
        progress=False,
    )
    df = load_runs(result.path)
    reps = df[(df.metric == "replacements") & (df.task == 2)]
    assert set(reps.layer) == {"hidden1", "hidden2", "hidden3"} and len(reps) == 6
    assert (reps.value > 0).all()


@pytest.mark.parametrize("visible,expected", [(True, 3.0), (False, 0.0)])
def test_head_reset_only_at_visible_boundaries(
    visible: bool, expected: float, tmp_path: Path
) -> None:
    config = {**TINY, "boundaries_visible": visible}
    result = contlearn.run(
        "bit-flipping",
        learner="head-reset",
        seeds=1,
        tasks=3,
        config=config,
        out=tmp_path / "run",
        progress=False,
    )
    df = load_runs(result.path)
    resets = df[(df.metric == "head_resets") & (df.task == 2)]
    assert resets.layer.tolist() == ["output"] and resets.value.tolist() == [expected]


BAD = [
    ("l2", "learner.l2", -1e-4),
    ("l2", "learner.decoupled", -1.0),
    ("l2-init", "learner.l2_init", -0.1),
    ("snp", "learner.shrink", -1e-4),
    ("snp", "learner.sigma", -1e-4),
    ("snp-init", "learner.lam", 1.5),
    ("snp-init", "learner.period", 0),
    ("cbp", "learner.replacement_rate", -1e-4),
    ("cbp", "learner.maturity", -1),
    ("cbp", "learner.decay", 1.0),
    ("cbp", "learner.utility", "weight"),
    ("cbp", "learner.l2", -1e-4),
    ("redo", "learner.threshold", -0.1),
    ("redo", "learner.window", 5000),
    ("cbp", "learner.bogus", 1),
    ("bp", "learner.replacement_rate", 1e-4),
]


@pytest.mark.parametrize("learner,key,value", BAD)
def test_bad_learner_options_are_config_errors(learner: str, key: str, value) -> None:
    with pytest.raises(ConfigError) as info:
        resolve({"stream": "bit-flipping", "learner": learner, key: value})
    message = str(info.value)
    assert "\n" not in message and key.removeprefix("learner.") in message


def test_options_reach_the_learner() -> None:
    cfg = resolve(
        {
            "stream": "bit-flipping",
            "learner": "cbp",
            "learner.replacement_rate": "1e-5",
            "learner.maturity": "7",
            "learner.l2": 1e-4,
            "optimizer": "adam",
        }
    )
    spec = cfg.learner.spec
    assert (spec.replacement_rate, spec.maturity, spec.l2) == (1e-5, 7, 1e-4)
    assert cfg.agent_spec.optimizer == "adam"


REPLICA_CASES = {
    "cbp": {
        "learner.replacement_rate": 0.05,
        "learner.maturity": 5,
        "optimizer": "adam",
        "learner.rounding": "stochastic",
        "learner.l2": 1e-3,
    },
    "redo": {"learner.period": 10, "learner.window": 5, "learner.threshold": 0.5},
    "snp": {"learner.shrink": 1e-3, "learner.sigma": 1e-2},
    "head-reset": {"boundaries_visible": True},
    "upgd": {"learner.sigma": 1e-2, "learner.beta": 0.9},
    "weight-clipping": {"learner.kappa": 0.5},
    "parseval": {"learner.lam": 1e-2},
    "regrama": {"learner.period": 10, "learner.window": 5, "learner.threshold": 0.8},
    "swr": {"learner.rate": 0.02, "learner.decay": 0.5, "optimizer": "adam"},
    "spectral": {"learner.lam": 1e-2},
    "snr": {"learner.eta": 0.1},
    "hare-tortoise": {"learner.period": 15, "learner.ema": 0.8},
    "plasticity-injection": {"learner.at": 20, "learner.every": 25, "optimizer": "adam"},
}


def _setup(learner: str, seeds: list[int], extra: dict):
    cfg = resolve(
        {
            "stream": "bit-flipping",
            "learner": learner,
            "seed": seeds[0],
            "seeds": len(seeds),
            "hidden": "8,8",
            "examples_per_task": 20,
            **extra,
        }
    )
    stream = make_stream(cfg.stream, cfg.stream_spec, cfg.seeds)
    return stream, cfg.agent_cls(stream.info, cfg.seeds, cfg.agent_spec, cfg.learner)


def _train(learner: str, seeds: list[int], extra: dict):
    stream, agent = _setup(learner, seeds, extra)
    run_loop(stream, agent, 80, lambda record: None)
    return agent


@pytest.mark.parametrize("learner", sorted(REPLICA_CASES))
def test_batched_replicas_equal_separate_runs(learner: str) -> None:
    batched = _train(learner, [0, 1], REPLICA_CASES[learner])
    diag = batched.diagnostics()
    for r in (0, 1):
        alone = _train(learner, [r], REPLICA_CASES[learner])
        for k, v in alone.parameters().items():
            torch.testing.assert_close(batched.parameters()[k][r], v[0], rtol=1e-5, atol=1e-6)
        for layer, metrics in alone.diagnostics().items():
            for metric, value in metrics.items():
                torch.testing.assert_close(diag[layer][metric][r], value[0], rtol=1e-5, atol=1e-6)
    if learner in ("cbp", "redo", "regrama", "snr"):
        assert sum(int(m["replacements"].sum()) for m in diag.values()) > 0


@pytest.mark.parametrize("learner", sorted(REPLICA_CASES))
def test_learner_state_survives_a_weights_only_checkpoint(learner: str) -> None:
    extra = REPLICA_CASES[learner]
    stream_a, agent_a = _setup(learner, [0, 1], extra)
    run_loop(stream_a, agent_a, 40, lambda record: None)
    buffer = io.BytesIO()
    torch.save(agent_a.state_dict(), buffer)
    buffer.seek(0)
    stream_b, agent_b = _setup(learner, [0, 1], extra)
    agent_b.load_state_dict(torch.load(buffer, weights_only=True))
    stream_b.load_state_dict(stream_a.state_dict())
    for stream, agent in ((stream_a, agent_a), (stream_b, agent_b)):
        run_loop(stream, agent, 80, lambda record: None)
    for k, v in agent_a.parameters().items():
        assert torch.equal(agent_b.parameters()[k], v), k
