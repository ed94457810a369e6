"""Network options (layer_norm, crelu, fourier) and normalize-and-project (issue #18).

The forward pass is checked against a per-example computation written on plain vectors, its
gradients against autograd through that computation; every registered learner runs (or is
refused in one line) under each option, on the reference step, which every fast backend must
leave to it.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from contlearn.agents.network_options import CONCAT_ACTIVATIONS
from contlearn.agents.networks import BatchedMLP
from contlearn.agents.online import OnlineAgent
from contlearn.backends.base import REFERENCE, StepConfig, choose
from contlearn.backends.check import check_online_agent, synthetic_batches
from contlearn.backends.mlp import BACKENDS, BlockLoop, HandBackward
from contlearn.backends.ppo_gradients import PPOGradients
from contlearn.cli import main
from contlearn.envs.base import StreamInfo
from contlearn.errors import ConfigError
from contlearn.learners import learners
from contlearn.learners.fused import fused_plan
from contlearn.learners.optim import adam, sgd
from contlearn.learners.resets import reset_units
from contlearn.learners.rng import replica_rng_states
from contlearn.listing import describe
from contlearn.running.config import resolve
from contlearn.state import tree_leaves

SEEDS = [0, 1]
#: each option on its own, and one combination
OPTIONS = {
    "layer_norm": {"layer_norm": True},
    "crelu": {"activation": "crelu"},
    "fourier": {"activation": "fourier"},
    "crelu+layer_norm": {"activation": "crelu", "layer_norm": True},
}
#: options that make resets happen within a few steps (as tests/test_backends.py)
EXERCISE = {
    "cbp": {"learner.maturity": 2, "learner.replacement_rate": 0.3, "learner.decay": 0.9},
    "redo": {"learner.period": 4, "learner.window": 4, "learner.threshold": 0.9},
    "regrama": {"learner.period": 4, "learner.window": 4, "learner.threshold": 0.9},
    "swr": {"learner.rate": 0.1},
    "snr": {"learner.eta": 0.3},
    "hare-tortoise": {"learner.period": 3, "learner.ema": 0.5},
    "plasticity-injection": {"learner.at": 3, "learner.every": 2},
}


def _info(kind: str = "classification", batch: int = 1) -> StreamInfo:
    outputs = 4 if kind == "classification" else 2
    metric = "accuracy" if kind == "classification" else "squared_error"
    return StreamInfo("synthetic", kind, (6,), outputs, True, len(SEEDS), metric, batch)


def _config(learner: str = "bp", stream: str = "permuted-mnist", **options):
    values = {"stream": stream, "learner": learner, "hidden": "5,4", "lr": 0.05}
    return resolve({**values, **EXERCISE.get(learner, {}), **options})


def _agent(learner: str = "bp", kind: str = "classification", batch: int = 1, **options):
    cfg = _config(learner, **options)
    return OnlineAgent(_info(kind, batch), SEEDS, cfg.agent_spec, cfg.learner)


def _net(activation: str, layer_norm: bool) -> BatchedMLP:
    gens = [torch.Generator().manual_seed(s) for s in SEEDS]
    net = BatchedMLP(6, (5, 4), 3, activation, "kaiming_uniform", gens, layer_norm=layer_norm)
    for k, v in net.params.items():  # gains and offsets away from 1 and 0
        if ".ln_" in k:
            v.add_(torch.randn(v.shape, generator=torch.Generator().manual_seed(7)) * 0.3)
    return net


def _by_hand(params: dict[str, torch.Tensor], x: torch.Tensor, act: str, ln: bool):
    """The network on one example ``x (D,)`` of one replica's ``params``, vector by vector."""
    h = x
    for name in ("hidden1", "hidden2", "output"):
        z = params[f"{name}.weight"] @ h + params[f"{name}.bias"]
        if name == "output":
            return z
        if ln:
            mu = sum(z) / len(z)
            var = sum((zi - mu) ** 2 for zi in z) / len(z)
            z = (z - mu) / torch.sqrt(var + 1e-5) * params[f"{name}.ln_weight"]
            z = z + params[f"{name}.ln_bias"]
        if act == "crelu":
            h = torch.cat([torch.clamp(z, min=0), torch.clamp(-z, min=0)])
        elif act == "fourier":
            h = torch.cat([torch.sin(z), torch.cos(z)])
        else:
            h = torch.clamp(z, min=0)
    raise AssertionError


@pytest.mark.parametrize("act,ln", [("relu", True), ("crelu", False), ("fourier", False),
                                    ("crelu", True), ("fourier", True)])  # fmt: skip
def test_forward_and_gradients_match_a_per_example_computation(act, ln):
    net = _net(act, ln)
    x = torch.randn(2, 3, 6, generator=torch.Generator().manual_seed(3))
    params = {k: v.clone().requires_grad_(True) for k, v in net.params.items()}
    out, feats = net.forward(x, params)
    assert feats["hidden1"].shape == (2, 3, 5 * (2 if act in CONCAT_ACTIVATIONS else 1))
    assert net.by_name["hidden2"].fan_in == feats["hidden1"].shape[-1]
    hand = {k: v.detach().clone().requires_grad_(True) for k, v in net.params.items()}
    rows = [
        torch.stack([_by_hand({k: v[r] for k, v in hand.items()}, x[r, b], act, ln)
                     for b in range(3)])
        for r in range(2)
    ]  # fmt: skip
    expected = torch.stack(rows)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(4))
    got = torch.autograd.grad((out * w).sum(), list(params.values()))
    want = torch.autograd.grad((expected * w).sum(), list(hand.values()))
    for k, a, b in zip(params, got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=k)  # (∂/∂b ≈ 0 under LN)
    train_out, hs, zs = net.forward_train(x, net.params)  # what probes read: the same
    torch.testing.assert_close(train_out, out.detach())
    assert (zs is not None) == ln and len(hs) == 2
    by_hand = net.backward(w, x, hs, zs, net.params)  # the `backward` backend's gradients
    for k, a in zip(params, got, strict=True):
        torch.testing.assert_close(by_hand[k], a, rtol=1e-5, atol=1e-5, msg=k)


@pytest.mark.parametrize("act", ["tanh", "elu", "swish"])
def test_the_hand_written_backward_under_layer_norm_with_other_activations(act):
    net = _net(act, True)
    x = torch.randn(2, 3, 6, generator=torch.Generator().manual_seed(3))
    params = {k: v.clone().requires_grad_(True) for k, v in net.params.items()}
    out, _ = net.forward(x, params)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(4))
    got = torch.autograd.grad((out * w).sum(), list(params.values()))
    _, hs, zs = net.forward_train(x, net.params)
    by_hand = net.backward(w, x, hs, zs, net.params)
    for k, a in zip(params, got, strict=True):
        torch.testing.assert_close(by_hand[k], a, rtol=1e-5, atol=1e-5, msg=k)


def test_a_reset_unit_gets_its_layer_norm_gain_one_offset_zero_and_clean_state():
    net = _net("relu", True)
    params = {k: v.clone() for k, v in net.params.items()}
    opt = adam(0.01)
    state = opt.init(params)
    grads = {k: torch.ones_like(v) for k, v in params.items()}
    updates, state = opt.update(grads, state, params)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[0, 1] = mask[1, 3] = True
    before = {k: (v + updates[k]).clone() for k, v in params.items()}
    out = reset_units(params, updates, state, net, "hidden1", mask, replica_rng_states(SEEDS, 0))
    for k in ("hidden1.ln_weight", "hidden1.ln_bias"):
        value = 1.0 if k.endswith("ln_weight") else 0.0
        assert params[k][mask].eq(value).all() and out[k].eq(0).all()
        torch.testing.assert_close(params[k][~mask], before[k][~mask])  # others: θ + u
        for moments in (s for s in tree_leaves(state) if s.shape == params[k].shape):
            assert moments[mask].eq(0).all()
    assert params["hidden2.weight"][0, :, 1].eq(0).all()  # outgoing weights zeroed
    k = "hidden2.ln_weight"  # another layer's gain: untouched, its update returned
    torch.testing.assert_close(params[k] + out[k], before[k])


@pytest.mark.parametrize("activation", sorted(CONCAT_ACTIVATIONS))
def test_unit_resets_refuse_concatenating_activations_but_the_head_reset_runs(activation):
    net = _net(activation, False)
    params = {k: v.clone() for k, v in net.params.items()}
    mask = torch.ones(2, 5, dtype=torch.bool)
    with pytest.raises(ConfigError, match="two"):
        reset_units(params, None, (), net, "hidden1", mask, replica_rng_states(SEEDS, 0))
    head = torch.ones(2, 3, dtype=torch.bool)
    reset_units(params, None, (), net, "output", head, replica_rng_states(SEEDS, 0))
    assert not torch.equal(params["output.weight"], net.params["output.weight"])


def _refusal(learner: str, options: dict) -> str | None:
    try:
        _config(learner, **options)
    except ConfigError as e:
        return str(e)
    return None


@pytest.mark.parametrize("option", sorted(OPTIONS))
@pytest.mark.parametrize("learner", learners.names())
def test_every_learner_runs_or_is_refused_under_each_option_and_backward_is_exact(learner, option):
    why = _refusal(learner, OPTIONS[option])
    if why is not None:  # crelu/fourier with unit scorers: one line naming the fix
        assert learner in ("cbp", "redo", "regrama", "snr") and "activation" in OPTIONS[option]
        assert "\n" not in why and "choose" in why
        return
    for kind in ("classification", "regression"):  # permuted MNIST, bit-flipping's kind
        cfg = _config(learner, **OPTIONS[option])
        for batch in (1, 3):
            info = _info(kind, batch)
            backend = check_online_agent(info, SEEDS, cfg.agent_spec, cfg.learner, steps=8)
            assert backend == HandBackward.name


def test_only_the_hand_written_backward_takes_the_options_and_only_under_bp():
    for act in ("relu", "crelu", "fourier"):
        for ln in (False, True):
            cfg = StepConfig(
                "mlp", act, 2, "classification", "bp", "sgd",
                network_options=frozenset({"layer_norm"} if ln else ()), fused=fused_plan(sgd(0.1)),
                kernels=True,
            )  # fmt: skip
            plain = act == "relu" and not ln
            assert choose(BACKENDS, cfg) is (BlockLoop if plain else HandBackward)
            fa = dataclasses.replace(cfg, credit="fa")
            assert (choose(BACKENDS, fa) is None) == (not plain)
            unknown = dataclasses.replace(cfg, network_options=frozenset({"batch_norm"}))
            assert choose(BACKENDS, unknown) is None  # an option no backend declares
            ppo = dataclasses.replace(cfg, network="actor-critic", task="rl")
            assert PPOGradients().supports(ppo) == plain
    for option in OPTIONS.values():
        for batch in (1, 3):
            assert _agent(batch=batch, **option).backend == HandBackward.name
            assert _agent(batch=batch, fast=False, **option).backend == REFERENCE
    assert _agent("normalize-and-project").backend == HandBackward.name


@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_runs_are_deterministic(option):
    runs = []
    for _ in range(2):
        agent = _agent("l2", batch=3, **OPTIONS[option])
        for obs, y in synthetic_batches(agent.info, 5):
            agent.observe(obs, agent.act(obs), y)
        runs.append(agent.parameters())
    for k, v in runs[0].items():
        assert torch.equal(v, runs[1][k]), k


def test_checkpoint_resume_is_exact_with_layer_norm_and_projection(tmp_path):
    batches = synthetic_batches(_info(), 8)
    whole, first = _agent("normalize-and-project"), _agent("normalize-and-project")
    for obs, y in batches:
        whole.observe(obs, whole.act(obs), y)
    for obs, y in batches[:4]:
        first.observe(obs, first.act(obs), y)
    torch.save(first.state_dict(), tmp_path / "ckpt.pt")
    resumed = _agent("normalize-and-project")
    resumed.load_state_dict(torch.load(tmp_path / "ckpt.pt", weights_only=True))
    for obs, y in batches[4:]:
        resumed.observe(obs, resumed.act(obs), y)
    assert "hidden1.ln_weight" in resumed.parameters()
    for k, v in whole.parameters().items():
        assert torch.equal(v, resumed.parameters()[k]), k


def test_normalize_and_project_keeps_each_weight_norm_at_its_initial_value():
    agent = _agent("normalize-and-project", batch=3, optimizer="adam", lr=0.05)
    assert agent.spec.layer_norm  # turned on by the learner
    init = {k: v.clone() for k, v in agent.initial_parameters().items()}
    norms = {k: init[k].flatten(1).norm(dim=1) for k in init if k.endswith(".weight")}
    assert set(norms) == {"hidden1.weight", "hidden2.weight", "output.weight"}
    for obs, y in synthetic_batches(agent.info, 6):
        agent.observe(obs, agent.act(obs), y)
        for k, n in norms.items():
            torch.testing.assert_close(agent.parameters()[k].flatten(1).norm(dim=1), n)
    assert not torch.equal(agent.parameters()["hidden1.weight"], init["hidden1.weight"])
    hidden_only = _agent("normalize-and-project", **{"learner.output": False})
    for obs, y in synthetic_batches(hidden_only.info, 3):
        hidden_only.observe(obs, hidden_only.act(obs), y)
    out = hidden_only.parameters()["output.weight"].flatten(1).norm(dim=1)
    assert not torch.allclose(out, norms["output.weight"])


def test_normalize_and_project_one_sgd_step_by_hand():
    agent = _agent("normalize-and-project", lr=0.1)
    theta = {k: v.clone().requires_grad_(True) for k, v in agent.parameters().items()}
    ((obs, y),) = synthetic_batches(agent.info, 1)
    out, _ = agent.net.forward(agent.flat(obs), theta)
    grads = torch.autograd.grad(agent.loss(out, y).sum(), list(theta.values()))
    agent.observe(obs, agent.act(obs), y)
    for (k, t), g in zip(theta.items(), grads, strict=True):
        step = t.detach() - 0.1 * g
        if k.endswith(".weight"):
            n0 = t.detach().flatten(1).norm(dim=1)
            step = step * (n0 / step.flatten(1).norm(dim=1)).view(-1, 1, 1)
        torch.testing.assert_close(agent.parameters()[k], step, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("values", "needle"),
    [
        ({"activation": "crelu", "learner": "cbp"}, "learner cbp"),
        ({"activation": "fourier", "learner": "redo"}, "learner redo"),
        ({"layer_norm": True, "credit": "fa"}, "credit=bp"),
        ({"activation": "fourier", "credit": "dfa"}, "credit=bp"),
        ({"learner": "normalize-and-project", "layer_norm": False}, "layer_norm=true"),
        ({"stream": "slippery-ant", "activation": "crelu"}, "crelu"),
        ({"stream": "slippery-ant", "layer_norm": True}, "layer_norm"),
        ({"stream": "slippery-ant", "learner": "normalize-and-project"}, "online agent"),
        ({"agent": "ff", "learner": "normalize-and-project"}, "online agent"),
    ],
)
def test_bad_combinations_are_one_line_config_errors(values, needle):
    values = {"stream": "permuted-mnist", "hidden": "5,4", **values}
    with pytest.raises(ConfigError) as e:
        resolve(values)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_cli_refuses_a_bad_combination_with_exit_2_and_writes_nothing(capsys, tmp_path):
    args = ["permuted-mnist", "--set", "activation=crelu", "--learner", "cbp"]
    code = main(["run", *args, "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "cbp" in err
    assert not (tmp_path / "run").exists()


def test_listing_shows_the_options_and_the_learner():
    text = describe()
    assert "layer_norm = False" in text and "|crelu|fourier]" in text
    (line,) = [ln for ln in text.splitlines() if ln.startswith("  normalize-and-project ")]
    assert "sets layer_norm=True" in line


def test_bit_flipping_runs_each_option():
    for option in OPTIONS.values():
        cfg = _config(stream="bit-flipping", **option)
        assert cfg.agent_spec.layer_norm == option.get("layer_norm", False)
    assert math.isfinite(float(_agent(kind="regression", layer_norm=True).probe_loss(
        *synthetic_batches(_info("regression"), 1)[0]).sum()))  # fmt: skip


@pytest.mark.parametrize("learner", ["cbp", "redo"])
def test_unit_resets_happen_under_layer_norm(learner):
    agent = _agent(learner, layer_norm=True)
    for obs, y in synthetic_batches(agent.info, 12):
        agent.observe(obs, agent.act(obs), y)
    replaced = sum(int(d["replacements"].sum()) for d in agent.diagnostics().values())
    assert replaced > 0  # (what a reset sets: test_a_reset_unit_gets_its_layer_norm_gain_...)


def test_ppo_refuses_the_online_agents_network_options_with_the_reason(tmp_path, capsys):
    from contlearn.cli import main

    out = tmp_path / "r"
    assert main(["run", "slippery-ant", "--set", "layer_norm=true", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "layer_norm does not apply to agent ppo" in err
    assert not out.exists()
