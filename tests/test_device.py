"""The torch paths on an accelerator: every learner, credit rule and network option of the
online agent on the device against the reference on the CPU, and a short run of each stream.

Skipped without CUDA. ``CONTLEARN_TEST_DEVICE=cpu`` runs the same checks with the CPU as the
device (which checks the checks); ``scripts/gpu_check.sh`` runs them on a GPU.
"""

from __future__ import annotations

import itertools
import math
import os
from pathlib import Path

import pytest
import torch

import contlearn
from contlearn.backends.check import check_online_agent
from contlearn.credit import credit_rules
from contlearn.envs.base import StreamInfo
from contlearn.learners import learner_def, learners
from contlearn.running.config import resolve

DEVICE = os.environ.get("CONTLEARN_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else "")
pytestmark = pytest.mark.skipif(
    not DEVICE, reason="no CUDA device (CONTLEARN_TEST_DEVICE=cpu runs these on the CPU)"
)
SEEDS = [0, 1]
#: a device's float sums run in another order than the CPU's
RTOL, ATOL = 1e-3, 1e-4
#: options that make rare events (replacements, resets) happen within a few steps
EXERCISE = {
    "cbp": {"learner.maturity": 2, "learner.replacement_rate": 0.3, "learner.decay": 0.9},
    "redo": {"learner.period": 4, "learner.window": 4, "learner.threshold": 0.9},
    "snp": {"learner.sigma": 1e-3, "learner.shrink": 1e-3},
}


def _info(kind: str, batch_size: int) -> StreamInfo:
    outputs = 4 if kind == "classification" else 2
    metric = "accuracy" if kind == "classification" else "squared_error"
    return StreamInfo("synthetic", kind, (12,), outputs, True, len(SEEDS), metric, batch_size)


def _check(learner: str, kind: str = "classification", batch: int = 1, **options) -> str:
    cfg = resolve(
        {
            "stream": "permuted-mnist",
            "learner": learner,
            "hidden": "7,5",
            "lr": 1e-2 if options.get("optimizer") == "adam" else 0.05,
            **EXERCISE.get(learner, {}),
            **options,
        }
    )
    return check_online_agent(
        _info(kind, batch), SEEDS, cfg.agent_spec, cfg.learner, rtol=RTOL, atol=ATOL, device=DEVICE
    )


@pytest.mark.parametrize(
    "learner,optimizer", list(itertools.product(learners.names(), ("sgd", "adam")))
)
def test_every_learner_on_the_device_computes_the_cpu_reference(learner, optimizer):
    for kind, batch in itertools.product(("classification", "regression"), (1, 3)):
        _check(learner, kind, batch, optimizer=optimizer)


@pytest.mark.parametrize("rule", credit_rules.names())
def test_every_credit_rule_on_the_device(rule):
    for learner in ("bp", "cbp"):
        _check(learner, credit=rule, **({"credit.decay": 0.02} if rule == "kolen-pollack" else {}))


@pytest.mark.parametrize("activation", ["relu", "tanh", "crelu", "fourier"])
def test_network_options_on_the_device(activation):
    _check("bp", activation=activation)
    _check("bp", activation=activation, layer_norm=True)


def test_the_device_agent_keeps_its_tensors_there():
    cfg = resolve({"stream": "permuted-mnist", "learner": "cbp", "hidden": "7,5"})
    from contlearn.agents.online import OnlineAgent

    agent = OnlineAgent(_info("classification", 1), SEEDS, cfg.agent_spec, cfg.learner).to(DEVICE)
    obs, target = torch.rand(2, 1, 12), torch.randint(4, (2, 1))
    pred = agent.act(obs)
    agent.observe(obs, pred, target)
    assert pred.device.type == "cpu", "predictions come back on the CPU"
    assert all(p.device.type == torch.device(DEVICE).type for p in agent.parameters().values())


#: a few hundred steps of each stream (the RL one: a few PPO updates)
STREAMS = {
    "permuted-mnist": {"examples_per_task": 100, "hidden": "32,32"},
    "label-shuffled-mnist": {"examples_per_task": 100, "hidden": "32,32"},
    "bit-flipping": {"examples_per_task": 100},
}
RL = {
    "num_envs": 2, "rollout": 64, "minibatch_size": 32, "epochs": 1, "hidden": "32,32",
    "change_every": 120, "max_episode_steps": 80, "probe_every": 150,
}  # fmt: skip


@pytest.mark.parametrize("stream", sorted(STREAMS))
@pytest.mark.parametrize("learner", ["bp", "cbp", "adam"])
def test_a_run_on_the_device_records_the_cpu_runs_metrics(stream, learner, tmp_path: Path):
    frames = {}
    for i, device in enumerate(("cpu", DEVICE)):
        out = tmp_path / f"run{i}"
        config = {**STREAMS[stream], "device": device}
        contlearn.run(stream, learner=learner, seeds=2, tasks=3, config=config, out=out)
        frames[i] = contlearn.load_runs(out).sort_values(["metric", "layer", "seed", "step"])
    cpu, dev = frames[0], frames[1]
    assert list(cpu.metric) == list(dev.metric) and len(cpu) > 0
    score = cpu.metric.isin(["accuracy", "squared_error"])
    assert (
        (cpu.value[score] - dev.value[score]).abs() <= 0.02 + 1e-3 * cpu.value[score].abs()
    ).all()


def test_slippery_ant_runs_on_the_device(tmp_path: Path):
    pytest.importorskip("mujoco")
    config = {**RL, "device": DEVICE}
    contlearn.run("slippery-ant", learner="cbp", seeds=2, steps=300, config=config, out=tmp_path)
    df = contlearn.load_runs(tmp_path)
    assert len(df) > 0 and all(math.isfinite(v) for v in df.value)


def test_layer_norm_learner_runs_on_the_device():
    # (normalize-and-project turns the network's layer norm on)
    assert learner_def("normalize-and-project").agent_defaults.get("layer_norm")
    _check("normalize-and-project")


@pytest.mark.parametrize("learner", ["cbp", "adam", "snp"])
def test_a_run_on_the_device_resumes_exactly(learner, tmp_path: Path):
    config = {**STREAMS["permuted-mnist"], "device": DEVICE, "checkpoint_every": 150}
    whole, part = tmp_path / "whole", tmp_path / "part"
    contlearn.run("permuted-mnist", learner=learner, seeds=2, tasks=3, config=config, out=whole)
    contlearn.run("permuted-mnist", learner=learner, seeds=2, tasks=2, config=config, out=part)
    contlearn.run(
        "permuted-mnist", learner=learner, seeds=2, tasks=3, config=config, out=part, resume=True
    )
    a, b = (
        contlearn.load_runs(p).sort_values(["metric", "layer", "seed", "step"])[["metric", "value"]]
        for p in (whole, part)
    )
    assert len(a) > 0 and a.reset_index(drop=True).equals(b.reset_index(drop=True))


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("network, shape", [("convnet", (3, 32, 32)), ("resnet18", (3, 16, 16))])
def test_conv_networks_on_the_device(network, shape, optimizer):
    """A conv network's steps on the device equal the CPU's (docs/conv_networks.md)."""
    from contlearn.agents.online import OnlineAgent
    from contlearn.backends.check import synthetic_batches

    values = {"stream": "permuted-mnist", "network": network, "optimizer": optimizer}
    cfg = resolve({**values, "learner": "l2", "lr": 1e-3})
    info = StreamInfo("conv", "classification", shape, 3, True, 2, "accuracy", 4)
    cpu = OnlineAgent(info, SEEDS, cfg.agent_spec, cfg.learner)
    dev = OnlineAgent(info, SEEDS, cfg.agent_spec, cfg.learner).to(DEVICE)
    for obs, target in synthetic_batches(info, 3, seed=7):
        for agent in (cpu, dev):
            agent.observe(obs, agent.act(obs), target)
    for k, v in cpu.parameters().items():
        torch.testing.assert_close(dev.parameters()[k].cpu(), v, rtol=RTOL, atol=ATOL)
    for k, v in getattr(cpu.net, "buffers", {}).items():
        torch.testing.assert_close(dev.net.buffers[k].cpu(), v, rtol=RTOL, atol=ATOL)
