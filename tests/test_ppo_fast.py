"""PPO's fast paths against the autograd reference, devices, and the split vector env."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from contlearn.envs import make_stream
from contlearn.envs.base import StreamInfo
from contlearn.running.config import resolve
from contlearn.running.runner import place_agent
from contlearn.state import tree_leaves

INFO = StreamInfo("ant-like", "rl", (105,), 8, False, 2, "episode_return")
CBP = {"learner.maturity": 3, "learner.replacement_rate": 0.2}


def agent(learner: str = "bp", seeds=(0, 1), **options):
    cfg = resolve({"stream": "slippery-ant", "learner": learner, **options})
    return cfg.agent_cls(INFO, list(seeds), cfg.agent_spec, cfg.learner)


def minibatch(seed: int, R: int = 2, M: int = 64) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # log-probs near the policy's own (≈ −7.4 for 8 dims at σ = 1), so some ratios clip
    return {
        "obs": torch.randn(R, M, 105, generator=g),
        "action": torch.randn(R, M, 8, generator=g),
        "logp": torch.randn(R, M, generator=g) * 0.3 - 11.0 - torch.rand(R, M, generator=g),
        "adv": torch.randn(R, M, generator=g),
        "ret": torch.randn(R, M, generator=g),
    }


@pytest.mark.parametrize(
    "learner, options", [("bp", {}), ("cbp", CBP), ("bp", {"ent_coef": 0.01, "max_grad_norm": 0.5})]
)
def test_hand_written_update_equals_autograd(learner: str, options: dict) -> None:
    fast = agent(learner, value_worker=False, **options)  # (auto may choose the worker)
    ref = agent(learner, fast=False, **options)
    assert fast.backend == "ppo-gradients+compiled-acting" and ref.backend == "reference"
    for i in range(6):
        mb = minibatch(i)
        out_f, out_r = fast.minibatch(mb, record=True), ref.minibatch(mb, record=True)
        for k in out_r:
            torch.testing.assert_close(out_f[k], out_r[k], rtol=1e-4, atol=1e-5)
        assert 0 < float(out_r["clip_fraction"].mean()) < 1  # both branches of the clip taken
        for k in ref._keys:
            torch.testing.assert_close(fast._views[k], ref._views[k], rtol=1e-4, atol=1e-6)
    for k in ref._keys:
        torch.testing.assert_close(
            fast.stats["grad_sum"][k], ref.stats["grad_sum"][k], rtol=1e-4, atol=1e-6
        )
    if learner == "cbp":  # the same units were replaced
        assert fast.diagnostics().keys() == ref.diagnostics().keys()
        for layer, d in ref.diagnostics().items():
            assert torch.equal(fast.diagnostics()[layer]["replacements"], d["replacements"])
            assert int(d["replacements"].sum()) > 0


@pytest.mark.parametrize("learner, options", [("bp", {}), ("cbp", CBP)])
def test_parallel_nets_give_identical_numbers(learner: str, options: dict) -> None:
    seq, par = agent(learner, **options), agent(learner, parallel_nets=True, **options)
    for i in range(5):
        mb = minibatch(10 + i)
        a, b = seq.minibatch(mb, record=True), par.minibatch(mb, record=True)
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(seq._views[k], par._views[k]) for k in seq._keys)


def test_update_threads_apply_only_during_the_update() -> None:
    a = agent(rollout=8, minibatch_size=4, epochs=1, update_threads=2)
    seen = []
    update = a._update
    a._update = lambda: (seen.append(torch.get_num_threads()), update())[1]
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        obs = torch.randn(2, 1, 105)
        for _ in range(8):
            action = a.act(obs)
            a.observe(
                obs,
                action,
                (
                    torch.zeros(2, 1),
                    obs,
                    torch.zeros(2, 1, dtype=torch.bool),
                    torch.zeros(2, 1, dtype=torch.bool),
                ),
            )
        assert seen == [2] and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(old)


def _play(a, steps: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    obs, out = torch.randn(2, 2, 105, generator=g), []
    for _ in range(steps):
        action = a.act(obs)
        assert action.device.type == "cpu"
        nxt = torch.randn(2, 2, 105, generator=g)
        done = torch.rand(2, 2, generator=g) < 0.1
        m = a.observe(
            obs,
            action,
            (torch.randn(2, 2, generator=g), nxt, done, torch.zeros(2, 2, dtype=torch.bool)),
        )
        out.append(action)
        out.extend(m.values())
        obs = nxt
    return out


def test_to_cpu_device_runs_the_same_numbers() -> None:
    options = {"rollout": 16, "minibatch_size": 8, "epochs": 2}
    moved = place_agent(
        SimpleNamespace(run=SimpleNamespace(device="cpu:0"), agent="ppo"),
        agent("cbp", **options, **CBP),
    )
    assert moved.device == torch.device("cpu", 0)
    plain = agent("cbp", **options, **CBP)
    for x, y in zip(_play(moved, 40), _play(plain, 40), strict=True):
        assert x.device.type == "cpu" and torch.equal(x, y)
    assert all(v.device.type == "cpu" for v in moved.features(torch.randn(2, 3, 105)).values())


def test_to_places_network_learner_state_and_buffers_on_the_device() -> None:
    a = agent("cbp", rollout=16, minibatch_size=8, **CBP)
    a.act(torch.randn(2, 2, 105))  # allocates the rollout buffer on the CPU
    a.to("meta")  # a fake device: shapes only
    assert all(p.device.type == "meta" for p in a.net.params.values())
    assert all(p.device.type == "meta" for p in a.net.policy.params.values())
    # (generator states, uint8, stay on the CPU with the generators)
    assert all(
        t.device.type == "meta" for t in tree_leaves(a.learner_state) if t.dtype != torch.uint8
    )
    assert all(t.device.type == "meta" for t in a.buf.values())
    assert all(t.device.type == "meta" for t in a.stats["grad_sum"].values())


@pytest.mark.mujoco
def test_split_vector_env_steps_exactly_as_sync() -> None:
    streams = []
    for vector in ("sync", "split"):
        cfg = resolve(
            {
                "stream": "slippery-ant",
                "seeds": 2,
                "num_envs": 2,
                "vector": vector,
                "max_episode_steps": 40,
                "change_every": 30,
                "change_immediately": True,
            }
        )
        streams.append(make_stream(cfg.stream, cfg.stream_spec, cfg.seeds))
    sync, split = streams
    try:
        g = torch.Generator().manual_seed(0)
        for step in range(90):
            action = torch.rand(2, 2, 8, generator=g) * 2 - 1
            (fa, ea), (fb, eb) = sync.advance(action), split.advance(action)
            assert all(torch.equal(x, y) for x, y in zip(fa, fb, strict=True)) and ea == eb
            if step == 45:
                state = split.state_dict()
        assert torch.equal(sync.obs, split.obs)
        split.load_state_dict(state)  # checkpoints go through the worker too
        assert torch.equal(split.obs, state["obs"])
    finally:
        sync.close()
        split.close()
