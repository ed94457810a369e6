"""The replica-batched MLP against per-replica torch.nn.Linear layers."""

from __future__ import annotations

import math

import pytest
import torch

from contlearn.agents.networks import ACTIVATIONS, INITS, BatchedMLP, init_bounds
from contlearn.seeding import torch_generator


def _net(seeds, activation="relu", init="kaiming_uniform", hidden=(7, 5)):
    return BatchedMLP(4, hidden, 3, activation, init, [torch_generator(s, "agent") for s in seeds])


@pytest.mark.parametrize("activation", list(ACTIVATIONS))
def test_forward_matches_per_replica_nn_linear(activation):
    net = _net([0, 1, 2], activation)
    x = torch.randn(3, 6, 4)
    out, feats = net.forward(x)
    assert out.shape == (3, 6, 3) and list(feats) == ["hidden1", "hidden2"]
    act = ACTIVATIONS[activation]
    for r in range(3):
        h = x[r]
        for i, name in enumerate(["hidden1", "hidden2", "output"]):
            lin = torch.nn.Linear(*net.params[f"{name}.weight"][r].shape[::-1])
            with torch.no_grad():
                lin.weight.copy_(net.params[f"{name}.weight"][r])
                lin.bias.copy_(net.params[f"{name}.bias"][r])
            h = lin(h)
            if i < 2:
                h = act(h)
                torch.testing.assert_close(feats[name][r], h.detach())
        torch.testing.assert_close(out[r], h.detach())


def test_replica_init_depends_on_its_seed_only():
    batched = _net([4, 9])
    alone = _net([9])
    for k, v in batched.params.items():
        assert torch.equal(v[1], alone.params[k][0])
    assert not torch.equal(batched.params["hidden1.weight"][0], batched.params["hidden1.weight"][1])


@pytest.mark.parametrize("init", INITS)
def test_init_bounds_respected(init):
    net = _net([0], init=init, hidden=(300,))
    for layer in net.layers:
        w_bound, b_bound = init_bounds(init, layer)
        w = net.params[f"{layer.name}.weight"]
        assert w.abs().max() <= w_bound
        assert w.abs().max() > 0.8 * w_bound  # uniform: fills its range
        b = net.params[f"{layer.name}.bias"]
        assert (b.abs().max() <= b_bound) if b_bound else torch.all(b == 0)


def test_kaiming_relu_bound_is_hand_computed():
    net = _net([0], hidden=(10,))
    assert init_bounds("kaiming_uniform", net.layers[0]) == (math.sqrt(2) * math.sqrt(3 / 4), 0.0)
    assert init_bounds("torch_default", net.layers[1]) == (1 / math.sqrt(10), 1 / math.sqrt(10))


def test_sample_init_uses_the_layer_distribution():
    net = _net([0], hidden=(50,))
    w, b = net.sample_init("hidden1", 1000, torch.Generator().manual_seed(1))
    bound = init_bounds("kaiming_uniform", net.layers[0])[0]
    assert w.shape == (1000, 4) and torch.all(b == 0)
    assert w.abs().max() <= bound and abs(float(w.var()) - bound**2 / 3) < 0.1 * bound**2
