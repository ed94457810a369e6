"""``contlearn.learners.attach``: registered learners on a user's torch module.

Each check has an independent reference: the built-in online agent on its autograd reference
path (``fast=false``) with the same initial weights and stream, a plain torch optimizer step
on a copy of the module and optimizer (what the step would be without the learner), or
formulas computed here from the module's tensors.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from contlearn.agents.online import OnlineAgent, OnlineAgentSpec
from contlearn.envs.base import StreamInfo
from contlearn.learners import Learner, attach, learner_def
from contlearn.spec import build_spec

IN, C, B = 6, 3, 2


def builtin(learner: str, options: dict, *, seed: int = 0, **spec) -> OnlineAgent:
    """The built-in agent on the reference path (R = 1)."""
    info = StreamInfo("test", "classification", (IN,), C, True, 1, "accuracy", B)
    agent_spec = OnlineAgentSpec(
        **{"hidden": "8,8", "activation": "relu", "lr": 0.05, "fast": False, **spec}
    )
    lspec = build_spec(learner_def(learner).Spec, options, "learner.")
    return OnlineAgent(info, [seed], agent_spec, Learner(learner, lspec))


def module_of(agent: OnlineAgent) -> nn.Sequential:
    """An nn.Sequential MLP with the agent's initial weights."""
    mods: list[nn.Module] = []
    for layer in agent.net.layers:
        lin = nn.Linear(layer.fan_in, layer.fan_out)
        with torch.no_grad():
            lin.weight.copy_(agent.views[f"{layer.name}.weight"][0])
            lin.bias.copy_(agent.views[f"{layer.name}.bias"][0])
        mods.append(lin)
        if layer.next is not None:
            mods.append(nn.ReLU())
    return nn.Sequential(*mods)


def stream(steps: int, task_length: int = 40, seed: int = 1):
    """A small classification stream: labels from a random linear teacher redrawn each task."""
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(C, IN, generator=g)
    for t in range(steps):
        if t and t % task_length == 0:
            teacher = torch.randn(C, IN, generator=g)
        x = torch.randn(B, IN, generator=g)
        yield x, (x @ teacher.T).argmax(1), t % task_length == 0


def run_builtin(agent: OnlineAgent, steps: int) -> tuple[list[float], list[float]]:
    losses, hits = [], []
    for x, y, new_task in stream(steps):
        if new_task:
            agent.on_task_start(0)
        out = agent.act(x[None])
        hits.append(float((out[0].argmax(1) == y).float().mean()))
        losses.append(float(agent.observe(x[None], out, y[None])["loss"][0]))
    return losses, hits


def run_module(model: nn.Module, opt, learner, steps: int) -> tuple[list[float], list[float]]:
    losses, hits = [], []
    for x, y, new_task in stream(steps):
        opt.zero_grad()
        out = model(x)
        loss = F.cross_entropy(out, y)
        loss.backward()
        learner.step(loss=loss, task_start=new_task)
        hits.append(float((out.argmax(1) == y).float().mean()))
        losses.append(float(loss.detach()))
    return losses, hits


EQUAL = [
    ("cbp", {"replacement_rate": 0.05, "maturity": 5}, {"momentum": 0.9}),
    ("cbp", {"replacement_rate": 0.05, "maturity": 5, "utility": "adaptable_contribution"}, {}),
    ("redo", {"threshold": 0.3, "period": 10, "window": 5}, {"momentum": 0.9}),
    ("snp", {"shrink": 1e-3, "sigma": 1e-2}, {}),
    ("l2", {"l2": 1e-2}, {"momentum": 0.9}),
    ("l2-init", {"l2_init": 1e-1}, {}),
    ("head-reset", {}, {}),
    ("l2", {"l2": 1e-2}, {"optimizer": "adam", "lr": 1e-2}),  # no resets: torch's Adam is ours
]


def torch_opt(model: nn.Module, spec: dict) -> torch.optim.Optimizer:
    lr = spec.get("lr", 0.05)
    if spec.get("optimizer") == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr)
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=spec.get("momentum", 0.0))


@pytest.mark.parametrize(("name", "options", "spec"), EQUAL)
def test_attach_gives_the_builtin_agents_metrics_and_parameters(name, options, spec) -> None:
    steps = 160
    agent = builtin(name, options, **spec)
    model = module_of(agent)
    opt = torch_opt(model, spec)
    learner = attach(model, name, optimizer=opt, seed=0, init="kaiming_uniform", **options)
    ref_loss, ref_hits = run_builtin(agent, steps)
    loss, hits = run_module(model, opt, learner, steps)
    torch.testing.assert_close(torch.tensor(loss), torch.tensor(ref_loss), atol=1e-5, rtol=1e-4)
    assert hits == ref_hits
    for layer, key in zip(agent.net.layers, ["0", "2", "4"], strict=True):
        for kind in ("weight", "bias"):
            torch.testing.assert_close(
                getattr(model.get_submodule(key), kind),
                agent.views[f"{layer.name}.{kind}"][0],
                atol=1e-5,
                rtol=1e-4,
            )
    ours, theirs = learner.diagnostics(), agent.diagnostics()
    if name in ("cbp", "redo"):
        replaced = [ours[k]["replacements"] for k in ("0", "2")]
        assert replaced == [float(theirs[n]["replacements"][0]) for n in ("hidden1", "hidden2")]
        assert sum(replaced) > 0
    if name == "head-reset":
        assert ours["4"]["head_resets"] == float(theirs["output"]["head_resets"][0]) == 4


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(IN, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, C))


def batch(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(4, IN, generator=g), torch.randint(0, C, (4,), generator=g)


def backward(model: nn.Module, g: torch.Generator) -> None:
    x, y = batch(g)
    F.cross_entropy(model(x), y).backward()


def plain_step(model: nn.Module, opt: torch.optim.Optimizer):
    """A copy of the module and optimizer after a plain ``opt.step()`` on the same gradients
    (what the step would be without the learner)."""
    twin, twin_opt = copy.deepcopy((model, opt))  # (deepcopy keeps the state, not the grads)
    for p, tp in zip(model.parameters(), twin.parameters(), strict=True):
        tp.grad = None if p.grad is None else p.grad.clone()
    twin_opt.step()
    return twin, twin_opt


def reset_masks(learner, model: nn.Module) -> dict[str, torch.Tensor]:
    """Per parameter, the entries a reset of this step touched: the reset units' incoming rows
    and biases, and their outgoing columns (units whose age restarted at 0)."""
    ages = learner.state.stats.age
    masks = {k: torch.zeros_like(p, dtype=torch.bool) for k, p in model.named_parameters()}
    layers = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    for name, nxt in zip(layers, layers[1:], strict=False):
        unit = ages[name][0] == 0  # (H,)
        masks[f"{name}.weight"][unit] = True
        masks[f"{name}.bias"][unit] = True
        masks[f"{nxt}.weight"][:, unit] = True
    return masks


@pytest.mark.parametrize(
    ("make_opt", "keys"),
    [
        (lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9), ["momentum_buffer"]),
        (lambda ps: torch.optim.Adam(ps, lr=1e-2), ["exp_avg", "exp_avg_sq"]),
        (
            lambda ps: torch.optim.AdamW(ps, lr=1e-2, amsgrad=True),
            ["exp_avg", "exp_avg_sq", "max_exp_avg_sq"],
        ),
    ],
)
@pytest.mark.parametrize("name", ["cbp", "redo"])
def test_resets_clear_exactly_the_reset_entries_of_the_optimizer_state(
    make_opt, keys, name
) -> None:
    model = mlp()
    opt = make_opt(model.parameters())
    options = (
        {"replacement_rate": 0.2, "maturity": 3, "bias_folding": False}
        if name == "cbp"
        else {"threshold": 0.5, "period": 4, "window": 4}
    )
    learner = attach(model, name, optimizer=opt, seed=3, **options)
    g = torch.Generator().manual_seed(0)
    checked = 0
    for _ in range(30):
        opt.zero_grad()
        backward(model, g)
        twin, twin_opt = plain_step(model, opt)
        learner.step()
        masks = reset_masks(learner, model)
        if not any(m.any() for m in masks.values()):
            continue
        checked += 1
        for (k, p), tp in zip(model.named_parameters(), twin.parameters(), strict=True):
            state, plain = opt.state[p], twin_opt.state[tp]
            for key in keys:
                reset = masks[k]
                assert (state[key][reset] == 0).all(), (k, key)
                assert torch.equal(state[key][~reset], plain[key][~reset]), (k, key)
            kept = ~masks[k]
            assert torch.equal(p.detach()[kept], tp.detach()[kept]), k
    assert checked > 0


def test_same_seed_same_result_other_seed_other_draws() -> None:
    def final(seed: int) -> torch.Tensor:
        model = mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        learner = attach(model, "cbp", optimizer=opt, seed=seed, replacement_rate=0.2, maturity=2)
        g = torch.Generator().manual_seed(0)
        for _ in range(20):
            opt.zero_grad()
            backward(model, g)
            learner.step()
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    assert torch.equal(final(0), final(0))
    assert not torch.equal(final(0), final(1))


def test_head_reset_redraws_the_output_layer_and_clears_its_state() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    learner = attach(model, "head-reset", optimizer=opt, seed=0)
    g = torch.Generator().manual_seed(0)
    for t in range(4):
        opt.zero_grad()
        backward(model, g)
        twin, twin_opt = plain_step(model, opt)
        if t == 3:
            learner.on_task_start()
        learner.step()
    head, twin_head = model[4], twin[4]
    bound = 1 / math.sqrt(8)  # torch's default init: U(±1/√fan_in), weights and biases
    for kind in ("weight", "bias"):
        new, plain = getattr(head, kind).detach(), getattr(twin_head, kind).detach()
        assert (new.abs() <= bound).all() and not torch.isclose(new, plain).any()
        assert (opt.state[getattr(head, kind)]["momentum_buffer"] == 0).all()
    for i in (0, 2):  # the hidden layers took the plain step
        assert torch.equal(model[i].weight, twin[i].weight)
        assert torch.equal(model[i].bias, twin[i].bias)
    assert learner.diagnostics() == {"4": {"head_resets": 1.0}}


def test_shrink_and_perturb_shrinks_the_step_and_adds_noise() -> None:
    lam, sigma = 0.1, 0.01
    for sig in (0.0, sigma):
        model = mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        learner = attach(model, "snp", optimizer=opt, seed=0, shrink=lam, sigma=sig)
        opt.zero_grad()
        backward(model, torch.Generator().manual_seed(0))
        twin, twin_opt = plain_step(model, opt)
        learner.step()
        got = torch.cat([p.detach().flatten() for p in model.parameters()])
        plain = torch.cat([p.detach().flatten() for p in twin.parameters()])
        noise = (got - (1 - lam) * plain) / sigma
        if sig == 0.0:
            torch.testing.assert_close(noise, torch.zeros_like(noise), atol=1e-5, rtol=0)
        else:  # ~N(0, 1) over the 155 parameters
            assert abs(float(noise.mean())) < 0.3 and 0.75 < float(noise.std()) < 1.25


def test_l2_and_l2_init_add_their_gradient_terms() -> None:
    lam = 0.5
    for name, key in (("l2", "l2"), ("l2-init", "l2_init")):
        model = mlp()
        start = [p.detach().clone() for p in model.parameters()]
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        learner = attach(model, name, optimizer=opt, seed=0, **{key: lam})
        g = torch.Generator().manual_seed(0)
        for _ in range(3):
            opt.zero_grad()
            backward(model, g)
            before = [p.detach().clone() for p in model.parameters()]
            grads = [p.grad.clone() for p in model.parameters()]
            learner.step()
            for p, b, gr, s in zip(model.parameters(), before, grads, start, strict=True):
                pull = b if name == "l2" else b - s
                torch.testing.assert_close(p.detach(), b - 0.1 * (gr + lam * pull))


def test_a_checkpointed_learner_continues_as_if_uninterrupted() -> None:
    def handle(model: nn.Module):
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        return opt, attach(model, "cbp", optimizer=opt, seed=0, replacement_rate=0.2, maturity=2)

    def train(model, opt, learner, g, steps: int) -> None:
        for _ in range(steps):
            opt.zero_grad()
            backward(model, g)
            learner.step()

    model = mlp()
    opt, learner = handle(model)
    g = torch.Generator().manual_seed(0)
    train(model, opt, learner, g, 10)
    saved = copy.deepcopy(
        (model.state_dict(), opt.state_dict(), learner.state_dict(), g.get_state())
    )
    train(model, opt, learner, g, 10)
    resumed = mlp(seed=5)
    ropt, rlearner = handle(resumed)
    resumed.load_state_dict(saved[0])
    ropt.load_state_dict(saved[1])
    rlearner.load_state_dict(saved[2])
    rg = torch.Generator()
    rg.set_state(saved[3])
    train(resumed, ropt, rlearner, rg, 10)
    assert rlearner.steps == learner.steps == 20
    for p, q in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)
    assert rlearner.diagnostics() == learner.diagnostics()
