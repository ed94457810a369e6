"""Every configuration's chosen backend computes the reference step (contlearn/backends).

The cases are enumerated from the registries, not listed by hand: every registered learner ×
activation × base optimizer × stream kind × batch size, and every init, and every registered
credit rule with every learner (both optimizers, both batch sizes) and with every activation,
stream kind and batch size (under bp and cbp), so that a learner, a rule, an activation or an
option added later is checked too — a backend that does not know it must not
declare it supported, and then the reference runs, which passes trivially. A fake backend that
declares everything supported shows the check fails when a backend computes something else.
"""

from __future__ import annotations

import itertools

import pytest

import contlearn.agents.online as online
from contlearn.agents.networks import ACTIVATIONS, INITS
from contlearn.backends import kernels
from contlearn.backends.base import REFERENCE, Backend, StepConfig, choose
from contlearn.backends.check import BackendMismatchError, check_online_agent
from contlearn.backends.mlp import BACKENDS, BlockLoop, FusedBackward, HandBackward
from contlearn.credit import credit_rules
from contlearn.envs.base import StreamInfo
from contlearn.errors import ConfigError
from contlearn.learners import learner_def, learners
from contlearn.running.config import resolve

SEEDS = [0, 1]
#: options that make rare events happen within a few steps (replacements, resets); learners
#: not named here run their defaults
EXERCISE = {
    "cbp": {"learner.maturity": 2, "learner.replacement_rate": 0.3, "learner.decay": 0.9},
    "redo": {"learner.period": 4, "learner.window": 4, "learner.threshold": 0.9},
    "regrama": {"learner.period": 4, "learner.window": 3, "learner.threshold": 0.9},
    "snp": {"learner.sigma": 1e-3, "learner.shrink": 1e-3},
    "snp-init": {"learner.lam": 0.9},
    "weight-clipping": {"learner.kappa": 0.3},  # (most weights start outside the range)
}
#: rule options that make their effect show within a few steps
CREDIT_EXERCISE = {"kolen-pollack": {"credit.decay": 0.02}}
#: options checked on their own, once per learner (test_every_credit_rule_with_every_learner)
CREDIT_VARIANTS = {"kolen-pollack": {"credit.regularize": True}}
OPTIMIZERS = ("sgd", "adam")
KINDS = ("classification", "regression")
BATCHES = (1, 3)


def _info(kind: str, batch_size: int) -> StreamInfo:
    outputs = 4 if kind == "classification" else 2
    return StreamInfo(
        "synthetic",
        kind,
        (12,),
        outputs,
        True,
        len(SEEDS),
        "accuracy" if kind == "classification" else "squared_error",
        batch_size,
    )


def _config(learner: str, **options):
    return resolve(
        {
            "stream": "permuted-mnist",
            "learner": learner,
            "hidden": "7,5",
            "lr": 0.05,
            **EXERCISE.get(learner, {}),
            **options,
        }
    )


@pytest.mark.parametrize("learner,optimizer", list(itertools.product(learners.names(), OPTIMIZERS)))
def test_every_backend_choice_computes_the_reference_step(learner, optimizer):
    chosen = set()
    for activation, kind, batch in itertools.product(ACTIVATIONS, KINDS, BATCHES):
        options = {"optimizer": optimizer, "activation": activation}
        if optimizer == "adam":
            options["lr"] = 1e-2
        cfg = _config(learner, **options)
        chosen.add(check_online_agent(_info(kind, batch), SEEDS, cfg.agent_spec, cfg.learner))
    if _needs_layer_norm(learner):  # only `backward` has layer norm (test_network_options.py)
        assert chosen == {HandBackward.name}
    else:
        assert REFERENCE not in chosen, "the hand-written backward takes every learner"


def _needs_layer_norm(learner: str) -> bool:
    """Whether the learner turns on the network's layer norm (normalize-and-project), which
    runs only with backprop credit, on the hand-written backward or the reference."""
    return bool(learner_def(learner).agent_defaults.get("layer_norm"))


@pytest.mark.parametrize("learner", learners.names())
def test_every_init_and_momentum_too(learner):
    for init in INITS:
        cfg = _config(learner, init=init)
        check_online_agent(_info("classification", 1), SEEDS, cfg.agent_spec, cfg.learner)
    cfg = _config(learner, momentum=0.9)
    check_online_agent(_info("classification", 1), SEEDS, cfg.agent_spec, cfg.learner)


def _rule_config(rule: str, learner: str, **options):
    if options.get("optimizer") == "adam":
        options["lr"] = 1e-2
    return _config(learner, credit=rule, **CREDIT_EXERCISE.get(rule, {}), **options)


@pytest.mark.parametrize("rule", credit_rules.names())
def test_every_credit_rule_with_every_learner(rule):
    for learner, optimizer, batch in itertools.product(learners.names(), OPTIMIZERS, BATCHES):
        if rule != "bp" and _needs_layer_norm(learner):
            with pytest.raises(ConfigError, match="credit=bp"):
                _rule_config(rule, learner, optimizer=optimizer)
            continue
        cfg = _rule_config(rule, learner, optimizer=optimizer)
        check_online_agent(_info("classification", batch), SEEDS, cfg.agent_spec, cfg.learner)
    for learner in learners.names() if rule in CREDIT_VARIANTS else ():
        if _needs_layer_norm(learner):
            continue
        cfg = _rule_config(rule, learner, **CREDIT_VARIANTS[rule])
        check_online_agent(_info("classification", 1), SEEDS, cfg.agent_spec, cfg.learner)


@pytest.mark.parametrize("rule", credit_rules.names())
def test_every_credit_rule_with_every_activation_kind_and_batch(rule):
    chosen = set()
    for learner, activation, kind, batch in itertools.product(
        ("bp", "cbp"), ACTIVATIONS, KINDS, BATCHES
    ):
        if rule == "sign-symmetry" and learner == "cbp" and kind == "classification":
            # softmax's output error sums to 0: a top hidden unit whose outgoing weights share
            # one sign gets δ = 0 up to rounding, and a reset unit's fresh outgoing weights
            # α δ_k h_i then take the sign of that rounding: the reference's own trajectory is
            # decided by rounding there (docs/credit.md, Backends)
            continue
        cfg = _rule_config(rule, learner, activation=activation)
        chosen.add(check_online_agent(_info(kind, batch), SEEDS, cfg.agent_spec, cfg.learner))
    if rule in ("bp", "fa", "dfa", "sign-symmetry", "kolen-pollack"):
        assert REFERENCE not in chosen
    if rule == "sign-symmetry":  # and its other scale
        cfg = _rule_config(rule, "cbp", **{"credit.scale": "unit"})
        check_online_agent(_info("classification", 1), SEEDS, cfg.agent_spec, cfg.learner)


def test_the_backends_chosen_for_the_credit_rules():
    block = BlockLoop.name if kernels.library() is not None else FusedBackward.name
    for rule in ("fa", "dfa", "sign-symmetry", "kolen-pollack"):
        assert _agent("bp", credit=rule).backend == block
        assert _agent("l2", credit=rule).backend == block
        assert _agent("bp", "regression", credit=rule).backend == block
        assert _agent("bp", batch=3, credit=rule).backend == FusedBackward.name
        assert _agent("bp", activation="elu", credit=rule).backend == FusedBackward.name
        assert _agent("bp", credit=rule, fast=False).backend == REFERENCE
    for rule in ("fa", "dfa", "sign-symmetry"):  # fixed (or following W) feedback: any reset
        assert _agent("cbp", credit=rule).backend == block
        assert _agent("snp", credit=rule).backend == FusedBackward.name
    for rule in ("fa", "dfa", "kolen-pollack"):
        assert _agent("bp", credit=rule, optimizer="adam").backend == HandBackward.name
        assert _agent("redo", credit=rule).backend == HandBackward.name
    # sign symmetry under Adam-like learners: rounding decides (HandBackward.supports)
    assert _agent("bp", credit="sign-symmetry", optimizer="adam").backend == REFERENCE
    assert _agent("redo", credit="sign-symmetry").backend == REFERENCE
    # learned feedback follows the whole update: a post-update edit (noise, resets) leaves the
    # fused paths, and the hand-written backward runs the reference's own learner call
    assert _agent("cbp", credit="kolen-pollack").backend == HandBackward.name
    assert _agent("snp", credit="kolen-pollack").backend == HandBackward.name
    regularized = {"credit.regularize": True}
    assert _agent("l2", credit="kolen-pollack", **regularized).backend == HandBackward.name
    for rule in ("weight-mirror", "symmetric-alignment", "activation-alignment"):
        assert _agent("bp", credit=rule).backend == REFERENCE
        assert _agent("cbp", credit=rule).backend == REFERENCE
    assert _agent("bp", credit="information-alignment").backend == REFERENCE


def _agent(learner: str, kind: str = "classification", batch: int = 1, **options):
    cfg = _config(learner, **options)
    return online.OnlineAgent(_info(kind, batch), SEEDS, cfg.agent_spec, cfg.learner)


def test_the_backends_chosen_are_the_expected_ones():
    block = BlockLoop.name if kernels.library() is not None else FusedBackward.name
    assert _agent("bp").backend == block
    assert _agent("cbp").backend == block
    assert _agent("bp", "regression").backend == block
    assert _agent("bp", batch=3).backend == FusedBackward.name
    assert _agent("bp", activation="elu").backend == FusedBackward.name
    assert _agent("snp").backend == block  # (its noise drawn in the kernel: issue 21)
    assert _agent("cbp", **{"learner.rounding": "stochastic"}).backend == FusedBackward.name
    # Adam's form runs in the block loop (issue 21); at batch 3 the hand-written backward
    adam = BlockLoop.name if kernels.library() is not None else HandBackward.name
    assert _agent("bp", optimizer="adam").backend == adam
    assert _agent("cbp", optimizer="adam").backend == adam
    assert _agent("bp", batch=3, optimizer="adam").backend == HandBackward.name
    assert _agent("cbp", optimizer="adam", **{"learner.rounding": "stochastic"}).backend == (
        HandBackward.name
    )
    # L2-Init over SGD's family and ReDo over SGD's family or Adam run in the block loop too
    # (issue 21); L2-Init over Adam, or a rule other than backprop: the hand-written backward
    assert _agent("l2-init").backend == adam
    assert _agent("redo").backend == adam
    assert _agent("regrama", **{"learner.l2": 1e-3}).backend == adam
    assert _agent("redo", optimizer="adam").backend == adam
    assert _agent("l2-init", optimizer="adam").backend == HandBackward.name
    assert _agent("redo", credit="fa").backend == HandBackward.name
    # weight clipping declares its clamp as a post-update edit: the fused backward runs it
    assert _agent("weight-clipping").backend == FusedBackward.name
    assert _agent("weight-clipping", optimizer="adam").backend == HandBackward.name
    # the injected multi-layer head is a network no fast backend declares
    head = {"learner.head_layers": 2}
    assert _agent("plasticity-injection", **head).backend == REFERENCE
    assert _agent("bp", fast=False).backend == REFERENCE
    assert all(isinstance(b, Backend) for b in BACKENDS)


def test_without_the_compiled_kernels_no_block_backend(monkeypatch):
    monkeypatch.setattr(kernels, "_lib", False)  # as without a C compiler
    agent = _agent("bp")
    assert agent.backend == FusedBackward.name and not agent.block_ready(1)
    cfg = _config("cbp")
    check_online_agent(_info("classification", 1), SEEDS, cfg.agent_spec, cfg.learner)
    for rule, learner in (("fa", "cbp"), ("sign-symmetry", "l2"), ("kolen-pollack", "l2")):
        cfg = _rule_config(rule, learner)
        assert check_online_agent(_info("regression", 1), SEEDS, cfg.agent_spec, cfg.learner) == (
            FusedBackward.name
        )


def test_choose_takes_the_first_that_supports():
    cfg = StepConfig("mlp", "relu", 2, "classification", "bp", "adam")
    assert choose(BACKENDS, cfg) is HandBackward
    assert choose(BACKENDS, StepConfig("cnn", "relu", 2, "classification", "bp", "adam")) is None
    fa = StepConfig("mlp", "relu", 2, "classification", "bp", "sgd", credit="fa")
    assert choose(BACKENDS, fa) is HandBackward
    mirror = StepConfig("mlp", "relu", 2, "classification", "bp", "sgd", credit="weight-mirror")
    assert choose(BACKENDS, mirror) is None


class _WrongBackend(HandBackward):
    """Declares every configuration supported but updates with twice the gradient."""

    name = "wrong"
    description = "a deliberately wrong backend"

    @staticmethod
    def supports(cfg: StepConfig) -> bool:
        return True

    def observe(self, target, task_start):
        assert self._cache is not None
        flat, out, hs, zs = self._cache
        self._cache = None
        agent = self.agent
        loss, delta = self._loss_and_delta(out, target)
        grads = agent.net.backward(delta.mul_(2.0), flat, hs, zs, agent.views)
        agent.add_grad_l1(grads)
        agent.apply_updates(
            grads,
            dict(zip([la.name for la in agent.net.hidden_layers], hs, strict=True)),
            task_start,
        )
        return loss


def test_a_backend_declaring_what_it_does_not_compute_is_caught(monkeypatch):
    monkeypatch.setattr(online, "BACKENDS", [_WrongBackend, *BACKENDS])
    cfg = _config("bp")
    with pytest.raises(BackendMismatchError, match="backend wrong"):
        check_online_agent(_info("classification", 1), SEEDS, cfg.agent_spec, cfg.learner)


def test_a_run_prints_and_records_its_backend_and_fast_false_runs_the_reference(cli, tmp_path):
    import json

    import torch

    from contlearn.results.store import load_runs

    args = (
        "run",
        "permuted-mnist",
        "--seeds",
        "2",
        "--tasks",
        "2",
        "--set",
        "examples_per_task=500",
        "--progress",
    )
    expected = "block" if kernels.library() is not None else "fused"
    frames = []
    for name, extra, backend in (
        ("fast", (), expected),
        ("ref", ("--set", "fast=false"), REFERENCE),
    ):
        code, _, err = cli(*args, *extra, "--out", tmp_path / name)
        assert code == 0, err
        assert f"contlearn: backend {backend}\n" in err
        assert json.loads((tmp_path / name / "meta.json").read_text())["backend"] == backend
        df = load_runs(tmp_path / name)
        frames.append(df.sort_values(["seed", "step", "metric", "layer"]).reset_index())
    a, b = frames
    assert list(a.metric) == list(b.metric) and len(a) > 0
    torch.testing.assert_close(
        torch.tensor(a.value.values), torch.tensor(b.value.values), rtol=1e-4, atol=2e-5
    )
