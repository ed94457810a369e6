"""Every PPO configuration: the backend the agent chooses computes what the reference does.

Enumerates the registered learners × activations × optimizers (and the options a backend
reads: gradient clipping, the entropy bonus, the value worker) for a tiny PPO and compares the
chosen backend with ``fast=false`` over a few updates, so a backend that declares something
supported that it does not compute fails here (shown with a fake backend).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest
import torch

from contlearn.agents.networks import ACTIVATIONS
from contlearn.agents.ppo import PPOAgent
from contlearn.agents.ppo_loss import REFERENCE_STEP, StepResult
from contlearn.backends.base import REFERENCE, Backend, StepConfig
from contlearn.backends.ppo_acting import ACTIVATIONS as ACTING_ACTIVATIONS
from contlearn.backends.ppo_gradients import HAND_WRITTEN_ACTIVATIONS, PPO_GRADIENTS
from contlearn.backends.ppo_worker import SEPARABLE_LEARNERS, VALUE_WORKER
from contlearn.envs.base import StreamInfo
from contlearn.errors import ConfigError
from contlearn.learners import learners
from contlearn.running.config import resolve
from contlearn.state import tree_leaves

INFO = StreamInfo("tiny", "rl", (5,), 2, False, 2, "episode_return")
TINY = {"hidden": "6,5", "rollout": 8, "minibatch_size": 4, "epochs": 2, "lr": 0.01}
#: learner options that make every learner act within a few minibatch updates
ACTIVE = {
    "cbp": {"learner.maturity": 1, "learner.replacement_rate": 0.3},
    "redo": {"learner.period": 2, "learner.window": 2, "learner.threshold": 0.3},
    "snp": {"learner.shrink": 1e-3, "learner.sigma": 1e-3},
    "snp-init": {"learner.lam": 0.99},
    "l2": {"learner.l2": 1e-2},
    "l2-init": {"learner.l2_init": 1e-2},
}
LEARNERS = [name for name in learners.names() if name not in PPOAgent.unsupported_learners]


def make(learner: str, **options: Any) -> PPOAgent:
    """A tiny PPO agent on 2 replicas."""
    cfg = resolve(
        {"stream": "slippery-ant", "learner": learner, **TINY, **ACTIVE.get(learner, {}), **options}
    )
    return cfg.agent_cls(INFO, [0, 1], cfg.agent_spec, cfg.learner)


def play(agent: PPOAgent, updates: int) -> list[dict[str, torch.Tensor]]:
    """Feed fixed transitions (2 env copies) until ``updates`` updates ran; their metrics."""
    g = torch.Generator().manual_seed(0)
    metrics: list[dict[str, torch.Tensor]] = []
    t = 0
    while len(metrics) < updates:
        obs = torch.randn(2, 2, 5, generator=g)
        action = agent.act(obs)
        feedback = (
            torch.randn(2, 2, generator=g),
            torch.randn(2, 2, 5, generator=g),
            torch.rand(2, 2, generator=g) < 0.2,
            torch.full((2, 2), t % 5 == 4),
        )
        out = agent.observe(obs, action, feedback)
        if out:
            metrics.append(out)
        t += 1
    return metrics


def check_against_reference(learner: str, updates: int = 2, **options: Any) -> str:
    """Run the backend ``options`` choose and the reference (``fast=false``) side by side.

    Raises:
        AssertionError: a metric, a weight or the learner state differs beyond float
            tolerance.

    Returns:
        The chosen backend's name.
    """
    fast = make(learner, **options)
    ref = make(learner, **{**options, "fast": False, "value_worker": False})
    try:
        assert ref.backend == REFERENCE
        for m_fast, m_ref in zip(play(fast, updates), play(ref, updates), strict=True):
            assert m_fast.keys() == m_ref.keys()
            for k in m_ref:
                torch.testing.assert_close(m_fast[k], m_ref[k], rtol=1e-4, atol=1e-5)
        for k in ref._keys:
            torch.testing.assert_close(fast._views[k], ref._views[k], rtol=1e-4, atol=1e-5)
        for a, b in zip(
            tree_leaves(fast.learner_state), tree_leaves(ref.learner_state), strict=True
        ):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        return fast.backend
    finally:
        fast.close()


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("activation", list(ACTIVATIONS))
@pytest.mark.parametrize("learner", LEARNERS)
def test_chosen_backend_computes_the_reference(
    learner: str, activation: str, optimizer: str
) -> None:
    name = check_against_reference(
        learner, activation=activation, optimizer=optimizer, value_worker=False
    )
    hand = activation in HAND_WRITTEN_ACTIVATIONS
    acting = "+compiled-acting" if hand and activation in ACTING_ACTIVATIONS else ""
    assert name == (PPO_GRADIENTS.name + acting if hand else REFERENCE)


@pytest.mark.parametrize(
    "options",
    [
        {"max_grad_norm": 0.05},
        {"ent_coef": 0.1},
        {"parallel_nets": True},
        {"vf_coef": 0.5, "clip": 0.05},
    ],
)
@pytest.mark.parametrize("learner", ["bp", "cbp", "redo"])
def test_backend_options_compute_the_reference(learner: str, options: dict) -> None:
    name = check_against_reference(learner, value_worker=False, **options)
    assert name == PPO_GRADIENTS.name + "+compiled-acting"


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("learner", SEPARABLE_LEARNERS)
def test_value_worker_computes_the_reference(learner: str, optimizer: str) -> None:
    name = check_against_reference(
        learner, value_worker=True, optimizer=optimizer, activation="tanh", updates=2
    )
    assert name == VALUE_WORKER.name


@pytest.mark.parametrize("learner", [n for n in LEARNERS if n not in SEPARABLE_LEARNERS])
def test_value_worker_refuses_learners_that_couple_parameters(learner: str) -> None:
    with pytest.raises(ConfigError, match="value_worker=true needs a learner"):
        make(learner, value_worker=True)


def test_fast_false_and_every_backend_refusing_run_the_reference(monkeypatch) -> None:
    assert make("bp", fast=False).backend == REFERENCE
    monkeypatch.setattr(PPOAgent, "backends", ())
    assert make("bp").backend == REFERENCE


class _ForgetsTheValueNet:
    """A deliberately wrong backend: declares every configuration, never updates the value
    net (its gradients are zero)."""

    name = "fake"
    description = "the reference without the value net's gradients"

    def supports(self, cfg: StepConfig) -> bool:
        return True

    def loss_and_grads(
        self,
        net: Any,
        mb: Mapping[str, torch.Tensor],
        clip: float,
        vf_coef: float,
        ent_coef: float,
        pool: Any = None,
    ) -> StepResult:
        loss, stats, grads, feats = REFERENCE_STEP.loss_and_grads(net, mb, clip, vf_coef, ent_coef)
        return (
            loss,
            stats,
            {k: g * 0 if k.startswith("value.") else g for k, g in grads.items()},
            feats,
        )

    def update(
        self, agent: Any, data: dict[str, torch.Tensor], orders: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        return agent.run_minibatches(data, orders)


def test_the_check_catches_a_backend_that_declares_what_it_does_not_compute(monkeypatch) -> None:
    fake = _ForgetsTheValueNet()
    assert isinstance(fake, Backend)
    monkeypatch.setattr(PPOAgent, "backends", (fake,))
    assert make("bp").backend == "fake+compiled-acting"  # (acting: its own backend)
    with pytest.raises(AssertionError):
        check_against_reference("bp")
