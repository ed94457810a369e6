"""Replica-batched MLPs: R independent networks of one architecture run as one model.

Parameters are a dict of named tensors with a leading replica dim::

    hidden1.weight (R, H1, D)   hidden1.bias (R, H1)
    ...
    output.weight  (R, C, Hn)   output.bias  (R, C)

Each replica's initial weights come from its own torch Generator, so replica r of a batch is
initialised exactly as the same seed run alone. Each layer keeps its init distribution so that
resets (continual backprop, ReDo) redraw units from it.

Besides the autograd-friendly :meth:`BatchedMLP.forward`, the network has a hand-written
backward pass (the derivative of every activation is simple) for agents that learn online
without autograd: :meth:`~BatchedMLP.forward_train` keeps what the backward needs,
:meth:`~BatchedMLP.backward` returns the gradients, and :meth:`~BatchedMLP.backward_update_`
applies ``θ ← (1 + β) θ + α g`` in place while back-propagating, without materialising g (see
:mod:`contlearn.learners.fused`); a credit rule's error replaces ``δ W`` going down (``signal``).

(Over 400 lines: the network's forward pass and its hand-written backward, plain and fused,
side by side so that each can be read against the others.)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from contlearn.agents.network_options import (
    CONCAT_ACTIVATIONS,
    CONCAT_GAINS,
    LN_BIAS,
    LN_WEIGHT,
    features_per_unit,
    layer_norm,
)
from contlearn.backends import kernels
from contlearn.errors import ConfigError

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": torch.relu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "leaky_relu": F.leaky_relu,
    "elu": F.elu,
    "swish": F.silu,
}
#: gain of the Kaiming (He) init per activation; ReLU-like units get √2.
GAINS = {
    "relu": math.sqrt(2.0),
    "tanh": 5.0 / 3.0,
    "sigmoid": 1.0,
    "leaky_relu": math.sqrt(2.0 / (1 + 0.01**2)),
    "elu": math.sqrt(2.0),
    "swish": math.sqrt(2.0),
    "linear": 1.0,
    **CONCAT_GAINS,
}
INITS = ("kaiming_uniform", "lecun_uniform", "xavier_uniform", "torch_default")
#: activations whose derivative the backward pass takes from the pre-activation z (others: h).
_NEEDS_PRE = ("elu", "swish")
#: weight matrices larger than this (bytes, all replicas) are back-propagated and updated in
#: row blocks of about ``_BLOCK_BYTES`` per replica, so that the update (and the column norms)
#: read each block while the backward pass has just brought it into cache.
_BLOCKED_BYTES = 4 << 20
_BLOCK_BYTES = 1 << 20


def activation_backward(
    activation: str, grad: torch.Tensor, h: torch.Tensor, z: torch.Tensor | None
) -> torch.Tensor:
    """``grad ⊙ act'(z)`` from the output ``h = act(z)`` (or ``z`` for elu and swish), with the
    kernels autograd uses."""
    if activation == "relu":
        return torch.ops.aten.threshold_backward(grad, h, 0)
    if activation == "tanh":
        return torch.ops.aten.tanh_backward(grad, h)
    if activation == "sigmoid":
        return torch.ops.aten.sigmoid_backward(grad, h)
    if activation == "leaky_relu":  # the sign of h is the sign of z
        return torch.ops.aten.leaky_relu_backward(grad, h, 0.01, True)
    if z is None:
        raise ValueError(f"the {activation} backward needs the pre-activations")
    if activation == "elu":
        return torch.ops.aten.elu_backward(grad, 1.0, 1, 1, False, z)
    if activation == "swish":
        return torch.ops.aten.silu_backward(grad, z)
    raise ConfigError(f"no backward for activation {activation!r}")


@dataclass(frozen=True)
class Layer:
    """One linear layer of the MLP.

    Attributes:
        name: ``hidden1`` … ``hiddenN`` or ``output``; params are ``{name}.weight``/``.bias``.
        fan_in: inputs per unit.
        fan_out: units.
        next: the name of the layer that reads this one's units (None for the output layer).
        activation: the nonlinearity after this layer (``linear`` for the output layer).
    """

    name: str
    fan_in: int
    fan_out: int
    next: str | None
    activation: str


def init_bounds(init: str, layer: Layer) -> tuple[float, float]:
    """Half-widths of the uniform distributions of a layer's weights and biases.

    ``kaiming_uniform``: weights U(±gain·√(3/fan_in)), biases 0; ``lecun_uniform``: U(±√(3/fan_in)),
    biases 0; ``xavier_uniform``: U(±gain·√(6/(fan_in+fan_out))), biases 0; ``torch_default``: as
    ``torch.nn.Linear``, weights and biases U(±1/√fan_in).
    """
    gain = GAINS[layer.activation]
    if init == "kaiming_uniform":
        return gain * math.sqrt(3.0 / layer.fan_in), 0.0
    if init == "lecun_uniform":
        return math.sqrt(3.0 / layer.fan_in), 0.0
    if init == "xavier_uniform":
        return gain * math.sqrt(6.0 / (layer.fan_in + layer.fan_out)), 0.0
    if init == "torch_default":
        bound = 1.0 / math.sqrt(layer.fan_in)
        return bound, bound
    raise ConfigError(f"unknown init {init!r}; choose one of {', '.join(INITS)}")


def draw_initial_params(
    params: dict[str, torch.Tensor],
    layers: Sequence[Layer],
    generators: Sequence[torch.Generator],
    sample_init: Callable[[str, int, torch.Generator], tuple[torch.Tensor, torch.Tensor]],
) -> None:
    """Fill each layer's ``<name>.weight`` and ``<name>.bias`` of ``params`` (leading replica
    dim) with ``sample_init(name, fan_out, generator)``, replica by replica and layer by layer
    in that order, so that replica r's numbers depend on its own generator (its seed) only."""
    for r, gen in enumerate(generators):
        for layer in layers:
            w, b = sample_init(layer.name, layer.fan_out, gen)
            params[f"{layer.name}.weight"][r] = w
            params[f"{layer.name}.bias"][r] = b


def sample_layer_init(
    init: str, layer: Layer, rows: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``rows`` fresh incoming weights ``(rows, fan_in)`` and biases ``(rows,)`` of ``layer``
    from init ``init``'s uniform distributions (:func:`init_bounds`), weights drawn first."""
    w_bound, b_bound = init_bounds(init, layer)
    w = torch.empty(rows, layer.fan_in).uniform_(-w_bound, w_bound, generator=generator)
    b = torch.zeros(rows)
    if b_bound:
        b.uniform_(-b_bound, b_bound, generator=generator)
    return w, b


class BatchedMLP:
    """R replicas of ``in_dim → hidden… → out_dim`` (see the module docstring).

    Args:
        in_dim: input features.
        hidden: hidden widths, e.g. ``(100, 100, 100)``.
        out_dim: outputs.
        activation: a key of :data:`ACTIVATIONS`.
        init: one of :data:`INITS`.
        generators: one torch Generator per replica (R = len(generators)).
        layer_norm: layer norm before each hidden activation, with parameters
            ``<layer>.ln_weight``/``.ln_bias`` ``(R, H)``
            (:mod:`~contlearn.agents.network_options`).

    ``activation`` may also be ``crelu`` or ``fourier`` (two features per unit: the next layer's
    fan-in is twice the width). Under those and ``layer_norm``, :meth:`backward` hands over to
    :func:`~contlearn.agents.network_backward.backward_with_options`; the fused
    :meth:`backward_update_` refuses them.
    """

    def __init__(
        self,
        in_dim: int,
        hidden: Sequence[int],
        out_dim: int,
        activation: str,
        init: str,
        generators: Sequence[torch.Generator],
        layer_norm: bool = False,
    ) -> None:
        acts = {**ACTIVATIONS, **CONCAT_ACTIVATIONS}
        if activation not in acts:
            raise ConfigError(f"unknown activation {activation!r}; choose one of {', '.join(acts)}")
        self.activation = activation
        self.act_fn = acts[activation]
        self.layer_norm = layer_norm
        #: whether an option the hand-written backward lacks is on (layer norm, crelu, fourier)
        self.autograd_only = layer_norm or activation in CONCAT_ACTIVATIONS
        self.init = init
        self.num_replicas = len(generators)
        per = features_per_unit(activation)
        widths = [in_dim, *hidden, out_dim]
        names = [f"hidden{i + 1}" for i in range(len(hidden))] + ["output"]
        self.layers = [
            Layer(
                names[i],
                widths[i] * (per if i else 1),
                widths[i + 1],
                names[i + 1] if i + 1 < len(names) else None,
                activation if names[i] != "output" else "linear",
            )
            for i in range(len(names))
        ]
        self.by_name = {layer.name: layer for layer in self.layers}
        #: ``{"<layer>.weight": (R, out, in), "<layer>.bias": (R, out)}``
        self.params: dict[str, torch.Tensor] = {}
        for layer in self.layers:
            w = torch.empty(self.num_replicas, layer.fan_out, layer.fan_in)
            b = torch.empty(self.num_replicas, layer.fan_out)
            self.params[f"{layer.name}.weight"] = w
            self.params[f"{layer.name}.bias"] = b
            if layer_norm and layer.next is not None:
                self.params[f"{layer.name}.{LN_WEIGHT}"] = torch.ones(self.num_replicas, b.shape[1])
                self.params[f"{layer.name}.{LN_BIAS}"] = torch.zeros(self.num_replicas, b.shape[1])
        draw_initial_params(self.params, self.layers, generators, self.sample_init)

    @property
    def hidden_layers(self) -> list[Layer]:
        """The hidden layers (those whose units continual backprop and probes look at)."""
        return self.layers[:-1]

    def sample_init(
        self, name: str, rows: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Fresh incoming weights ``(rows, fan_in)`` and biases ``(rows,)`` for layer ``name``,
        from the layer's own init distribution."""
        return sample_layer_init(self.init, self.by_name[name], rows, generator)

    def forward(
        self, x: torch.Tensor, params: dict[str, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Outputs and hidden activations.

        Args:
            x: ``(R, B, in_dim)``.
            params: parameters to use (default: the network's own).

        Returns:
            ``(out (R, B, out_dim), {hidden layer name: activation (R, B, H)})``.
        """
        p = self.params if params is None else params
        features: dict[str, torch.Tensor] = {}
        h = x
        for layer in self.layers:
            z = torch.baddbmm(
                p[f"{layer.name}.bias"].unsqueeze(1), h, p[f"{layer.name}.weight"].transpose(1, 2)
            )
            if layer.next is None:
                return z, features
            if self.layer_norm:
                z = layer_norm(z, p[f"{layer.name}.{LN_WEIGHT}"], p[f"{layer.name}.{LN_BIAS}"])
            h = self.act_fn(z)
            features[layer.name] = h
        raise AssertionError("unreachable: the last layer is the output layer")

    def forward_train(
        self,
        x: torch.Tensor,
        params: dict[str, torch.Tensor] | None = None,
        first: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor] | None]:
        """:meth:`forward` (same kernels, same numbers) keeping what :meth:`backward` needs.

        Args:
            x, params: as for :meth:`forward`.
            first: the first layer's pre-activation ``(R, B, H1)`` if computed already.

        Returns:
            ``(out (R, B, out_dim), hidden activations [(R, B, H)], pre-activations or None)``;
            pre-activations are kept only for activations whose derivative needs them.
        """
        p = self.params if params is None else params
        if self.autograd_only:  # (no backend that passes ``first`` runs these options)
            if first is not None:
                raise ValueError("forward_train(first=...) has no layer norm, crelu or fourier")
            return self._forward_options(x, p)
        keep_pre = self.activation in _NEEDS_PRE
        hs: list[torch.Tensor] = []
        zs: list[torch.Tensor] | None = [] if keep_pre else None
        h = x
        for i, layer in enumerate(self.layers):
            z = (
                first
                if i == 0 and first is not None
                else torch.baddbmm(
                    p[f"{layer.name}.bias"].unsqueeze(1),
                    h,
                    p[f"{layer.name}.weight"].transpose(1, 2),
                )
            )
            if layer.next is None:
                return z, hs, zs
            if zs is not None:
                zs.append(z)
            h = self.act_fn(z)
            hs.append(h)
        raise AssertionError("unreachable: the last layer is the output layer")

    def _forward_options(
        self, x: torch.Tensor, p: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor] | None]:
        """:meth:`forward_train` under layer norm, crelu or fourier: ``zs`` are the raw
        pre-activations (before the norm) with layer norm, else None
        (:mod:`~contlearn.agents.network_backward`)."""
        hs: list[torch.Tensor] = []
        zs: list[torch.Tensor] | None = [] if self.layer_norm else None
        h = x
        for layer in self.layers:
            w, b = p[f"{layer.name}.weight"], p[f"{layer.name}.bias"]
            z = torch.baddbmm(b.unsqueeze(1), h, w.transpose(1, 2))
            if layer.next is None:
                return z, hs, zs
            if zs is not None:
                zs.append(z)
                z = layer_norm(z, p[f"{layer.name}.{LN_WEIGHT}"], p[f"{layer.name}.{LN_BIAS}"])
            h = self.act_fn(z)
            hs.append(h)
        raise AssertionError("unreachable: the last layer is the output layer")

    def _delta_below(
        self, i: int, d: torch.Tensor, hs: list[torch.Tensor], zs: list[torch.Tensor] | None
    ) -> torch.Tensor:
        """δ of hidden layer ``i - 1`` from ``d = δ_i W_i`` (the input gradient of layer i)."""
        if self.autograd_only:
            raise ConfigError("the fused backward has no layer norm, crelu or fourier")
        return activation_backward(self.activation, d, hs[i - 1], None if zs is None else zs[i - 1])

    def backward(
        self,
        delta: torch.Tensor,
        x: torch.Tensor,
        hs: list[torch.Tensor],
        zs: list[torch.Tensor] | None,
        params: dict[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Gradients of a loss whose gradient with respect to the outputs is ``delta``.

        Args:
            delta: ``dL/d out``, ``(R, B, out_dim)``.
            x, hs, zs: the input and what :meth:`forward_train` returned for it.
            params: the parameters the forward pass used (default: the network's own).

        Returns:
            ``{name: gradient}`` in the order of :attr:`params` (weights ``(R, out, in)``).
        """
        p = self.params if params is None else params
        if self.autograd_only:
            from contlearn.agents.network_backward import backward_with_options

            return backward_with_options(self, delta, x, hs, zs, p)
        grads: dict[str, torch.Tensor] = {}
        for i in range(len(self.layers) - 1, -1, -1):
            name = self.layers[i].name
            h_in = x if i == 0 else hs[i - 1]
            grads[f"{name}.weight"] = torch.bmm(delta.transpose(1, 2), h_in)  # (R, out, in)
            grads[f"{name}.bias"] = delta.sum(1)
            if i > 0:
                delta = self._delta_below(i, torch.bmm(delta, p[f"{name}.weight"]), hs, zs)
        return {k: grads[k] for k in p}

    def backward_update_(
        self,
        delta: torch.Tensor,
        x: torch.Tensor,
        hs: list[torch.Tensor],
        zs: list[torch.Tensor] | None,
        alpha: float,
        beta: float,
        col_l1: tuple[str, ...] = (),
        params: dict[str, torch.Tensor] | None = None,
        defer_first: bool = False,
        grad_l1: torch.Tensor | None = None,
        signal: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """Back-propagate ``delta`` and apply ``θ ← (1 + β) θ + α g`` to every parameter in
        place, layer by layer from the output (each layer's δ below is taken with its weights
        before their update), without materialising the gradients g.

        Args:
            delta, x, hs, zs: as for :meth:`backward`.
            alpha, beta: the coefficients (SGD: ``alpha = −lr``, ``beta = 0``).
            col_l1: weights whose column L1 norms ``Σ_k |W[k, i]|`` after the update to return.
            params: the tensors to update (default: the network's own; pass detached views if
                they require grad).
            defer_first: leave the first layer's weights alone and return their δ instead (the
                caller applies the update later, e.g. with the next forward pass).
            grad_l1: ``(R, layers)`` float64 or None: adds each layer's ``‖g‖₁`` (weights and
                bias, :func:`gradient_l1`) to it.
            signal: a credit rule's error sent down, ``signal(i, δ_i)`` (called before layer
                i's update) instead of ``δ_i W_i`` (None: backprop).

        Returns:
            ``({weight name: (R, in)} for the names in col_l1, the first layer's δ or None)``.
        """
        p = self.params if params is None else params
        cols: dict[str, torch.Tensor] = {}
        for i in range(len(self.layers) - 1, -1, -1):
            name = self.layers[i].name
            w, b = p[f"{name}.weight"], p[f"{name}.bias"]
            want = f"{name}.weight" in col_l1
            if grad_l1 is not None:
                grad_l1[:, i] += gradient_l1(delta, x if i == 0 else hs[i - 1])
            sent = signal(i, delta) if signal is not None and i > 0 else None
            if i > 0 or not defer_first:
                below, col = _update_weight_(
                    w,
                    delta,
                    x if i == 0 else hs[i - 1],
                    alpha,
                    beta,
                    need_below=i > 0 and sent is None,
                    want_col=want,
                )
                below = below if sent is None else sent
                if want:
                    assert col is not None  # want_col=want
                    cols[f"{name}.weight"] = col
            if beta:
                b.mul_(1.0 + beta)
            b.add_(delta[:, 0] if delta.shape[1] == 1 else delta.sum(1), alpha=alpha)
            if i > 0:
                assert below is not None  # need_below=i > 0 above
                delta = self._delta_below(i, below, hs, zs)
        return cols, (delta if defer_first else None)


def gradient_l1(delta: torch.Tensor, h_in: torch.Tensor) -> torch.Tensor:
    """``‖δᵀ h_in‖₁ + ‖Σ_b δ_b‖₁`` per replica, float64 ``(R,)``: the L1 norm of a layer's
    weight and bias gradients from its ``δ (R, B, K)`` and input ``(R, B, H)``. For one example
    the weight gradient is an outer product, whose L1 norm is ``‖δ‖₁ ‖h_in‖₁``: no product is
    formed."""
    if delta.shape[1] == 1:
        d = delta[:, 0].abs().to(torch.float64).sum(-1)
        return d * (h_in[:, 0].abs().to(torch.float64).sum(-1) + 1.0)
    weight = torch.bmm(delta.transpose(1, 2), h_in).abs().to(torch.float64).sum((1, 2))
    return weight + delta.sum(1).abs().to(torch.float64).sum(-1)


def _update_weight_(
    w: torch.Tensor,
    delta: torch.Tensor,
    h_in: torch.Tensor,
    alpha: float,
    beta: float,
    need_below: bool,
    want_col: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``w ← (1 + β) w + α δᵀ h_in`` in place for ``w (R, K, H)``; returns ``δ w`` taken before
    the update ``(R, B, H)`` (if ``need_below``) and ``Σ_k |w[k, :]|`` after it ``(R, H)`` (if
    ``want_col``). One pass of the compiled kernel (:mod:`contlearn.backends.kernels`) when it
    applies; else torch ops, large matrices in row blocks that stay in cache between reads."""
    if kernels.applies(w, delta, h_in):
        return kernels.layer_update_(w, delta, h_in, alpha, beta, need_below, want_col)
    R, K, H = w.shape
    dt = delta.transpose(1, 2)  # (R, K, B)
    if w.numel() * w.element_size() <= _BLOCKED_BYTES or not (need_below or want_col):
        below = torch.bmm(delta, w) if need_below else None
        w.baddbmm_(dt, h_in, beta=1.0 + beta, alpha=alpha)
        return below, (w.abs().sum(1) if want_col else None)
    rows = max(8, _BLOCK_BYTES // (H * w.element_size()))  # per replica: independent of R
    below = delta.new_zeros(R, delta.shape[1], H) if need_below else None
    col = w.new_zeros(R, H) if want_col else None
    scratch = w.new_empty(R, min(rows, K), H) if want_col else None
    for start in range(0, K, rows):
        wb = w[:, start : start + rows]  # (R, rows, H)
        if below is not None:
            below.baddbmm_(delta[:, :, start : start + rows], wb)
        wb.baddbmm_(dt[:, start : start + rows], h_in, beta=1.0 + beta, alpha=alpha)
        if col is not None and scratch is not None:
            col.add_(torch.abs(wb, out=scratch[:, : wb.shape[1]]).sum(1))
    return below, col
