"""The ``feedback_alignment`` and ``weight_alignment`` probes against independent
computations: autograd through a linear layer whose backward uses B (feedback alignment as
Lillicrap et al. write it), the output error projected by hand (DFA), hand-built angles."""

from __future__ import annotations

import math

import pytest
import torch

from contlearn.credit.alignment import angle
from contlearn.probes.measures import DEFAULT_PROBES, run_probes
from tests.test_credit import IN, C, make_agent


def test_angle_is_degrees_per_replica() -> None:
    a = torch.tensor([[1.0, 0.0], [1.0, 1.0], [1.0, 0.0], [0.0, 0.0]])
    b = torch.tensor([[0.0, 2.0], [2.0, 2.0], [-3.0, 0.0], [1.0, 0.0]])
    got = angle(a, b)
    want = torch.tensor([90.0, 0.0, 180.0, 90.0], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    c = torch.tensor([[1.0, 1.0]])
    torch.testing.assert_close(angle(c, torch.tensor([[1.0, 0.0]])).item(), 45.0)


class _FeedbackLinear(torch.autograd.Function):
    """y = x Wᵀ forward; the error sent back to x is g B (B in place of W)."""

    @staticmethod
    def forward(ctx, x, w, b):
        ctx.save_for_backward(b)
        return torch.bmm(x, w.transpose(1, 2))

    @staticmethod
    def backward(ctx, g):
        (b,) = ctx.saved_tensors
        return torch.bmm(g, b), None, None


def _errors_by_autograd(agent, x, y, feedback: bool) -> list[torch.Tensor]:
    """∂̃L/∂h_l for each hidden layer: true backprop, or with every layer's backward using B."""
    p = agent.views
    h = x.clone().requires_grad_(True)
    hidden = []
    names = [layer.name for layer in agent.net.layers]
    for i, name in enumerate(names):
        w, bias = p[f"{name}.weight"], p[f"{name}.bias"]
        if feedback and i > 0:
            z = _FeedbackLinear.apply(h, w, agent.credit.feedback[name]) + bias.unsqueeze(1)
        else:
            z = torch.bmm(h, w.transpose(1, 2)) + bias.unsqueeze(1)
        if i < len(names) - 1:
            h = torch.tanh(z)
            h.retain_grad()
            hidden.append(h)
        else:
            out = z
    agent.loss(out, y).sum().backward()
    return [t.grad for t in hidden]


def _angle_loop(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    out = []
    for r in range(a.shape[0]):
        u, v = a[r].flatten().double(), b[r].flatten().double()
        out.append(
            math.degrees(math.acos(max(-1.0, min(1.0, float(u @ v / (u.norm() * v.norm()))))))
        )
    return out


@pytest.mark.parametrize("credit", ["fa", "kolen-pollack"])
def test_feedback_alignment_is_the_angle_autograd_gives(credit: str) -> None:
    agent = make_agent(credit)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, IN, generator=g)
    y = torch.randint(0, C, (2, 16), generator=g)
    got = agent.credit_alignment(x, y)["feedback_alignment"]
    rule = _errors_by_autograd(agent, x, y, feedback=True)
    bp = _errors_by_autograd(agent, x, y, feedback=False)
    for layer, r_err, b_err in zip(agent.net.hidden_layers, rule, bp, strict=True):
        assert got[layer.name].tolist() == pytest.approx(_angle_loop(r_err, b_err), abs=1e-4)
    assert got[""].tolist() == pytest.approx(
        torch.stack([got[n.name] for n in agent.net.hidden_layers]).mean(0).tolist()
    )


def test_dfa_alignment_by_hand() -> None:
    agent = make_agent("dfa")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 8, IN, generator=g)
    y = torch.randint(0, C, (2, 8), generator=g)
    got = agent.credit_alignment(x, y)
    bp = _errors_by_autograd(agent, x, y, feedback=False)
    # the output error e = ∂L/∂ŷ by hand (softmax − one-hot over the batch mean)
    out = agent.net.forward_train(x, agent.views)[0]
    e = (torch.softmax(out, -1) - torch.nn.functional.one_hot(y, C)) / x.shape[1]
    for layer, b_err in zip(agent.net.hidden_layers, bp, strict=True):
        mine = torch.bmm(e, agent.credit.feedback[layer.name])
        want = _angle_loop(mine, b_err)
        assert got["feedback_alignment"][layer.name].tolist() == pytest.approx(want, abs=1e-4)
    w1, w2 = agent.views["hidden2.weight"], agent.views["output.weight"]
    D1, D2 = agent.credit.feedback["hidden1"], agent.credit.feedback["hidden2"]
    wa = got["weight_alignment"]
    assert wa["hidden2"].tolist() == pytest.approx(_angle_loop(D2, w2), abs=1e-4)
    assert wa["hidden1"].tolist() == pytest.approx(_angle_loop(D1, w2 @ w1), abs=1e-4)


def test_feedback_equal_to_the_weights_is_aligned_and_signs_are_measured() -> None:
    agent = make_agent("fa")
    for layer in agent.net.layers[1:]:
        agent.credit.feedback[layer.name].copy_(agent.views[f"{layer.name}.weight"])
    x, y = torch.randn(2, 4, IN), torch.randint(0, C, (2, 4))
    got = agent.credit_alignment(x, y)
    for probe in ("feedback_alignment", "weight_alignment"):
        assert all(v.abs().max() < 1e-3 for v in got[probe].values()), probe
    ss = make_agent("sign-symmetry")
    wa = ss.credit_alignment(x, y)["weight_alignment"]
    w = ss.views["output.weight"]
    want = [
        math.degrees(math.acos(float(w[r].abs().sum() / (w[r].numel() ** 0.5 * w[r].norm()))))
        for r in range(2)
    ]
    assert wa["output"].tolist() == pytest.approx(want, abs=1e-4)


def test_the_probes_are_default_and_silent_under_backprop() -> None:
    assert {"feedback_alignment", "weight_alignment"} <= set(DEFAULT_PROBES)
    x, y = torch.randn(2, 4, IN), torch.randint(0, C, (2, 4))
    names = ["feedback_alignment", "weight_alignment"]
    assert run_probes(names, make_agent("bp"), x, y) == {}
    found = run_probes(names, make_agent("weight-mirror"), x, y)
    assert set(found) == set(names)
    assert set(found["feedback_alignment"]) == {"hidden1", "hidden2", ""}
    assert set(found["weight_alignment"]) == {"hidden2", "output", ""}


def test_probing_changes_nothing() -> None:
    a, b = make_agent("kolen-pollack", decay=0.01), make_agent("kolen-pollack", decay=0.01)
    g = torch.Generator().manual_seed(3)
    for _ in range(4):
        x, y = torch.randn(2, 2, IN, generator=g), torch.randint(0, C, (2, 2), generator=g)
        a.credit_alignment(x, y)
        for agent in (a, b):
            agent.act(x)
            agent.observe(x, None, y)
    for k in a.views:
        assert torch.equal(a.views[k], b.views[k])
    for k in a.credit.feedback:
        assert torch.equal(a.credit.feedback[k], b.credit.feedback[k])
