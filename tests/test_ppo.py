"""The PPO agent: its math against hand and naive computations, replicas, learners, state."""

from __future__ import annotations

import io
import math

import pytest
import torch

from contlearn.agents.ppo import (
    ActorCritic,
    PPOAgent,
    PPOSpec,
    clipped_policy_loss,
    gae,
    gaussian_log_prob,
)
from contlearn.envs import make_stream
from contlearn.errors import ConfigError
from contlearn.learners.base import find_states
from contlearn.learners.optim import ScaleByAdamState
from contlearn.loop.rl import RLLoop
from contlearn.running.config import resolve
from contlearn.seeding import torch_generator

SMALL = {"change_every": 150, "rollout": 64, "minibatch_size": 16, "epochs": 2}  # 8 updates


def build(seeds: list[int], learner: str = "bp", **options):
    """Stream, agent, loop and the list the records go to, for a small PPO on Slippery Ant."""
    cfg = resolve({"stream": "slippery-ant", "learner": learner, **SMALL, **options})
    stream = make_stream(cfg.stream, cfg.stream_spec, seeds)
    agent = cfg.agent_cls(stream.info, stream.seeds, cfg.agent_spec, cfg.learner)
    records: list = []
    return stream, agent, RLLoop(stream, agent, records.append), records


def test_gae_hand_computed() -> None:
    # γ = 0.5, λ = 0.5, one replica, one copy, 4 steps; the episode terminates after step 1.
    r = torch.tensor([[[1.0], [2.0], [3.0], [4.0]]])  # (R, T, E)
    v = torch.tensor([[[1.0], [1.0], [2.0], [2.0]]])
    v_next = torch.tensor([[[1.0], [9.0], [2.0], [4.0]]])  # 9.0 is never used: terminal
    term = torch.tensor([[[False], [True], [False], [False]]])
    adv, ret = gae(r, v, v_next, term, term, 0.5, 0.5)
    # δ = r + γ(1−term)V' − V: [0.5, 1.0, 2.0, 4.0]; A_t = δ_t + γλ(1−end_t) A_{t+1}
    # A_3 = 4; A_2 = 2 + 0.25·4 = 3; A_1 = 1 (episode end); A_0 = 0.5 + 0.25·1 = 0.75
    assert adv.flatten().tolist() == [0.75, 1.0, 3.0, 4.0]
    assert ret.flatten().tolist() == [1.75, 2.0, 5.0, 6.0]


def test_gae_truncation_bootstraps_but_cuts_the_trace() -> None:
    r, v = torch.ones(1, 2, 1), torch.zeros(1, 2, 1)
    v_next = torch.full((1, 2, 1), 10.0)
    trunc = torch.tensor([[[True], [False]]])
    adv, _ = gae(r, v, v_next, torch.zeros_like(trunc), trunc, 0.5, 1.0)
    assert adv.flatten().tolist() == [6.0, 6.0]  # step 0: 1 + 0.5·10, no trace from step 1


def test_gae_matches_naive_loop() -> None:
    g = torch.Generator().manual_seed(0)
    R, T, E = 2, 7, 3
    r, v, vn = (torch.randn(R, T, E, generator=g, dtype=torch.float64) for _ in range(3))
    term = torch.rand(R, T, E, generator=g) < 0.2
    end = term | (torch.rand(R, T, E, generator=g) < 0.2)
    adv, ret = gae(r, v, vn, term, end, 0.9, 0.8)
    rl, vl, vnl, terml, endl, advl = (x.tolist() for x in (r, v, vn, term, end, adv))
    for i in range(R):
        for e in range(E):
            nxt = 0.0
            for t in reversed(range(T)):
                delta = rl[i][t][e] + 0.9 * vnl[i][t][e] * (not terml[i][t][e]) - vl[i][t][e]
                nxt = delta + 0.9 * 0.8 * nxt * (not endl[i][t][e])
                assert math.isclose(advl[i][t][e], nxt, rel_tol=1e-12, abs_tol=1e-12)
    torch.testing.assert_close(ret, adv + v)


def test_clipped_loss_matches_naive() -> None:
    g = torch.Generator().manual_seed(1)
    logp, logp_old = torch.randn(3, 50, generator=g), torch.randn(3, 50, generator=g)
    adv = torch.randn(3, 50, generator=g)
    loss = clipped_policy_loss(logp, logp_old, adv, 0.2)
    for i in range(3):
        terms = []
        for b in range(50):
            ratio = math.exp(logp[i, b] - logp_old[i, b])
            clipped = min(max(ratio, 0.8), 1.2)
            terms.append(-min(ratio * adv[i, b].item(), clipped * adv[i, b].item()))
        assert math.isclose(loss[i].item(), sum(terms) / 50, rel_tol=1e-5)


def test_gaussian_log_prob_matches_torch_normal() -> None:
    g = torch.Generator().manual_seed(2)
    a, mean = torch.randn(2, 5, 4, generator=g), torch.randn(2, 5, 4, generator=g)
    log_std = torch.randn(2, 4, generator=g)
    ref = torch.distributions.Normal(mean, log_std.exp().unsqueeze(1)).log_prob(a).sum(-1)
    torch.testing.assert_close(gaussian_log_prob(a, mean, log_std), ref)


def test_actor_critic_names_layers_of_both_nets() -> None:
    net = ActorCritic(5, 2, (8, 8), "relu", "lecun_uniform", [torch_generator(0, "agent")], 0.0)
    assert [layer.name for layer in net.hidden_layers] == [
        "policy.hidden1",
        "policy.hidden2",
        "value.hidden1",
        "value.hidden2",
    ]
    assert net.by_name["value.hidden2"].next == "value.output"
    assert net.params["policy.hidden1.weight"] is net.policy.params["hidden1.weight"]
    w, b = net.sample_init("value.hidden1", 3, torch.Generator().manual_seed(0))
    assert w.shape == (3, 5) and bool((b == 0).all())


def test_spec_checks_minibatches_tile_the_rollout() -> None:
    with pytest.raises(ConfigError, match="multiple of minibatch_size"):
        resolve({"stream": "slippery-ant", "rollout": 100, "minibatch_size": 16})


@pytest.mark.mujoco
def test_head_reset_is_refused() -> None:
    with pytest.raises(ConfigError, match="head-reset"):
        build([0], "head-reset")


def _trajectory(records: list, replica: int | None = None) -> list:
    return [
        (r.kind, r.step, r.task, r.layer, {k: v.tolist() for k, v in r.values.items()})
        for r in records
        if replica is None or r.replica == replica
    ]


@pytest.mark.mujoco
@pytest.mark.parametrize(
    "learner, options",
    [
        ("bp", {}),
        ("cbp", {"learner.maturity": 5, "learner.replacement_rate": 0.05}),
        ("redo", {"learner.period": 20, "learner.window": 10, "learner.threshold": 0.5}),
    ],
)
def test_replica_in_batch_equals_seed_alone(learner: str, options: dict) -> None:
    s2, a2, loop2, rec2 = build([3, 7], learner, **options)
    s1, a1, loop1, rec1 = build([7], learner, **options)
    loop2.run(300)
    loop1.run(300)
    assert torch.equal(s2.obs[1], s1.obs[0])
    p2, p1 = a2.state_dict()["params"], a1.state_dict()["params"]
    assert all(torch.equal(p2[k][1], p1[k][0]) for k in p1)
    episodes2 = [x for x in _trajectory(rec2, 1) if x[0] == "episode"]
    assert episodes2 == [x for x in _trajectory(rec1) if x[0] == "episode"] and episodes2


@pytest.mark.mujoco
def test_cbp_maturity_counts_minibatch_updates_and_resets_clear_adam() -> None:
    # 8 minibatch updates per rollout; with ρ = 1 every eligible unit is replaced at once.
    _, agent, loop, _ = build(
        [0], "cbp", **{"learner.maturity": 8, "learner.replacement_rate": 1.0}
    )
    loop.run(64)  # updates 1..8: ages reach 8, none is > 8 yet
    diag = agent.diagnostics()
    assert set(diag) == {"policy.hidden1", "policy.hidden2", "value.hidden1", "value.hidden2"}
    assert all(
        int(d["replacements"][0]) == 0 and float(d["mean_age"][0]) == 8.0 for d in diag.values()
    )
    loop.run(128)  # update 9 replaces every unit; updates 10..16 age them to 7
    diag = agent.diagnostics()
    assert all(
        int(d["replacements"][0]) == 256 and float(d["mean_age"][0]) == 7.0 for d in diag.values()
    )


@pytest.mark.mujoco
def test_cbp_reset_zeroes_adam_state_of_replaced_units() -> None:
    _, agent, loop, _ = build(
        [0], "cbp", **{"learner.maturity": 7, "learner.replacement_rate": 1.0}
    )
    loop.run(64)  # the 8th (last) minibatch update of the rollout replaces every hidden unit
    (adam,) = find_states(agent.learner_state, ScaleByAdamState)
    for name in ("policy.hidden1.weight", "value.hidden2.weight", "policy.output.weight"):
        assert bool((adam.mu[name] == 0).all()) and bool((adam.count[name] == 0).all())
    assert bool((agent.net.params["policy.output.weight"] == 0).all())  # outgoing weights
    assert bool((adam.count["policy.log_std"] == 8).all())  # untouched by the resets


@pytest.mark.mujoco
def test_state_dict_round_trip_continues_identically() -> None:
    options = {"learner.maturity": 5, "learner.replacement_rate": 0.05}
    stream, agent, loop, records = build([5], "cbp", **options)
    loop.run(100)  # mid-rollout, mid-episode
    buffer = io.BytesIO()
    torch.save(
        {"stream": stream.state_dict(), "agent": agent.state_dict(), "loop": loop.state_dict()},
        buffer,
    )
    loop.run(250)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    stream2, agent2, loop2, records2 = build([5], "cbp", **options)
    stream2.load_state_dict(saved["stream"])
    agent2.load_state_dict(saved["agent"])
    loop2.load_state_dict(saved["loop"])
    loop2.run(250)
    assert _trajectory(records2) == [x for x in _trajectory(records) if x[1] > 100]
    p, p2 = agent.state_dict()["params"], agent2.state_dict()["params"]
    assert all(torch.equal(p[k], p2[k]) for k in p)
    assert torch.equal(stream.obs, stream2.obs)


@pytest.mark.mujoco
@pytest.mark.slow
def test_ppo_learns_inverted_pendulum() -> None:
    from contlearn.envs.rl_stream import MujocoRLStream, RLStreamSpec
    from contlearn.learners import Learner
    from contlearn.learners.presets import NoOptions

    stream = MujocoRLStream(RLStreamSpec(env_id="InvertedPendulum-v5"), [0])
    agent = PPOAgent(
        stream.info, stream.seeds, PPOSpec(hidden="64,64", lr=3e-4), Learner("bp", NoOptions())
    )
    records: list = []
    RLLoop(stream, agent, records.append).run(40_000)
    returns = [r.values["episode_return"].item() for r in records if r.kind == "episode"]
    assert returns[0] < 100  # a random policy drops the pole within a few dozen steps
    assert sum(returns[-5:]) / 5 >= 500  # 1000 is the maximum (the time limit)


def test_head_reset_is_refused_before_the_run_dir_is_made(tmp_path) -> None:
    import contlearn

    with pytest.raises(ConfigError, match="does not apply to agent ppo"):
        contlearn.run("slippery-ant", learner="head-reset", steps=10, out=tmp_path / "r")
    assert not (tmp_path / "r").exists()


def _mean64(policy, obs: torch.Tensor) -> torch.Tensor:
    """The policy's mean in float64 (an independent evaluation of the forward pass)."""
    params = {k: v.detach().double() for k, v in policy.params.items()}
    return policy.forward(obs.double(), params)[0]


@pytest.mark.parametrize("compiled", [False, True], ids=["torch", "compiled"])
@pytest.mark.parametrize("seeds, copies", [([0], 1), ([3, 4], 2)])
def test_act_is_the_per_step_sample(seeds: list[int], copies: int, compiled: bool) -> None:
    """Acting with σ and the noise log-probabilities computed once per rollout gives, at every
    step and across updates and a resume, what the per-step formulas give: a = μ(s) + σ z
    (``addcmul``; bit for bit on torch's path, to float rounding in the acting kernel, checked
    against a float64 evaluation) and log N(a; μ, σ²) = −Σ (z²/2 + log σ + log(2π)/2); and the
    latter equals ``gaussian_log_prob`` of the action to float rounding."""
    options = {} if compiled else {"activation": "tanh"}  # (the kernel has relu only)
    stream, agent, _, _ = build(
        seeds, num_envs=copies, vector="sync", value_worker=False, **options
    )
    assert agent.backend.endswith("+compiled-acting") == compiled
    updates = 0
    try:
        for step in range(3 * 64 // copies):
            if step == 100 // copies:  # a checkpoint mid-rollout, restored
                agent.load_state_dict(agent.state_dict())
            obs = stream.obs
            log_std = agent._views["policy.log_std"].clone()
            with torch.no_grad():
                mean = agent.net.policy.forward(obs)[0]
                mean64 = _mean64(agent.net.policy, obs)
            z = agent.buf["noise"][:, agent.t] if agent.buf else None
            action = agent.act(obs)
            z = agent.buf["noise"][:, agent.t] if z is None else z
            want = torch.addcmul(mean, z, log_std.exp().unsqueeze(1))
            want_logp = -(0.5 * z.pow(2) + log_std.unsqueeze(1) + 0.5 * math.log(2 * math.pi))
            if compiled:
                want64 = mean64 + z.double() * log_std.double().exp().unsqueeze(1)
                torch.testing.assert_close(action.double(), want64, rtol=1e-5, atol=1e-6)
                torch.testing.assert_close(action, want, rtol=1e-5, atol=1e-6)
            else:
                assert torch.equal(action, want)
            assert torch.equal(agent._last[2], want_logp.sum(-1))
            torch.testing.assert_close(agent._last[2], gaussian_log_prob(action, mean, log_std))
            feedback, _ = stream.advance(action)
            updates += bool(agent.observe(obs, action, feedback))
        assert updates == 3  # σ changed twice in between
    finally:
        stream.close()
        agent.close()
