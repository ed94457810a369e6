"""The replica-batched ResNet-18 (agents/resnet.py) against a per-seed ``nn.Module`` with
``nn.BatchNorm2d`` (agents/conv_reference.py) and ``torch.optim``; continual backprop on its
blocks' channels against a per-channel loop. Small images (3 × 8 × 8) keep it fast."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from contlearn.agents.conv_reference import TorchResNet18
from contlearn.agents.online import OnlineAgent, OnlineAgentSpec
from contlearn.agents.resnet import BatchedResNet18
from contlearn.backends.check import synthetic_batches
from contlearn.envs.base import StreamInfo
from contlearn.learners.base import find_states
from contlearn.learners.optim import ScaleByAdamState
from contlearn.running.config import resolve

SPEC = OnlineAgentSpec(network="resnet18", lr=0.01)
INFO = StreamInfo("test", "classification", (3, 8, 8), 3, True, 2, "accuracy", 2)
ETA = 0.99


def learner(name: str = "bp", **options):
    values = {"stream": "permuted-mnist", "learner": name, "network": "resnet18"}
    values.update({f"learner.{k}": v for k, v in options.items()})
    return resolve(values).learner


def module(agent: OnlineAgent, r: int) -> TorchResNet18:
    net = agent.net
    assert isinstance(net, BatchedResNet18)
    return TorchResNet18(3, 3).load_replica(agent.parameters(), net.buffers, r)


def test_forward_train_and_eval_equal_each_seeds_module():
    gens = [torch.Generator().manual_seed(s) for s in (3, 4)]
    net = BatchedResNet18((3, 8, 8), 3, "relu", "kaiming_uniform", gens)
    x = torch.rand(2, 4, 3, 8, 8)
    refs = [TorchResNet18(3, 3).load_replica(net.params, net.buffers, r) for r in range(2)]
    out, feats = net.forward(x)  # the learning pass: batch statistics, running ones updated
    for r, m in enumerate(refs):
        torch.testing.assert_close(out[r], m.train()(x[r]), rtol=1e-4, atol=1e-4)
        h = m.blocks[3].hidden
        assert h is not None
        per_pos = h.permute(0, 2, 3, 1).reshape(-1, h.shape[1])
        torch.testing.assert_close(feats["layer2.1.conv1"][r], per_pos, rtol=1e-4, atol=1e-5)
        for name, (_, bn) in m.pairs().items():
            if bn is not None:
                rm = net.buffers[f"{name}.running_mean"][r]
                torch.testing.assert_close(rm, bn.running_mean, rtol=1e-4, atol=1e-6)
    evaluated, pooled, _ = net.forward_train(x)  # probes: evaluation mode
    for r, m in enumerate(refs):
        torch.testing.assert_close(evaluated[r], m.eval()(x[r]), rtol=1e-4, atol=1e-4)
        h = m.blocks[0].hidden
        assert h is not None
        torch.testing.assert_close(pooled[0][r], h.mean((2, 3)), rtol=1e-4, atol=1e-5)


def test_sgd_steps_equal_torch_optim_and_replicas_equal_seeds_alone():
    # (16 × 16 images, 4 a batch: batch norm over 2 values at 1 × 1 would amplify rounding)
    info = dataclasses.replace(INFO, input_shape=(3, 16, 16), batch_size=4)
    agent = OnlineAgent(info, [5, 6], SPEC, learner())
    alone = OnlineAgent(dataclasses.replace(info, num_replicas=1), [6], SPEC, learner())
    for k, v in agent.parameters().items():
        assert torch.equal(v[1:], alone.parameters()[k])
    refs = [module(agent, r).train() for r in range(2)]
    opts = [torch.optim.SGD(m.parameters(), lr=SPEC.lr) for m in refs]
    for obs, target in synthetic_batches(info, 2, seed=1):
        agent.observe(obs, agent.act(obs), target)
        alone.observe(obs[1:], alone.act(obs[1:]), target[1:])
        for r, (m, opt) in enumerate(zip(refs, opts, strict=True)):
            opt.zero_grad()
            F.cross_entropy(m(obs[r]), target[r]).backward()
            opt.step()
    net = agent.net
    assert isinstance(net, BatchedResNet18)
    for r, m in enumerate(refs):
        for name, (conv, bn) in m.pairs().items():
            got = agent.parameters()[f"{name}.weight"][r].reshape(conv.weight.shape)
            torch.testing.assert_close(got, conv.weight.detach(), rtol=1e-3, atol=1e-5)
            if bn is not None:
                g = agent.parameters()[f"{name}.bn_weight"][r]
                torch.testing.assert_close(g, bn.weight.detach(), rtol=1e-3, atol=1e-5)
                rv = net.buffers[f"{name}.running_var"][r]
                torch.testing.assert_close(rv, bn.running_var, rtol=1e-4, atol=1e-5)
    for k, v in agent.parameters().items():
        torch.testing.assert_close(v[1:], alone.parameters()[k], rtol=1e-4, atol=1e-5)


def test_cbp_utility_of_each_block_channel_equals_a_per_channel_loop():
    agent = OnlineAgent(INFO, [7, 8], SPEC, learner("cbp", maturity=10))
    refs = [module(agent, r).train() for r in range(2)]
    obs, target = synthetic_batches(INFO, 1, seed=2)[0]
    agent.observe(obs, agent.act(obs), target)
    state = agent.learner_state
    for r, m in enumerate(refs):
        m.zero_grad()
        F.cross_entropy(m(obs[r]), target[r]).backward()
        with torch.no_grad():
            for p in m.parameters():
                p -= SPEC.lr * p.grad
        for k, block in enumerate(m.blocks):
            name = f"layer{k // 2 + 1}.{k % 2}.conv1"
            h = block.hidden.detach()
            w_out = block.conv2.weight.detach()  # post-update: (out, in, 3, 3)
            y = torch.stack(
                [h[:, i].abs().mean() * w_out[:, i].abs().sum() for i in range(h.shape[1])]
            )
            torch.testing.assert_close(state.utility[name][r], (1 - ETA) * y, rtol=1e-4, atol=1e-7)


def test_cbp_resets_a_block_channel_with_its_batch_norm_and_adam_state():
    spec = dataclasses.replace(SPEC, optimizer="adam", lr=1e-3)
    agent = OnlineAgent(INFO, [9, 10], spec, learner("cbp", maturity=1, replacement_rate=0.5))
    for obs, target in synthetic_batches(INFO, 2, seed=3):
        agent.observe(obs, agent.act(obs), target)
    params, stats = agent.parameters(), agent.learner_state.stats
    net = agent.net
    assert isinstance(net, BatchedResNet18)
    (adam,) = find_states(agent.learner_state, ScaleByAdamState)
    name, nxt = "layer3.0.conv1", "layer3.0.conv2"
    r, i = (stats.age[name] == 0).nonzero(as_tuple=True)
    assert len(r) == 2 * 128  # half of each replica's 256 channels
    assert torch.all(params[f"{name}.bn_weight"][r, i] == 1)
    assert torch.all(params[f"{name}.bn_bias"][r, i] == 0)
    assert torch.all(params[f"{name}.bias"][r, i] == 0)
    assert torch.all(net.buffers[f"{name}.running_mean"][r, i] == 0)
    assert torch.all(net.buffers[f"{name}.running_var"][r, i] == 1)
    assert torch.all(params[f"{nxt}.weight"][r, :, i] == 0)
    for s in (adam.count, adam.mu, adam.nu):
        for key in (f"{name}.weight", f"{name}.bias", f"{name}.bn_weight", f"{name}.bn_bias"):
            assert torch.all(s[key][r, i] == 0), key
        assert torch.all(s[f"{nxt}.weight"][r, :, i] == 0)
    kept = stats.age[name] > 0
    assert bool((net.buffers[f"{name}.running_mean"][kept] != 0).all())


def test_resume_restores_the_batch_norm_statistics():
    cbp = learner("cbp", maturity=1, replacement_rate=0.1)
    whole, first = (OnlineAgent(INFO, [1, 2], SPEC, cbp) for _ in range(2))
    batches = synthetic_batches(INFO, 4, seed=4)
    for a, part in ((whole, batches), (first, batches[:2])):
        for obs, target in part:
            a.observe(obs, a.act(obs), target)
    state = first.state_dict()
    second = OnlineAgent(INFO, [1, 2], SPEC, cbp)
    second.load_state_dict(state)
    for obs, target in batches[2:]:
        second.observe(obs, second.act(obs), target)
    for k, v in whole.parameters().items():
        assert torch.equal(v, second.parameters()[k]), k
    for k, v in whole.net.buffers.items():  # type: ignore[attr-defined]
        assert torch.equal(v, second.net.buffers[k]), k  # type: ignore[attr-defined]


def test_a_resnet_run_is_deterministic_and_probes_each_block(tmp_path):
    from contlearn import load_runs, run
    from tests.conv_stream_examples import TinyImageStream

    config = {
        "network": "resnet18",
        "learner": "cbp",
        "seeds": 2,
        "probe_size": 8,
        "channels": 3,
        "side": 8,
        "learner.maturity": 1,
        "learner.replacement_rate": 0.05,
    }
    for name in ("a", "b"):
        run(TinyImageStream, tasks=2, config=config, out=tmp_path / name)
    a, b = (load_runs(tmp_path / n).sort_values(["metric", "layer", "seed", "step"]) for n in "ab")
    assert a.value.tolist() == b.value.tolist()
    ranks = a[a.metric == "effective_rank"]
    assert len(set(ranks.layer) - {""}) == 8
    assert float(a[(a.metric == "replacements") & (a.layer == "layer4.1.conv1")].value.max()) > 0
