"""PPO's definitions: the Gaussian policy's log-probability, GAE, the clipped objective, and the
reference minibatch step every PPO backend is tested against.

The reference (:data:`REFERENCE_STEP`) computes one minibatch's loss with plain torch ops and
its gradient with ``torch.autograd``; ``fast=false`` runs it, and so does every configuration
that no backend supports. A backend (:class:`PPOBackend`: the hand-written gradients
:mod:`contlearn.backends.ppo_gradients`, the value worker :mod:`contlearn.backends.ppo_worker`)
computes the same numbers faster; which one runs is decided once, by
:func:`contlearn.backends.base.choose` over :attr:`contlearn.agents.ppo.PPOAgent.backends`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import torch

from contlearn.backends.base import REFERENCE, Backend, StepConfig

#: log(2π)
LOG_2PI = math.log(2 * math.pi)

#: ``(loss (R,), statistics {name: (R,)}, gradients {param name: tensor}, hidden activations)``
StepResult = tuple[
    torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]
]


def standard_log_prob(z: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
    """log N(a; μ, σ²) summed over action dims from the standardised action ``z = (a − μ)/σ``:
    ``−Σ_j (z_j²/2 + s_j + log(2π)/2)``; ``z`` ``(R, B, A)``, ``log_std`` s ``(R, A)``."""
    return -(0.5 * z.pow(2) + log_std.unsqueeze(1) + 0.5 * LOG_2PI).sum(-1)


def gaussian_log_prob(
    action: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor
) -> torch.Tensor:
    """log N(action; mean, exp(log_std)²) summed over action dims: ``(R, B, A) -> (R, B)``;
    ``log_std`` is ``(R, A)``."""
    return standard_log_prob((action - mean) * torch.exp(-log_std).unsqueeze(1), log_std)


def gaussian_entropy(log_std: torch.Tensor) -> torch.Tensor:
    """Entropy of the diagonal Gaussian, ``Σ_j (s_j + (1 + log 2π)/2)``: ``(R, A) -> (R,)``."""
    return (log_std + 0.5 * (1.0 + LOG_2PI)).sum(-1)


def gae(
    reward: torch.Tensor,
    value: torch.Tensor,
    next_value: torch.Tensor,
    terminal: torch.Tensor,
    episode_end: torch.Tensor,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimates (Schulman et al. 2016) over a rollout.

    ``δ_t = r_t + γ (1 − terminal_t) V(s'_t) − V(s_t)``,
    ``A_t = δ_t + γ λ (1 − episode_end_t) A_{t+1}`` (``A_T = 0``), returns ``A_t + V(s_t)``.

    Args:
        reward, value, next_value: ``(R, T, E)``; ``next_value`` is V of each step's next
            observation (the final one where an episode ended).
        terminal: ``(R, T, E)`` bool, no bootstrap from ``s'_t``.
        episode_end: ``(R, T, E)`` bool, step t+1 starts a new episode.
        gamma, lam: γ and λ.

    Returns:
        ``(advantages, returns)``, both ``(R, T, E)``.
    """
    delta = reward + gamma * next_value * (~terminal) - value  # (R, T, E) in value's dtype
    carry = (~episode_end).to(value.dtype) * (gamma * lam)
    adv = torch.zeros_like(value)
    running = torch.zeros_like(value[:, 0])
    for t in range(value.shape[1] - 1, -1, -1):
        running = torch.addcmul(delta[:, t], carry[:, t], running)
        adv[:, t] = running
    return adv, adv + value


def clipped_policy_loss(
    logp: torch.Tensor, logp_old: torch.Tensor, adv: torch.Tensor, clip: float
) -> torch.Tensor:
    """PPO's clipped surrogate, to minimise: ``mean_b max(−ρA, −clip(ρ, 1−ε, 1+ε)A)``, with
    ``ρ = exp(logp − logp_old)``; ``(R, B)`` inputs, ``(R,)`` out."""
    ratio = torch.exp(logp - logp_old)
    return torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip, 1 + clip)).mean(1)


def combine(
    policy: Mapping[str, torch.Tensor], value_loss: torch.Tensor, vf_coef: float, ent_coef: float
) -> dict[str, torch.Tensor]:
    """A minibatch's statistics from the policy's terms (``policy_loss``, ``entropy``,
    ``approx_kl``, ``clip_fraction``) and the value loss, with the total
    ``loss = L_π + c_V L_V − c_H H``; every value ``(R,)``."""
    loss = policy["policy_loss"] + vf_coef * value_loss - ent_coef * policy["entropy"]
    return {
        "loss": loss,
        "policy_loss": policy["policy_loss"],
        "value_loss": value_loss,
        **{k: policy[k] for k in ("entropy", "approx_kl", "clip_fraction")},
    }


def reference_loss(
    net: Any, mb: Mapping[str, torch.Tensor], clip: float, vf_coef: float, ent_coef: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One minibatch's loss ``(R,)`` (differentiable), statistics and hidden activations.

    Args:
        net: the :class:`~contlearn.agents.actor_critic.ActorCritic`.
        mb: ``obs (R, M, D)``, ``action (R, M, A)``, ``logp``, ``adv``, ``ret`` ``(R, M)``.
        clip, vf_coef, ent_coef: as in :class:`~contlearn.agents.ppo.PPOSpec`.
    """
    mean, value, feats = net.forward(mb["obs"])
    loss, stats = output_loss(
        mean, value, net.params["policy.log_std"], mb, clip, vf_coef, ent_coef
    )
    return loss, stats, feats


def output_loss(
    mean: torch.Tensor,
    value: torch.Tensor,
    log_std: torch.Tensor,
    mb: Mapping[str, torch.Tensor],
    clip: float,
    vf_coef: float,
    ent_coef: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One minibatch's loss ``(R,)`` (differentiable) and statistics from the nets' outputs:
    action means ``(R, M, A)``, values ``(R, M)`` and the log-std ``(R, A)``; ``mb`` and the
    coefficients as for :func:`reference_loss`."""
    logp = gaussian_log_prob(mb["action"], mean, log_std)  # (R, M)
    with torch.no_grad():
        log_ratio = logp - mb["logp"]
        policy = {
            "approx_kl": (log_ratio.exp() - 1 - log_ratio).mean(1),
            "clip_fraction": ((log_ratio.exp() - 1).abs() > clip).float().mean(1),
        }
    policy["policy_loss"] = clipped_policy_loss(logp, mb["logp"], mb["adv"], clip)
    policy["entropy"] = gaussian_entropy(log_std)
    stats = combine(policy, (value - mb["ret"]).pow(2).mean(1), vf_coef, ent_coef)
    return stats["loss"], {k: v.detach() for k, v in stats.items()}


def clip_by_global_norm(
    grads: Mapping[str, torch.Tensor], max_norm: float
) -> dict[str, torch.Tensor]:
    """Scale each replica's gradients (weights ``(R, ...)``) to a norm over all of them of at
    most ``max_norm``."""
    norm = torch.stack([g.pow(2).flatten(1).sum(1) for g in grads.values()]).sum(0).sqrt()
    factor = (max_norm / (norm + 1e-6)).clamp(max=1.0)  # (R,)
    return {k: g * factor.view(-1, *([1] * (g.dim() - 1))) for k, g in grads.items()}


class PPOBackend(Backend, Protocol):
    """What PPO asks of its reference and of each backend (:class:`Backend` plus the code)."""

    def loss_and_grads(
        self,
        net: Any,
        mb: Mapping[str, torch.Tensor],
        clip: float,
        vf_coef: float,
        ent_coef: float,
        pool: ThreadPoolExecutor | None = None,
    ) -> StepResult:
        """One minibatch's loss, statistics, gradients (keyed and ordered like
        ``net.params``) and hidden activations, all detached."""
        ...

    def update(
        self, agent: Any, data: dict[str, torch.Tensor], orders: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """One PPO update's minibatch steps over the rollout ``data`` ``{name: (R, N, ...)}`` in
        the minibatch orders ``(epochs, R, N)``; the statistics summed over the minibatches."""
        ...


class Reference:
    """The reference minibatch step: :func:`reference_loss` and ``torch.autograd.grad``."""

    name = REFERENCE
    description = "PPO's minibatch loss in torch ops, its gradient by autograd"

    def supports(self, cfg: StepConfig) -> bool:
        """The reference computes every configuration."""
        return True

    def loss_and_grads(
        self,
        net: Any,
        mb: Mapping[str, torch.Tensor],
        clip: float,
        vf_coef: float,
        ent_coef: float,
        pool: ThreadPoolExecutor | None = None,
    ) -> StepResult:
        """See :meth:`PPOBackend.loss_and_grads` (``pool`` is not used)."""
        with torch.enable_grad():
            loss, stats, feats = reference_loss(net, mb, clip, vf_coef, ent_coef)
            grads = torch.autograd.grad(loss.sum(), list(net.params.values()))
        return (
            loss.detach(),
            stats,
            dict(zip(net.params, grads, strict=True)),
            {k: v.detach() for k, v in feats.items()},
        )

    def update(
        self, agent: Any, data: dict[str, torch.Tensor], orders: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """In this process, one :meth:`~contlearn.agents.ppo.PPOAgent.minibatch` at a time."""
        return agent.run_minibatches(data, orders)


#: the reference step
REFERENCE_STEP = Reference()
