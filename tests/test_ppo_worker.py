"""PPO's value worker (the value net's updates in a second process) changes no number."""

from __future__ import annotations

import pytest
import torch

from contlearn.envs.base import StreamInfo
from contlearn.errors import ConfigError
from contlearn.running.config import resolve
from contlearn.state import tree_leaves

INFO = StreamInfo("ant-like", "rl", (11,), 3, False, 2, "episode_return")
SMALL = {"hidden": "16,16", "rollout": 32, "minibatch_size": 8, "epochs": 3}


def agent(learner: str = "bp", **options):
    cfg = resolve({"stream": "slippery-ant", "learner": learner, **SMALL, **options})
    return cfg.agent_cls(INFO, [0, 1], cfg.agent_spec, cfg.learner)


def play(a, steps: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """Feed ``a`` fixed transitions (2 copies per replica); its update metrics."""
    g = torch.Generator().manual_seed(seed)
    metrics = []
    for t in range(steps):
        obs = torch.randn(2, 2, 11, generator=g)
        action = a.act(obs)
        feedback = (
            torch.randn(2, 2, generator=g),
            torch.randn(2, 2, 11, generator=g),
            torch.rand(2, 2, generator=g) < 0.1,
            torch.full((2, 2), t % 7 == 6),
        )
        out = a.observe(obs, action, feedback)
        if out:
            metrics.append(out)
    return metrics


def same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def assert_identical(a, b) -> None:
    assert same(a._views.values(), b._views.values())
    assert same(tree_leaves(a.learner_state), tree_leaves(b.learner_state))


@pytest.mark.parametrize(
    "learner, options",
    [
        ("bp", {}),
        ("proper-adam", {"ent_coef": 0.01}),
        ("bp", {"optimizer": "sgd", "momentum": 0.9}),
    ],
)
def test_value_worker_gives_identical_numbers(learner: str, options: dict) -> None:
    ref, split = agent(learner, **options), agent(learner, value_worker=True, **options)
    try:
        m_ref, m_split = play(ref, 48, 0), play(split, 48, 0)
        assert len(m_ref) == 3
        for x, y in zip(m_ref, m_split, strict=True):
            assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
        assert_identical(ref, split)
        s_ref, s_split = ref.update_stats(), split.update_stats()
        assert all(torch.equal(s_ref[m][k], s_split[m][k]) for m in s_ref for k in s_ref[m])
        ref.stop_replicas(torch.tensor([True, False]))
        split.stop_replicas(torch.tensor([True, False]))
        play(ref, 16, 1), play(split, 16, 1)
        assert_identical(ref, split)
    finally:
        split.close()


def test_value_worker_resumes_from_a_checkpoint() -> None:
    ref, split = agent(), agent(value_worker=True)
    try:
        play(ref, 40, 0)
        play(split, 40, 0)
        state = split.state_dict()
        play(split, 40, 1)  # the worker moves on ...
        split.load_state_dict(state)  # ... and is replaced by one from the restored state
        play(ref, 40, 1), play(split, 40, 1)
        assert_identical(ref, split)
    finally:
        split.close()


@pytest.mark.parametrize(
    "learner, options", [("cbp", {}), ("bp", {"max_grad_norm": 0.5}), ("bp", {"fast": False})]
)
def test_value_worker_refuses_coupled_updates(learner: str, options: dict) -> None:
    with pytest.raises(ConfigError, match="value_worker"):
        agent(learner, value_worker=True, **options)


@pytest.mark.parametrize("kernels_on", [True, False])
def test_switching_between_the_worker_and_this_process_changes_no_number(
    monkeypatch, kernels_on: bool
) -> None:
    """The value half alternates between the worker and the agent's process (as a lagging
    worker makes it): the numbers are the one-process update's. Without the compiled Adam the
    optimizer caches its uniform counts per process: the other process's writes must mark the
    cache stale."""
    from contlearn.backends import kernels, ppo_worker

    if not kernels_on:
        monkeypatch.setattr(kernels, "adam_applies", lambda *ts: False)
    plan = iter(["worker", "local", "local", "worker", "worker", "local", "worker", "local"])
    monkeypatch.setattr(ppo_worker.ValueMode, "choose", lambda self: next(plan))
    ref, split = agent("proper-adam"), agent("proper-adam", value_worker=True)
    try:
        m_ref, m_split = play(ref, 8 * 16, 0), play(split, 8 * 16, 0)
        assert len(m_ref) == len(m_split) == 8
        for x, y in zip(m_ref, m_split, strict=True):
            assert all(torch.equal(x[k], y[k]) for k in x)
        assert_identical(ref, split)
        s_ref, s_split = ref.update_stats(), split.update_stats()
        assert all(torch.equal(s_ref[m][k], s_split[m][k]) for m in s_ref for k in s_ref[m])
    finally:
        split.close()


def test_value_mode_keeps_the_faster_mode_and_retries_the_other() -> None:
    from contlearn.backends.ppo_worker import RETRY_EVERY, ValueMode

    vm = ValueMode()
    assert vm.choose() == "worker"
    vm.record("worker", 1.0, waited=0.1, own=0.9)  # the worker keeps up: stay with it
    assert vm.choose() == "worker"
    vm.record("worker", 1.6, waited=0.8, own=0.6)  # it lags (waited longer than own half)
    assert vm.choose() == "local" and vm.local_stale
    vm.record("local", 1.2)
    assert vm.worker_stale
    modes = [vm.choose() for _ in range(2 * RETRY_EVERY)]  # local faster (1.2 < 1.3)
    assert modes.count("worker") == 2 and modes[RETRY_EVERY - 1] == "worker"
    for _ in range(4):  # the load eases: the worker's updates get faster, it wins again
        vm.record("worker", 0.5)
    assert vm.choose() == "worker"
