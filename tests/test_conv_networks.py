"""The replica-batched conv net (agents/conv_networks.py) against a plain per-seed
``nn.Module`` (agents/conv_reference.py) and ``torch.optim``: forward pass, learning steps,
replicas equal to seeds run alone, determinism, resume, refusals."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from contlearn.agents.conv_networks import BatchedConvNet
from contlearn.agents.conv_reference import TorchConvNet
from contlearn.agents.online import OnlineAgent, OnlineAgentSpec
from contlearn.backends.check import synthetic_batches
from contlearn.backends.mlp import BACKENDS
from contlearn.envs.base import StreamInfo
from contlearn.errors import ConfigError
from contlearn.learners import Learner
from contlearn.running.config import resolve

SPEC = OnlineAgentSpec(network="convnet", init="torch_default", lr=0.05)


def info(shape=(3, 32, 32), R=2, B=3, classes=2) -> StreamInfo:
    return StreamInfo("test", "classification", shape, classes, True, R, "accuracy", B)


def learner(name: str = "bp", **options) -> Learner:
    values = {"stream": "permuted-mnist", "learner": name, "network": "convnet"}
    values.update({f"learner.{k}": v for k, v in options.items()})
    return resolve(values).learner


def modules(agent: OnlineAgent) -> list[TorchConvNet]:
    c, side, _ = agent.info.input_shape
    return [
        TorchConvNet(c, side, agent.info.num_outputs).load_replica(agent.parameters(), r)
        for r in range(len(agent.seeds))
    ]


@pytest.mark.parametrize("mode", ["grouped", "loop"])
@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 28, 28)])
def test_forward_equals_each_seeds_torch_module(shape, mode):
    gens = [torch.Generator().manual_seed(s) for s in (1, 2, 3)]
    net = BatchedConvNet(shape, 5, "relu", "torch_default", gens)
    net.replica_convs = mode
    x = torch.rand(3, 4, *shape)
    out, feats = net.forward(x)
    pooled = net.forward_train(x.reshape(3, 4, -1))[1]
    for r in range(3):
        ref = TorchConvNet(shape[0], shape[1], 5).load_replica(net.params, r)
        y, hs = ref.predict(x[r])
        torch.testing.assert_close(out[r], y, rtol=1e-4, atol=1e-5)
        for layer, h, p in zip(net.hidden_layers, hs, pooled, strict=True):
            if h.dim() == 4:  # a channel's map: every position a sample; probes: its mean
                per_pos = h.permute(0, 2, 3, 1).reshape(-1, h.shape[1])
                torch.testing.assert_close(feats[layer.name][r], per_pos, rtol=1e-4, atol=1e-5)
                torch.testing.assert_close(p[r], h.mean((2, 3)), rtol=1e-4, atol=1e-5)
            else:
                torch.testing.assert_close(p[r], h, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(net.forward_vmap(x, net.params), out, rtol=1e-4, atol=1e-5)


def test_init_draws_each_layer_from_its_fan_in():
    net = BatchedConvNet((3, 32, 32), 2, "relu", "torch_default", [torch.Generator()])
    for layer in net.layers:
        w = net.params[f"{layer.name}.weight"]
        bound = layer.fan_in**-0.5  # nn.Conv2d / nn.Linear's default: U(±1/√fan_in)
        assert float(w.abs().max()) <= bound and float(w.abs().max()) > 0.9 * bound
    assert net.layers[0].fan_in == 3 * 25 and net.shapes["fc1"] == (128, 128, 4)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_steps_equal_torch_optim_per_seed(optimizer):
    spec = dataclasses.replace(SPEC, optimizer=optimizer, lr=0.01 if optimizer == "sgd" else 1e-3)
    agent = OnlineAgent(info(), [4, 5], spec, learner())
    assert agent.backend == "reference" and agent.step_config.network == "convnet"
    assert not any(b.supports(agent.step_config) for b in BACKENDS)
    refs = modules(agent)
    opts = [
        torch.optim.SGD(m.parameters(), lr=spec.lr)
        if optimizer == "sgd"
        else torch.optim.Adam(m.parameters(), lr=spec.lr, betas=(spec.beta1, spec.beta2))
        for m in refs
    ]
    for obs, target in synthetic_batches(agent.info, 4, seed=1):
        loss = agent.observe(obs, agent.act(obs), target)["loss"]
        for r, (m, opt) in enumerate(zip(refs, opts, strict=True)):
            opt.zero_grad()
            ref_loss = F.cross_entropy(m(obs[r]), target[r])
            ref_loss.backward()
            opt.step()
            torch.testing.assert_close(loss[r], ref_loss.detach(), rtol=1e-4, atol=1e-5)
    for r, m in enumerate(refs):
        torch.testing.assert_close(
            modules(agent)[r].state_dict(), m.state_dict(), rtol=2e-4, atol=2e-5
        )


def run(agent: OnlineAgent, batches, task_start: int = 2) -> None:
    for t, (obs, target) in enumerate(batches):
        if t == task_start:
            agent.on_task_start(t)
        agent.observe(obs, agent.act(obs), target)


def test_replicas_equal_seeds_run_alone_and_same_seed_is_identical():
    cbp = learner("cbp", maturity=1, replacement_rate=0.2)
    both = OnlineAgent(info(R=2), [7, 8], SPEC, cbp)
    alone = OnlineAgent(info(R=1), [8], SPEC, cbp)
    again = OnlineAgent(info(R=2), [7, 8], SPEC, cbp)
    for k, v in both.parameters().items():
        assert torch.equal(v[1:], alone.parameters()[k])
    batches = synthetic_batches(info(R=2), 5, seed=2)
    run(both, batches)
    run(again, batches)
    run(alone, [(o[1:], t[1:]) for o, t in batches])
    for k, v in both.parameters().items():
        assert torch.equal(v, again.parameters()[k])
        torch.testing.assert_close(v[1:], alone.parameters()[k], rtol=1e-4, atol=1e-5)
    assert int(both.diagnostics()["conv1"]["replacements"].sum()) > 0


def test_resume_from_state_dict_is_exact():
    cbp = learner("cbp", maturity=1, replacement_rate=0.2)
    spec = dataclasses.replace(SPEC, optimizer="adam", lr=1e-3)
    whole = OnlineAgent(info(), [3, 4], spec, cbp)
    first = OnlineAgent(info(), [3, 4], spec, cbp)
    batches = synthetic_batches(info(), 6, seed=3)
    run(whole, batches)
    run(first, batches[:3])
    state = first.state_dict()
    second = OnlineAgent(info(), [3, 4], spec, cbp)
    second.load_state_dict(state)
    run(second, batches[3:], task_start=-1)
    for k, v in whole.parameters().items():
        assert torch.equal(v, second.parameters()[k]), k


@pytest.mark.parametrize(
    "shape, spec, words",
    [
        ((784,), SPEC, "reads images (C, H, W), and this stream's input_shape is (784,)"),
        ((1, 16, 16), SPEC, "at least 24×24 pixels, and this stream's are 16×16"),
        ((1, 28, 28), dataclasses.replace(SPEC, layer_norm=True), "has no layer_norm"),
        ((1, 28, 28), dataclasses.replace(SPEC, activation="crelu"), "activation=crelu"),
        ((3, 4, 4), dataclasses.replace(SPEC, network="resnet18"), "at least 8×8 pixels"),
        ((3, 8, 8), dataclasses.replace(SPEC, network="resnet18"), "use batch_size >= 2"),
    ],
)
def test_refusals_name_the_problem_and_the_fix(shape, spec, words):
    with pytest.raises(ConfigError) as err:
        OnlineAgent(info(shape, B=1), [0], spec, learner())
    assert words in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "values, words",
    [
        ({"credit": "fa"}, "learns by backprop only"),
        ({"learner": "normalize-and-project"}, "does not apply to network=convnet"),
    ],
)
def test_refused_combinations_are_refused_when_resolved(values, words):
    with pytest.raises(ConfigError, match=words):
        resolve({"stream": "permuted-mnist", "network": "convnet", **values})


def test_more_seeds_of_a_resnet_than_memory_holds_are_refused_up_front():
    values = {"stream": "permuted-mnist", "network": "resnet18", "seeds": 100_000}
    with pytest.raises(ConfigError, match="more than this machine's"):
        resolve(values)
