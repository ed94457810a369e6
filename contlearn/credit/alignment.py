"""How well a credit rule's feedback aligns with backprop: the ``feedback_alignment`` and
``weight_alignment`` probes (docs/credit.md, "Probes").

- ``feedback_alignment`` of hidden layer l: the angle, in degrees, between the error the rule
  delivers to layer l (``g_l``, what the layer above sends down, with the rule's own errors all
  the way from the output) and backprop's ``∂L/∂h_l`` on the same forward pass, each flattened
  over the probe batch; one shadow backward pass of each.
- ``weight_alignment``: the angle between a layer's feedback matrix and what backprop would use
  in its place: ``B_l`` against ``W_l`` (recorded under the layer of ``W_l``); for ``dfa``,
  ``D_l`` against the product of the forward weights above hidden layer l,
  ``W_L ⋯ W_{l+1}`` (recorded under hidden layer l); for ``sign-symmetry``, ``s · sign W_l``
  against ``W_l``.

Both are per replica; the whole-network value (layer ``""``) is the mean over layers. Backprop
itself is at 0° by definition and records neither.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from contlearn.agents.networks import BatchedMLP, activation_backward
from contlearn.credit.rules import DirectFeedback, FeedbackRule, SignSymmetry
from contlearn.probes.measures import with_layer_mean


def angle(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per replica, the angle in degrees between ``a`` and ``b`` (``(R, ...)``) flattened,
    in float64; 90° where either is zero."""
    a64 = a.reshape(a.shape[0], -1).to(torch.float64)
    b64 = b.reshape(b.shape[0], -1).to(torch.float64)
    norms = a64.norm(dim=1) * b64.norm(dim=1)
    cos = torch.where(norms > 0, (a64 * b64).sum(1) / norms.clamp_min(1e-300), 0.0)
    return torch.rad2deg(torch.acos(cos.clamp(-1.0, 1.0)))


def feedback_alignment(
    net: BatchedMLP,
    params: dict[str, torch.Tensor],
    rule: FeedbackRule,
    x: torch.Tensor,
    output_error: Callable[[torch.Tensor], torch.Tensor],
) -> dict[str, torch.Tensor]:
    """``{hidden layer: (R,)}`` angles between the rule's error and backprop's (and ``""``).

    Args:
        net, params: the network and its parameters.
        rule: the credit rule.
        x: the probe inputs ``(R, P, D)``.
        output_error: ``e = ∂L/∂ŷ`` of the outputs ``(R, P, C)`` (the probe batch's loss).
    """
    out, hs, zs = net.forward_train(x, params)
    e = output_error(out)
    delta_rule, delta_bp = e, e
    angles: dict[str, torch.Tensor] = {}
    for i in range(len(net.layers) - 1, 0, -1):
        w = params[f"{net.layers[i].name}.weight"]
        g_rule = rule.signal(i, delta_rule, e, params)
        g_bp = torch.bmm(delta_bp, w)
        below = net.layers[i - 1].name
        angles[below] = angle(g_rule, g_bp)
        z = None if zs is None else zs[i - 1]
        delta_rule = activation_backward(net.activation, g_rule, hs[i - 1], z)
        delta_bp = activation_backward(net.activation, g_bp, hs[i - 1], z)
    return with_layer_mean(dict(reversed(list(angles.items()))))


def weight_alignment(
    net: BatchedMLP, params: dict[str, torch.Tensor], rule: FeedbackRule
) -> dict[str, torch.Tensor]:
    """``{layer: (R,)}`` angles between each feedback matrix and what backprop uses instead
    (the module docstring), and their mean ``""``."""
    angles: dict[str, torch.Tensor] = {}
    if isinstance(rule, DirectFeedback):
        # the product of the forward weights above each hidden layer, from the output down
        product = params[f"{net.layers[-1].name}.weight"]  # (R, C, H_last)
        for i in range(len(net.layers) - 2, -1, -1):
            name = net.layers[i].name
            angles[name] = angle(rule.feedback[name], product)
            if i > 0:
                product = torch.bmm(product, params[f"{name}.weight"])
    elif isinstance(rule, SignSymmetry):
        for layer in net.layers[1:]:
            w = params[f"{layer.name}.weight"]
            angles[layer.name] = angle(rule.matrix(w), w)
    else:
        for name, b in rule.feedback.items():
            angles[name] = angle(b, params[f"{name}.weight"])
    order = [layer.name for layer in net.layers]
    return with_layer_mean({n: angles[n] for n in order if n in angles})


__all__ = ["angle", "feedback_alignment", "weight_alignment"]
