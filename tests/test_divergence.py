"""Divergence: a NaN/inf loss marks that seed (the others go on) or stops the run cleanly."""

from __future__ import annotations

import math

import pytest
import torch

import contlearn
from contlearn.probes.measures import PROBES
from contlearn.results.store import load_runs


class _Breaks:
    """Replica 1's loss becomes NaN at step 30; counts learning steps per replica."""

    supports_replicas = True

    def __init__(self, info, seeds):
        self.R = len(seeds)
        self.step = 0
        self.learned = torch.zeros(self.R)
        self.stopped = torch.zeros(self.R, dtype=torch.bool)

    def act(self, obs):
        return torch.zeros(obs.shape[0], obs.shape[1], 1)

    def observe(self, obs, action, feedback):
        self.step += 1
        loss = torch.ones(self.R)
        if self.step >= 30:
            loss[1] = math.nan
        self.learned += (~self.stopped).float()
        return {"loss": loss}

    def stop_replicas(self, mask):
        self.stopped = mask


class _Tracked(_Breaks):
    """Keeps its instances (at module level: a run's agent must be found again)."""

    instances: list[_Breaks] = []

    def __init__(self, info, seeds):
        super().__init__(info, seeds)
        self.instances.append(self)


def test_mark_records_the_diverged_seed_and_the_others_go_on(tmp_path, monkeypatch):
    agents: list[_Breaks] = []
    monkeypatch.setattr(_Tracked, "instances", agents)
    Agent = _Tracked
    res = contlearn.run(
        "bit-flipping",
        agent=Agent,
        seeds=3,
        steps=100,
        config={"examples_per_task": 50},
        out=tmp_path / "r",
    )
    df = res.metrics()
    marks = df[df.metric == "diverged"]
    assert marks.seed.tolist() == [1] and marks.step.tolist() == [30]
    assert agents[0].learned.tolist() == [100, 30, 100]  # only seed 1 stopped learning
    loss = df[df.metric == "loss"]
    assert loss[loss.seed != 1].value.notna().all()


def test_stop_ends_the_run_with_a_clear_message_and_keeps_rows(tmp_path, cli):
    code, _, err = cli(
        "run",
        "bit-flipping",
        "--seeds",
        "2",
        "--tasks",
        "5",
        "--set",
        "examples_per_task=200",
        "--set",
        "lr=1e6",
        "--set",
        "on_divergence=stop",
        "--set",
        "probes=none",
        "--out",
        tmp_path / "r",
    )
    assert code == 2 and err.count("\n") == 1 and "diverged" in err and "lower lr" in err
    df = load_runs(tmp_path / "r")
    assert (df.metric == "diverged").any()


def test_mark_with_the_online_agent_freezes_diverged_replicas(tmp_path):
    res = contlearn.run(
        "bit-flipping",
        seeds=2,
        tasks=3,
        config={"examples_per_task": 100, "lr": 1e6, "probes": "none"},
        out=tmp_path / "r",
    )
    df = res.metrics()
    assert sorted(df[df.metric == "diverged"].seed) == [0, 1]
    assert df.task.max() == 2  # the run went to its end


@pytest.mark.parametrize("mode", ["mark", "stop"])
def test_bad_on_divergence_value_is_refused(mode, tmp_path):
    with pytest.raises(contlearn.ContlearnError):
        contlearn.run(
            "bit-flipping", steps=1, config={"on_divergence": mode + "x"}, out=tmp_path / "x"
        )


# --- divergence with probes on (issue #17): every probe skips or marks a diverged replica ---


def test_singular_values_of_a_non_finite_replica_are_nan_and_the_others_exact():
    from contlearn.probes.measures import ProbeContext, effective_rank, singular_values

    a = torch.randn(3, 40, 6, dtype=torch.float64)
    a[1, 3, 2] = math.nan
    a[2, 0, 0] = math.inf
    s = singular_values(a)
    assert s[1:].isnan().all() and torch.allclose(s[0], torch.linalg.svdvals(a[0]))
    ranks = effective_rank(ProbeContext({"h": a}, {}, "relu"))["h"]
    assert ranks[1:].isnan().all() and ranks[0].isfinite()


PROBED = {
    "examples_per_task": 100,
    "hidden": "8,8",
    "probe_size": 16,
    "probe_every": 25,
    "probes": ",".join(PROBES),
}


def _probes_after_divergence(df):
    """Probe rows of each diverged seed at or after the step it diverged."""
    marks = df[df.metric == "diverged"].groupby("seed").step.min()
    probes = df[df.metric.isin(_PROBE_METRICS)]
    late = probes.seed.map(marks).le(probes.step)
    return probes[late & probes.seed.isin(marks.index)]


_PROBE_METRICS = set(PROBES)  # every registered probe, the off-by-default ones too


def test_the_issue_command_ends_with_the_diverged_seeds_marked(tmp_path, cli):
    out = tmp_path / "r"
    args = ["--seeds", "3", "--set", "examples_per_task=500", "--set", "lr=0.3"]
    code, _, err = cli("run", "permuted-mnist", "--tasks", "3", *args, "--out", out)
    assert code == 0, err
    df = load_runs(out)
    diverged = set(df[df.metric == "diverged"].seed)
    assert diverged and diverged != {0, 1, 2}  # (with these seeds: some, not all)
    assert _probes_after_divergence(df).value.isna().all()
    healthy = df[~df.seed.isin(diverged) & df.metric.isin(_PROBE_METRICS - {"grad_magnitude"})]
    assert healthy.value.notna().all()
    acc = df[df.metric == "accuracy"]
    assert (acc.groupby("seed").task.max() == 2).all()  # every seed ran every task
    code, _, err = cli("resume", out, "--tasks", "4")  # and the run can go on
    assert code == 0, err
    assert (load_runs(out).query("metric == 'accuracy'").groupby("seed").task.max() == 3).all()


@pytest.mark.parametrize(
    "learner, extra",
    [
        ("bp", {}),
        ("adam", {}),
        ("l2", {}),
        ("l2-init", {}),
        ("snp", {}),
        ("snp-init", {}),
        ("cbp", {"learner.replacement_rate": 0.05, "learner.maturity": 5}),
        ("redo", {"learner.period": 20, "learner.window": 10}),
        ("head-reset", {"boundaries_visible": True}),
        pytest.param(
            "weight-clipping",
            {},
            marks=pytest.mark.skip(reason="clipping bounds the weights: it does not diverge"),
        ),
        ("upgd", {}),
        ("parseval", {}),
        ("regrama", {}),
        ("swr", {}),
        ("bp", {"credit": "fa"}),  # the alignment probes
        ("cbp", {"credit": "kolen-pollack", "activation": "tanh", "fast": False}),
    ],
)
def test_every_learner_and_probe_marks_a_diverged_replica_and_resumes(tmp_path, learner, extra):
    config = {**PROBED, **extra, "lr": 1e6, "checkpoint_every": 100}
    # every probe that the online agent can feed (a probe named that it cannot is refused)
    unfed = {"goodness_gap"}
    if "credit" not in extra:
        unfed |= {"feedback_alignment", "weight_alignment"}
    config["probes"] = ",".join(p for p in PROBES if p not in unfed)
    part = contlearn.run(
        "bit-flipping", learner=learner, seeds=2, steps=150, config=config, out=tmp_path / "r"
    )
    contlearn.resume(part.path, steps=300)
    df = load_runs(part.path)
    assert set(df[df.metric == "diverged"].seed)  # (adam: not always both)
    assert (df[df.metric == "squared_error"].groupby("seed").step.max() == 300).all()
    late = _probes_after_divergence(df)
    assert len(late) and late.value.isna().all()
    assert df.step.max() == 300


@pytest.mark.mujoco
@pytest.mark.parametrize("learner", ["bp", "cbp"])
def test_rl_divergence_with_probes_marks_and_resumes(tmp_path, learner):
    config = {
        "rollout": 64,
        "minibatch_size": 32,
        "epochs": 1,
        "hidden": "16,16",
        "change_every": 120,
        "max_episode_steps": 80,
        "probe_every": 100,
        "lr": 1e4,
        "checkpoint_every": 128,
    }
    run = contlearn.run(
        "slippery-ant", learner=learner, seeds=2, steps=200, config=config, out=tmp_path / "r"
    )
    contlearn.resume(run.path, steps=300)
    df = load_runs(run.path)
    assert set(df[df.metric == "diverged"].seed) == {0, 1}
    late = _probes_after_divergence(df)
    assert len(late) and late.value.isna().all()
    assert df.step.max() == 300
