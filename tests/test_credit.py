"""Credit-assignment rules against independent implementations: a per-sample loop over plain
vectors (no autograd), hand-derived local-loss gradients, and backprop where a rule must
reduce to it; plus the ``credit`` option's errors, checkpoints and replica independence."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from contlearn.agents.online import OnlineAgent, OnlineAgentSpec
from contlearn.credit import Credit, credit_def, credit_rules
from contlearn.credit.learned import alignment_loss
from contlearn.credit.rules import rule_gradients
from contlearn.envs.base import StreamInfo
from contlearn.errors import ConfigError
from contlearn.learners import Learner, learner_def
from contlearn.running.config import resolve
from contlearn.seeding import torch_generator
from contlearn.spec import build_spec

IN, HIDDEN, C = 6, "5,4", 3
SIMPLE = ("fa", "dfa", "sign-symmetry", "kolen-pollack", "weight-mirror")


def make_agent(
    credit: str,
    seeds=(0, 1),
    batch: int = 2,
    activation: str = "tanh",
    fast: bool = False,
    **options,
) -> OnlineAgent:
    info = StreamInfo("test", "classification", (IN,), C, True, len(seeds), "accuracy", batch)
    spec = OnlineAgentSpec(hidden=HIDDEN, activation=activation, lr=0.05, fast=fast)
    cspec = build_spec(credit_def(credit).Spec, options, "credit.")
    learner = Learner("bp", learner_def("bp").Spec(), Credit(credit, cspec))
    return OnlineAgent(info, list(seeds), spec, learner)


def batches(R: int, B: int, steps: int, seed: int = 7):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(R, B, IN, generator=g), torch.randint(0, C, (R, B), generator=g))
        for _ in range(steps)
    ]


def f_and_df(activation: str, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if activation == "relu":
        return z.clamp(min=0), (z > 0).to(z.dtype)
    t = torch.tanh(z)
    return t, 1 - t * t


class LoopNet:
    """One replica, one example at a time, column vectors: the rules as their papers write
    them (W_l: out × in, B_l: out × in so that the error sent down is B_lᵀ δ)."""

    def __init__(self, agent: OnlineAgent, r: int) -> None:
        self.credit = agent.credit.name
        self.act = agent.spec.activation
        self.lr = agent.spec.lr
        self.names = [layer.name for layer in agent.net.layers]
        self.W = [agent.views[f"{n}.weight"][r].clone().double() for n in self.names]
        self.b = [agent.views[f"{n}.bias"][r].clone().double() for n in self.names]
        self.B = {k: v[r].clone().double() for k, v in agent.credit.feedback.items()}
        self.r, self.seed = r, agent.seeds[r]
        self.rule = agent.credit
        if self.credit == "weight-mirror":
            self.noise = torch_generator(self.seed, "credit-noise")
            self.steps = 0

    def feedback_down(self, i: int, delta: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        name = self.names[i]
        if self.credit == "dfa":
            return self.B[self.names[i - 1]].T @ e
        if self.credit == "sign-symmetry":
            w = self.W[i]
            return (torch.sign(w) * w.abs().mean()).T @ delta
        return self.B[name].T @ delta

    def step(self, xs: torch.Tensor, ys: torch.Tensor) -> None:
        n_layers = len(self.W)
        gW = [torch.zeros_like(w) for w in self.W]
        gb = [torch.zeros_like(b) for b in self.b]
        inputs_per_sample = []
        for x, y in zip(xs.double(), ys, strict=True):
            hs, dfs, h = [x], [], x
            for i in range(n_layers):
                z = self.W[i] @ h + self.b[i]
                if i == n_layers - 1:
                    out = z
                    break
                h, d = f_and_df(self.act, z)
                hs.append(h)
                dfs.append(d)
            p = torch.softmax(out, 0)
            e = (p - torch.nn.functional.one_hot(y, C).double()) / len(xs)
            delta = e
            for i in range(n_layers - 1, -1, -1):
                gW[i] += torch.outer(delta, hs[i])
                gb[i] += delta
                if i > 0:
                    delta = self.feedback_down(i, delta, e) * dfs[i - 1]
            inputs_per_sample.append(hs)
        updates = [-self.lr * g for g in gW]
        for i in range(n_layers):
            self.W[i] += updates[i]
            self.b[i] -= self.lr * gb[i]
        if self.credit == "kolen-pollack":
            lam = self.rule.decay
            for i in range(1, n_layers):
                self.B[self.names[i]] += updates[i]
            self.W = [(1 - lam) * w for w in self.W]
            self.B = {k: (1 - lam) * v for k, v in self.B.items()}
        if self.credit == "weight-mirror":
            rule = self.rule
            self.steps += 1
            if self.steps % rule.every == 0:
                for i in range(1, n_layers):
                    X = torch.randn(rule.samples, self.W[i].shape[1], generator=self.noise)
                    X = X.double() * rule.noise_std
                    acc = torch.zeros_like(self.W[i])
                    for xn in X:
                        acc += torch.outer(self.W[i] @ xn, xn)
                    name = self.names[i]
                    self.B[name] = (1 - rule.decay) * self.B[name] + rule.rate / rule.samples * acc


@pytest.mark.parametrize("credit", SIMPLE)
@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_each_rule_matches_a_per_sample_loop(credit: str, activation: str) -> None:
    options = {"decay": 0.01} if credit == "kolen-pollack" else {}
    if credit == "weight-mirror":
        options = {"every": 2, "samples": 3, "rate": 0.05, "decay": 0.02}
    agent = make_agent(credit, activation=activation, **options)
    assert agent.backend == "reference"
    loops = [LoopNet(agent, r) for r in range(2)]
    for x, y in batches(2, 2, 6):
        agent.act(x)
        agent.observe(x, None, y)
        for r, loop in enumerate(loops):
            loop.step(x[r], y[r])
    for r, loop in enumerate(loops):
        for i, name in enumerate(loop.names):
            torch.testing.assert_close(
                agent.views[f"{name}.weight"][r].double(), loop.W[i], rtol=1e-4, atol=1e-6
            )
            torch.testing.assert_close(
                agent.views[f"{name}.bias"][r].double(), loop.b[i], rtol=1e-4, atol=1e-6
            )
        for k, v in loop.B.items():
            torch.testing.assert_close(
                agent.credit.feedback[k][r].double(), v, rtol=1e-4, atol=1e-6
            )


@pytest.mark.parametrize("credit", ("fa", "dfa", "sign-symmetry", "kolen-pollack"))
@pytest.mark.parametrize("batch", [1, 2])
def test_the_fast_backends_match_the_per_sample_loop_too(credit: str, batch: int) -> None:
    from contlearn.backends import kernels

    options = {"decay": 0.01} if credit == "kolen-pollack" else {}
    agent = make_agent(credit, batch=batch, activation="relu", fast=True, **options)
    block = batch == 1 and kernels.library() is not None
    assert agent.backend == ("block" if block else "fused")
    loops = [LoopNet(agent, r) for r in range(2)]
    for x, y in batches(2, batch, 6):
        if block:  # the C loop, one step per block
            agent.learn_block(x[None], y[None])
        else:
            agent.act(x)
            agent.observe(x, None, y)
        for r, loop in enumerate(loops):
            loop.step(x[r], y[r])
    params = agent.parameters()
    for r, loop in enumerate(loops):
        for i, name in enumerate(loop.names):
            torch.testing.assert_close(
                params[f"{name}.weight"][r].double(), loop.W[i], rtol=1e-4, atol=1e-6
            )
            torch.testing.assert_close(
                params[f"{name}.bias"][r].double(), loop.b[i], rtol=1e-4, atol=1e-6
            )
        for k, v in loop.B.items():
            torch.testing.assert_close(
                agent.credit.feedback[k][r].double(), v, rtol=1e-4, atol=1e-6
            )


def test_fa_with_feedback_set_to_the_weights_is_backprop() -> None:
    fa, bp = make_agent("fa"), make_agent("bp")
    for x, y in batches(2, 3, 3):
        for layer in fa.net.layers[1:]:
            fa.credit.feedback[layer.name].copy_(fa.views[f"{layer.name}.weight"])
        for agent in (fa, bp):
            agent.act(x)
            agent.observe(x, None, y)
    for k in bp.views:
        torch.testing.assert_close(fa.views[k], bp.views[k], rtol=1e-5, atol=1e-6)


def test_kolen_pollack_without_decay_started_at_the_weights_stays_backprop() -> None:
    kp, bp = make_agent("kolen-pollack", decay=0.0), make_agent("bp")
    for layer in kp.net.layers[1:]:
        kp.credit.feedback[layer.name].copy_(kp.views[f"{layer.name}.weight"])
    for x, y in batches(2, 2, 8):
        for agent in (kp, bp):
            agent.act(x)
            agent.observe(x, None, y)
    for k in bp.views:
        torch.testing.assert_close(kp.views[k], bp.views[k], rtol=1e-5, atol=1e-6)
    for layer in kp.net.layers[1:]:
        torch.testing.assert_close(kp.credit.feedback[layer.name], kp.views[f"{layer.name}.weight"])


def test_dfa_gives_the_output_layer_its_true_gradient_and_independent_matrices() -> None:
    agent = make_agent("dfa")
    (x, y) = batches(2, 3, 1)[0]
    params = {k: v.clone().requires_grad_(True) for k, v in agent.views.items()}
    out = agent.net.forward(x, params)[0]
    loss = agent.loss(out, y).sum()
    true = dict(zip(params, torch.autograd.grad(loss, list(params.values())), strict=True))
    with torch.no_grad():
        out2, hs, zs = agent.net.forward_train(x, agent.views)
    leaf = out2.detach().requires_grad_(True)
    (e,) = torch.autograd.grad(agent.loss(leaf, y).sum(), [leaf])
    grads = rule_gradients(agent.net, agent.views, agent.credit, x, hs, zs, e)
    for k in ("output.weight", "output.bias"):
        torch.testing.assert_close(grads[k], true[k])
    assert not torch.allclose(grads["hidden1.weight"], true["hidden1.weight"])
    d1, d2 = agent.credit.feedback["hidden1"], agent.credit.feedback["hidden2"]
    assert d1.shape == (2, C, 5) and d2.shape == (2, C, 4)  # (outputs, units), one per layer


@pytest.mark.parametrize("credit", SIMPLE + ("information-alignment",))
def test_replica_r_learns_as_its_seed_alone(credit: str) -> None:
    both, alone = make_agent(credit, seeds=(3, 4)), make_agent(credit, seeds=(4,))
    for x, y in batches(2, 2, 5):
        both.act(x)
        both.observe(x, None, y)
        alone.act(x[1:])
        alone.observe(x[1:], None, y[1:])
    for k in both.views:
        torch.testing.assert_close(both.views[k][1:], alone.views[k], rtol=1e-5, atol=1e-7)
    for k in both.credit.feedback:
        torch.testing.assert_close(both.credit.feedback[k][1:], alone.credit.feedback[k])


def _hand_gradient(rule: str, coef, w, b, x):
    """∂L/∂B of Kunin et al.'s local losses, derived by hand (F = X Wᵀ, P = X Bᵀ, n inputs)."""
    n = x.shape[1]
    F = torch.bmm(x, w.transpose(1, 2))
    P = torch.bmm(x, b.transpose(1, 2))
    if rule == "symmetric-alignment":
        return coef[0] * 2 * b - coef[1] * w
    if rule == "activation-alignment":
        return coef[0] * 2 / n * torch.bmm(P.transpose(1, 2), x) - coef[1] / n * torch.bmm(
            F.transpose(1, 2), x
        )
    FB = torch.bmm(F, b)
    return (
        -coef[0] / n * torch.bmm(F.transpose(1, 2), x)
        + coef[1] * 2 / n * torch.bmm(F.transpose(1, 2), FB)
        + coef[2] * 2 * b
    )


@pytest.mark.parametrize(
    "rule", ["symmetric-alignment", "activation-alignment", "information-alignment"]
)
def test_kunin_local_losses_have_the_hand_derived_gradients(rule: str) -> None:
    g = torch.Generator().manual_seed(0)
    w, b = (
        torch.randn(2, 4, 5, generator=g, dtype=torch.float64),
        torch.randn(2, 4, 5, generator=g, dtype=torch.float64),
    )
    x = torch.randn(2, 7, 5, generator=g, dtype=torch.float64)
    coef = (0.3, 0.7, 0.2)
    leaf = b.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(alignment_loss(rule, coef, w, leaf, x), [leaf])
    torch.testing.assert_close(grad, _hand_gradient(rule, coef, w, b, x))


@pytest.mark.parametrize(
    "rule", ["symmetric-alignment", "activation-alignment", "information-alignment"]
)
def test_kunin_rules_step_their_feedback_by_the_local_gradient(rule: str) -> None:
    agent = make_agent(rule, lr=0.1)
    before = {k: v.clone() for k, v in agent.credit.feedback.items()}
    x, y = batches(2, 3, 1)[0]
    agent.act(x)
    with torch.no_grad():
        hs = agent.net.forward_train(x, agent.views)[1]
    agent.observe(x, None, y)
    coef = agent.credit.coef
    for i, layer in enumerate(agent.net.layers[1:], start=1):
        w = agent.views[f"{layer.name}.weight"].double()
        expect = before[layer.name].double() - 0.1 * _hand_gradient(
            rule, coef, w, before[layer.name].double(), hs[i - 1].double()
        )
        torch.testing.assert_close(agent.credit.feedback[layer.name].double(), expect)


@pytest.mark.parametrize("credit", ["kolen-pollack", "weight-mirror", "dfa"])
def test_a_restored_agent_steps_exactly_as_the_original(credit: str) -> None:
    a = make_agent(credit)
    data = batches(2, 2, 8)
    for x, y in data[:4]:
        a.act(x)
        a.observe(x, None, y)
    state = a.state_dict()
    buf = __import__("io").BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    b = make_agent(credit)
    b.load_state_dict(torch.load(buf, weights_only=True))
    for x, y in data[4:]:
        for agent in (a, b):
            agent.act(x)
            agent.observe(x, None, y)
    for k in a.views:
        assert torch.equal(a.views[k], b.views[k])
    for k in a.credit.feedback:
        assert torch.equal(a.credit.feedback[k], b.credit.feedback[k])


def test_every_rule_is_registered_listed_and_resolves() -> None:
    assert set(credit_rules.names()) == {
        "bp",
        "fa",
        "dfa",
        "sign-symmetry",
        "kolen-pollack",
        "weight-mirror",
        "symmetric-alignment",
        "activation-alignment",
        "information-alignment",
    }
    for name in credit_rules.names():
        cfg = resolve({"stream": "permuted-mnist", "credit": name})
        assert cfg.learner.credit.name == name
        assert cfg.to_dict()["credit"] == name


@pytest.mark.parametrize(
    "values, message",
    [
        ({"credit": "fb"}, "unknown credit rule 'fb'"),
        ({"credit": "kolen-pollack", "credit.decay": "-1"}, "credit.decay"),
        ({"credit": "fa", "credit.decay": "0.1"}, "credit.decay"),
        (
            {"stream": "slippery-ant", "credit": "kolen-pollack", "credit.decay": "2"},
            "credit.decay",
        ),
        ({"stream": "slippery-ant", "credit": "fb"}, "unknown credit rule 'fb'"),
    ],
)
def test_bad_credit_settings_are_config_errors(values: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        resolve({"stream": "permuted-mnist", **values})


def test_cli_refuses_a_rule_a_plugin_agent_does_not_declare(tmp_path) -> None:
    mod = tmp_path / "myagent.py"
    mod.write_text(
        "import torch\n"
        "class Mine:\n"
        "    def __init__(self, info, seed, learner=None):\n"
        "        self.n = info.num_outputs\n"
        "    def act(self, obs):\n"
        "        return torch.zeros(obs.shape[0], self.n)\n"
        "    def observe(self, obs, action, feedback):\n"
        "        return {}\n"
    )
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "contlearn", "run", "permuted-mnist", "--agent", "myagent:Mine"]
        + ["--set", "credit=dfa", "--set", "examples_per_task=50", "--tasks", "1", "--out"]
        + [str(out)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "credit rule dfa does not apply to agent myagent:Mine" in proc.stderr
    assert not out.exists()


def test_a_run_with_a_rule_records_it_and_its_backend(tmp_path) -> None:
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "contlearn", "run", "permuted-mnist", "--learner", "cbp"]
        + ["--seeds", "2", "--tasks", "2", "--set", "examples_per_task=200", "--set"]
        + ["credit=dfa", "--set", "hidden=16,16", "--progress", "--out", str(out)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    from contlearn.backends import kernels

    backend = "block" if kernels.library() is not None else "fused"  # dfa + cbp learn fast
    assert f"contlearn: backend {backend}" in proc.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["credit"] == "dfa"
    assert json.loads((out / "meta.json").read_text())["backend"] == backend
    import contlearn

    df = contlearn.load_runs([out])
    assert set(df["learner"]) == {"dfa+cbp"}
    fa = df[df["metric"] == "feedback_alignment"]
    assert set(fa["layer"]) == {"hidden1", "hidden2", ""} and set(fa["seed"]) == {0, 1}
    assert set(fa["task"]) == {0, 1}  # the default schedule: each task's start
    assert ((fa["value"] >= 0) & (fa["value"] <= 180)).all()
    assert (df["metric"] == "weight_alignment").any()
    png = tmp_path / "probes.png"
    plot = subprocess.run(
        [sys.executable, "-m", "contlearn", "plot", str(out), "--probes", "--out", str(png)],
        capture_output=True,
        text=True,
    )
    assert plot.returncode == 0, plot.stderr
    assert png.stat().st_size > 0
