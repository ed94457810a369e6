"""``feedback_alignment`` on PPO, against a per-sample loop: the angle between the error each
net's rule sends to a hidden layer and backprop's, on the last update's last minibatch."""

from __future__ import annotations

import io

import pytest
import torch

from contlearn.agents.ppo_credit import NETS
from contlearn.credit.alignment import angle
from tests.test_ppo_credit import f_and_df, hand_output_errors, make, play


def loop_alignment(agent, mb: dict, r: int) -> dict[str, torch.Tensor]:
    """Replica r's angles per prefixed hidden layer, one sample at a time, float64."""
    act = agent.spec.activation
    rule = agent.credit
    signals: dict[str, tuple[list, list]] = {}
    outs, caches = {}, {}
    for n in NETS:
        mlp = agent.net.nets[n]
        W = [mlp.params[f"{layer.name}.weight"][r].double() for layer in mlp.layers]
        b = [mlp.params[f"{layer.name}.bias"][r].double() for layer in mlp.layers]
        rows = []
        for x in mb["obs"][r].double():
            hs, dfs = [x], []
            for i in range(len(W)):
                z = W[i] @ hs[-1] + b[i]
                if i == len(W) - 1:
                    rows.append(z)
                else:
                    h, df = f_and_df(act, z)
                    hs.append(h)
                    dfs.append(df)
            caches.setdefault(n, []).append(dfs)
        outs[n] = torch.stack(rows)
        caches[n + ".W"] = W
    e_mean, e_value, _ = hand_output_errors(agent, mb, r, outs["policy"], outs["value"][:, 0])
    for n, errors in (("policy", e_mean), ("value", e_value.unsqueeze(-1))):
        W, names = caches[n + ".W"], [layer.name for layer in agent.net.nets[n].layers]
        for dfs, e in zip(caches[n], errors, strict=True):
            d_rule, d_bp = e, e
            for i in range(len(W) - 1, 0, -1):
                if rule.name == "dfa":
                    g_rule = rule.rules[n].feedback[names[i - 1]][r].double().T @ e
                else:  # fa
                    g_rule = rule.rules[n].feedback[names[i]][r].double().T @ d_rule
                g_bp = W[i].T @ d_bp
                got = signals.setdefault(f"{n}.{names[i - 1]}", ([], []))
                got[0].append(g_rule)
                got[1].append(g_bp)
                d_rule, d_bp = g_rule * dfs[i - 1], g_bp * dfs[i - 1]
    return {
        k: angle(torch.stack(a).unsqueeze(0), torch.stack(c).unsqueeze(0))[0]
        for k, (a, c) in signals.items()
    }


@pytest.mark.parametrize("credit", ["fa", "dfa"])
@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_ppo_feedback_alignment_matches_a_per_sample_loop(credit: str, activation: str) -> None:
    agent = make(credit, activation=activation)
    assert "feedback_alignment" not in agent.credit_alignment(torch.zeros(2, 1, 5), None)
    play(agent, 2)
    mb = agent.credit.probe_minibatch
    assert mb is not None and mb["obs"].shape[:2] == (2, 4)
    got = agent.credit_alignment(torch.zeros(2, 1, 5), None)["feedback_alignment"]
    layers = {f"{n}.hidden{i}" for n in NETS for i in (1, 2)}
    assert set(got) == layers | {""}
    for r in range(2):
        want = loop_alignment(agent, mb, r)
        for k in layers:
            torch.testing.assert_close(got[k][r], want[k], atol=1e-3, rtol=0)
    torch.testing.assert_close(got[""], torch.stack([got[k] for k in sorted(layers)]).mean(0))


def test_the_probe_minibatch_is_checkpointed() -> None:
    agent = make("fa")
    play(agent, 1)
    buffer = io.BytesIO()
    torch.save(agent.state_dict(), buffer)
    buffer.seek(0)
    restored = make("fa")
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    a = agent.credit_alignment(torch.zeros(2, 1, 5), None)["feedback_alignment"]
    b = restored.credit_alignment(torch.zeros(2, 1, 5), None)["feedback_alignment"]
    assert all(torch.equal(a[k], b[k]) for k in a)
