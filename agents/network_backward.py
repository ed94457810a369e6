"""The MLP's hand-written backward under its network options (layer norm, crelu, fourier).

:meth:`BatchedMLP.backward <contlearn.agents.networks.BatchedMLP.backward>` hands over to
:func:`backward_with_options` when an option is on; :meth:`~BatchedMLP.forward_train` then
keeps each hidden layer's features ``h`` and, with layer norm, its raw pre-activations
``z = W h_in + b`` (before the norm). Going down, with ``d = δ_{l+1} W_{l+1}`` the input
gradient of the layer above:

- crelu ``h = [relu(ẑ), relu(−ẑ)]``, ``d = [a, b]``: ``∂L/∂ẑ = a ⊙ [h₁ > 0] − b ⊙ [h₂ > 0]``;
- fourier ``h = [sin ẑ, cos ẑ]``: ``∂L/∂ẑ = a ⊙ cos ẑ − b ⊙ sin ẑ = a ⊙ h₂ − b ⊙ h₁``;
- elementwise activations: :func:`~contlearn.agents.networks.activation_backward`;
- layer norm ``ẑ = x̂ ⊙ γ + β``, ``x̂ = (z − μ) σ⁻¹`` over the H units: ``∂L/∂γ = Σ_b g ⊙ x̂``,
  ``∂L/∂β = Σ_b g``, and with ``u = g ⊙ γ``,
  ``∂L/∂z = σ⁻¹ (u − mean(u) − x̂ ⊙ mean(u ⊙ x̂))``.

These are autograd's derivatives (ReLU's at 0 is 0), checked against it in
``tests/test_network_options.py``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from contlearn.agents.network_options import LN_BIAS, LN_EPS, LN_WEIGHT, layer_norm

if TYPE_CHECKING:
    from contlearn.agents.networks import BatchedMLP


def concat_backward(activation: str, d: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``∂L/∂ẑ (R, B, H)`` from ``d = ∂L/∂h`` and ``h`` ``(R, B, 2H)`` (module docstring)."""
    a, b = d.chunk(2, -1)
    h1, h2 = h.chunk(2, -1)
    if activation == "crelu":
        return a * (h1 > 0) - b * (h2 > 0)
    return a * h2 - b * h1  # fourier: h1 = sin ẑ, h2 = cos ẑ


def layer_norm_backward(
    g: torch.Tensor, z: torch.Tensor, gain: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(∂L/∂z (R, B, H), ∂L/∂γ (R, H), ∂L/∂β (R, H))`` from ``g = ∂L/∂ẑ`` and the raw
    pre-activations ``z``."""
    mean = z.mean(-1, keepdim=True)
    rstd = torch.rsqrt(z.var(-1, unbiased=False, keepdim=True) + LN_EPS)
    xhat = (z - mean) * rstd
    u = g * gain.unsqueeze(1)
    dz = (u - u.mean(-1, keepdim=True) - xhat * (u * xhat).mean(-1, keepdim=True)) * rstd
    return dz, (g * xhat).sum(1), g.sum(1)


def backward_with_options(
    net: BatchedMLP,
    delta: torch.Tensor,
    x: torch.Tensor,
    hs: list[torch.Tensor],
    zs: list[torch.Tensor] | None,
    params: dict[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """:meth:`BatchedMLP.backward`'s gradients (layer-norm gains and offsets included) under
    the network's options; ``zs``: the raw pre-activations with layer norm, else None."""
    from contlearn.agents.networks import _NEEDS_PRE, activation_backward

    grads: dict[str, torch.Tensor] = {}
    for i in range(len(net.layers) - 1, -1, -1):
        name = net.layers[i].name
        grads[f"{name}.weight"] = torch.bmm(delta.transpose(1, 2), x if i == 0 else hs[i - 1])
        grads[f"{name}.bias"] = delta.sum(1)
        if i == 0:
            break
        d = torch.bmm(delta, params[f"{name}.weight"])  # (R, B, features)
        lower, h = net.layers[i - 1].name, hs[i - 1]
        z = zs[i - 1] if zs is not None else None
        gain = params.get(f"{lower}.{LN_WEIGHT}")
        if net.activation in ("crelu", "fourier"):
            delta = concat_backward(net.activation, d, h)
        else:
            pre = None
            if net.activation in _NEEDS_PRE and z is not None and gain is not None:
                pre = layer_norm(z, gain, params[f"{lower}.{LN_BIAS}"])
            delta = activation_backward(net.activation, d, h, pre)
        if net.layer_norm:
            assert z is not None and gain is not None  # (forward_train keeps z with layer norm)
            delta, g_gain, g_bias = layer_norm_backward(delta, z, gain)
            grads[f"{lower}.{LN_WEIGHT}"], grads[f"{lower}.{LN_BIAS}"] = g_gain, g_bias
    return {k: grads[k] for k in params}
