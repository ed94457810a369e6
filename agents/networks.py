"""Replica-batched MLPs: R independent networks of one architecture run as one model.

Parameters are a dict of named tensors with a leading replica dim::

    hidden1.weight (R, H1, D)   hidden1.bias (R, H1)
    ...
    output.weight  (R, C, Hn)   output.bias  (R, C)

Each replica's initial weights come from its own torch Generator, so replica r of a batch is
initialised exactly as the same seed run alone. Each layer keeps its init distribution so that
resets (continual backprop, ReDo) redraw units from it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

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
GAINS = {"relu": math.sqrt(2.0), "tanh": 5.0 / 3.0, "sigmoid": 1.0,
         "leaky_relu": math.sqrt(2.0 / (1 + 0.01**2)), "elu": math.sqrt(2.0),
         "swish": math.sqrt(2.0), "linear": 1.0}
INITS = ("kaiming_uniform", "lecun_uniform", "xavier_uniform", "torch_default")


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


class BatchedMLP:
    """R replicas of ``in_dim → hidden… → out_dim`` (see the module docstring).

    Args:
        in_dim: input features.
        hidden: hidden widths, e.g. ``(100, 100, 100)``.
        out_dim: outputs.
        activation: a key of :data:`ACTIVATIONS`.
        init: one of :data:`INITS`.
        generators: one torch Generator per replica (R = len(generators)).
    """

    def __init__(self, in_dim: int, hidden: Sequence[int], out_dim: int, activation: str,
                 init: str, generators: Sequence[torch.Generator]) -> None:
        if activation not in ACTIVATIONS:
            raise ConfigError(
                f"unknown activation {activation!r}; choose one of {', '.join(ACTIVATIONS)}"
            )
        self.activation = activation
        self.act_fn = ACTIVATIONS[activation]
        self.init = init
        self.num_replicas = len(generators)
        widths = [in_dim, *hidden, out_dim]
        names = [f"hidden{i + 1}" for i in range(len(hidden))] + ["output"]
        self.layers = [
            Layer(names[i], widths[i], widths[i + 1], names[i + 1] if i + 1 < len(names) else None,
                  activation if names[i] != "output" else "linear")
            for i in range(len(names))
        ]
        self.by_name = {layer.name: layer for layer in self.layers}
        self.params: dict[str, torch.Tensor] = {}
        for layer in self.layers:
            w = torch.empty(self.num_replicas, layer.fan_out, layer.fan_in)
            b = torch.empty(self.num_replicas, layer.fan_out)
            self.params[f"{layer.name}.weight"] = w
            self.params[f"{layer.name}.bias"] = b
        # Draw replica by replica, layer by layer, so replica r's numbers depend on its seed only.
        for r, gen in enumerate(generators):
            for layer in self.layers:
                w, b = self.sample_init(layer.name, layer.fan_out, gen)
                self.params[f"{layer.name}.weight"][r] = w
                self.params[f"{layer.name}.bias"][r] = b

    @property
    def hidden_layers(self) -> list[Layer]:
        """The hidden layers (those whose units continual backprop and probes look at)."""
        return self.layers[:-1]

    def sample_init(self, name: str, rows: int, generator: torch.Generator
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Fresh incoming weights ``(rows, fan_in)`` and biases ``(rows,)`` for layer ``name``,
        from the layer's own init distribution."""
        layer = self.by_name[name]
        w_bound, b_bound = init_bounds(self.init, layer)
        w = torch.empty(rows, layer.fan_in).uniform_(-w_bound, w_bound, generator=generator)
        b = torch.zeros(rows)
        if b_bound:
            b.uniform_(-b_bound, b_bound, generator=generator)
        return w, b

    def forward(self, x: torch.Tensor, params: dict[str, torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Outputs and hidden activations.

        Args:
            x: ``(R, B, in_dim)``.
            params: parameters to use (default: the network's own).

        Returns:
            ``(out (R, B, out_dim), {hidden layer name: activation (R, B, H)})``.
        """
        p = self.params if params is None else params
        features = {}
        h = x
        for layer in self.layers:
            z = torch.baddbmm(p[f"{layer.name}.bias"].unsqueeze(1), h,
                              p[f"{layer.name}.weight"].transpose(1, 2))
            if layer.next is None:
                return z, features
            h = self.act_fn(z)
            features[layer.name] = h
        raise AssertionError("unreachable: the last layer is the output layer")
