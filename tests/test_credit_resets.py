"""Resets and credit rules: continual backprop, ReDo and the head reset re-initialise a unit's
*learned* feedback with its forward weights and never touch fixed feedback (docs/credit.md).

The checks are invariants a correct implementation must keep, not replays of its code:
Kolen–Pollack shrinks ``W − B`` by ``1 − λ`` at every entry a reset leaves alone, even on the
steps a reset materialises the update itself; a reset unit's outgoing feedback column is zero
and stays equal to its outgoing weights; its incoming feedback row is a fresh draw from the
layer's init distribution.
"""

from __future__ import annotations

import pytest
import torch

from contlearn.agents.networks import init_bounds
from contlearn.agents.online import OnlineAgent, OnlineAgentSpec
from contlearn.credit import Credit, credit_def
from contlearn.envs.base import StreamInfo
from contlearn.learners import Learner, learner_def
from contlearn.spec import build_spec

IN, C = 6, 3


def make_agent(
    credit: str,
    learner: str,
    learner_options: dict,
    hidden: str = "5,4",
    seeds=(0, 1),
    optimizer: str = "sgd",
    **credit_options,
) -> OnlineAgent:
    info = StreamInfo("test", "classification", (IN,), C, True, len(seeds), "accuracy", 1)
    spec = OnlineAgentSpec(
        hidden=hidden, activation="relu", lr=0.05, fast=False, optimizer=optimizer
    )
    cspec = build_spec(credit_def(credit).Spec, credit_options, "credit.")
    lspec = build_spec(learner_def(learner).Spec, learner_options, "learner.")
    return OnlineAgent(info, list(seeds), spec, Learner(learner, lspec, Credit(credit, cspec)))


def step(agent: OnlineAgent, g: torch.Generator, task_start: bool = False) -> None:
    R = len(agent.seeds)
    x = torch.randn(R, 1, IN, generator=g)
    y = torch.randint(0, C, (R, 1), generator=g)
    if task_start:
        agent.on_task_start(1)
    agent.act(x)
    agent.observe(x, None, y)


def snapshot(agent: OnlineAgent) -> tuple[dict, dict]:
    agent.sync()
    w = {layer.name: agent.views[f"{layer.name}.weight"].clone() for layer in agent.net.layers}
    return w, {k: v.clone() for k, v in agent.credit.feedback.items()}


CBP = {"replacement_rate": 0.5, "maturity": 1, "decay": 0.5}


def test_kolen_pollack_with_cbp_keeps_its_invariants_through_replacements() -> None:
    lam = 0.01
    agent = make_agent("kolen-pollack", "cbp", CBP, decay=lam)
    g = torch.Generator().manual_seed(3)
    keep = 1.0 - lam
    names = [layer.name for layer in agent.net.layers]
    hidden = [layer.name for layer in agent.net.hidden_layers]
    replaced_total = 0
    for _ in range(30):
        W0, B0 = snapshot(agent)
        ages0 = {n: agent.learner_state.stats.age[n].clone() for n in hidden}
        step(agent, g)
        W1, B1 = snapshot(agent)
        ages1 = {n: agent.learner_state.stats.age[n] for n in hidden}
        # units replaced this step: their age restarted at 0
        reset = {n: ages1[n] <= ages0[n] for n in hidden}
        replaced_total += sum(int(m.sum()) for m in reset.values())
        for li, name in enumerate(names[1:], start=1):
            below = names[li - 1]
            D0, D1 = W0[name] - B0[name], W1[name] - B1[name]
            rows = torch.zeros_like(D0, dtype=torch.bool)
            cols = torch.zeros_like(D0, dtype=torch.bool)
            if name in reset:  # incoming rows of reset units: fresh B, within the init bound
                rows = reset[name].unsqueeze(2).expand_as(D0)
                bound = init_bounds(agent.net.init, agent.net.by_name[name])[0]
                assert torch.all(B1[name][rows].abs() <= bound)
            if below in reset:  # outgoing columns of reset units below: W = B = 0, unless
                # the row was redrawn after (layers are replaced from the input side)
                cols = reset[below].unsqueeze(1).expand_as(D0) & ~rows
                assert torch.all(W1[name][cols] == 0) and torch.all(B1[name][cols] == 0)
            untouched = ~(rows | cols)
            torch.testing.assert_close(D1[untouched], keep * D0[untouched], rtol=0, atol=1e-6)
    assert replaced_total > 10, "the test must see replacements"


def test_a_reset_units_feedback_column_follows_its_weights_exactly_afterwards() -> None:
    agent = make_agent("kolen-pollack", "cbp", CBP, hidden="6", decay=0.01)
    g = torch.Generator().manual_seed(5)
    for _ in range(12):
        step(agent, g)
    W, B = snapshot(agent)
    ages = agent.learner_state.stats.age["hidden1"]
    young = ages < 12  # replaced at least once: since then W[:, i] and B[:, i] moved together
    assert young.any()
    cols = young.unsqueeze(1).expand_as(W["output"])
    torch.testing.assert_close(B["output"][cols], W["output"][cols], rtol=0, atol=1e-6)


@pytest.mark.parametrize("credit", ["fa", "dfa"])
def test_fixed_feedback_is_never_changed_by_resets(credit: str) -> None:
    agent = make_agent(credit, "cbp", CBP)
    B0 = {k: v.clone() for k, v in agent.credit.feedback.items()}
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        step(agent, g)
    assert int(sum(d["replacements"].sum() for d in agent.diagnostics().values())) > 0
    for k, v in agent.credit.feedback.items():
        assert torch.equal(v, B0[k])


@pytest.mark.parametrize("credit", ["weight-mirror", "symmetric-alignment"])
def test_redo_resets_learned_feedback_of_its_dormant_units(credit: str) -> None:
    opts = {"period": 3, "window": 3, "threshold": 2.0}  # every unit
    agent = make_agent(credit, "redo", opts, hidden="5")
    g = torch.Generator().manual_seed(2)
    for _ in range(2):
        step(agent, g)
    _, B0 = snapshot(agent)
    step(agent, g)  # the third update resets every hidden unit
    W1, B1 = snapshot(agent)
    # the output layer's feedback columns of the reset units are zero, and learned after the
    # reset from zero weights (weight mirror and the symmetric rule move B toward W = 0)
    assert torch.all(W1["output"] == 0)
    assert B1["output"].abs().max() < B0["output"].abs().max() * 0.5


def test_head_reset_redraws_the_output_layers_learned_feedback() -> None:
    agent = make_agent("kolen-pollack", "head-reset", {}, decay=0.0)
    g = torch.Generator().manual_seed(4)
    step(agent, g)
    W0, B0 = snapshot(agent)
    step(agent, g, task_start=True)
    W1, B1 = snapshot(agent)
    bound = init_bounds(agent.net.init, agent.net.by_name["output"])[0]
    assert not torch.equal(B1["output"], B0["output"])
    assert torch.all(B1["output"].abs() <= bound)
    # hidden layers' feedback followed their weights' update: W − B unchanged (no decay)
    torch.testing.assert_close(
        W1["hidden2"] - B1["hidden2"], W0["hidden2"] - B0["hidden2"], rtol=0, atol=1e-6
    )


@pytest.mark.parametrize("credit", ["kolen-pollack", "weight-mirror"])
def test_replicas_with_resets_equal_seeds_alone(credit: str) -> None:
    both = make_agent(credit, "cbp", CBP, seeds=(0, 1))
    alone = make_agent(credit, "cbp", CBP, seeds=(1,))
    g1 = torch.Generator().manual_seed(9)
    for _ in range(15):
        x = torch.randn(2, 1, IN, generator=g1)
        y = torch.randint(0, C, (2, 1), generator=g1)
        both.act(x)
        both.observe(x, None, y)
        alone.act(x[1:])
        alone.observe(x[1:], None, y[1:])
    _, B2 = snapshot(both)
    _, B1 = snapshot(alone)
    for k in B1:
        torch.testing.assert_close(B2[k][1:], B1[k], rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "credit, options",
    [("kolen-pollack", {}), ("information-alignment", {}), ("kolen-pollack", {"regularize": True})],
)
def test_a_restored_agent_with_resets_steps_exactly_as_the_original(credit, options) -> None:
    import io

    a = make_agent(credit, "cbp", {**CBP, "l2": 0.01}, optimizer="adam", **options)
    g = torch.Generator().manual_seed(11)
    for _ in range(6):
        step(a, g)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = make_agent(credit, "cbp", {**CBP, "l2": 0.01}, optimizer="adam", **options)
    b.load_state_dict(torch.load(buf, weights_only=True))
    state = g.get_state()
    for agent in (a, b):
        g.set_state(state)
        for _ in range(8):
            step(agent, g)
    for k in a.views:
        assert torch.equal(a.views[k], b.views[k])
    for k in a.credit.feedback:
        assert torch.equal(a.credit.feedback[k], b.credit.feedback[k])


def _pair(credit: str, learner: str, learner_options: dict, **credit_options):
    on = make_agent(credit, learner, learner_options, regularize=True, **credit_options)
    off = make_agent(credit, learner, learner_options, **credit_options)
    return on, off


def test_regularize_puts_l2_on_kolen_pollack_feedback_by_hand() -> None:
    lam, decay, lr = 0.1, 0.01, 0.05
    on, off = _pair("kolen-pollack", "l2", {"l2": lam}, decay=decay)
    B0 = {k: v.clone() for k, v in on.credit.feedback.items()}
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    for agent in (on, off):
        g.set_state(state)
        step(agent, g)
    for k in on.views:  # the forward weights do not see the option
        assert torch.equal(on.views[k], off.views[k])
    for k, b0 in B0.items():  # B also got −lr·λ·B before the shared decay
        want = off.credit.feedback[k] - lr * lam * b0 * (1 - decay)
        torch.testing.assert_close(on.credit.feedback[k], want, rtol=0, atol=1e-6)


def test_regularize_shrinks_weight_mirror_feedback_by_hand() -> None:
    shrink, decay = 0.2, 0.05
    opts = {"shrink": shrink, "sigma": 0.0}
    on, off = _pair("weight-mirror", "snp", opts, decay=decay, rate=0.01)
    B0 = {k: v.clone() for k, v in on.credit.feedback.items()}
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    for agent in (on, off):
        g.set_state(state)
        step(agent, g)
    for k, b0 in B0.items():  # the mirror step is linear in B: the shrink carries through
        want = off.credit.feedback[k] - shrink * b0 * (1 - decay)
        torch.testing.assert_close(on.credit.feedback[k], want, rtol=0, atol=1e-6)


def test_regularized_feedback_has_optimizer_state_that_resets_clear() -> None:
    from contlearn.learners.base import per_param_state

    # with Adam the feedback has moments (and step counts) that a reset must clear
    opts = {**CBP, "l2": 0.01}
    agent = make_agent("kolen-pollack", "cbp", opts, optimizer="adam", regularize=True)
    states = per_param_state(agent.learner_state, agent.learner_params())
    assert states and all("feedback.hidden2" in s for s in states)
    g = torch.Generator().manual_seed(8)
    seen = 0
    for _ in range(20):
        ages0 = agent.learner_state.stats.age["hidden2"].clone()
        step(agent, g)
        reset = agent.learner_state.stats.age["hidden2"] <= ages0  # (R, H)
        for s in per_param_state(agent.learner_state, agent.learner_params()):
            rows = s["feedback.hidden2"][reset]
            cols = s["feedback.output"].transpose(1, 2)[reset]
            assert torch.all(rows == 0) and torch.all(cols == 0)
            assert s["feedback.hidden2"].abs().sum() > 0  # (the others are not cleared)
            seen += int(reset.sum())
    assert seen > 0
