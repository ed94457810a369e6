"""``contlearn.learners.attach`` on a small CNN and on custom modules, and its errors.

Conv units are output channels: their statistics are means over the batch and the positions
(checked against the activations recorded here), their outgoing weights are the next conv's
input-channel slices or the S columns of a Linear reading the flattened output.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from contlearn.errors import ConfigError
from contlearn.learners import attach
from tests.test_attach import plain_step

C = 3


def cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3),  # (4, 6, 6)
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, padding=1),  # (6, 6, 6)
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * 36, C),
    )


def backward(model: nn.Module, g: torch.Generator) -> None:
    x, y = torch.randn(5, 1, 8, 8, generator=g), torch.randint(0, C, (5,), generator=g)
    F.cross_entropy(model(x), y).backward()


def test_conv_statistics_are_means_over_batch_and_positions() -> None:
    model = cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    eta = 0.9
    learner = attach(model, "cbp", optimizer=opt, seed=0, decay=eta, maturity=100)
    seen: dict[int, torch.Tensor] = {}
    for i in (1, 3):
        model[i].register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, out.detach()))
    opt.zero_grad()
    backward(model, torch.Generator().manual_seed(0))
    learner.step()
    state = learner.state
    h0, h2 = seen[1].mean((0, 2, 3)), seen[3].mean((0, 2, 3))  # (channels,)
    torch.testing.assert_close(state.mean_act["0"][0] / (1 - eta), h0)
    torch.testing.assert_close(state.mean_act["2"][0] / (1 - eta), h2)
    out0 = model[2].weight.detach().abs().sum((0, 2, 3))  # post-update outgoing magnitudes
    out2 = model[5].weight.detach().view(C, 6, 36).abs().sum((0, 2))
    torch.testing.assert_close(state.utility["0"][0] / (1 - eta), h0 * out0)
    torch.testing.assert_close(state.utility["2"][0] / (1 - eta), h2 * out2)


def outgoing(model: nn.Sequential, name: str) -> torch.Tensor:
    """Each channel's outgoing weights, ``(K, channels, S)``."""
    if name == "0":
        w = model[2].weight.detach()
        return w.reshape(w.shape[0], w.shape[1], -1)
    return model[5].weight.detach().view(C, 6, 36)


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("cbp", {"replacement_rate": 0.3, "maturity": 2}),
        ("redo", {"threshold": 0.6, "period": 3, "window": 3}),
    ],
)
def test_cnn_channels_are_replaced_fresh_in_zero_out(name, options) -> None:
    model = cnn()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    learner = attach(model, name, optimizer=opt, seed=0, **options)
    g = torch.Generator().manual_seed(0)
    convs, fan_in = {"0": model[0], "2": model[2]}, {"0": 9, "2": 36}
    replaced = 0
    for _ in range(25):
        opt.zero_grad()
        backward(model, g)
        twin, _ = plain_step(model, opt)
        learner.step()
        for layer, conv in convs.items():
            fresh = learner.state.stats.age[layer][0] == 0  # (channels,)
            if not fresh.any():
                continue
            replaced += int(fresh.sum())
            w = conv.weight.detach()[fresh]
            plain = dict(twin.named_parameters())[f"{layer}.weight"].detach()[fresh]
            assert (w.abs() <= 1 / math.sqrt(fan_in[layer])).all()
            assert not torch.isclose(w, plain).any()
            assert (conv.bias.detach()[fresh] == 0).all()
            out = outgoing(model, layer)[:, fresh]
            if layer == "0":  # rows of layer 2 redrawn this step are fresh, columns too
                out = out[learner.state.stats.age["2"][0] != 0]
            assert (out == 0).all()
            for key in ("exp_avg", "exp_avg_sq"):
                assert (opt.state[conv.weight][key][fresh] == 0).all()
    assert replaced > 0
    assert sum(d["replacements"] for d in learner.diagnostics().values()) == replaced


class Custom(nn.Module):
    """Functional activations and an auxiliary head after the output."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2, self.aux = nn.Linear(4, 6), nn.Linear(6, C), nn.Linear(C, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


def test_declared_layers_and_callable_activations() -> None:
    model = Custom()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ConfigError, match="activations="):
        attach(model, "redo", optimizer=opt, output="fc2")
    learner = attach(
        model,
        "redo",
        optimizer=opt,
        output="fc2",
        activations={"fc1": torch.tanh},
        threshold=10.0,  # every unit counts as dormant
        period=2,
        window=2,
    )
    assert [layer.name for layer in learner.network.layers] == ["fc1", "fc2"]
    assert learner.network.layers[0].activation == "tanh"
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        opt.zero_grad()
        x, y = torch.randn(3, 4, generator=g), torch.randint(0, C, (3,), generator=g)
        F.cross_entropy(model(x), y).backward()
        learner.step()
    assert learner.diagnostics()["fc1"]["replacements"] == 6
    assert (model.fc2.weight == 0).all() and (model.fc1.bias == 0).all()


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, C))


def one_line(exc: pytest.ExceptionInfo, *words: str) -> None:
    text = str(exc.value)
    assert "\n" not in text
    for w in words:
        assert w in text, text


def test_bad_inputs_are_one_line_config_errors() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ConfigError) as e:
        attach(model, "cbq", optimizer=opt)
    one_line(e, "unknown learner", "cbp")
    with pytest.raises(ConfigError) as e:
        attach(model, "cbp", optimizer=opt, rate=1e-3)
    one_line(e, "unknown option 'rate'", "replacement_rate")
    with pytest.raises(ConfigError) as e:
        attach(model, "cbp", optimizer=opt, replacement_rate=2.0)
    one_line(e, "replacement_rate")
    with pytest.raises(ConfigError) as e:
        attach(nn.Sequential(nn.ReLU()), "cbp", optimizer=opt)
    one_line(e, "nn.Linear/nn.Conv2d", "layers=")
    with pytest.raises(ConfigError) as e:
        attach(model, "cbp", optimizer=opt, layers=["0", "fc9"])
    one_line(e, "'fc9'", "not a submodule")
    with pytest.raises(ConfigError) as e:
        attach(model, "cbp", optimizer=opt, layers=["0", "0", "2"])
    one_line(e, "two layers")
    with pytest.raises(ConfigError) as e:
        attach(model, "cbp", optimizer=torch.optim.SGD(mlp().parameters(), lr=0.1))
    one_line(e, "does not hold", "module.parameters()")
    with pytest.raises(ConfigError) as e:
        attach(model, "cbp", optimizer="sgd")  # type: ignore[arg-type]
    one_line(e, "torch.optim.Optimizer")
    with pytest.raises(ConfigError) as e:
        attach(model, "adam", optimizer=opt)
    one_line(e, "torch optimizer", "'bp'")
    with pytest.raises(ConfigError) as e:
        attach(model, "cbp", optimizer=opt, output="1")
    one_line(e, "output='1'")
    with pytest.raises(ConfigError) as e:
        attach(model, "cbp", optimizer=opt, init="normal")
    one_line(e, "unknown init", "torch_default")
    no_bias = nn.Sequential(nn.Linear(4, 5, bias=False), nn.ReLU(), nn.Linear(5, C))
    with pytest.raises(ConfigError) as e:
        attach(no_bias, "cbp", optimizer=torch.optim.SGD(no_bias.parameters(), lr=0.1))
    one_line(e, "no bias")
    act = nn.ReLU()
    shared = nn.Sequential(nn.Linear(4, 5), act, nn.Linear(5, 5), act, nn.Linear(5, C))
    with pytest.raises(ConfigError) as e:
        attach(shared, "cbp", optimizer=torch.optim.SGD(shared.parameters(), lr=0.1))
    one_line(e, "share one activation module", "activations=")


class Swapped(nn.Module):
    """Layers defined in one order, run in another."""

    def __init__(self) -> None:
        super().__init__()
        self.second, self.act, self.first = nn.Linear(5, 5), nn.ReLU(), nn.Linear(5, 5)
        self.act2, self.head = nn.ReLU(), nn.Linear(5, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act2(self.second(self.act(self.first(x)))))


def test_layers_running_in_another_order_than_declared_are_refused() -> None:
    model = Swapped()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    learner = attach(model, "cbp", optimizer=opt, activations={"second": "act", "first": "act2"})
    model(torch.randn(2, 5)).sum().backward()
    with pytest.raises(ConfigError) as e:
        learner.step()
    one_line(e, "declare layers=", "['second', 'first', 'head']")
    learner.detach()
    fixed = attach(
        model,
        "cbp",
        optimizer=opt,
        layers=["first", "second", "head"],
        activations={"first": "act", "second": "act2"},
    )
    opt.zero_grad()
    for _ in range(2):  # accumulated gradients: two whole passes
        model(torch.randn(2, 5)).sum().backward()
    fixed.step()


def test_step_needs_a_forward_and_a_backward_pass() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    learner = attach(model, "cbp", optimizer=opt)
    with pytest.raises(ConfigError) as e:
        learner.step()
    one_line(e, "no gradient", "loss.backward()")
    x = torch.randn(2, 4)
    model(x).sum().backward()
    learner.step()
    with pytest.raises(ConfigError) as e:
        learner.step()  # the old gradients, but no forward pass since
    one_line(e, "no forward pass")
    with torch.no_grad():
        model(x)  # evaluation leaves the activations alone
    with pytest.raises(ConfigError):
        learner.step()
    model(x).sum().backward()
    with pytest.raises(ConfigError) as e:
        learner.step(loss=torch.ones(2))
    one_line(e, "loss= must be a scalar")


@pytest.mark.parametrize(
    ("name", "options"),
    [("l2", {"l2": 0.5}), ("l2-init", {"l2_init": 0.5}), ("snp", {"shrink": 0.1, "sigma": 0.0})],
)
def test_weight_level_learners_on_a_cnn(name, options) -> None:
    model = cnn()
    start = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
    learner = attach(model, name, optimizer=opt, seed=0, **options)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        opt.zero_grad()
        backward(model, g)
        if name != "snp":  # the gradient terms, then the plain step
            for p, s in zip(model.parameters(), start, strict=True):
                pull = p.detach() if name == "l2" else p.detach() - s
                p.grad += 0.5 * pull
        twin, _ = plain_step(model, opt)
        if name != "snp":
            for p, s in zip(model.parameters(), start, strict=True):
                pull = p.detach() if name == "l2" else p.detach() - s
                p.grad -= 0.5 * pull  # (the learner adds the term itself)
        learner.step()
        keep = 0.9 if name == "snp" else 1.0
        for p, tp in zip(model.parameters(), twin.parameters(), strict=True):
            torch.testing.assert_close(p.detach(), keep * tp.detach())


def test_head_reset_on_a_cnn() -> None:
    model = cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    learner = attach(model, "head-reset", optimizer=opt, seed=0)
    opt.zero_grad()
    backward(model, torch.Generator().manual_seed(0))
    twin, _ = plain_step(model, opt)
    learner.step(task_start=True)
    new, plain = model[5].weight.detach(), twin[5].weight.detach()
    assert (new.abs() <= 1 / math.sqrt(216)).all() and not torch.isclose(new, plain).any()
    assert torch.equal(model[0].weight, twin[0].weight)
    assert torch.equal(model[2].weight, twin[2].weight)
    assert learner.diagnostics() == {"5": {"head_resets": 1.0}}


@pytest.mark.parametrize(
    "name",
    [
        "weight-clipping",
        "upgd",
        "parseval",
        "regrama",
        "swr",
        "spectral",
        "snr",
        "hare-tortoise",
        "plasticity-injection",
    ],
)
def test_the_other_learners_run_on_a_cnn(name) -> None:
    model = cnn()
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    learner = attach(model, name, optimizer=opt, seed=0)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        opt.zero_grad()
        backward(model, g)
        learner.step()
    for p, b in zip(model.parameters(), before, strict=True):
        assert torch.isfinite(p).all() and not torch.equal(p.detach(), b)
