"""The fast paths give the results of the plain ones (docs/performance.md).

The online agent's fast path (hand-written backward, fused in-place updates) against its
autograd reference path (``fast=false``), step by step on the same stream; fused plans of the
learner presets; the stream's gathered-ahead examples against per-step gathering; Adam's scalar
bias corrections against the per-element ones; threads and device options.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import contlearn
from contlearn.agents.online import OnlineAgent
from contlearn.backends import kernels
from contlearn.envs import make_stream
from contlearn.errors import ConfigError
from contlearn.learners.fused import fused_plan
from contlearn.learners.optim import scale_by_adam
from contlearn.probes.measures import DEFAULT_PROBES, PROBES, register_probe, run_probes
from contlearn.running.config import resolve
from contlearn.state import tree_leaves

CBP_FAST = {"learner.replacement_rate": 0.02, "learner.maturity": 10, "learner.decay": 0.9}
CASES = [
    ("bp", "sgd", {}),
    ("l2", "sgd", {"learner.l2": 1e-2}),
    ("snp", "sgd", {"learner.shrink": 1e-3, "learner.sigma": 1e-3}),
    ("cbp", "sgd", CBP_FAST),
    ("cbp", "adam", {**CBP_FAST, "lr": 1e-3}),
    (
        "cbp",
        "sgd",
        {
            **CBP_FAST,
            "learner.utility": "adaptable_contribution",
            "learner.rounding": "stochastic",
            "learner.l2": 1e-3,
        },
    ),
    ("bp", "adam", {"lr": 1e-3}),
    ("l2-init", "sgd", {}),
    ("redo", "sgd", {"learner.period": 20, "learner.window": 10, "learner.threshold": 0.5}),
]


def _pair(learner: str, optimizer: str, options: dict, seeds=(0, 1, 2), **extra):
    cfg = resolve(
        {
            "stream": "permuted-mnist",
            "learner": learner,
            "optimizer": optimizer,
            "hidden": "32,24",
            "examples_per_task": 60,
            **options,
            **extra,
        }
    )
    stream = make_stream(cfg.stream, cfg.stream_spec, list(seeds))
    agents = [
        OnlineAgent(
            stream.info, list(seeds), dataclasses.replace(cfg.agent_spec, fast=f), cfg.learner
        )
        for f in (True, False)
    ]
    return stream, agents


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("learner,optimizer,options", CASES)
def test_fast_path_matches_the_autograd_reference_step_by_step(learner, optimizer, options):
    _compare_step_by_step(learner, optimizer, options)


@pytest.mark.parametrize("learner,optimizer,options", [CASES[0], CASES[3], CASES[5]])
def test_fast_path_without_the_compiled_kernel_matches_too(
    monkeypatch, learner, optimizer, options
):
    monkeypatch.setattr(kernels, "_lib", False)  # as without a C compiler
    _compare_step_by_step(learner, optimizer, options)


def test_shrink_perturb_noise_drawn_replica_by_replica_matches_too(monkeypatch):
    from contlearn.learners import regularizers

    monkeypatch.setattr(regularizers, "_NOISE_BYTES", 16)  # as for large networks
    _compare_step_by_step(*CASES[2])


def test_deferred_input_layer_update_is_applied_before_anyone_reads_the_weights():
    # (learners without a post-update edit defer the input layer's update; one with a post,
    # such as cbp, has nothing deferred when its post reads the weights)
    stream, (fast, ref) = _pair("bp", "sgd", {})
    assert fast._step._defer == (kernels.library() is not None)
    assert not _pair("cbp", "sgd", CBP_FAST)[1][0]._step._defer
    for _ in range(3):
        batch = stream.next()
        for agent in (fast, ref):
            agent.observe(batch.obs, agent.act(batch.obs), batch.target)
        w = fast.parameters()["hidden1.weight"]  # a reader: the pending update is applied first
        assert fast._step._pending is None
        _close(w.detach(), ref.net.params["hidden1.weight"].detach())


def _compare_step_by_step(learner: str, optimizer: str, options: dict) -> None:
    stream, (fast, ref) = _pair(learner, optimizer, options)
    assert (fast.plan is not None) == (learner in ("bp", "l2", "snp", "cbp") and optimizer == "sgd")
    for agent in (fast, ref):
        agent.watch_gradients()
    for _ in range(200):
        batch = stream.next()
        preds = [agent.act(batch.obs) for agent in (fast, ref)]
        _close(preds[0], preds[1])
        losses = [
            agent.observe(batch.obs, p, batch.target)["loss"]
            for agent, p in zip((fast, ref), preds, strict=True)
        ]
        _close(losses[0], losses[1])
    for k in fast.parameters():
        _close(fast.parameters()[k].detach(), ref.parameters()[k].detach())
    stats = [agent.update_stats()["grad_magnitude"] for agent in (fast, ref)]
    for layer, value in stats[0].items():
        _close(value, stats[1][layer])
    for a, b in zip(tree_leaves(fast.learner_state), tree_leaves(ref.learner_state), strict=True):
        if a.is_floating_point():
            _close(a, b)
        else:
            assert torch.equal(a, b)  # ages, counts, generator states: exactly equal
    if learner == "cbp":
        replaced = fast.diagnostics()["hidden1"]["replacements"]
        assert int(replaced.sum()) > 0, "the test should exercise replacements"


@pytest.mark.parametrize("learner,optimizer,options", CASES[:5])
def test_fast_path_run_metrics_match_the_reference_run(tmp_path, learner, optimizer, options):
    config = {
        "optimizer": optimizer,
        "hidden": "16,16",
        "examples_per_task": 100,
        "probe_size": 50,
        **options,
    }
    runs = [
        contlearn.run(
            "permuted-mnist",
            learner=learner,
            seeds=2,
            tasks=3,
            config={**config, "fast": f},
            out=tmp_path / str(f),
        ).metrics()
        for f in (True, False)
    ]
    a, b = (
        df.sort_values(["seed", "step", "metric", "layer"]).reset_index(drop=True) for df in runs
    )
    assert list(a.metric) == list(b.metric) and list(a.layer) == list(b.layer)
    _close(torch.tensor(a.value.values), torch.tensor(b.value.values))


def test_probes_read_the_same_numbers_on_both_paths():
    stream, (fast, ref) = _pair("cbp", "sgd", CBP_FAST)
    for _ in range(30):
        batch = stream.next()
        for agent in (fast, ref):
            agent.observe(batch.obs, agent.act(batch.obs), batch.target)
    obs, target = stream.probe_batch(40)
    results = [run_probes(DEFAULT_PROBES, agent, obs, target) for agent in (fast, ref)]
    assert results[0].keys() == results[1].keys()
    for metric, by_layer in results[0].items():
        for layer, value in by_layer.items():
            _close(value, results[1][metric][layer])


def test_fused_plans_of_the_presets():
    lr = 0.05
    cases = {
        "bp": (-lr, 0.0, False),
        "l2": (-lr, -lr * 1e-4, False),
        "snp": (-(1 - 3e-7) * lr, -3e-7, True),
        "cbp": (-lr, 0.0, True),
    }
    for name, (alpha, beta, has_post) in cases.items():
        _, (agent, _) = _pair(name, "sgd", {"lr": lr})
        plan = agent.plan
        assert plan is not None
        assert plan.grad_scale == pytest.approx(alpha) and plan.param_scale == pytest.approx(beta)
        assert (plan.post is not None) == has_post
    assert fused_plan(_pair("cbp", "sgd", {})[1][0].learner).col_l1 == (
        "hidden2.weight",
        "output.weight",
    )
    for name, options in (
        ("bp", {"optimizer": "adam"}),
        ("bp", {"momentum": 0.9}),
        ("l2-init", {}),
        ("snp-init", {}),
        ("redo", {}),
    ):
        _, (agent, _) = _pair(name, options.get("optimizer", "sgd"), options)
        assert agent.plan is None and fused_plan(agent.learner) is None


def test_fused_plan_of_cbp_over_noise_asks_no_column_norms():
    from contlearn.learners import chain, continual_backprop, sgd, shrink_perturb

    _, (agent, _) = _pair("bp", "sgd", {})
    inner = chain(sgd(0.1), shrink_perturb(0.01, 0.1, [0, 1, 2]))
    plan = fused_plan(continual_backprop(inner, agent.net, [0, 1, 2]))
    assert plan is not None and plan.col_l1 == () and plan.post is not None


@pytest.mark.parametrize("name", ["permuted-mnist", "label-shuffled-mnist"])
def test_examples_gathered_ahead_equal_per_step_gathering(name):
    def batches(ahead: bool, n: int = 70):
        cfg = resolve({"stream": name, "examples_per_task": 30})
        stream = make_stream(name, cfg.stream_spec, [5, 6])
        if not ahead:
            stream._gather_ahead = lambda batch_size: None
        out = []
        for i in range(n):
            if i == 41:  # a checkpoint restored mid-chunk continues identically
                state = stream.state_dict()
                stream.load_state_dict(state)
            b = stream.next()
            out.append((b.obs.clone(), b.target.clone(), b.task, stream.pos))
        return out

    for a, b in zip(batches(True), batches(False), strict=True):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2:] == b[2:]


@pytest.mark.parametrize("compiled", [True, False])
def test_adam_scalar_corrections_equal_per_element_ones_after_a_reset(monkeypatch, compiled):
    if not compiled:
        monkeypatch.setattr(kernels, "_lib", False)  # the torch-ops path
    params = {"w": torch.zeros(2, 3, 4), "b": torch.zeros(2, 3)}
    gen = torch.Generator().manual_seed(0)
    grads = [{k: torch.randn(v.shape, generator=gen) for k, v in params.items()} for _ in range(6)]
    t = scale_by_adam(0.9, 0.99)
    state = t.init(params)
    for i, g in enumerate(grads):
        if i == 3:  # a reset transform zeroes the state of some elements (count included)
            for s in state:
                s["w"][0, 1] = 0
        updates, state = t.update(g, state, params)
    expected_count = torch.full((2, 3, 4), 6.0)
    expected_count[0, 1] = 3.0
    assert torch.equal(state.count["w"], expected_count)
    assert torch.equal(state.count["b"], torch.full((2, 3), 6.0))
    n, m, v = state.count["w"], state.mu["w"], state.nu["w"]
    by_hand = (m / (1 - 0.9**n)) / (v.sqrt() / (1 - 0.99**n).sqrt() + 1e-8)
    torch.testing.assert_close(updates["w"], by_hand, rtol=1e-5, atol=1e-6)


def test_preferred_threads_depend_on_the_network_size_and_cores(monkeypatch):
    small = _pair("bp", "adam", {})[1][0]  # Adam: no whole-step kernel
    assert small.preferred_threads() == 1
    blocks = _pair("bp", "sgd", {})[1][0]  # 3 replicas learning in blocks: one per core
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert blocks.preferred_threads() == 1 and blocks.block_workers() == 2
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    assert blocks.block_workers() == 3
    blocks.replica_workers = 1  # the run option threads=1
    assert blocks.block_workers() == 1
    alone = _pair("bp", "sgd", {}, seeds=(0,))[1][0]
    assert alone.block_workers() == 1
    cfg = resolve({"stream": "permuted-mnist", "hidden": "2000,2000"})
    big = OnlineAgent(
        make_stream(cfg.stream, cfg.stream_spec, [0]).info, [0], cfg.agent_spec, cfg.learner
    )
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    assert big.preferred_threads() == 0 and small.preferred_threads() == 1
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert big.preferred_threads() == 1


def test_agent_moves_to_a_device_and_hands_back_cpu_tensors():
    stream, (agent, ref) = _pair("cbp", "sgd", CBP_FAST)
    agent.to("cpu")
    batch = stream.next()
    out = agent.act(batch.obs)
    assert out.device.type == "cpu"
    assert agent.observe(batch.obs, out, batch.target)["loss"].device.type == "cpu"


def test_threads_option_holds_during_the_run_and_is_restored(tmp_path, monkeypatch):
    seen: list[int] = []
    set_threads = torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (seen.append(n), set_threads(n)))
    before = torch.get_num_threads()
    contlearn.run(
        "permuted-mnist",
        steps=30,
        out=tmp_path / "run",
        config={"threads": 2, "hidden": "8", "examples_per_task": 10, "probes": "none"},
    )
    assert seen == [2, before] and torch.get_num_threads() == before


@pytest.mark.parametrize("threads,probing", [(0, 1), (2, 2)])
def test_probes_run_on_one_thread_unless_threads_is_set(tmp_path, monkeypatch, threads, probing):
    # 3 replicas learn in blocks on 2 threads; the probes' torch ops take 1 (auto)
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    seen: list[int] = []
    register_probe("threads_seen", lambda ctx: seen.append(torch.get_num_threads()) or {})
    before = torch.get_num_threads()
    try:
        contlearn.run(
            "permuted-mnist",
            seeds=3,
            tasks=2,
            out=tmp_path / "run",
            config={
                "threads": threads,
                "hidden": "8",
                "examples_per_task": 10,
                "probes": "threads_seen",
            },
        )
    finally:
        PROBES.pop("threads_seen")
    assert seen == [probing] * 2 and torch.get_num_threads() == before


@pytest.mark.parametrize("device", ["warp-drive", "cuda:7"])
def test_bad_or_missing_device_is_a_config_error(tmp_path, device):
    if device.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has that GPU")
    with pytest.raises(ConfigError, match="device"):
        contlearn.run("permuted-mnist", steps=5, config={"device": device}, out=tmp_path / "r")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("threads,process,workers", [(0, 1, 1), (0, 2, 2), (1, 2, 1), (2, 1, 2)])
def test_block_workers_follow_the_threads_option_or_the_process_setting(
    tmp_path, monkeypatch, threads, process, workers
):
    # a sweep worker's process holds its share of the cores; threads=N is the user's word
    seen: list[int] = []
    learn = OnlineAgent.learn_block
    monkeypatch.setattr(
        OnlineAgent,
        "learn_block",
        lambda self, obs, target: (seen.append(self.block_workers()), learn(self, obs, target))[1],
    )
    before = torch.get_num_threads()
    torch.set_num_threads(process)
    try:
        contlearn.run(
            "permuted-mnist",
            seeds=3,
            steps=20,
            out=tmp_path / "run",
            config={"threads": threads, "hidden": "8", "examples_per_task": 10, "probes": "none"},
        )
    finally:
        torch.set_num_threads(before)
    assert seen and set(seen) == {workers}
