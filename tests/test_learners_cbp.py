"""Continual backprop against a naive per-unit reference written here (docs/design.md §4a)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from contlearn.agents.networks import BatchedMLP
from contlearn.learners import adam, continual_backprop, sgd
from contlearn.learners.cbp import CBPState
from contlearn.seeding import torch_generator

LR, B1, B2, EPS = 0.05, 0.9, 0.99, 1e-8


def _net(seeds: list[int], hidden=(5, 4), in_dim: int = 6, out_dim: int = 3) -> BatchedMLP:
    return BatchedMLP(
        in_dim,
        hidden,
        out_dim,
        "relu",
        "kaiming_uniform",
        [torch_generator(s, "agent") for s in seeds],
    )


class NaiveCBP:
    """One replica of CBP with per-element Adam, one unit at a time, in plain loops."""

    def __init__(
        self,
        net: BatchedMLP,
        replica: int,
        seed: int,
        *,
        rate: float,
        maturity: int,
        decay: float,
        utility: str,
        folding: bool,
        rounding: str,
    ) -> None:
        self.net = net
        self.p = {k: v[replica].clone() for k, v in net.params.items()}
        self.adam = {s: {k: torch.zeros_like(v) for k, v in self.p.items()} for s in "mvn"}
        self.gen = torch_generator(seed, "learner")
        self.layers = [(layer.name, layer.next) for layer in net.hidden_layers]
        H = {n: self.p[f"{n}.bias"].shape[0] for n, _ in self.layers}
        self.age = {n: [0] * H[n] for n in H}
        self.f = {n: torch.zeros(H[n]) for n in H}
        self.u = {n: torch.zeros(H[n]) for n in H}
        self.u_hat = {n: torch.zeros(H[n]) for n in H}
        self.carry = {n: 0.0 for n in H}
        self.rate, self.maturity, self.decay = rate, maturity, decay
        self.utility, self.folding, self.rounding = utility, folding, rounding

    def forward(self, x: torch.Tensor, p: dict) -> tuple[torch.Tensor, dict]:
        feats, h = {}, x
        for layer in self.net.layers:
            z = h @ p[f"{layer.name}.weight"].T + p[f"{layer.name}.bias"]
            if layer.next is None:
                return z, feats
            h = torch.relu(z)
            feats[layer.name] = h
        raise AssertionError

    def adam_update(self, grads: dict) -> dict:
        out = {}
        for k, g in grads.items():
            m, v, n = self.adam["m"][k], self.adam["v"][k], self.adam["n"][k]
            m.mul_(B1).add_((1 - B1) * g)
            v.mul_(B2).add_((1 - B2) * g * g)
            n.add_(1)
            denom = v.sqrt() / (1 - B2**n).sqrt() + EPS
            out[k] = -LR * (m / (1 - B1**n)) / denom
        return out

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        p = {k: v.clone().requires_grad_(True) for k, v in self.p.items()}
        out, feats = self.forward(x, p)
        grads = dict(
            zip(p, torch.autograd.grad(F.cross_entropy(out, y), list(p.values())), strict=True)
        )
        upd = self.adam_update(grads)
        post = {k: self.p[k] + upd[k] for k in self.p}
        f_hats = {n: self.test(post, n, nxt, feats[n].detach()) for n, nxt in self.layers}
        uniforms = (
            torch.rand(len(self.layers), generator=self.gen, dtype=torch.float64)
            if self.rounding == "stochastic"
            else None
        )
        for li, (n, nxt) in enumerate(self.layers):
            chosen = self.select(n, None if uniforms is None else float(uniforms[li]))
            self.replace(post, n, nxt, chosen, f_hats[n])
        self.p = post

    def test(self, post: dict, n: str, nxt: str, h: torch.Tensor) -> list[float]:
        f_hats = []
        for i in range(len(self.age[n])):
            self.age[n][i] += 1
            self.f[n][i] = self.decay * self.f[n][i] + (1 - self.decay) * h[:, i].mean()
            correction = 1 - self.decay ** self.age[n][i]
            f_hat = self.f[n][i] / correction
            out_mag = post[f"{nxt}.weight"][:, i].abs().sum()
            if self.utility == "contribution":
                y = h[:, i].abs().mean() * out_mag
            else:
                tiny = torch.finfo(torch.float32).tiny  # documented floor: 0/0 gives 0
                in_mag = post[f"{n}.weight"][i, :].abs().mean().clamp_min(tiny)
                y = (h[:, i] - f_hat).abs().mean() * out_mag / in_mag
            self.u[n][i] = self.decay * self.u[n][i] + (1 - self.decay) * y
            self.u_hat[n][i] = self.u[n][i] / correction
            f_hats.append(float(f_hat))
        return f_hats

    def select(self, n: str, uniform: float | None) -> list[int]:
        eligible = [i for i, a in enumerate(self.age[n]) if a > self.maturity]
        if uniform is None:
            self.carry[n] += self.rate * len(eligible)
            k = math.floor(self.carry[n])
            self.carry[n] -= k
        else:
            k = math.floor(self.rate * len(eligible) + uniform)
        ranked = sorted(eligible, key=lambda i: (float(self.u_hat[n][i]), i))
        return sorted(ranked[:k])

    def replace(self, post: dict, n: str, nxt: str, chosen: list[int], f_hats: list[float]) -> None:
        if not chosen:
            return
        fresh, _ = self.net.sample_init(n, len(chosen), self.gen)
        for j, i in enumerate(chosen):
            post[f"{n}.weight"][i] = fresh[j]
            post[f"{n}.bias"][i] = 0.0
            if self.folding:
                post[f"{nxt}.bias"] += post[f"{nxt}.weight"][:, i] * f_hats[i]
            post[f"{nxt}.weight"][:, i] = 0.0
            for s in self.adam.values():
                s[f"{n}.weight"][i] = 0.0
                s[f"{n}.bias"][i] = 0.0
                s[f"{nxt}.weight"][:, i] = 0.0
            self.u[n][i] = self.f[n][i] = self.u_hat[n][i] = 0.0
            self.age[n][i] = 0


def _batched_step(net: BatchedMLP, learner, state, x: torch.Tensor, y: torch.Tensor):
    params = {k: v.requires_grad_(True) for k, v in net.params.items()}
    out, feats = net.forward(x, params)
    R = out.shape[0]
    loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), reduction="none")
    grads = torch.autograd.grad(loss.view(R, -1).mean(1).sum(), list(params.values()))
    views = {k: v.detach() for k, v in net.params.items()}
    with torch.no_grad():
        updates, state = learner.update(
            dict(zip(views, grads, strict=True)),
            state,
            views,
            features={k: v.detach() for k, v in feats.items()},
        )
        for k in views:
            views[k] += updates[k]
    return state


CASES = [
    ("contribution", True, "carry"),
    ("adaptable_contribution", True, "carry"),
    ("contribution", False, "stochastic"),
    ("adaptable_contribution", False, "stochastic"),
]


@pytest.mark.parametrize("utility,folding,rounding", CASES)
def test_matches_naive_per_unit_reference(utility: str, folding: bool, rounding: str) -> None:
    seeds, steps = [3, 8], 150
    opts = dict(rate=0.06, maturity=5, decay=0.9)
    net = _net(seeds)
    naive = [
        NaiveCBP(net, r, s, utility=utility, folding=folding, rounding=rounding, **opts)
        for r, s in enumerate(seeds)
    ]
    learner = continual_backprop(
        adam(LR, B1, B2, EPS),
        net,
        seeds,
        replacement_rate=0.06,
        maturity=5,
        decay=0.9,
        utility=utility,
        bias_folding=folding,
        rounding=rounding,
    )
    state = learner.init({k: v.detach() for k, v in net.params.items()})
    data = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = torch.rand(2, 4, 6, generator=data) * 2 - 0.5
        y = torch.randint(0, 3, (2, 4), generator=data)
        state = _batched_step(net, learner, state, x, y)
        for r, ref in enumerate(naive):
            ref.step(x[r], y[r])
            _compare(net, state, ref, r)
    total = sum(int(v.sum()) for v in state.stats.replacements.values())
    assert total > 20, "the test should exercise many replacements"


def _compare(net: BatchedMLP, state: CBPState, ref: NaiveCBP, r: int) -> None:
    for n, _ in ref.layers:
        assert state.stats.age[n][r].tolist() == ref.age[n], "same units replaced"
        torch.testing.assert_close(state.mean_act[n][r], ref.f[n], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(state.stats.utility[n][r], ref.u_hat[n], rtol=1e-4, atol=1e-6)
        if ref.rounding == "carry":
            assert float(state.carry[n][r]) == ref.carry[n]
    for k, v in ref.p.items():
        torch.testing.assert_close(net.params[k][r].detach(), v, rtol=1e-3, atol=1e-4)
    count, mu, nu = state.inner.inner[0]
    for ours, theirs in ((count, "n"), (mu, "m"), (nu, "v")):
        for k in ref.p:
            torch.testing.assert_close(ours[k][r], ref.adam[theirs][k], rtol=1e-4, atol=1e-6)


def _batches(net: BatchedMLP, steps: int, seed: int = 0):
    """``steps`` random classification batches ``(x (R, 4, D), y (R, 4))``."""
    data = torch.Generator().manual_seed(seed)
    R, D = net.num_replicas, net.layers[0].fan_in
    C = net.layers[-1].fan_out
    return [
        (torch.rand(R, 4, D, generator=data) * 2 - 0.5, torch.randint(0, C, (R, 4), generator=data))
        for _ in range(steps)
    ]


def _train(net: BatchedMLP, learner, state, steps: int, seed: int = 0):
    """``steps`` updates on random data; yields the state after each."""
    for x, y in _batches(net, steps, seed):
        state = _batched_step(net, learner, state, x, y)
        yield state


def _views(net: BatchedMLP) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in net.params.items()}


def test_no_burst_when_units_first_mature() -> None:
    net = _net([0], hidden=(50,))
    learner = continual_backprop(sgd(0.01), net, [0], replacement_rate=0.01, maturity=20)
    per_step, last = [], 0
    for step, state in enumerate(_train(net, learner, learner.init(_views(net)), 40), 1):
        total = int(state.stats.replacements["hidden1"])
        per_step.append(total - last)
        last = total
        if step == 21:  # 50 units just became eligible: carry 0.5, no debt from steps 1–20
            assert float(state.carry["hidden1"]) == 0.5
    assert per_step[:21] == [0] * 21
    assert per_step[21] == 1  # step 22: carry reaches 1.0
    assert max(per_step) == 1


def test_exact_carry_of_fractional_counts() -> None:
    # maturity 0: all 8 units are eligible every step, ρ|E| = 0.375 (exact in binary)
    net = _net([1], hidden=(8,))
    learner = continual_backprop(sgd(0.01), net, [1], replacement_rate=0.375 / 8, maturity=0)
    for t, state in enumerate(_train(net, learner, learner.init(_views(net)), 40), 1):
        assert int(state.stats.replacements["hidden1"]) == math.floor(0.375 * t)
        assert float(state.carry["hidden1"]) == 0.375 * t - math.floor(0.375 * t)


def _plain_adam_step(net: BatchedMLP, base, inner_state, params: dict, x, y):
    """What the inner optimizer alone does from a copy of ``inner_state``: (updates, state)."""
    plain = base.init(params)
    for d, saved in zip(plain.inner[0], inner_state.inner[0], strict=True):
        for k in d:
            d[k].copy_(saved[k])
    p = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    out, _ = net.forward(x, p)
    loss = F.cross_entropy(out.reshape(-1, 3), y.reshape(-1), reduction="none").view(2, -1)
    grads = torch.autograd.grad(loss.mean(1).sum(), list(p.values()))
    return base.update(dict(zip(p, grads, strict=True)), plain, params)


def _touched(state: CBPState, params: dict) -> dict[str, torch.Tensor]:
    """Per parameter, the elements a reset on this step re-initialised (units with age 0)."""
    out = {k: torch.zeros_like(v, dtype=torch.bool) for k, v in params.items()}
    for layer, nxt in (("hidden1", "hidden2"), ("hidden2", "output")):
        new = state.stats.age[layer] == 0  # (R, H)
        out[f"{layer}.weight"] |= new.unsqueeze(-1).expand_as(out[f"{layer}.weight"])
        out[f"{layer}.bias"] |= new
        out[f"{nxt}.weight"] |= new.unsqueeze(1).expand_as(out[f"{nxt}.weight"])
    return out


def test_reset_clears_optimizer_state_of_replaced_weights_only() -> None:
    net = _net([4, 5], hidden=(6, 5))
    base = adam(LR, 0.99, 0.99)
    learner = continual_backprop(base, net, [4, 5], replacement_rate=0.2, maturity=3)
    state = learner.init(_views(net))
    batches = _batches(net, 5)
    for x, y in batches[:3]:  # nothing is eligible yet
        state = _batched_step(net, learner, state, x, y)
    before = {k: v.clone() for k, v in _views(net).items()}
    plain_updates, plain = _plain_adam_step(net, base, state.inner, before, *batches[3])
    state = _batched_step(net, learner, state, *batches[3])  # one unit per layer replaced
    assert [
        int(m.sum()) for m in (state.stats.age["hidden1"] == 0, state.stats.age["hidden2"] == 0)
    ] == [2, 2]
    touched, after = _touched(state, before), _views(net)
    for ours, theirs in zip(state.inner.inner[0], plain.inner[0], strict=True):
        for k, t in touched.items():
            assert (ours[k][t] == 0).all(), f"{k}: state of re-initialised weights is zero"
            assert torch.equal(ours[k][~t], theirs[k][~t]), f"{k}: state elsewhere untouched"
    for k in ("hidden1.weight", "hidden2.weight", "output.weight", "hidden1.bias"):
        t = touched[k]
        assert torch.equal(after[k][~t], (before[k] + plain_updates[k])[~t])
    for layer, nxt in (("hidden1", "hidden2"), ("hidden2", "output")):
        new = state.stats.age[layer] == 0
        fresh_rows = state.stats.age.get(nxt, torch.ones(2, 3)) == 0  # rows redrawn in nxt
        out_cols = (new.unsqueeze(1) & ~fresh_rows.unsqueeze(-1)).expand_as(after[f"{nxt}.weight"])
        assert (after[f"{nxt}.weight"][out_cols] == 0).all(), "outgoing weights are zero"
        assert (after[f"{layer}.bias"][new] == 0).all()
        assert not torch.equal(after[f"{layer}.weight"][new], before[f"{layer}.weight"][new])
    state = _batched_step(net, learner, state, *batches[4])
    count = state.inner.inner[0].count["hidden1.weight"]  # Adam's bias correction restarted
    age = state.stats.age["hidden1"].unsqueeze(-1).expand_as(count)
    assert (count[age == 1] == 1).all()  # replaced at step 4
    assert (count[age == 0] == 0).all()  # replaced at step 5
    assert (count[age == 5] == 5).all() and (age == 5).sum() == 2 * 4 * 6


@pytest.mark.parametrize("folding", [True, False])
def test_bias_folding_of_a_constant_unit_keeps_the_output(folding: bool) -> None:
    """Unit 0 has no input weights and bias c, so h_0 = relu(c) = c on every input; replacing it
    with folding on moves W_out[:, 0]·f̂_0 = W_out[:, 0]·c into the output bias: no change."""
    net = _net([2], hidden=(6,))
    p = _views(net)
    c = 0.7
    p["hidden1.weight"][0, 0] = 0.0
    p["hidden1.bias"][0] = torch.tensor([c, 5, 5, 5, 5, 5])  # other units active, high utility
    p["output.weight"][0, :, 0] = torch.tensor([1e-3, -2e-3, 1e-3])
    w_out = p["output.weight"][0, :, 0].clone()
    b_out = p["output.bias"].clone()
    learner = continual_backprop(
        sgd(0.0), net, [2], replacement_rate=1 / 6, maturity=0, decay=0.9, bias_folding=folding
    )
    probe = torch.rand(1, 32, 6)
    before = net.forward(probe, p)[0]
    state = next(_train(net, learner, learner.init(p), 1))
    assert state.stats.age["hidden1"][0].tolist() == [0, 1, 1, 1, 1, 1]  # unit 0 replaced
    assert (p["output.weight"][0, :, 0] == 0).all()
    after = net.forward(probe, p)[0]
    if folding:
        torch.testing.assert_close(p["output.bias"][0] - b_out[0], w_out * c)
        torch.testing.assert_close(after, before, rtol=0, atol=1e-6)
    else:
        torch.testing.assert_close(p["output.bias"], b_out)
        torch.testing.assert_close(before - after, (w_out * c).expand_as(after))


def test_update_without_features_is_an_error() -> None:
    net = _net([0])
    learner = continual_backprop(sgd(0.1), net, [0])
    state = learner.init(_views(net))
    grads = {k: torch.zeros_like(v) for k, v in net.params.items()}
    with pytest.raises(ValueError, match="features"):
        learner.update(grads, state, _views(net))


@pytest.mark.parametrize(
    "option,value",
    [
        ("replacement_rate", -1e-4),
        ("replacement_rate", 2.0),
        ("maturity", -1),
        ("decay", 1.0),
        ("decay", -0.1),
        ("utility", "weight"),
        ("rounding", "nearest"),
    ],
)
def test_bad_options_raise_config_error(option: str, value) -> None:
    from contlearn.errors import ConfigError

    with pytest.raises(ConfigError, match=option):
        continual_backprop(sgd(0.1), _net([0]), [0], **{option: value})
