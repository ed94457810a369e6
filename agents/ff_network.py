"""The replica-batched network of the Forward-Forward agent (Hinton 2022, "The Forward-Forward
Algorithm: Some Preliminary Investigations", arXiv:2212.13345).

R replicas of ``in_dim → hidden1 → … → hiddenN`` (plus, for ``predict=head``, a linear
readout ``head``), parameters named as :class:`~contlearn.agents.networks.BatchedMLP`'s::

    hidden1.weight (R, H1, D)   hidden1.bias (R, H1)
    ...
    head.weight    (R, C, ΣH)   head.bias    (R, C)        (predict=head only)

Layer l reads the *normalised* activity of layer l − 1 (``rms``: ``h / (√(mean h²) + ε)``, or
``length``: ``h / (‖h‖ + ε)``), detached: no gradient flows between layers; the first layer
reads the normalised embedded input (as the common reference code does), so that with the
default init and θ = width every layer starts with G ≈ θ. Each hidden
layer's goodness is ``G_l = Σ_j h_{l,j}²`` (``sum``) or ``mean_j h_{l,j}²`` (``mean``).
The head reads the concatenated normalised activities of the layers from ``from_layer`` on.

The network exposes what the learners' resets need (``layers``, ``hidden_layers``,
``by_name`` with each layer's ``next`` reader, ``sample_init``), so continual backprop, ReDo
and the regularisers act on it as on the MLP. ``hidden_l.next`` is ``hidden_{l+1}`` (the last
hidden layer has none: the head reads several layers and is not anyone's "next").
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from contlearn.agents.networks import ACTIVATIONS, Layer, draw_initial_params, sample_layer_init
from contlearn.errors import ConfigError

NORMS = ("rms", "length")
GOODNESS = ("sum", "mean")
EMBEDS = ("replace", "append")
#: ε of the normalisation (keeps a layer whose units are all silent finite)
NORM_EPS = 1e-8


def normalise(h: torch.Tensor, norm: str) -> torch.Tensor:
    """``h / (‖h‖ + ε)`` (``length``) or ``h / (√(mean_j h_j²) + ε)`` (``rms``) over the last
    dim of ``(R, B, H)``."""
    if norm == "length":
        scale = torch.linalg.vector_norm(h, dim=-1, keepdim=True)
    else:
        scale = h.pow(2).mean(-1, keepdim=True).sqrt()
    return h / (scale + NORM_EPS)


def goodness(h: torch.Tensor, kind: str) -> torch.Tensor:
    """``Σ_j h_j²`` (``sum``) or ``mean_j h_j²`` (``mean``): ``(R, B, H) -> (R, B)``."""
    sq = h.pow(2)
    return sq.sum(-1) if kind == "sum" else sq.mean(-1)


def embed(x: torch.Tensor, labels: torch.Tensor | None, classes: int, mode: str) -> torch.Tensor:
    """The input with a label embedded: ``replace`` sets the first ``classes`` values to the
    one-hot label (Hinton's MNIST setup), ``append`` concatenates it; ``labels=None`` embeds
    the neutral label (``1/classes`` everywhere).

    Args:
        x: ``(R, B, D)``.
        labels: ``(R, B)`` int64, or None.
        classes: C.
        mode: one of :data:`EMBEDS`.

    Returns:
        ``(R, B, D)`` (replace) or ``(R, B, D + C)`` (append).
    """
    R, B = x.shape[:2]
    if labels is None:
        code = x.new_full((R, B, classes), 1.0 / classes)
    else:
        code = x.new_zeros(R, B, classes).scatter_(-1, labels.unsqueeze(-1), 1.0)
    if mode == "append":
        return torch.cat([x, code], -1)
    return torch.cat([code, x[..., classes:]], -1)


def embed_all(x: torch.Tensor, classes: int, mode: str) -> torch.Tensor:
    """Every label embedded into every input, as one batch: ``(R, B, D) -> (R, C·B, D')``
    with row ``c·B + b`` holding input b with label c."""
    R, B = x.shape[:2]
    labels = torch.arange(classes, device=x.device).repeat_interleave(B)  # (C·B,)
    tiled = x.repeat(1, classes, 1)  # (R, C·B, D): label-major
    return embed(tiled, labels.expand(R, -1), classes, mode)


class FFNetwork:
    """R replicas of a Forward-Forward network (see the module docstring).

    Args:
        in_dim: input features after the label embedding.
        hidden: hidden widths.
        activation: a key of :data:`~contlearn.agents.networks.ACTIVATIONS`.
        init: a weight init of :data:`~contlearn.agents.networks.INITS`.
        generators: one torch Generator per replica.
        norm: one of :data:`NORMS`.
        head_classes: outputs of the linear head (0: no head).
        from_layer: the first layer (1-based) the head reads.
    """

    def __init__(
        self,
        in_dim: int,
        hidden: Sequence[int],
        activation: str,
        init: str,
        generators: Sequence[torch.Generator],
        norm: str = "rms",
        head_classes: int = 0,
        from_layer: int = 1,
    ) -> None:
        if activation not in ACTIVATIONS:
            raise ConfigError(
                f"unknown activation {activation!r}; choose one of {', '.join(ACTIVATIONS)}"
            )
        if norm not in NORMS:
            raise ConfigError(f"unknown norm {norm!r}; choose one of {', '.join(NORMS)}")
        self.activation, self.act_fn, self.init, self.norm = (
            activation,
            ACTIVATIONS[activation],
            init,
            norm,
        )
        self.num_replicas = len(generators)
        self.from_layer = from_layer
        widths = [in_dim, *hidden]
        names = [f"hidden{i + 1}" for i in range(len(hidden))]
        self.layers = [
            Layer(names[i], widths[i], widths[i + 1], nxt, activation)
            for i, nxt in enumerate([*names[1:], None])
        ]
        if head_classes:
            read = sum(hidden[from_layer - 1 :])
            self.layers.append(Layer("head", read, head_classes, None, "linear"))
        self.by_name = {layer.name: layer for layer in self.layers}
        self.params: dict[str, torch.Tensor] = {}
        for layer in self.layers:
            self.params[f"{layer.name}.weight"] = torch.empty(
                self.num_replicas, layer.fan_out, layer.fan_in
            )
            self.params[f"{layer.name}.bias"] = torch.empty(self.num_replicas, layer.fan_out)
        draw_initial_params(self.params, self.layers, generators, self.sample_init)

    @property
    def hidden_layers(self) -> list[Layer]:
        """The FF layers (those with a goodness; what resets and probes look at)."""
        return [layer for layer in self.layers if layer.name != "head"]

    @property
    def has_head(self) -> bool:
        """Whether the network has the linear readout ``head``."""
        return "head" in self.by_name

    def sample_init(
        self, name: str, rows: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Fresh incoming weights ``(rows, fan_in)`` and biases ``(rows,)`` for layer ``name``
        from its init distribution (as :meth:`BatchedMLP.sample_init`)."""
        return sample_layer_init(self.init, self.by_name[name], rows, generator)

    def layer_forward(
        self, name: str, x: torch.Tensor, params: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """One layer's pre-activation ``W x + b``: ``(R, B, fan_in) -> (R, B, fan_out)``."""
        w, b = params[f"{name}.weight"], params[f"{name}.bias"]
        return torch.baddbmm(b.unsqueeze(1), x, w.transpose(1, 2))

    @torch.no_grad()
    def activities(self, x: torch.Tensor, params: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Every hidden layer's activity ``h_l (R, B, H_l)`` for embedded inputs ``x``, each
        layer reading the normalised activity of the one below (no learning)."""
        hs: list[torch.Tensor] = []
        h = normalise(x, self.norm)
        for layer in self.hidden_layers:
            a = self.act_fn(self.layer_forward(layer.name, h, params))
            hs.append(a)
            h = normalise(a, self.norm)
        return hs

    @torch.no_grad()
    def label_pass(
        self, x: torch.Tensor, classes: int, mode: str, params: dict[str, torch.Tensor]
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Every hidden layer's ``(z, h)`` on every label embedded into every input, ``(R, C·B,
        H_l)`` each (rows label-major as :func:`embed_all`), the first layer in one product.

        Every embedded input ``x_c`` has the same squared length (the one-hot adds 1 whatever
        c is), so its normalisation scale s is shared, and ``W·x_c/s = (W·x₀ + W[:, c])/s``
        with x₀ the input without its label: one row of products per input instead of C (the
        same numbers as :meth:`activities` on :func:`embed_all`'s batch, to float rounding).

        Args:
            x: ``(R, B, D)`` inputs without a label.
            classes: C.
            mode: the label embedding (one of :data:`EMBEDS`).
            params: the parameters.
        """
        R, B = x.shape[:2]
        first, rest = self.hidden_layers[0], self.hidden_layers[1:]
        w, b = params[f"{first.name}.weight"], params[f"{first.name}.bias"]
        if mode == "append":
            bare = torch.cat([x, x.new_zeros(R, B, classes)], -1)
            code = w[:, :, x.shape[-1] :]  # (R, H, C)
        else:
            bare = x.clone()
            bare[..., :classes] = 0.0
            code = w[:, :, :classes]
        sq = bare.pow(2).sum(-1, keepdim=True) + 1.0  # (R, B, 1): ‖x_c‖² for every c
        scale = sq.sqrt() if self.norm == "length" else (sq / bare.shape[-1]).sqrt()
        inv = (scale + NORM_EPS).reciprocal().unsqueeze(1)  # (R, 1, B, 1)
        base = torch.bmm(bare, w.transpose(1, 2)).unsqueeze(1)  # (R, 1, B, H)
        z = (base + code.transpose(1, 2).unsqueeze(2)) * inv + b[:, None, None, :]
        z = z.reshape(R, classes * B, -1)
        out = [(z, self.act_fn(z))]
        for layer in rest:
            z = self.layer_forward(layer.name, normalise(out[-1][1], self.norm), params)
            out.append((z, self.act_fn(z)))
        return out

    def head_input(self, hs: Sequence[torch.Tensor]) -> torch.Tensor:
        """The head's input: the normalised activities of the layers from ``from_layer`` on,
        concatenated ``(R, B, ΣH)``."""
        return torch.cat([normalise(h, self.norm) for h in hs[self.from_layer - 1 :]], -1)
