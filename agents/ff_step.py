"""The Forward-Forward agent's local losses and their gradients: the reference (autograd, one
layer at a time on detached inputs) and the hand-written form (closed-form gradients, no
autograd graph), which computes the same numbers (``tests/test_forward_forward.py``).

Per hidden layer l and replica, on a step's B positive inputs (true label embedded) and B
negative inputs (a wrong label), with goodness G = Σ_j h_j² (or mean_j h_j²) and threshold θ_l:

    L_l = ½ [ mean_b softplus(θ_l − G⁺_b) + mean_b softplus(G⁻_b − θ_l) ]

(the mean binary cross-entropy of p(positive) = σ(G − θ) over the 2B inputs; softplus is
evaluated stably). With peer normalisation (weight λ, momentum μ), a running mean activity
``m ← μ m + (1 − μ) mean_{b∈pos} h_b`` (gradient through this step's term only, as in
Hinton's description and the common reference code) adds ``λ · mean_j (mean_k m_k − m_j)²``.
Layer l's input is the normalised, detached activity of layer l − 1 (layer 1: the normalised
input), so ∂L_l reaches only
layer l's weights; every layer is updated on every step.

Closed form, with c_b = ∂L_l/∂G_b (−½σ(θ − G⁺_b)/B, or ½σ(G⁻_b − θ)/B):
``∂L/∂h_b = c_b · 2h_b`` (``mean``: ``/H``), plus the peer term
``(2λ(1 − μ)/(H·B)) (m − m̄)`` on positive inputs; ``δ = ∂L/∂h ⊙ act'(z)``;
``∂L/∂W = δᵀ x``, ``∂L/∂b = Σ_b δ_b``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

from contlearn.agents.ff_network import FFNetwork, goodness, normalise
from contlearn.agents.networks import activation_backward


class LayerOptions(NamedTuple):
    """What the local loss of every layer needs.

    Attributes:
        goodness: ``sum`` or ``mean``.
        thresholds: θ_l per hidden layer.
        peer: λ of peer normalisation (0: off).
        peer_momentum: μ of the running mean activity.
    """

    goodness: str
    thresholds: tuple[float, ...]
    peer: float
    peer_momentum: float


class LocalStep(NamedTuple):
    """One step's local gradients and what else the agent records.

    Attributes:
        grads: ``{"<layer>.weight": (R, H, in), "<layer>.bias": (R, H)}`` of the FF layers.
        features: ``{layer: (R, 2B, H)}`` activities on the positive then negative inputs.
        losses: ``(R, L)`` each layer's L_l (without the peer term).
        running: ``{layer: (R, H)}`` the running mean activities after this step.
        deltas: ``{layer: ((R, 2B, H) δ, (R, 2B, in) input)}``, whose product is the weight
            gradient (hand-written step only; what a fused update applies in place).
    """

    grads: dict[str, torch.Tensor]
    features: dict[str, torch.Tensor]
    losses: torch.Tensor
    running: dict[str, torch.Tensor]
    deltas: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None


def ff_loss(g: torch.Tensor, batch: int, theta: float) -> torch.Tensor:
    """``½[mean softplus(θ − G⁺) + mean softplus(G⁻ − θ)]`` of ``g (R, 2B)`` (positives first):
    ``(R,)``."""
    return 0.5 * (
        F.softplus(theta - g[:, :batch]).mean(1) + F.softplus(g[:, batch:] - theta).mean(1)
    )


def _peer_mean(running: torch.Tensor, h_pos: torch.Tensor, momentum: float) -> torch.Tensor:
    """``μ m + (1 − μ) mean_b h⁺_b``: ``(R, H)``."""
    return running * momentum + h_pos.mean(1) * (1.0 - momentum)


def reference_step(
    net: FFNetwork,
    params: dict[str, torch.Tensor],
    x: torch.Tensor,
    batch: int,
    opts: LayerOptions,
    running: dict[str, torch.Tensor],
) -> LocalStep:
    """The definition: autograd's gradient of each layer's local loss, layer by layer.

    Args:
        net: the network.
        params: its parameters (plain tensors; not modified).
        x: ``(R, 2B, D')`` the embedded positive then negative inputs.
        batch: B.
        opts: the loss's options.
        running: the running mean activities before this step (peer normalisation).
    """
    grads, feats, losses, new_running = {}, {}, [], {}
    h_in = normalise(x, net.norm)
    for i, layer in enumerate(net.hidden_layers):
        w = params[f"{layer.name}.weight"].detach().requires_grad_(True)
        b = params[f"{layer.name}.bias"].detach().requires_grad_(True)
        with torch.enable_grad():
            h = net.act_fn(
                net.layer_forward(
                    layer.name, h_in, {f"{layer.name}.weight": w, f"{layer.name}.bias": b}
                )
            )
            loss = ff_loss(goodness(h, opts.goodness), batch, opts.thresholds[i])  # (R,)
            total = loss
            if opts.peer:
                m = _peer_mean(running[layer.name], h[:, :batch], opts.peer_momentum)
                total = total + opts.peer * (m.mean(-1, keepdim=True) - m).pow(2).mean(-1)
                new_running[layer.name] = m.detach()
            gw, gb = torch.autograd.grad(total.sum(), [w, b])
        grads[f"{layer.name}.weight"], grads[f"{layer.name}.bias"] = gw, gb
        losses.append(loss.detach())
        feats[layer.name] = h.detach()
        h_in = normalise(feats[layer.name], net.norm)
    return LocalStep(grads, feats, torch.stack(losses, 1), new_running)


@torch.no_grad()
def hand_step(
    net: FFNetwork,
    params: dict[str, torch.Tensor],
    x: torch.Tensor,
    batch: int,
    opts: LayerOptions,
    running: dict[str, torch.Tensor],
    materialize: bool = True,
    forward: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> LocalStep:
    """:func:`reference_step` in closed form (see the module docstring); same arguments, and
    ``materialize=False`` to return each layer's δ and input instead of its gradients;
    ``forward``: each layer's ``(z, h)`` on ``x`` already computed with ``params`` (the
    prediction's pass), so that only the backward part runs here."""
    grads, feats, losses, new_running, deltas = {}, {}, [], {}, {}
    h_in = normalise(x, net.norm)
    for i, layer in enumerate(net.hidden_layers):
        if forward is None:
            z = net.layer_forward(layer.name, h_in, params)  # (R, 2B, H)
            h = net.act_fn(z)
        else:
            z, h = forward[i]
        g = goodness(h, opts.goodness)  # (R, 2B)
        theta = opts.thresholds[i]
        losses.append(ff_loss(g, batch, theta))
        coef = torch.cat(
            [torch.sigmoid(theta - g[:, :batch]).neg_(), torch.sigmoid(g[:, batch:] - theta)], 1
        ).mul_(1.0 / batch)  # (R, 2B): ∂L/∂G = ½ · (∓σ) / B, times the 2 of ∂G/∂h
        if opts.goodness == "mean":
            coef.div_(h.shape[-1])
        dh = h * coef.unsqueeze(-1)  # (R, 2B, H)
        if opts.peer:
            m = _peer_mean(running[layer.name], h[:, :batch], opts.peer_momentum)
            scale = 2.0 * opts.peer * (1.0 - opts.peer_momentum) / (h.shape[-1] * batch)
            dh[:, :batch] += ((m - m.mean(-1, keepdim=True)) * scale).unsqueeze(1)
            new_running[layer.name] = m
        delta = activation_backward(net.activation, dh, h, z)
        if materialize:
            grads[f"{layer.name}.weight"] = torch.bmm(delta.transpose(1, 2), h_in)  # (R, H, in)
            grads[f"{layer.name}.bias"] = delta.sum(1)
        deltas[layer.name] = (delta, h_in)
        feats[layer.name] = h
        h_in = normalise(h, net.norm)
    return LocalStep(grads, feats, torch.stack(losses, 1), new_running, deltas)


def head_gradients(
    net: FFNetwork, params: dict[str, torch.Tensor], feat: torch.Tensor, labels: torch.Tensor
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The head's cross-entropy gradients on detached features ``feat (R, B, ΣH)`` and labels
    ``(R, B)``, in closed form: ``∂/∂logits = (softmax − onehot) / B``; returns the gradients
    and the loss ``(R,)``."""
    logits = net.layer_forward("head", feat, params)  # (R, B, C)
    logp = torch.log_softmax(logits, -1)
    loss = -logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1).mean(1)
    d = logp.exp().scatter_add_(-1, labels.unsqueeze(-1), -torch.ones_like(logp[..., :1]))
    d.div_(labels.shape[1])
    return {"head.weight": torch.bmm(d.transpose(1, 2), feat), "head.bias": d.sum(1)}, loss
