"""PPO's minibatch gradient by hand: forward and backward of both nets without autograd.

A minibatch update of PPO on Slippery Ant moves ~144 MFLOP through two 256-256 MLPs; with
autograd it also pays for ~200 small ops and a graph. :func:`loss_and_grads` computes the same
loss, statistics and gradients as :meth:`contlearn.agents.ppo.PPOAgent._loss` with
``torch.autograd.grad`` (to float rounding; ``tests/test_ppo_fast.py`` compares them), with
the networks' own kernels (``baddbmm``, ``threshold_backward``) and the closed-form gradient
of the loss:

- ``z = (a − μ) e^{−s}`` (s the log-std), ``log π = −Σ_j (z_j²/2 + s_j + log(2π)/2)``,
  ``ρ = exp(log π − log π_old)``;
- ``L_π = mean_b max(−Aρ, −A clip(ρ, 1 − ε, 1 + ε))``: ``∂L_π/∂ρ_b = −A_b / M`` where the
  unclipped term is the larger (or ρ is inside the clip range), else 0;
- ``∂ log π/∂μ = z e^{−s}``, ``∂ log π/∂s = z² − 1``;
- ``L_V = c_V mean_b (V_b − R_b)²``: ``∂L_V/∂V_b = 2 c_V (V_b − R_b) / M``;
- the entropy bonus ``−c_H Σ_j (s_j + (1 + log 2π)/2)`` adds ``−c_H`` to ``∂L/∂s``.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from contlearn.agents.networks import activation_backward

_LOG_2PI = math.log(2 * math.pi)


def _value_forward(net: Any, obs: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The value net's forward pass as ``ActorCritic.values`` computes it: ``(R, B)`` values and
    hidden activations (the output unit as a multiply-and-sum, see there)."""
    p, act = net.value.params, net.value.act_fn
    hs, h = [], obs
    for layer in net.value.layers[:-1]:
        h = act(
            torch.baddbmm(
                p[f"{layer.name}.bias"].unsqueeze(1), h, p[f"{layer.name}.weight"].transpose(1, 2)
            )
        )
        hs.append(h)
    return (h * p["output.weight"]).sum(-1) + p["output.bias"], hs


def _value_backward(
    net: Any, delta_v: torch.Tensor, obs: torch.Tensor, hs: list[torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Gradients of the value net from ``∂L/∂V`` ``(R, B)``."""
    value = net.value
    p = value.params
    grads = {
        "output.weight": torch.bmm(delta_v.unsqueeze(1), hs[-1]),  # (R, 1, H)
        "output.bias": delta_v.sum(1, keepdim=True),
    }  # (R, 1)
    delta = activation_backward(
        value.activation, delta_v.unsqueeze(-1) * p["output.weight"], hs[-1], None
    )  # (R, B, H)
    for i in range(len(value.layers) - 2, -1, -1):
        name = value.layers[i].name
        h_in = obs if i == 0 else hs[i - 1]
        grads[f"{name}.weight"] = torch.bmm(delta.transpose(1, 2), h_in)
        grads[f"{name}.bias"] = delta.sum(1)
        if i > 0:
            delta = activation_backward(
                value.activation, torch.bmm(delta, p[f"{name}.weight"]), hs[i - 1], None
            )
    return grads


def supports(net: Any) -> bool:
    """Whether the hand-written pass applies: activations whose derivative reads the output."""
    return net.activation in ("relu", "tanh", "sigmoid", "leaky_relu")


def _value_part(
    net: Any, mb: dict[str, torch.Tensor], vf_coef: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor], list[torch.Tensor]]:
    """The value net's loss ``(R,)``, gradients and hidden activations."""
    obs = mb["obs"]
    value, hs_v = _value_forward(net, obs)  # (R, M)
    err = value - mb["ret"]
    grads = _value_backward(net, err * (2.0 * vf_coef / obs.shape[1]), obs, hs_v)
    return err.pow(2).mean(1), {f"value.{k}": g for k, g in grads.items()}, hs_v


def _policy_part(
    net: Any, mb: dict[str, torch.Tensor], clip: float, ent_coef: float
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], list[torch.Tensor]]:
    """The policy's loss terms and statistics ``(R,)``, gradients and hidden activations."""
    obs = mb["obs"]
    M = obs.shape[1]
    log_std = net.params["policy.log_std"].detach()  # (R, A)
    mean, hs_p, _ = net.policy.forward_train(obs)  # (R, M, A)
    inv_std = torch.exp(-log_std).unsqueeze(1)  # (R, 1, A)
    z = (mb["action"] - mean) * inv_std  # (R, M, A)
    logp = -(0.5 * z.pow(2) + log_std.unsqueeze(1) + 0.5 * _LOG_2PI).sum(-1)  # (R, M)
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
        f"policy.{k}": g for k, g in net.policy.backward(gz * inv_std, obs, hs_p, None).items()
    }
    g_log_std = (gz * z).sum(1) - g_logp.sum(1, keepdim=True)  # (R, A): Σ_b g (z² − 1)
    grads["policy.log_std"] = g_log_std - ent_coef if ent_coef else g_log_std
    stats = {
        "policy_loss": torch.maximum(surr, surr_clipped).mean(1),
        "entropy": (log_std + 0.5 * (1.0 + _LOG_2PI)).sum(-1),
        "approx_kl": (ratio - 1 - log_ratio).mean(1),
        "clip_fraction": ((ratio - 1).abs() > clip).float().mean(1),
    }
    return stats, grads, hs_p


def loss_and_grads(
    net: Any,
    mb: dict[str, torch.Tensor],
    clip: float,
    vf_coef: float,
    ent_coef: float,
    pool: ThreadPoolExecutor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Loss ``(R,)``, statistics, gradients and hidden activations of one minibatch.

    Args:
        net: the :class:`~contlearn.agents.ppo.ActorCritic`.
        mb: ``obs (R, M, D)``, ``action (R, M, A)``, ``logp``, ``adv``, ``ret`` ``(R, M)``.
        clip, vf_coef, ent_coef: as in :class:`~contlearn.agents.ppo.PPOSpec`.
        pool: a thread to run the value net's passes in while this thread runs the policy's
            (the two are independent; torch ops release the GIL). Same ops, same numbers.

    Returns:
        ``(loss, stats, grads, features)``: grads keyed like ``net.params``, features
        ``{"policy.hidden1": (R, M, H), ...}``.
    """
    if pool is not None:
        future = pool.submit(_value_part, net, mb, vf_coef)
        stats, grads, hs_p = _policy_part(net, mb, clip, ent_coef)
        value_loss, value_grads, hs_v = future.result()
    else:
        stats, grads, hs_p = _policy_part(net, mb, clip, ent_coef)
        value_loss, value_grads, hs_v = _value_part(net, mb, vf_coef)
    grads.update(value_grads)
    loss = stats["policy_loss"] + vf_coef * value_loss - ent_coef * stats["entropy"]
    stats = {
        "loss": loss,
        "policy_loss": stats["policy_loss"],
        "value_loss": value_loss,
        **{k: stats[k] for k in ("entropy", "approx_kl", "clip_fraction")},
    }
    features = {
        f"{prefix}.{layer.name}": h
        for prefix, mlp, hs in (("policy", net.policy, hs_p), ("value", net.value, hs_v))
        for layer, h in zip(mlp.layers[:-1], hs, strict=True)
    }
    return loss, stats, {k: grads[k] for k in net.params}, features
