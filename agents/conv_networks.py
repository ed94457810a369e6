"""Replica-batched convolutional networks: R seeds of one conv net run as one model.

``network=convnet`` is the small conv net of Dohare et al. (Nature 2024) for Continual ImageNet
(the reference code's ``lop/nets/conv_net.py``)::

    conv1 C→32, 5×5 · ReLU · max-pool 2×2
    conv2 32→64, 3×3 · ReLU · max-pool 2×2
    conv3 64→128, 3×3 · ReLU · max-pool 2×2
    fc1  128·S→128 · ReLU      (S: positions left after conv3's pool; 2×2 at 32×32 inputs)
    fc2  128→128 · ReLU
    output 128→classes

Convolutions have stride 1 and no padding, as in the reference. Parameters are a dict of named
tensors with a leading replica dim, in the layout the learner transforms read (the same as
:mod:`contlearn.learners.module_layers` presents a user's ``nn.Conv2d``): a unit is an output
channel,

- ``conv<j>.weight`` ``(R, out, in, kh·kw)``: channel i's incoming filter is row ``[:, i]``, and
  the outgoing weights of channel j of the conv below are the slice ``[:, :, j]``;
- ``fc1.weight`` ``(R, out, C, S)`` (``(R, out, C)`` when S = 1): conv3's channel j feeds the S
  columns ``[:, :, j]`` (``torch.flatten``'s channel-major order of ``(C, H, W)``);
- ``fc2.weight``, ``output.weight`` ``(R, out, in)``; biases ``(R, out)``.

The fully connected layers run the R replicas as one ``baddbmm``. The convs run either as
grouped convolutions (``replica_convs="grouped"``: the R replicas' inputs stacked along the
channel dim, ``(B, R·C, H, W)``, each conv one ``conv2d(groups=R)`` with the R filter banks
stacked as ``(R·out, in, kh, kw)``) or one ``conv2d`` per replica (``"loop"``); by default
``loop`` on the CPU, where it measured faster than grouped convs and than ``torch.func.vmap``
over stacked parameters (:meth:`BatchedConvNet.forward_vmap`), and ``grouped`` on CUDA. All
three compute the same (tested); figures in docs/conv_networks.md (``scripts/bench_conv.py``).

Activations (what learners and probes read) are those after each hidden layer's pool (the
reference returns the pooled maps, ``x1, x2, x3``): :meth:`BatchedConvNet.forward` hands the
learner a conv layer's ``(R, B·h·w, C)`` (every position a sample, so a channel's means are over
the batch and the positions: the reference's ``mean`` over dims ``(0, 2, 3)``), and
:meth:`BatchedConvNet.forward_train` hands probes the spatial mean ``(R, B, C)`` of each
channel (docs/conv_networks.md, "Probes").
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from contlearn.agents.networks import ACTIVATIONS, Layer, draw_initial_params, sample_layer_init
from contlearn.errors import ConfigError

if TYPE_CHECKING:
    from contlearn.agents.resnet import BatchedResNet18
    from contlearn.envs.base import StreamInfo

#: the network families a conv agent builds (``network=`` of the online agent)
CONV_NETWORKS = ("convnet", "resnet18")
#: every value of the online agent's ``network`` option
NETWORKS = ("mlp", *CONV_NETWORKS)


@dataclass(frozen=True)
class ConvLayer:
    """One conv layer: ``in_ch → out_ch`` channels, a ``kernel × kernel`` filter, stride 1, no
    padding, then the activation and a ``pool × pool`` max-pool (1: none)."""

    name: str
    in_ch: int
    out_ch: int
    kernel: int
    pool: int


def convnet_layers(in_ch: int) -> list[ConvLayer]:
    """The paper's three conv layers (``lop/nets/conv_net.py``) for ``in_ch`` input channels."""
    return [
        ConvLayer("conv1", in_ch, 32, 5, 2),
        ConvLayer("conv2", 32, 64, 3, 2),
        ConvLayer("conv3", 64, 128, 3, 2),
    ]


def conv_output_size(size: int, layers: Sequence[ConvLayer]) -> int:
    """The side left after ``layers`` from an input side ``size`` (0: too small)."""
    for c in layers:
        size = max(0, size - c.kernel + 1) // c.pool
    return size


def image_shape(input_shape: Sequence[int], network: str) -> tuple[int, int, int]:
    """``input_shape`` as ``(C, H, W)``, or a :class:`ConfigError` naming the problem."""
    if len(input_shape) != 3:
        raise ConfigError(
            f"network={network} reads images (C, H, W), and this stream's input_shape is "
            f"{tuple(input_shape)}; use network=mlp or an image stream (e.g. continual-imagenet)"
        )
    c, h, w = (int(d) for d in input_shape)
    return c, h, w


class BatchedConvNet:
    """R replicas of the paper's conv net (see the module docstring).

    Args:
        input_shape: ``(C, H, W)`` of one example.
        out_dim: outputs (classes).
        activation: a key of :data:`~contlearn.agents.networks.ACTIVATIONS` (paper: relu).
        init: one of :data:`~contlearn.agents.networks.INITS` (the reference's nn.Module
            default is ``torch_default``); fan-in of a conv unit is ``in·kh·kw``.
        generators: one torch Generator per replica (R = len(generators)).
        network: the family name (``convnet``), for messages and ``StepConfig``.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        out_dim: int,
        activation: str,
        init: str,
        generators: Sequence[torch.Generator],
        network: str = "convnet",
    ) -> None:
        if activation not in ACTIVATIONS:
            raise ConfigError(
                f"network={network} takes an element-wise activation "
                f"({', '.join(ACTIVATIONS)}), not {activation!r}"
            )
        c, h, w = image_shape(input_shape, network)
        self.family = network
        self.input_shape = (c, h, w)
        self.activation = activation
        self.act_fn = ACTIVATIONS[activation]
        self.init = init
        self.num_replicas = len(generators)
        #: how replicas' convs run: ``grouped`` (one ``conv2d(groups=R)``), ``loop`` (one
        #: ``conv2d`` per replica), or None: ``loop`` on the CPU, where it measured faster
        #: (``scripts/bench_conv.py``), ``grouped`` on CUDA (one kernel per layer)
        self.replica_convs: str | None = None
        self.convs = convnet_layers(c)
        sh, sw = conv_output_size(h, self.convs), conv_output_size(w, self.convs)
        if sh < 1 or sw < 1:
            raise ConfigError(
                f"network={network} needs images of at least {_min_side(self.convs)}×"
                f"{_min_side(self.convs)} pixels, and this stream's are {h}×{w}; use "
                "network=mlp or larger images"
            )
        self.positions = sh * sw
        last = self.convs[-1].out_ch
        widths = [(last * self.positions, 128), (128, 128), (128, out_dim)]
        fc_names = ["fc1", "fc2", "output"]
        names = [cv.name for cv in self.convs] + fc_names
        fans = [cv.in_ch * cv.kernel**2 for cv in self.convs] + [a for a, _ in widths]
        outs = [cv.out_ch for cv in self.convs] + [b for _, b in widths]
        self.layers = [
            Layer(
                n,
                fans[i],
                outs[i],
                names[i + 1] if i + 1 < len(names) else None,
                activation if n != "output" else "linear",
            )
            for i, n in enumerate(names)
        ]
        self.by_name = {layer.name: layer for layer in self.layers}
        #: each layer's weight shape without R (the learner's layout, module docstring)
        self.shapes: dict[str, tuple[int, ...]] = {
            cv.name: (cv.out_ch, cv.in_ch, cv.kernel**2) for cv in self.convs
        }
        fc1_in = (last, self.positions) if self.positions > 1 else (last,)
        self.shapes["fc1"] = (128, *fc1_in)
        self.shapes["fc2"] = (128, 128)
        self.shapes["output"] = (out_dim, 128)
        R = self.num_replicas
        self.params: dict[str, torch.Tensor] = {}
        for layer in self.layers:
            self.params[f"{layer.name}.weight"] = torch.empty(R, *self.shapes[layer.name])
            self.params[f"{layer.name}.bias"] = torch.empty(R, layer.fan_out)
        draw_initial_params(self.params, self.layers, generators, self.sample_init)

    @property
    def hidden_layers(self) -> list[Layer]:
        """The layers whose units (channels, or fc units) learners and probes look at."""
        return self.layers[:-1]

    def sample_init(
        self, name: str, rows: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Fresh incoming weights ``(rows, *shape[1:])`` (a conv channel's whole filter) and
        biases ``(rows,)`` of layer ``name`` from its init distribution, weights drawn first."""
        w, b = sample_layer_init(self.init, self.by_name[name], rows, generator)
        return w.reshape(rows, *self.shapes[name][1:]), b

    def _images(self, x: torch.Tensor) -> torch.Tensor:
        """``(R, B, D)`` or ``(R, B, C, H, W)`` inputs as ``(B, R·C, H, W)``."""
        R, B = x.shape[:2]
        c, h, w = self.input_shape
        return x.reshape(R, B, c, h, w).transpose(0, 1).reshape(B, R * c, h, w)

    def _run(
        self, x: torch.Tensor, p: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The forward pass: outputs ``(R, B, out)`` and each hidden layer's activation, a conv
        layer's as ``(B, R, C, h, w)`` maps, an fc layer's as ``(R, B, H)``."""
        R, B = x.shape[:2]
        mode = self.replica_convs or ("grouped" if x.is_cuda else "loop")
        acts = self._convs_grouped(x, p) if mode == "grouped" else self._convs_loop(x, p)
        h = acts[-1].reshape(B, R, -1).transpose(0, 1)  # (R, B, C·S), channel-major
        for layer in self.layers[len(self.convs) :]:
            w = p[f"{layer.name}.weight"].reshape(R, layer.fan_out, layer.fan_in)
            z = torch.baddbmm(p[f"{layer.name}.bias"].unsqueeze(1), h, w.transpose(1, 2))
            if layer.next is None:
                return z, acts
            h = self.act_fn(z)
            acts.append(h)
        raise AssertionError("unreachable: the last layer is the output layer")

    def _convs_grouped(self, x: torch.Tensor, p: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """The conv layers as ``conv2d(groups=R)`` on ``(B, R·C, H, W)``; maps ``(B, R, C, h,
        w)``."""
        R, B = x.shape[:2]
        a = self._images(x)  # (B, R·C, H, W)
        acts: list[torch.Tensor] = []
        for cv in self.convs:
            w = p[f"{cv.name}.weight"].reshape(R * cv.out_ch, cv.in_ch, cv.kernel, cv.kernel)
            a = self.act_fn(F.conv2d(a, w, p[f"{cv.name}.bias"].reshape(-1), groups=R))
            if cv.pool > 1:
                a = F.max_pool2d(a, cv.pool)
            acts.append(a.view(B, R, cv.out_ch, *a.shape[-2:]))
        return acts

    def _convs_loop(self, x: torch.Tensor, p: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """The conv layers replica by replica (one ``conv2d`` each), stacked to ``(B, R, C, h,
        w)`` after each layer."""
        R, B = x.shape[:2]
        per = list(x.reshape(R, B, *self.input_shape).unbind(0))  # R × (B, C, H, W)
        acts: list[torch.Tensor] = []
        for cv in self.convs:
            # unbind, not w[r]: indexing's backward writes a whole-size zero gradient per replica
            w = p[f"{cv.name}.weight"].reshape(R, cv.out_ch, cv.in_ch, cv.kernel, cv.kernel)
            pairs = zip(per, w.unbind(0), p[f"{cv.name}.bias"].unbind(0), strict=True)
            per = [self.act_fn(F.conv2d(a, wr, br)) for a, wr, br in pairs]
            if cv.pool > 1:
                per = [F.max_pool2d(a, cv.pool) for a in per]
            acts.append(torch.stack(per, 1))
        return acts

    def forward(
        self, x: torch.Tensor, params: dict[str, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Outputs and the activations learners read.

        Args:
            x: ``(R, B, D)`` (flattened images) or ``(R, B, C, H, W)``.
            params: parameters to use (default: the network's own).

        Returns:
            ``(out (R, B, out_dim), {layer: activation})``: a conv layer's ``(R, B·h·w, C)``
            (every position of its pooled map a sample), an fc layer's ``(R, B, H)``.
        """
        out, acts = self._run(x, self.params if params is None else params)
        feats: dict[str, torch.Tensor] = {}
        for layer, a in zip(self.hidden_layers, acts, strict=True):
            if a.dim() == 5:  # (B, R, C, h, w) → (R, B·h·w, C)
                a = a.permute(1, 0, 3, 4, 2).reshape(a.shape[1], -1, a.shape[2])
            feats[layer.name] = a
        return out, feats

    def forward_train(
        self, x: torch.Tensor, params: dict[str, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor], None]:
        """Outputs and what probes read: ``(out (R, B, out_dim), [(R, B, units)], None)``, a
        conv channel's activation on an example being the mean over the positions of its pooled
        map (the ``(P × channels)`` matrix of the rank probes)."""
        out, acts = self._run(x, self.params if params is None else params)
        pooled = [a.mean((-2, -1)).transpose(0, 1) if a.dim() == 5 else a for a in acts]
        return out, pooled, None

    def forward_vmap(self, x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """The outputs ``(R, B, out_dim)`` by ``torch.func.vmap`` of one replica's forward pass
        over the stacked parameters (the alternative to grouped convolutions; the benchmark
        and a test compare them)."""

        def one(p: dict[str, torch.Tensor], xr: torch.Tensor) -> torch.Tensor:
            a = xr.reshape(xr.shape[0], *self.input_shape)
            for cv in self.convs:
                w = p[f"{cv.name}.weight"].reshape(cv.out_ch, cv.in_ch, cv.kernel, cv.kernel)
                a = self.act_fn(F.conv2d(a, w, p[f"{cv.name}.bias"]))
                a = F.max_pool2d(a, cv.pool) if cv.pool > 1 else a
            h = a.reshape(a.shape[0], -1)
            for layer in self.layers[len(self.convs) :]:
                w = p[f"{layer.name}.weight"].reshape(layer.fan_out, layer.fan_in)
                h = F.linear(h, w, p[f"{layer.name}.bias"])
                h = h if layer.next is None else self.act_fn(h)
            return h

        return torch.func.vmap(one)(params, x)


def _min_side(layers: Sequence[ConvLayer]) -> int:
    """The smallest input side that leaves one position after ``layers``."""
    side = 1
    for c in reversed(layers):
        side = side * c.pool + c.kernel - 1
    return side


def build_network(
    network: str,
    input_shape: Sequence[int],
    out_dim: int,
    activation: str,
    init: str,
    generators: Sequence[torch.Generator],
    batch_size: int = 1,
) -> BatchedConvNet | BatchedResNet18:
    """The conv network ``network`` (one of :data:`CONV_NETWORKS`) for steps of
    ``batch_size`` examples."""
    if network == "convnet":
        return BatchedConvNet(input_shape, out_dim, activation, init, generators, network)
    if network == "resnet18":
        from contlearn.agents.resnet import BatchedResNet18

        return BatchedResNet18(input_shape, out_dim, activation, init, generators, batch_size)
    raise ConfigError(f"unknown network {network!r}; choose one of {', '.join(NETWORKS)}")


def network_for(
    spec: Any, info: StreamInfo, generators: Sequence[torch.Generator]
) -> BatchedConvNet | BatchedResNet18:
    """The online agent's conv network for its options ``spec`` (``network``, ``activation``,
    ``init``) on the stream ``info``."""
    return build_network(
        spec.network,
        info.input_shape,
        info.num_outputs,
        spec.activation,
        spec.init,
        generators,
        info.batch_size,
    )


def parameter_count(net: BatchedConvNet | BatchedResNet18) -> int:
    """Parameters of one replica."""
    return sum(math.prod(v.shape[1:]) for v in net.params.values())
