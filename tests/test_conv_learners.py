"""Learners and probes on conv layers, against a per-channel loop over a plain ``nn.Module``
(agents/conv_reference.py) and ``torch.optim.SGD``: a unit is an output channel
(docs/conv_networks.md)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import contlearn
from contlearn.agents.conv_reference import TorchConvNet
from contlearn.agents.online import OnlineAgent, OnlineAgentSpec
from contlearn.backends.check import synthetic_batches
from contlearn.envs.base import StreamInfo
from contlearn.learners.base import find_states
from contlearn.learners.optim import ScaleByAdamState
from contlearn.probes.measures import ProbeContext, dead_fraction, effective_rank_of
from contlearn.running.config import resolve
from tests import conv_stream_examples

SPEC = OnlineAgentSpec(network="convnet", init="torch_default", lr=0.05)
INFO = StreamInfo("test", "classification", (3, 32, 32), 2, True, 2, "accuracy", 3)
NEXT = {"conv1": "conv2", "conv2": "conv3", "conv3": "fc1", "fc1": "fc2", "fc2": "output"}
ETA = 0.99


def learner(name: str, **options):
    values = {"stream": "permuted-mnist", "learner": name, "network": "convnet"}
    values.update({f"learner.{k}": v for k, v in options.items()})
    return resolve(values).learner


def module(params: dict[str, torch.Tensor], r: int) -> TorchConvNet:
    return TorchConvNet(3, 32, 2).load_replica(params, r)


def presented(m: TorchConvNet) -> dict[str, torch.Tensor]:
    """The module's weights in the learner's layout, one replica: ``{name: tensor}``."""
    out = {}
    for name, mod in [("conv1", m.conv1), ("conv2", m.conv2), ("conv3", m.conv3)]:
        out[name] = mod.weight.detach().flatten(2)  # (out, in, kh·kw)
    out["fc1"] = m.fc1.weight.detach().view(128, 128, 4)  # conv3's channel j: [:, j, :]
    out["fc2"], out["output"] = m.fc2.weight.detach(), m.fc3.weight.detach()
    return out


def sgd_step(m: TorchConvNet, obs: torch.Tensor, target: torch.Tensor) -> list[torch.Tensor]:
    """One SGD step on the module; the hidden activations of its forward pass."""
    out, hs = m.predict(obs)
    m.zero_grad()
    F.cross_entropy(out, target).backward()
    with torch.no_grad():
        for p in m.parameters():
            p -= SPEC.lr * p.grad
    return [h.detach() for h in hs]


def channel_means(h: torch.Tensor) -> torch.Tensor:
    """Per unit, the mean of |h| over the batch and (for a conv map) its positions, by a loop."""
    return torch.stack([h[:, i].abs().mean() for i in range(h.shape[1])])


def out_l1(w: torch.Tensor) -> torch.Tensor:
    """Σ over every outgoing weight of unit i, by a loop over i (w: (out, in, ...))."""
    return torch.stack([w[:, i].abs().sum() for i in range(w.shape[1])])


def test_cbp_replaces_the_lowest_utility_channels_as_a_per_channel_loop_does():
    cbp = learner("cbp", maturity=1, replacement_rate=0.5)
    agent = OnlineAgent(INFO, [11, 12], SPEC, cbp)
    refs = [module(agent.parameters(), r) for r in range(2)]
    (o1, t1), (o2, t2) = synthetic_batches(INFO, 2, seed=4)
    agent.observe(o1, agent.act(o1), t1)
    before = {k: v.clone() for k, v in agent.parameters().items()}
    agent.observe(o2, agent.act(o2), t2)
    after = agent.parameters()
    stats = agent.learner_state.stats
    for r, m in enumerate(refs):
        h1 = sgd_step(m, o1[r], t1[r])
        u1 = {
            n: (1 - ETA) * channel_means(h) * out_l1(presented(m)[NEXT[n]])
            for n, h in zip(NEXT, h1, strict=False)
        }
        f1 = {
            n: (1 - ETA) * torch.stack([h[:, i].mean() for i in range(h.shape[1])])
            for n, h in zip(NEXT, h1, strict=False)
        }
        h2 = sgd_step(m, o2[r], t2[r])  # post-update weights of step 2: what CBP reads
        post = presented(m)
        below: list[int] = []  # the layer below's replaced units (their columns are zeroed)
        for n, h in zip(NEXT, h2, strict=False):
            y = channel_means(h) * out_l1(post[NEXT[n]])
            u_hat = (ETA * u1[n] + (1 - ETA) * y) / (1 - ETA**2)
            k = h.shape[1] // 2  # carry: ρ·|eligible| = 0.5·H units at the first mature step
            chosen = set(torch.sort(u_hat, stable=True).indices[:k].tolist())
            replaced = set((stats.age[n][r] == 0).nonzero().flatten().tolist())
            assert replaced == chosen, n
            f_hat = (
                ETA * f1[n] + (1 - ETA) * torch.stack([h[:, i].mean() for i in range(h.shape[1])])
            ) / (1 - ETA**2)
            w_in, w_out = after[f"{n}.weight"][r], after[f"{NEXT[n]}.weight"][r]
            bias_out = getattr(m, NEXT[n] if NEXT[n] != "output" else "fc3").bias.detach()
            # rows of the next layer not themselves replaced (a replaced row is redrawn whole)
            kept = stats.age[NEXT[n]][r] > 0 if NEXT[n] in stats.age else slice(None)
            fold = torch.zeros_like(bias_out)
            for i in range(h.shape[1]):
                if i in chosen:  # redrawn filter (not the SGD step's), zero bias, zero out
                    assert not torch.allclose(w_in[i], post[n][i])
                    assert float(w_in[i].abs().max()) <= w_in[i].numel() ** -0.5 + 1e-6
                    assert float(after[f"{n}.bias"][r, i]) == 0.0
                    assert torch.all(w_out[kept, i] == 0)
                    fold += post[NEXT[n]][:, i].reshape(bias_out.shape[0], -1).sum(1) * f_hat[i]
                else:  # the SGD step's filter, but for the columns of replaced units below
                    expect = post[n][i].clone()
                    expect[below] = 0
                    torch.testing.assert_close(w_in[i], expect, rtol=1e-4, atol=1e-5)
            below = sorted(chosen)
            if NEXT[n] == "output":
                torch.testing.assert_close(
                    after["output.bias"][r], bias_out + fold, rtol=1e-4, atol=1e-5
                )
    assert int(stats.replacements["conv1"].sum()) == 2 * 16
    assert not torch.equal(before["conv1.weight"], after["conv1.weight"])


def test_cbp_clears_the_adam_state_of_every_reset_entry():
    cbp = learner("cbp", maturity=1, replacement_rate=0.5)
    spec = OnlineAgentSpec(network="convnet", optimizer="adam", lr=1e-3)
    agent = OnlineAgent(INFO, [1, 2], spec, cbp)
    for obs, target in synthetic_batches(INFO, 2, seed=5):
        agent.observe(obs, agent.act(obs), target)
    stats = agent.learner_state.stats
    (adam,) = find_states(agent.learner_state, ScaleByAdamState)
    for n, nxt in [("conv2", "conv3"), ("conv3", "fc1")]:
        r, i = (stats.age[n] == 0).nonzero(as_tuple=True)
        assert len(r) > 0
        for s in (adam.count, adam.mu, adam.nu):
            assert torch.all(s[f"{n}.weight"][r, i] == 0)  # incoming filter
            assert torch.all(s[f"{n}.bias"][r, i] == 0)
            assert torch.all(s[f"{nxt}.weight"][r, :, i] == 0)  # outgoing: next conv / fc cols
        keep = stats.age[n] > 0
        assert bool((adam.nu[f"{n}.weight"][keep] != 0).any())


def test_redo_scores_channels_as_a_per_channel_loop_and_recycles_the_dormant():
    redo = learner("redo", period=1, window=1, threshold=0.6)
    agent = OnlineAgent(INFO, [21, 22], SPEC, redo)
    refs = [module(agent.parameters(), r) for r in range(2)]
    obs, target = synthetic_batches(INFO, 1, seed=6)[0]
    agent.observe(obs, agent.act(obs), target)
    after, stats = agent.parameters(), agent.learner_state.stats
    for r, m in enumerate(refs):
        hs = sgd_step(m, obs[r], target[r])
        post = presented(m)
        below: list[int] = []
        for n, h in zip(NEXT, hs, strict=False):
            act = channel_means(h)
            s = act / act.mean()
            torch.testing.assert_close(stats.utility[n][r], s, rtol=1e-4, atol=1e-6)
            kept = stats.age[NEXT[n]][r] > 0 if NEXT[n] in stats.age else slice(None)
            dormant = [i for i in range(h.shape[1]) if s[i] <= 0.6]
            assert ((stats.age[n][r] == 0).nonzero().flatten().tolist()) == dormant
            for i in range(h.shape[1]):
                if i in dormant:
                    assert torch.all(after[f"{NEXT[n]}.weight"][r][kept, i] == 0)
                    assert not torch.allclose(after[f"{n}.weight"][r][i], post[n][i])
                else:
                    expect = post[n][i].clone()
                    expect[below] = 0
                    torch.testing.assert_close(
                        after[f"{n}.weight"][r][i], expect, rtol=1e-4, atol=1e-5
                    )
            below = dormant
    assert int(sum(v.sum() for v in stats.replacements.values())) > 0


def test_probes_read_each_channels_spatial_mean():
    agent = OnlineAgent(INFO, [31, 32], SPEC, learner("bp"))
    with torch.no_grad():  # channels 0-7 of conv1 dead on every input, every position
        agent.views["conv1.bias"][:, :8] = -1e3
    obs = torch.rand(2, 40, 3, 32, 32)
    feats = agent.features(obs)
    got = dead_fraction(ProbeContext(feats, agent.parameters(), "relu"))
    assert got["conv1"].tolist() == [8 / 32, 8 / 32]
    for r in range(2):
        _, hs = module(agent.parameters(), r).predict(obs[r])
        pooled = hs[2].mean((2, 3)).double()  # (P, C): conv3's channels pooled over space
        torch.testing.assert_close(feats["conv3"][r].double(), pooled, rtol=1e-4, atol=1e-6)
        s = torch.linalg.svdvals(pooled)
        p = s / s.sum()
        erank = torch.exp(-(p * torch.log(p.clamp_min(1e-300))).sum())
        torch.testing.assert_close(effective_rank_of(s), erank)


def test_a_run_on_a_conv_net_probes_every_conv_layer_and_cbp_replaces_channels(tmp_path):
    config = {
        "network": "convnet",
        "learner": "cbp",
        "seeds": 2,
        "probe_size": 16,
        "learner.maturity": 1,
        "learner.replacement_rate": 0.05,
    }
    contlearn.run(conv_stream_examples.TinyImageStream, tasks=3, config=config, out=tmp_path / "r")
    df = contlearn.load_runs(tmp_path / "r")
    for metric in ("dead_fraction", "effective_rank", "weight_magnitude", "grad_magnitude"):
        layers = set(df[df.metric == metric].layer)
        assert {"conv1", "conv2", "conv3", "fc1", "fc2"} <= layers, metric
    reps = df[(df.metric == "replacements") & (df.layer == "conv3")]
    assert float(reps.value.max()) > 0
    contlearn.resume(tmp_path / "r", tasks=4)
    assert sorted(contlearn.load_runs(tmp_path / "r").task.unique()) == [0, 1, 2, 3]


def test_cbp_adaptable_utility_of_each_channel_equals_a_per_channel_loop():
    cbp = learner("cbp", maturity=10, utility="adaptable_contribution")
    agent = OnlineAgent(INFO, [41, 42], SPEC, cbp)
    refs = [module(agent.parameters(), r) for r in range(2)]
    obs, target = synthetic_batches(INFO, 1, seed=8)[0]
    agent.observe(obs, agent.act(obs), target)
    for r, m in enumerate(refs):
        hs = sgd_step(m, obs[r], target[r])
        post = presented(m)
        for n, h in zip(NEXT, hs, strict=False):
            y = []
            for i in range(h.shape[1]):  # f̂ after one step (age 1) is this step's mean
                hi = h[:, i]
                spread = (hi - hi.mean()).abs().mean()
                y.append(spread * post[NEXT[n]][:, i].abs().sum() / post[n][i].abs().mean())
            got = agent.learner_state.utility[n][r]
            torch.testing.assert_close(got, (1 - ETA) * torch.stack(y), rtol=1e-4, atol=1e-7)
