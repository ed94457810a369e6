"""The MLP that carries plasticity injection's multi-layer head (Nikishin et al. 2023, "Deep
reinforcement learning with plasticity injection"; docs/learners.md).

The last ``k`` layers of the MLP (``k − 1`` hidden layers and the output layer) are the
*head*; the layers before it the *trunk*. Besides its own head θ the network carries two more
copies of it, of the same shapes: θ′₁ (parameters ``inject.<layer>.weight``/``.bias``, the
trained copy) and θ′₂ (``inject_frozen.<layer>.…``, the frozen copy). The output is

    f(x) = h(z; θ) + (h(z; θ′₁) − h(z; θ′₂)),   z = the trunk's features of x,

the difference taken first, so that where θ′₁ = θ′₂ it is exactly 0 and the output exactly
h(z; θ). Both copies start at 0 (all their units output 0 after a zero output layer), so until
the injection the network computes the plain MLP's outputs to the bit. The learner
(:func:`contlearn.learners.head_injection.head_injection`) freezes θ′₁ and θ′₂ until the
injection; at it, it draws one fresh head from the layers' init into both copies and from then
on freezes θ and θ′₂ and trains θ′₁ (the trunk learns throughout, through all three heads).

``features`` (what the probes read) reports the hidden units that learn: the head's units
of θ until the injection, the trained copy θ′₁'s after it (θ's are frozen then), under the
plain MLP's layer names (the network's ``layers`` are the plain MLP's). No fast
backend computes this network (its structural option ``injection_head`` is declared by none),
so it runs the autograd reference.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from contlearn.agents.networks import BatchedMLP
from contlearn.errors import ConfigError

#: parameter-name prefixes of the trained copy θ′₁ and the frozen copy θ′₂ of the head
TRAINED, FROZEN = "inject.", "inject_frozen."


class InjectedHeadMLP(BatchedMLP):
    """A :class:`~contlearn.agents.networks.BatchedMLP` with plasticity injection's two head
    copies (module docstring).

    Args:
        in_dim, hidden, out_dim, activation, init, generators: as for ``BatchedMLP`` (the
            network's own parameters are drawn exactly as the plain MLP's).
        head_layers: k, the layers of the head (1: the output layer; 2: the last hidden layer
            and the output layer; at most ``len(hidden) + 1``).
    """

    #: marks the network to the learner and the backends
    injected_head = True

    def __init__(
        self,
        in_dim: int,
        hidden: Sequence[int],
        out_dim: int,
        activation: str,
        init: str,
        generators: Sequence[torch.Generator],
        head_layers: int,
    ) -> None:
        super().__init__(in_dim, hidden, out_dim, activation, init, generators)
        if not 1 <= head_layers <= len(self.layers):
            raise ConfigError(
                f"head_layers={head_layers} is out of range: the network has {len(self.layers)} "
                f"layers ({len(hidden)} hidden and the output layer); choose 1 to "
                f"{len(self.layers)}"
            )
        self.autograd_only = True
        #: names of the head's layers, first to last
        self.head = [layer.name for layer in self.layers[-head_layers:]]
        self._trunk = self.layers[: len(self.layers) - head_layers]
        for prefix in (TRAINED, FROZEN):
            for name in self.head:
                for part in ("weight", "bias"):
                    own = self.params[f"{name}.{part}"]
                    self.params[f"{prefix}{name}.{part}"] = torch.zeros_like(own)

    def copy_keys(self, prefix: str) -> list[str]:
        """The parameter names of one head copy: ``""`` (θ), :data:`TRAINED` or :data:`FROZEN`."""
        return [f"{prefix}{name}.{part}" for name in self.head for part in ("weight", "bias")]

    def _head(
        self, z: torch.Tensor, p: dict[str, torch.Tensor], prefix: str
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """One copy of the head on the trunk's features ``z``: its output and hidden units."""
        hs: list[torch.Tensor] = []
        h = z
        for name in self.head:
            w, b = p[f"{prefix}{name}.weight"], p[f"{prefix}{name}.bias"]
            h = torch.baddbmm(b.unsqueeze(1), h, w.transpose(1, 2))
            if name != "output":
                h = self.act_fn(h)
                hs.append(h)
        return h, hs

    def forward(
        self, x: torch.Tensor, params: dict[str, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Outputs ``h(z; θ) + (h(z; θ′₁) − h(z; θ′₂))`` and θ's hidden activations (as
        :meth:`BatchedMLP.forward`)."""
        p = self.params if params is None else params
        features: dict[str, torch.Tensor] = {}
        h = x
        for layer in self._trunk:
            w, b = p[f"{layer.name}.weight"], p[f"{layer.name}.bias"]
            h = self.act_fn(torch.baddbmm(b.unsqueeze(1), h, w.transpose(1, 2)))
            features[layer.name] = h
        out, hs = self._head(h, p, "")
        trained, trained_hs = self._head(h, p, TRAINED)
        frozen, _ = self._head(h, p, FROZEN)
        live = trained_hs if self.injected(p) else hs
        features.update(zip(self.head, live, strict=False))
        return out + (trained - frozen), features

    def injected(self, params: dict[str, torch.Tensor] | None = None) -> bool:
        """Whether the head has been injected: the frozen copy holds a fresh draw (it is 0
        until the injection and never changes after it)."""
        p = self.params if params is None else params
        return bool(p[f"{FROZEN}output.weight"].detach().any())

    def forward_train(
        self,
        x: torch.Tensor,
        params: dict[str, torch.Tensor] | None = None,
        first: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor] | None]:
        """:meth:`forward` in ``forward_train``'s shape (what the probes read); no
        hand-written backward runs this network, so no pre-activations are kept."""
        if first is not None:
            raise ValueError("forward_train(first=...) has no injected head")
        out, features = self.forward(x, params)
        return out, [features[layer.name] for layer in self.hidden_layers], None
