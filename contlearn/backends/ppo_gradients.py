"""The ``ppo-gradients`` backend: PPO's minibatch gradient by hand, both nets without autograd.

A minibatch update of PPO on Slippery Ant moves ~144 MFLOP through two 256-256 MLPs; with
autograd it also pays for ~200 small ops and a graph. :func:`loss_and_grads` computes the same
loss, statistics and gradients as the reference step (:data:`contlearn.agents.ppo_loss.
REFERENCE_STEP`, ``torch.autograd.grad`` of :func:`~contlearn.agents.ppo_loss.reference_loss`)
to float rounding (``tests/test_ppo_fast.py``, ``tests/test_ppo_backends.py``), with the
networks' own kernels (``baddbmm``, ``threshold_backward``) and the closed-form gradient of the
loss:

- ``z = (a − μ) e^{−s}`` (s the log-std), ``log π = −Σ_j (z_j²/2 + s_j + log(2π)/2)``,
  ``ρ = exp(log π − log π_old)``;
- ``L_π = mean_b max(−Aρ, −A clip(ρ, 1 − ε, 1 + ε))``: ``∂L_π/∂ρ_b = −A_b / M`` where the
  unclipped term is the larger (or ρ is inside the clip range), else 0;
- ``∂ log π/∂μ = z e^{−s}``, ``∂ log π/∂s = z² − 1``;
- ``L_V = c_V mean_b (V_b − R_b)²``: ``∂L_V/∂V_b = 2 c_V (V_b − R_b) / M``;
- the entropy bonus ``−c_H Σ_j (s_j + (1 + log 2π)/2)`` adds ``−c_H`` to ``∂L/∂s``.

Only the gradients are computed here: clipping, the learner's update and its application are
the agent's own code (:meth:`contlearn.agents.ppo.PPOAgent.learn`), shared with the reference.
:func:`value_part` and :func:`policy_part` are the two independent halves, which the value
worker (:mod:`contlearn.backends.ppo_worker`) runs in two processes.
"""

from __future__ import annotations

from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from contlearn.agents.networks import activation_backward
from contlearn.agents.ppo_loss import StepResult, combine, gaussian_entropy, standard_log_prob
from contlearn.backends.base import StepConfig, declares

#: the activations whose derivative :func:`~contlearn.agents.networks.activation_backward` has
HAND_WRITTEN_ACTIVATIONS = ("relu", "tanh", "sigmoid", "leaky_relu", "elu", "swish")


class PPOGradients:
    """PPO's minibatch gradients by hand (this module); the update loop is the reference's."""

    name = "ppo-gradients"
    description = "PPO's minibatch gradients by hand (closed form, no autograd graph)"

    def supports(self, cfg: StepConfig) -> bool:
        """The actor-critic MLPs under backprop with an activation that has a hand-written
        derivative, at least one hidden layer, float32 or float64.

        Learner, optimizer, clipping, batch size and device are not restricted: this backend
        replaces only the gradient; clipping, the learner's update and its application are the
        agent's code shared with the reference, and the ops run on any device.
        """
        return (
            cfg.network == "actor-critic"
            and cfg.task == "rl"
            and cfg.credit == "bp"
            and cfg.activation in HAND_WRITTEN_ACTIVATIONS
            and cfg.depth >= 1
            and cfg.dtype in ("float32", "float64")
            and declares(cfg)
        )

    def loss_and_grads(
        self,
        net: Any,
        mb: Mapping[str, torch.Tensor],
        clip: float,
        vf_coef: float,
        ent_coef: float,
        pool: ThreadPoolExecutor | None = None,
    ) -> StepResult:
        """:func:`loss_and_grads`."""
        return loss_and_grads(net, mb, clip, vf_coef, ent_coef, pool)

    def update(
        self, agent: Any, data: dict[str, torch.Tensor], orders: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """In this process, one minibatch step at a time (as the reference)."""
        return agent.run_minibatches(data, orders)


#: the backend
PPO_GRADIENTS = PPOGradients()


def _value_forward(
    net: Any, obs: torch.Tensor
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """The value net's forward pass as ``ActorCritic.values`` computes it: ``(R, B)`` values,
    hidden activations and pre-activations (the output unit as a multiply-and-sum, see
    there)."""
    p, act = net.value.params, net.value.act_fn
    hs, zs, h = [], [], obs
    for layer in net.value.layers[:-1]:
        z = torch.baddbmm(
            p[f"{layer.name}.bias"].unsqueeze(1), h, p[f"{layer.name}.weight"].transpose(1, 2)
        )
        h = act(z)
        zs.append(z)
        hs.append(h)
    return (h * p["output.weight"]).sum(-1) + p["output.bias"], hs, zs


def _value_backward(
    net: Any,
    delta_v: torch.Tensor,
    obs: torch.Tensor,
    hs: list[torch.Tensor],
    zs: list[torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Gradients of the value net from ``∂L/∂V`` ``(R, B)``."""
    value = net.value
    p = value.params
    grads = {
        "output.weight": torch.bmm(delta_v.unsqueeze(1), hs[-1]),  # (R, 1, H)
        "output.bias": delta_v.sum(1, keepdim=True),
    }  # (R, 1)
    delta = activation_backward(
        value.activation, delta_v.unsqueeze(-1) * p["output.weight"], hs[-1], zs[-1]
    )  # (R, B, H)
    for i in range(len(value.layers) - 2, -1, -1):
        name = value.layers[i].name
        h_in = obs if i == 0 else hs[i - 1]
        grads[f"{name}.weight"] = torch.bmm(delta.transpose(1, 2), h_in)
        grads[f"{name}.bias"] = delta.sum(1)
        if i > 0:
            delta = activation_backward(
                value.activation, torch.bmm(delta, p[f"{name}.weight"]), hs[i - 1], zs[i - 1]
            )
    return grads


def value_part(
    net: Any, mb: Mapping[str, torch.Tensor], vf_coef: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The value net's loss ``(R,)``, gradients and hidden activations (``value.hidden1``, ...),
    from ``obs`` and ``ret``; call without autograd recording (``torch.no_grad``)."""
    obs = mb["obs"]
    value, hs_v, zs_v = _value_forward(net, obs)  # (R, M)
    err = value - mb["ret"]
    grads = _value_backward(net, err * (2.0 * vf_coef / obs.shape[1]), obs, hs_v, zs_v)
    return (
        err.pow(2).mean(1),
        {f"value.{k}": g for k, g in grads.items()},
        _features("value", net.value, hs_v),
    )


def _features(prefix: str, mlp: Any, hs: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{layer.name}": h for layer, h in zip(mlp.layers[:-1], hs, strict=True)}


def policy_part(
    net: Any, mb: Mapping[str, torch.Tensor], clip: float, ent_coef: float
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The policy's loss terms and statistics ``(R,)``, gradients and hidden activations, from
    ``obs``, ``action``, ``logp`` and ``adv``; call without autograd recording."""
    obs = mb["obs"]
    M = obs.shape[1]
    log_std = net.params["policy.log_std"].detach()  # (R, A)
    mean, hs_p, zs_p = net.policy.forward_train(obs)  # (R, M, A)
    inv_std = torch.exp(-log_std).unsqueeze(1)  # (R, 1, A)
    z = (mb["action"] - mean) * inv_std  # (R, M, A)
    logp = standard_log_prob(z, log_std)  # (R, M)
    log_ratio = logp - mb["logp"]
    ratio = torch.exp(log_ratio)
    adv = mb["adv"]
    surr, surr_clipped = -adv * ratio, -adv * ratio.clamp(1 - clip, 1 + clip)
    # ∂L/∂log π: the unclipped term carries the gradient where it is the larger one or ρ is
    # inside the clip range (there both terms are equal and torch splits the gradient in two
    # halves that add up to the same)
    inside = (ratio >= 1 - clip) & (ratio <= 1 + clip)
    g_logp = torch.where(inside | (surr > surr_clipped), -adv * ratio, 0.0) / M  # (R, M)
    gz = g_logp.unsqueeze(-1) * z  # (R, M, A)
    grads = {
        f"policy.{k}": g for k, g in net.policy.backward(gz * inv_std, obs, hs_p, zs_p).items()
    }
    g_log_std = (gz * z).sum(1) - g_logp.sum(1, keepdim=True)  # (R, A): Σ_b g (z² − 1)
    grads["policy.log_std"] = g_log_std - ent_coef if ent_coef else g_log_std
    stats = {
        "policy_loss": torch.maximum(surr, surr_clipped).mean(1),
        "entropy": gaussian_entropy(log_std),
        "approx_kl": (ratio - 1 - log_ratio).mean(1),
        "clip_fraction": ((ratio - 1).abs() > clip).float().mean(1),
    }
    return stats, grads, _features("policy", net.policy, hs_p)


def loss_and_grads(
    net: Any,
    mb: Mapping[str, torch.Tensor],
    clip: float,
    vf_coef: float,
    ent_coef: float,
    pool: ThreadPoolExecutor | None = None,
) -> StepResult:
    """Loss ``(R,)``, statistics, gradients and hidden activations of one minibatch.

    Args:
        net: the :class:`~contlearn.agents.actor_critic.ActorCritic`.
        mb: ``obs (R, M, D)``, ``action (R, M, A)``, ``logp``, ``adv``, ``ret`` ``(R, M)``.
        clip, vf_coef, ent_coef: as in :class:`~contlearn.agents.ppo.PPOSpec`.
        pool: a thread to run the value net's passes in while this thread runs the policy's
            (the two are independent; torch ops release the GIL). Same ops, same numbers.

    Returns:
        ``(loss, stats, grads, features)``: grads keyed like ``net.params``, features
        ``{"policy.hidden1": (R, M, H), ...}``.
    """
    with torch.no_grad():
        if pool is not None:
            future = pool.submit(_no_grad_value_part, net, mb, vf_coef)
            policy, grads, features = policy_part(net, mb, clip, ent_coef)
            value_loss, value_grads, value_features = future.result()
        else:
            policy, grads, features = policy_part(net, mb, clip, ent_coef)
            value_loss, value_grads, value_features = value_part(net, mb, vf_coef)
    grads.update(value_grads)
    features.update(value_features)
    stats = combine(policy, value_loss, vf_coef, ent_coef)
    return stats["loss"], stats, {k: grads[k] for k in net.params}, features


def _no_grad_value_part(
    net: Any, mb: Mapping[str, torch.Tensor], vf_coef: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """:func:`value_part` in a pool thread (grad mode is per thread)."""
    with torch.no_grad():
        return value_part(net, mb, vf_coef)
