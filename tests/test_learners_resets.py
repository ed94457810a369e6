"""ReDo against a naive reference, the head reset, and resets of anchors (θ₀)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F

from contlearn.agents.networks import BatchedMLP
from contlearn.errors import ConfigError
from contlearn.learners import adam, add_l2_init, chain, continual_backprop, head_reset, redo, sgd
from contlearn.learners.base import AnchorState, find_states
from contlearn.seeding import torch_generator

LR, MU = 0.05, 0.9


def _net(seeds: list[int], hidden=(6, 5)) -> BatchedMLP:
    return BatchedMLP(
        4, hidden, 3, "relu", "kaiming_uniform", [torch_generator(s, "agent") for s in seeds]
    )


def _views(net: BatchedMLP) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in net.params.items()}


def _grads(net: BatchedMLP, p: dict, x: torch.Tensor, y: torch.Tensor):
    """Per-replica mean cross-entropy gradients and hidden activations."""
    params = {k: v.clone().requires_grad_(True) for k, v in p.items()}
    out, feats = net.forward(x, params)
    loss = F.cross_entropy(out.reshape(-1, 3), y.reshape(-1), reduction="none")
    grads = torch.autograd.grad(loss.view(x.shape[0], -1).mean(1).sum(), list(params.values()))
    return dict(zip(p, grads, strict=True)), {k: v.detach() for k, v in feats.items()}


def _step(net: BatchedMLP, learner, state, x, y, **extra):
    p = _views(net)
    grads, feats = _grads(net, p, x, y)
    updates, state = learner.update(grads, state, p, features=feats, **extra)
    for k in p:
        p[k] += updates[k]
    return state


def _batches(steps: int, R: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    data = torch.Generator().manual_seed(1)
    for _ in range(steps):
        # shifted inputs make some ReLU units (nearly) dormant
        yield torch.rand(R, 8, 4, generator=data) - 0.8, torch.randint(0, 3, (R, 8), generator=data)


class NaiveReDo:
    """One replica of ReDo over SGD with momentum, in plain per-unit loops."""

    def __init__(
        self, net: BatchedMLP, r: int, seed: int, tau: float, period: int, window: int
    ) -> None:
        self.net, self.r = net, r
        self.p = {k: v[r : r + 1].clone() for k, v in net.params.items()}
        self.buf = {k: torch.zeros_like(v) for k, v in self.p.items()}
        self.gen = torch_generator(seed, "learner")
        self.tau, self.period, self.window, self.t = tau, period, window, 0
        self.layers = [(layer.name, layer.next) for layer in net.hidden_layers]
        self.sums = {n: torch.zeros(self.p[f"{n}.bias"].shape[1]) for n, _ in self.layers}
        self.replaced = {n: 0 for n in self.sums}

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        grads, feats = _grads(self.net, self.p, x, y)
        post = {}
        for k, g in grads.items():
            self.buf[k] = MU * self.buf[k] + g
            post[k] = self.p[k] - LR * self.buf[k]
        self.t += 1
        if (self.t - 1) % self.period >= self.period - self.window:
            for n in self.sums:
                self.sums[n] += feats[n][0].abs().mean(0)
        if self.t % self.period == 0:
            dormant = {n: self.dormant(n) for n in self.sums}
            for n, nxt in self.layers:
                self.reset(post, n, nxt, dormant[n])
        self.p = post

    def dormant(self, n: str) -> list[int]:
        e = self.sums[n] / self.window
        self.sums[n] = torch.zeros_like(e)
        mean = float(e.mean())
        return [i for i in range(len(e)) if (float(e[i]) / mean if mean > 0 else 0.0) <= self.tau]

    def reset(self, post: dict, n: str, nxt: str, units: list[int]) -> None:
        if not units:
            return
        fresh, _ = self.net.sample_init(n, len(units), self.gen)
        for j, i in enumerate(units):
            post[f"{n}.weight"][0, i] = fresh[j]
            post[f"{n}.bias"][0, i] = 0.0
            post[f"{nxt}.weight"][0, :, i] = 0.0
            self.buf[f"{n}.weight"][0, i] = 0.0
            self.buf[f"{n}.bias"][0, i] = 0.0
            self.buf[f"{nxt}.weight"][0, :, i] = 0.0
        self.replaced[n] += len(units)


def test_redo_matches_naive_reference() -> None:
    seeds, tau, period, window = [2, 7], 0.5, 10, 4
    net = _net(seeds)
    naive = [NaiveReDo(net, r, s, tau, period, window) for r, s in enumerate(seeds)]
    learner = redo(sgd(LR, MU), net, seeds, threshold=tau, period=period, window=window)
    state = learner.init(_views(net))
    for x, y in _batches(60, 2):
        state = _step(net, learner, state, x, y)
        for r, ref in enumerate(naive):
            ref.step(x[r : r + 1], y[r : r + 1])
            for k, v in ref.p.items():
                torch.testing.assert_close(
                    net.params[k][r : r + 1].detach(), v, rtol=1e-4, atol=1e-5
                )
                torch.testing.assert_close(
                    state.inner.inner[0].trace[k][r : r + 1], ref.buf[k], rtol=1e-4, atol=1e-5
                )
            for n in ref.replaced:
                assert int(state.stats.replacements[n][r]) == ref.replaced[n]
    assert sum(int(v.sum()) for v in state.stats.replacements.values()) > 5


def test_redo_rejects_bad_window() -> None:
    with pytest.raises(ConfigError, match="window"):
        redo(sgd(0.1), _net([0]), [0], period=10, window=11)


def test_head_reset_redraws_output_layer_and_clears_its_state() -> None:
    seeds = [3, 4]
    net = _net(seeds)
    base = adam(0.01)
    learner = head_reset(base, net, seeds)
    state = learner.init(_views(net))
    batches = _batches(4, 2)
    for _ in range(3):
        state = _step(net, learner, state, *next(batches))
    x, y = next(batches)
    before = {k: v.clone() for k, v in _views(net).items()}
    plain_state = base.init(before)
    for d, ours in zip(plain_state.inner[0], state.inner.inner[0], strict=True):
        for k in d:
            d[k].copy_(ours[k])
    grads, _ = _grads(net, before, x, y)
    plain_updates, _ = base.update(grads, plain_state, before)
    state = _step(net, learner, state, x, y, task_start=True)
    for r, seed in enumerate(seeds):
        w, b = net.sample_init("output", 3, torch_generator(seed, "learner"))
        assert torch.equal(net.params["output.weight"][r].detach(), w)
        assert torch.equal(net.params["output.bias"][r].detach(), b)
    for k in ("hidden1.weight", "hidden2.bias"):
        assert torch.equal(_views(net)[k], before[k] + plain_updates[k])
    for d in state.inner.inner[0]:
        assert (d["output.weight"] == 0).all() and (d["output.bias"] == 0).all()
        assert (d["hidden1.weight"] != 0).any()
    assert state.resets.tolist() == [1, 1]


def test_reset_moves_anchor_of_replaced_weights_to_their_new_values() -> None:
    net = _net([0], hidden=(6,))
    theta0 = {k: v.clone() for k, v in _views(net).items()}
    learner = continual_backprop(
        chain(add_l2_init(0.1), sgd(0.01)), net, [0], replacement_rate=1 / 6, maturity=0
    )
    state = _step(net, learner, learner.init(_views(net)), *next(_batches(1, 1)))
    (anchor,) = find_states(state, AnchorState)
    i = int((state.stats.age["hidden1"][0] == 0).nonzero())
    p = _views(net)
    assert torch.equal(anchor.anchor["hidden1.weight"][0, i], p["hidden1.weight"][0, i])
    assert (anchor.anchor["output.weight"][0, :, i] == 0).all()
    keep = torch.arange(6) != i
    assert torch.equal(anchor.anchor["hidden1.weight"][0, keep], theta0["hidden1.weight"][0, keep])
    assert torch.equal(anchor.anchor["output.bias"], theta0["output.bias"])


def test_documented_composition_runs() -> None:
    """head_reset(continual_backprop(chain(sgd, shrink_perturb))) as in docs/learners.md."""
    from contlearn.learners import shrink_perturb

    seeds = [0, 1]
    net = _net(seeds)
    learner = head_reset(
        continual_backprop(
            chain(sgd(0.003), shrink_perturb(3e-7, 1e-5, seeds)),
            net,
            seeds,
            replacement_rate=0.2,
            maturity=2,
        ),
        net,
        seeds,
        rng_stream=2,
    )
    state = learner.init(_views(net))
    for step, (x, y) in enumerate(_batches(6, 2)):
        state = _step(net, learner, state, x, y, task_start=step == 3)
    assert state.resets.tolist() == [1, 1]
    assert int(state.inner.stats.replacements["hidden1"].sum()) > 0
    assert all(torch.isfinite(v).all() for v in net.params.values())
