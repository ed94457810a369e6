"""Speed options left at ``auto``: the rule (with fake core counts), the choice recorded in the
run's config, the same numbers as the plain setting, and the waiting side's back-off."""

from __future__ import annotations

import pytest
import torch

from contlearn.backends import auto
from contlearn.envs.base import StreamInfo
from contlearn.envs.split_vector import wait_ready, wait_reply
from contlearn.running.config import resolve

INFO = StreamInfo("ant-like", "rl", (11,), 3, False, 2, "episode_return")
SMALL = {"hidden": "16,16", "rollout": 32, "minibatch_size": 8, "epochs": 2}


@pytest.fixture
def cores(monkeypatch):
    """Set the usable core count the rule sees."""

    def set_cores(n: int) -> None:
        monkeypatch.setattr(auto, "usable_cores", lambda: n)

    return set_cores


@pytest.mark.parametrize(
    "n, values, worker, vector",
    [
        (2, {}, "true", "sync"),  # paper defaults: one copy, the value worker
        (2, {"num_envs": 4}, "true", "split"),
        (8, {"num_envs": 4, "threads": 0}, "true", "split"),
        (1, {"num_envs": 4}, "false", "sync"),  # one core: nothing to overlap
        (2, {"num_envs": 4, "threads": 1}, "false", "sync"),  # the run asks for one core
        (2, {"learner": "cbp", "num_envs": 4}, "false", "split"),  # resets couple the nets
        (2, {"max_grad_norm": 0.5}, "false", "sync"),  # a norm over both nets
        (2, {"fast": False}, "false", "sync"),  # the reference step
        (2, {"credit": "fa"}, "false", "sync"),
        (1, {"value_worker": True, "vector": "split", "num_envs": 2}, "true", "split"),  # as given
        (4, {"value_worker": "false", "vector": "sync", "num_envs": 2}, "false", "sync"),
    ],
)
def test_the_rule_and_the_recorded_choice(cores, n, values, worker, vector) -> None:
    cores(n)
    cfg = resolve({"stream": "slippery-ant", **values})
    assert (cfg.agent_spec.value_worker, cfg.stream_spec.vector) == (worker, vector)
    flat = cfg.to_dict()  # what config.json holds: the choice, not "auto"
    assert (flat["value_worker"], flat["vector"]) == (worker, vector)
    again = resolve({**flat, "stream": "slippery-ant"})  # a resume reads the same choice
    assert again.agent_spec.value_worker == worker and again.stream_spec.vector == vector


def test_the_rule_functions() -> None:
    assert auto.second_core_free(0, cores=2) and not auto.second_core_free(0, cores=1)
    assert not auto.second_core_free(1, cores=16) and auto.second_core_free(4, cores=16)
    assert auto.auto_flag("auto", True, 0, cores=2) == "true"
    assert auto.auto_flag("auto", False, 0, cores=2) == "false"
    assert auto.auto_flag("false", True, 0, cores=2) == "false"
    assert auto.auto_vector("auto", 1, 0, cores=2) == "sync"
    assert auto.auto_vector("async", 4, 1, cores=1) == "async"
    assert auto.usable_cores() >= 1
    cfg = resolve({"stream": "slippery-ant", "value_worker": "false"})
    spec = type(cfg.agent_spec)(**{**cfg.agent_spec.__dict__, "value_worker": "auto"})
    on = cfg.agent_cls.resolve_auto(spec, cfg.learner, cores=2)
    off = cfg.agent_cls.resolve_auto(spec, cfg.learner, device="cuda:0", cores=2)
    assert (on.value_worker, off.value_worker) == ("true", "false")  # shared memory: CPU only


def _play(agent, steps: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for t in range(steps):
        obs = torch.randn(2, 2, 11, generator=g)
        action = agent.act(obs)
        feedback = (
            torch.randn(2, 2, generator=g),
            torch.randn(2, 2, 11, generator=g),
            torch.rand(2, 2, generator=g) < 0.1,
            torch.full((2, 2), t % 7 == 6),
        )
        if m := agent.observe(obs, action, feedback):
            out.append(m)
    return out


def test_auto_gives_the_numbers_of_the_plain_setting(cores) -> None:
    cores(2)
    made = []
    for value in ("auto", "false"):
        cfg = resolve({"stream": "slippery-ant", "value_worker": value, **SMALL})
        made.append(cfg.agent_cls(INFO, [0, 1], cfg.agent_spec, cfg.learner))
    fast, plain = made
    try:
        assert fast.backend == "ppo-gradients+value-worker+compiled-acting"
        assert plain.backend == "ppo-gradients+compiled-acting"
        for x, y in zip(_play(fast, 48), _play(plain, 48), strict=True):
            assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
        for k in plain._keys:
            assert torch.equal(fast._views[k], plain._views[k])
    finally:
        fast.close()


def test_an_agent_built_without_the_config_resolves_auto_itself(cores) -> None:
    cfg = resolve({"stream": "slippery-ant", "value_worker": "false", **SMALL})
    spec = type(cfg.agent_spec)(**{**cfg.agent_spec.__dict__, "value_worker": "auto"})
    cores(1)
    assert cfg.agent_cls(INFO, [0], spec, cfg.learner).spec.value_worker == "false"


class _Conn:
    """A pipe end whose message arrives at the ``ready``-th poll; records each poll's
    timeout."""

    def __init__(self, ready: int | None) -> None:
        self.ready, self.timeouts = ready, []

    def poll(self, timeout: float = 0.0) -> bool:
        self.timeouts.append(timeout)
        return self.ready is not None and len(self.timeouts) >= self.ready

    def recv(self):
        return ("ok", 42)


def test_a_reply_due_at_once_is_caught_by_the_spin() -> None:
    conn = _Conn(ready=3)
    assert wait_ready(conn, spin=60.0, alive=lambda: True)
    assert conn.timeouts == [0, 0, 0]  # never blocked


def test_a_side_that_is_not_ready_is_waited_for_asleep() -> None:
    conn = _Conn(ready=4)
    assert wait_ready(conn, spin=0.0, alive=lambda: True, block=0.5)
    assert conn.timeouts[0] == 0 and conn.timeouts[1:] == [0.5, 0.5, 0.5]  # blocking waits


def test_a_dead_other_side_ends_the_wait() -> None:
    conn = _Conn(ready=None)
    assert not wait_ready(conn, spin=0.0, alive=lambda: False, block=0.5)

    class Dead:
        def is_alive(self) -> bool:
            return False

    with pytest.raises(RuntimeError, match="the env worker process died"):
        wait_reply(conn, Dead(), "env worker", spin=0.0)
    assert wait_reply(_Conn(ready=2), Dead(), "env worker", spin=0.0) == 42


def test_an_agent_dropped_without_close_ends_its_worker(cores) -> None:
    import gc

    cores(2)
    cfg = resolve({"stream": "slippery-ant", **SMALL})
    agent = cfg.agent_cls(INFO, [0, 1], cfg.agent_spec, cfg.learner)
    _play(agent, 16)  # one update: the worker is forked
    proc = agent._worker._proc
    assert proc.is_alive()
    del agent
    gc.collect()
    proc.join(timeout=10)
    assert not proc.is_alive()


def test_a_sweep_workers_share_of_the_cores() -> None:
    assert auto.cores_allowed(2, None) == 2
    assert auto.cores_allowed(2, 1) == 1  # workers=2 on 2 cores: no second process per run
    assert auto.cores_allowed(16, 8) == 8 and auto.cores_allowed(4, 0) == 1
    try:
        auto.limit_cores(1)
        assert auto._share == 1
    finally:
        auto.limit_cores(None)


def test_a_local_sweep_worker_limits_its_cores(monkeypatch) -> None:
    import contlearn.sweeps.local as local

    seen = []
    monkeypatch.setattr(auto, "limit_cores", seen.append)
    monkeypatch.setattr(local.os, "setpgid", lambda *a: None)
    monkeypatch.setattr(local.signal, "signal", lambda *a: None)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    local._init_worker(1, None)
    assert seen == [1]
