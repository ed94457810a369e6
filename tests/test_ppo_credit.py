"""Credit rules on PPO against independent computations: a per-sample loop over plain vectors
with the loss's output gradients derived by hand, backprop where a rule must reduce to it,
autograd where a rule keeps the true gradient; plus seeding, every learner, stopped replicas,
checkpoints, devices and the ``credit`` option on Slippery Ant.

(Over 400 lines: the independent per-sample implementation is half of it and serves the tests
beside it; the rest is one test per property.)
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from typing import Any

import pytest
import torch

from contlearn.agents.ppo import PPOAgent
from contlearn.agents.ppo_credit import NETS, CreditStep, credit_loss_and_grads
from contlearn.agents.ppo_loss import REFERENCE_STEP, gaussian_log_prob
from contlearn.backends.base import REFERENCE
from contlearn.credit import credit_def, credit_rules
from contlearn.envs.base import StreamInfo
from contlearn.errors import ConfigError
from contlearn.learners import learners
from contlearn.running.config import resolve
from contlearn.state import tree_leaves

OBS, ACT = 5, 2
TINY = {"hidden": "6,5", "rollout": 8, "minibatch_size": 4, "epochs": 2, "lr": 0.01}
RULES = [name for name in credit_rules.names() if name != "bp"]
LEARNED = [name for name in RULES if credit_def(name).learned]
LEARNERS = [name for name in learners.names() if name not in PPOAgent.unsupported_learners]
#: learner options that make every learner act within a few minibatch updates
ACTIVE = {
    "cbp": {"learner.maturity": 1, "learner.replacement_rate": 0.3},
    "redo": {"learner.period": 2, "learner.window": 2, "learner.threshold": 0.3},
    "snp": {"learner.shrink": 1e-3, "learner.sigma": 1e-3},
    "snp-init": {"learner.lam": 0.99},
    "l2": {"learner.l2": 1e-2},
    "l2-init": {"learner.l2_init": 1e-2},
}


def make(credit: str = "bp", learner: str = "bp", seeds=(0, 1), **options: Any) -> PPOAgent:
    """A tiny PPO agent (no environment needed)."""
    values = {"stream": "slippery-ant", "learner": learner, "credit": credit, **TINY}
    cfg = resolve({**values, **ACTIVE.get(learner, {}), **options})
    info = StreamInfo("tiny", "rl", (OBS,), ACT, False, len(seeds), "episode_return")
    return cfg.agent_cls(info, list(seeds), cfg.agent_spec, cfg.learner)


def play(agent: PPOAgent, updates: int, rows: slice = slice(None)) -> list[dict]:
    """Feed fixed transitions of 2 replicas (``rows`` of them) and 2 env copies until
    ``updates`` updates ran; their metrics."""
    g = torch.Generator().manual_seed(0)
    metrics: list[dict] = []
    t = 0
    while len(metrics) < updates:
        obs = torch.randn(2, 2, OBS, generator=g)[rows]
        action = agent.act(obs)
        feedback = (
            torch.randn(2, 2, generator=g)[rows],
            torch.randn(2, 2, OBS, generator=g)[rows],
            (torch.rand(2, 2, generator=g) < 0.2)[rows],
            torch.full((2, 2), t % 5 == 4)[rows],
        )
        out = agent.observe(obs, action, feedback)
        if out:
            metrics.append(out)
        t += 1
    return metrics


def minibatch(agent: PPOAgent, M: int = 6, seed: int = 3) -> dict[str, torch.Tensor]:
    """A minibatch whose old log-probabilities are near the current policy's, so that some
    ratios fall outside the clip range and some inside."""
    g = torch.Generator().manual_seed(seed)
    R = len(agent.seeds)
    obs = torch.randn(R, M, OBS, generator=g)
    action = torch.randn(R, M, ACT, generator=g)
    with torch.no_grad():
        mean = agent.net.policy.forward(obs)[0]
        logp = gaussian_log_prob(action, mean, agent.net.log_std)
    return {
        "obs": obs,
        "action": action,
        "logp": logp + 0.3 * torch.randn(R, M, generator=g),
        "adv": torch.randn(R, M, generator=g),
        "ret": torch.randn(R, M, generator=g),
    }


def f_and_df(activation: str, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if activation == "relu":
        return z.clamp(min=0), (z > 0).to(z.dtype)
    t = torch.tanh(z)
    return t, 1 - t * t


def hand_output_errors(agent: PPOAgent, mb: dict, r: int, mean, value) -> tuple:
    """∂L/∂μ_b (A), ∂L/∂V_b and ∂L/∂s for replica r, derived by hand, float64:
    with z = (a − μ)/σ, ρ = exp(logp − logp_old) and u = 1 where the unclipped term is the
    maximum (inside the clip range both are): ∂L/∂μ_b = −u A ρ z/σ / M,
    ∂L/∂V_b = 2 c_V (V − ret)/M, ∂L/∂s = Σ_b −u A ρ (z² − 1)/M − c_H."""
    s, sp = agent.net.log_std[r].double(), agent.spec
    M = mb["obs"].shape[1]
    a = mb["action"][r].double()
    sigma = s.exp()
    z = (a - mean) / sigma  # (M, A)
    logp = -(0.5 * z**2 + s + 0.5 * torch.log(torch.tensor(2 * torch.pi))).sum(-1)
    rho = torch.exp(logp - mb["logp"][r].double())
    A = mb["adv"][r].double()
    inside = (rho >= 1 - sp.clip) & (rho <= 1 + sp.clip)
    unclipped = -A * rho > -A * rho.clamp(1 - sp.clip, 1 + sp.clip)
    u = (inside | unclipped).double()
    coef = -u * A * rho / M  # (M,)
    e_mean = coef.unsqueeze(1) * z / sigma
    e_value = 2 * sp.vf_coef * (value - mb["ret"][r].double()) / M
    g_s = (coef.unsqueeze(1) * (z**2 - 1)).sum(0) - sp.ent_coef
    return e_mean, e_value, g_s


def loop_gradients(agent: PPOAgent, mb: dict, r: int) -> dict[str, torch.Tensor]:
    """Replica r's gradients under the agent's rule, one sample at a time over column
    vectors (W: out × in; the error sent down is Bᵀ δ), float64."""
    act = agent.spec.activation
    grads: dict[str, torch.Tensor] = {}
    outs, caches = {}, {}
    for n in NETS:
        mlp = agent.net.nets[n]
        W = [mlp.params[f"{layer.name}.weight"][r].double() for layer in mlp.layers]
        b = [mlp.params[f"{layer.name}.bias"][r].double() for layer in mlp.layers]
        per_sample = []
        for x in mb["obs"][r].double():
            hs, dfs = [x], []
            for i in range(len(W)):
                zi = W[i] @ hs[-1] + b[i]
                if i == len(W) - 1:
                    per_sample.append(zi)
                else:
                    h, df = f_and_df(act, zi)
                    hs.append(h)
                    dfs.append(df)
            caches.setdefault(n, []).append((hs, dfs))
        outs[n] = torch.stack(per_sample)  # (M, outputs)
        caches[n + ".W"] = W  # type: ignore[assignment]
    e_mean, e_value, g_s = hand_output_errors(
        agent, mb, r, outs["policy"], outs["value"].squeeze(-1)
    )
    grads["policy.log_std"] = g_s
    rule = agent.credit
    assert rule is not None
    for n, e_all in (("policy", e_mean), ("value", e_value.unsqueeze(-1))):
        mlp, W = agent.net.nets[n], caches[n + ".W"]
        names = [layer.name for layer in mlp.layers]
        for k in names:
            grads[f"{n}.{k}.weight"] = torch.zeros_like(W[names.index(k)])
            grads[f"{n}.{k}.bias"] = torch.zeros(W[names.index(k)].shape[0], dtype=torch.float64)
        for (hs, dfs), e in zip(caches[n], e_all, strict=True):
            delta = e
            for i in range(len(W) - 1, -1, -1):
                grads[f"{n}.{names[i]}.weight"] += torch.outer(delta, hs[i])
                grads[f"{n}.{names[i]}.bias"] += delta
                if i == 0:
                    break
                if rule.name == "dfa":
                    D = rule.rules[n].feedback[names[i - 1]][r].double()  # (outputs, units)
                    g = D.T @ e
                elif rule.name == "sign-symmetry":
                    g = (W[i].abs().mean() * torch.sign(W[i])).T @ delta
                else:  # fa
                    g = rule.rules[n].feedback[names[i]][r].double().T @ delta
                delta = g * dfs[i - 1]
    return grads


@pytest.mark.parametrize("activation", ["relu", "tanh"])
@pytest.mark.parametrize("credit", ["fa", "dfa", "sign-symmetry"])
def test_minibatch_gradients_match_a_per_sample_loop(credit: str, activation: str) -> None:
    agent = make(credit, activation=activation, clip=0.2, vf_coef=0.5, ent_coef=0.1)
    mb = minibatch(agent)
    assert agent.credit is not None
    _, _, grads, _ = credit_loss_and_grads(agent.net, agent.credit, mb, 0.2, 0.5, 0.1)[0]
    assert list(grads) == list(agent.net.params)
    for r in range(2):
        loop = loop_gradients(agent, mb, r)
        assert set(loop) == set(grads)
        for k, v in loop.items():
            torch.testing.assert_close(
                grads[k][r].double().reshape(v.shape), v, rtol=1e-4, atol=1e-6
            )


def set_feedback_to_weights(agent: PPOAgent) -> None:
    assert agent.credit is not None
    for n, rule in agent.credit.rules.items():
        for name, b in rule.feedback.items():
            b.copy_(agent.net.nets[n].params[f"{name}.weight"].detach())


@pytest.mark.parametrize("learner", ["bp", "cbp"])
def test_fa_with_feedback_set_to_the_weights_makes_bps_minibatch_update(learner: str) -> None:
    options = {"max_grad_norm": 0.5, "ent_coef": 0.1, "fast": False}
    fa, bp = make("fa", learner, **options), make("bp", learner, **options)
    assert bp._step is REFERENCE_STEP and isinstance(fa._step, CreditStep)
    for k in bp._keys:  # the rule does not change the initial weights
        assert torch.equal(fa._views[k], bp._views[k])
    set_feedback_to_weights(fa)
    mb = minibatch(bp, M=4)
    orders = torch.arange(4).expand(1, 2, 4)  # one epoch, one minibatch, in order
    stats_fa = fa._step.update(fa, mb, orders)
    stats_bp = bp._step.update(bp, mb, orders)
    for k in stats_bp:
        torch.testing.assert_close(stats_fa[k], stats_bp[k])
    for k in bp._keys:
        torch.testing.assert_close(fa._views[k], bp._views[k], rtol=1e-5, atol=1e-6)
    for a, b in zip(tree_leaves(fa.learner_state), tree_leaves(bp.learner_state), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_kolen_pollack_without_decay_started_at_the_weights_stays_backprop() -> None:
    kp = make("kolen-pollack", "adam", **{"credit.decay": 0.0})
    bp = make("bp", "adam", fast=False)
    set_feedback_to_weights(kp)
    for m_kp, m_bp in zip(play(kp, 3), play(bp, 3), strict=True):
        for k in m_bp:
            torch.testing.assert_close(m_kp[k], m_bp[k], rtol=1e-4, atol=1e-6)
    for k in bp._keys:
        torch.testing.assert_close(kp._views[k], bp._views[k], rtol=1e-4, atol=1e-6)
    assert kp.credit is not None
    for name, b in kp.credit.feedback.items():
        torch.testing.assert_close(b, kp._views[f"{name}.weight"], rtol=1e-4, atol=1e-6)


def test_dfa_gives_the_output_layers_and_log_std_their_true_gradients() -> None:
    agent = make("dfa")
    mb = minibatch(agent)
    assert agent.credit is not None
    _, _, grads, _ = credit_loss_and_grads(agent.net, agent.credit, mb, 0.2, 1.0, 0.0)[0]
    _, _, true, _ = REFERENCE_STEP.loss_and_grads(agent.net, mb, 0.2, 1.0, 0.0)
    for k in ("policy.output.weight", "policy.output.bias", "value.output.weight"):
        torch.testing.assert_close(grads[k], true[k])
    torch.testing.assert_close(grads["value.output.bias"], true["value.output.bias"])
    torch.testing.assert_close(grads["policy.log_std"], true["policy.log_std"])
    assert not torch.allclose(grads["policy.hidden1.weight"], true["policy.hidden1.weight"])
    fb = agent.credit.feedback  # (R, outputs, units): one per hidden layer of each net
    assert fb["policy.hidden1"].shape == (2, ACT, 6) and fb["value.hidden2"].shape == (2, 1, 5)


def test_each_net_draws_its_own_feedback_from_each_replicas_seed() -> None:
    agent = make("fa", seeds=(3, 7))
    assert agent.credit is not None
    fb = agent.credit.feedback
    assert set(fb) == {"policy.hidden2", "policy.output", "value.hidden2", "value.output"}
    assert not torch.equal(fb["policy.hidden2"], fb["value.hidden2"])  # same shape, own draw
    assert not torch.equal(fb["policy.hidden2"][0], fb["policy.hidden2"][1])
    alone = make("fa", seeds=(7,))
    assert alone.credit is not None
    for k, v in alone.credit.feedback.items():
        assert torch.equal(fb[k][1:], v)


@pytest.mark.parametrize("credit", ["fa", "dfa", "sign-symmetry", *LEARNED])
def test_replica_r_learns_as_its_seed_alone(credit: str) -> None:
    both, alone = make(credit, "cbp", seeds=(3, 7)), make(credit, "cbp", seeds=(7,))
    m_both, m_alone = play(both, 2), play(alone, 2, rows=slice(1, 2))
    for a, b in zip(m_both, m_alone, strict=True):
        assert all(torch.equal(a[k][1:], b[k]) for k in b)
    assert all(torch.equal(both._views[k][1:], alone._views[k]) for k in both._keys)
    assert both.credit is not None and alone.credit is not None
    for k, v in alone.credit.feedback.items():
        assert torch.equal(both.credit.feedback[k][1:], v)


@pytest.mark.parametrize("learner", LEARNERS)
@pytest.mark.parametrize("credit", RULES)
def test_every_learner_runs_with_every_rule(credit: str, learner: str) -> None:
    agent = make(credit, learner)
    assert agent.backend == REFERENCE
    start = {k: v.clone() for k, v in agent._views.items()}
    feedback = {k: v.clone() for k, v in agent.credit.feedback.items()} if agent.credit else {}
    metrics = play(agent, 2)
    assert all(bool(torch.isfinite(v).all()) for m in metrics for v in m.values())
    for k, v in agent._views.items():
        assert bool(torch.isfinite(v).all()) and not torch.equal(v, start[k]), k
    if credit in LEARNED:
        assert agent.credit is not None
        assert all(not torch.equal(agent.credit.feedback[k], v) for k, v in feedback.items())


def test_stopped_replicas_keep_their_weights_and_feedback() -> None:
    agent = make("kolen-pollack", "adam", **{"credit.decay": 0.01})
    agent.stop_replicas(torch.tensor([False, True]))
    start = {k: v.clone() for k, v in agent._views.items()}
    assert agent.credit is not None
    feedback = {k: v.clone() for k, v in agent.credit.feedback.items()}
    play(agent, 2)
    for k, v in agent._views.items():
        assert torch.equal(v[1], start[k][1]) and not torch.equal(v[0], start[k][0])
    for k, v in agent.credit.feedback.items():
        assert torch.equal(v[1], feedback[k][1]) and not torch.equal(v[0], feedback[k][0])


@pytest.mark.parametrize(
    "credit, learner, options",
    [
        ("fa", "cbp", {}),
        ("kolen-pollack", "cbp", {}),
        ("weight-mirror", "cbp", {}),
        ("kolen-pollack", "l2", {"credit.regularize": True, "learner.l2": 0.1}),
    ],
)
def test_a_restored_agent_steps_exactly_as_the_original(
    credit: str, learner: str, options: dict
) -> None:
    a = make(credit, learner, **options)
    play(a, 1)
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    buffer.seek(0)
    b = make(credit, learner, **options)
    b.load_state_dict(torch.load(buffer, weights_only=True))
    assert a.credit is not None and b.credit is not None
    for k in a.credit.feedback:
        assert torch.equal(a.credit.feedback[k], b.credit.feedback[k])
    for m_a, m_b in zip(play(a, 2), play(b, 2), strict=True):
        assert all(torch.equal(m_a[k], m_b[k]) for k in m_a)
    assert all(torch.equal(a._views[k], b._views[k]) for k in a._keys)
    for k in a.credit.feedback:
        assert torch.equal(a.credit.feedback[k], b.credit.feedback[k])


@pytest.mark.parametrize("credit", ["kolen-pollack", "fa"])
def test_cbp_resets_reinitialise_learned_feedback_and_leave_fixed_feedback(credit: str) -> None:
    # 4 minibatch updates per rollout; maturity 3 and ρ = 1: the 4th replaces every hidden unit
    agent = make(credit, "cbp", **{"learner.maturity": 3, "learner.replacement_rate": 1.0})
    assert agent.credit is not None
    start = {k: v.clone() for k, v in agent.credit.feedback.items()}
    after: list[dict] = []  # the feedback after each minibatch update's learning
    original_learn = agent.credit.learn

    def learn(views, updates, inputs, stopped=None):
        original_learn(views, updates, inputs, stopped)
        after.append({k: v.clone() for k, v in agent.credit.feedback.items()})

    agent.credit.learn = learn  # type: ignore[method-assign]
    play(agent, 1)
    assert len(after) == 4
    diag = agent.diagnostics()
    for layer, d in diag.items():  # every unit of both replicas, once
        assert d["replacements"].tolist() == [agent.net.by_name[layer].fan_out] * 2
    fb = agent.credit.feedback
    if credit == "fa":  # fixed feedback is never changed by resets
        assert all(torch.equal(fb[k], v) for k, v in start.items())
        return
    for n in NETS:
        # B_output[:, i] = 0 for every reset hidden2 unit (as W_output), and ΔB = ΔW is 0 there
        assert bool((fb[f"{n}.output"] == 0).all())
        assert bool((agent._views[f"{n}.output.weight"] == 0).all())
        assert not bool((after[2][f"{n}.output"] == 0).any())
        # every row B_hidden2[i, :] redrawn
        assert bool((fb[f"{n}.hidden2"] != after[2][f"{n}.hidden2"]).any(-1).all())


@pytest.mark.parametrize("learned", [True, False])
def test_regularize_makes_l2_act_on_learned_feedback(learned: bool) -> None:
    lam, lr = 0.1, 0.01
    options = {"learner.l2": lam, "optimizer": "sgd", "credit.decay": 0.0}
    plain = make("kolen-pollack", "l2", **options)
    reg = make("kolen-pollack", "l2", **options, **{"credit.regularize": learned})
    assert plain.credit is not None and reg.credit is not None
    start = {k: v.clone() for k, v in reg.credit.feedback.items()}
    mb = minibatch(plain, M=4)
    orders = torch.arange(4).expand(1, 2, 4)
    plain._step.update(plain, mb, orders)
    reg._step.update(reg, mb, orders)
    for k in plain._keys:
        assert torch.equal(plain._views[k], reg._views[k])
    for k, b0 in start.items():  # SGD on g = 0 + λB: B gets −lr·λ·B besides ΔB = ΔW
        expected = plain.credit.feedback[k] - (lr * lam * b0 if learned else 0.0)
        torch.testing.assert_close(reg.credit.feedback[k], expected, rtol=1e-5, atol=1e-7)


def test_a_checkpoint_without_the_rules_state_is_refused() -> None:
    with pytest.raises(ValueError, match="no feedback for credit rule fa"):
        make("fa").load_state_dict(make("bp").state_dict())


def test_to_moves_the_feedback_with_the_networks() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    agent = make("kolen-pollack", "cbp").to(device)
    assert agent.credit is not None
    assert all(v.device.type == device for v in agent.credit.feedback.values())
    play(agent, 2)
    assert all(v.device.type == device for v in agent.credit.feedback.values())
    assert all(v.device.type == device for v in agent._views.values())


def test_fast_backends_stay_backprop_only() -> None:
    for credit in RULES:
        agent = make(credit, value_worker=False)
        assert agent.backend == REFERENCE and agent.step_config().credit == credit
    assert make("bp").backend != REFERENCE
    with pytest.raises(ConfigError, match="value_worker=true needs credit=bp"):
        make("fa", value_worker=True)


def test_every_rule_resolves_on_slippery_ant() -> None:
    for name in credit_rules.names():
        cfg = resolve({"stream": "slippery-ant", "credit": name})
        assert cfg.learner.credit.name == name and cfg.to_dict()["credit"] == name


@pytest.mark.parametrize(
    "sets, message",
    [
        (["credit=fb"], "unknown credit rule 'fb'"),
        (["credit=kolen-pollack", "credit.decay=-1"], "credit.decay"),
        (["credit=fa", "credit.decay=0.1"], "credit.decay"),
    ],
)
def test_cli_bad_rule_or_option_on_slippery_ant_is_one_line_exit_2(
    tmp_path, sets: list[str], message: str
) -> None:
    out = tmp_path / "run"
    args = [a for s in sets for a in ("--set", s)]
    proc = subprocess.run(
        [sys.executable, "-m", "contlearn", "run", "slippery-ant", *args, "--steps", "10"]
        + ["--out", str(out)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and message in proc.stderr
    assert not out.exists()


@pytest.mark.mujoco
def test_slippery_ant_runs_resumes_and_plots_under_fa(tmp_path) -> None:
    out = tmp_path / "run"
    sets = ["rollout=64", "minibatch_size=16", "epochs=2", "hidden=16,16", "change_every=200"]
    args = [sys.executable, "-m", "contlearn", "run", "slippery-ant", "--set", "credit=fa"]
    args += [a for s in [*sets, "checkpoint_every=100"] for a in ("--set", s)]
    args += ["--out", str(out), "--resume", "--progress"]
    first = subprocess.run([*args, "--steps", "300"], capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    assert "contlearn: backend reference" in first.stderr
    second = subprocess.run([*args, "--steps", "500"], capture_output=True, text=True)
    assert second.returncode == 0, second.stderr
    assert json.loads((out / "config.json").read_text())["credit"] == "fa"
    assert json.loads((out / "meta.json").read_text())["backend"] == "reference"
    import contlearn

    df = contlearn.load_runs([out])
    assert set(df["learner"]) == {"fa+bp"} and df["step"].max() == 500
    full = contlearn.run(
        "slippery-ant",
        steps=500,
        config={"credit": "fa", **dict(s.split("=") for s in sets)},
        out=tmp_path / "full",
    )
    cols = ["seed", "step", "metric", "layer"]
    a = df.drop(columns=["run"]).sort_values(cols).reset_index(drop=True)
    b = contlearn.load_runs([full.path]).drop(columns=["run"]).sort_values(cols)
    import pandas as pd

    pd.testing.assert_frame_equal(a, b.reset_index(drop=True))
    plot = subprocess.run(
        [sys.executable, "-m", "contlearn", "plot", str(out), "--out", str(tmp_path / "p.png")],
        capture_output=True,
        text=True,
    )
    assert plot.returncode == 0, plot.stderr
    assert (tmp_path / "p.png").stat().st_size > 0


@pytest.mark.mujoco
@pytest.mark.parametrize("credit", ["fa", "kolen-pollack"])
def test_slippery_ant_replicas_and_resume_mid_rollout_are_exact(credit: str) -> None:
    from tests.test_ppo import _trajectory, build

    s2, a2, loop2, _ = build([3, 7], credit=credit)
    s1, a1, loop1, _ = build([7], credit=credit)
    loop2.run(200)
    loop1.run(200)
    assert torch.equal(s2.obs[1], s1.obs[0])
    assert all(torch.equal(a2._views[k][1], a1._views[k][0]) for k in a1._keys)
    stream, agent, loop, records = build([5], "cbp", credit=credit)
    loop.run(100)  # mid-rollout, mid-episode
    buffer = io.BytesIO()
    saved = {"stream": stream.state_dict(), "agent": agent.state_dict(), "loop": loop.state_dict()}
    torch.save(saved, buffer)
    loop.run(250)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    stream2, agent2, loop2, records2 = build([5], "cbp", credit=credit)
    stream2.load_state_dict(state["stream"])
    agent2.load_state_dict(state["agent"])
    loop2.load_state_dict(state["loop"])
    loop2.run(250)
    assert _trajectory(records2) == [x for x in _trajectory(records) if x[1] > 100]
    assert all(torch.equal(agent._views[k], agent2._views[k]) for k in agent._keys)
    assert agent.credit is not None and agent2.credit is not None
    for k, v in agent.credit.feedback.items():
        assert torch.equal(v, agent2.credit.feedback[k])


@pytest.mark.mujoco
def test_alignment_is_probed_on_ppo_per_net_and_matches_the_angle(tmp_path) -> None:
    import contlearn
    from contlearn.credit.alignment import angle

    out = tmp_path / "run"
    contlearn.run(
        "slippery-ant",
        seeds=2,
        steps=2048,
        config={"hidden": "8,8", "credit": "kolen-pollack", "probe_every": 1024},
        out=out,
        progress=False,
    )
    df = contlearn.load_runs([out])
    wa = df[df["metric"] == "weight_alignment"]
    assert {"policy.hidden2", "policy.output", "value.hidden2", "value.output", ""} <= set(
        wa["layer"]
    )
    fa = df[df["metric"] == "feedback_alignment"]  # (on the last update's minibatch)
    assert {"policy.hidden1", "policy.hidden2", "value.hidden1", "value.hidden2", ""} <= set(
        fa["layer"]
    )
    assert ((wa["value"] >= 0) & (wa["value"] <= 180)).all()
    bp = tmp_path / "bp"
    contlearn.run(
        "slippery-ant",
        seeds=1,
        steps=1024,
        config={"hidden": "8,8", "probe_every": 1024},
        out=bp,
        progress=False,
    )
    assert not (contlearn.load_runs([bp])["metric"] == "weight_alignment").any()
    # the recorded angle is the angle between B and W of that layer at that step
    from contlearn.running.config import resolve

    cfg = resolve({"stream": "slippery-ant", "hidden": "8,8", "credit": "fa", "seeds": 2})
    from contlearn.agents.ppo import PPOAgent
    from contlearn.envs import make_stream

    stream = make_stream(cfg.stream, cfg.stream_spec, cfg.seeds)
    try:
        agent = PPOAgent(stream.info, cfg.seeds, cfg.agent_spec, cfg.learner)
        got = agent.credit_alignment(torch.zeros(2, 1, 1), None)["weight_alignment"]
        for n in ("policy", "value"):
            rule = agent.credit.rules[n]
            w = agent.net.nets[n].params["output.weight"]
            torch.testing.assert_close(got[f"{n}.output"], angle(rule.feedback["output"], w))
    finally:
        stream.close()
