"""Replica-batched ResNet-18, the variant Dohare et al. (Nature 2024) train on class-incremental
CIFAR-100 (the reference code's ``lop/nets/torchvision_modified_resnet.py``).

torchvision's ResNet-18 with the reference's changes: every conv has a bias; the stem is a 3×3
conv with stride 1 and padding 1 (not 7×7 stride 2) and has no max-pool::

    stem      conv 3×3 C→64 · BN · ReLU
    layer1-4  two BasicBlocks each, widths 64, 128, 256, 512; the first block of layers 2-4
              has stride 2 and a 1×1 conv + BN downsample on the skip path
    BasicBlock: conv1 3×3 · BN · ReLU · conv2 3×3 · BN, + skip, ReLU
    head      global average pool · fc 512→classes (``output``)

Batch norm (ε = 1e-5, momentum 0.1, as ``nn.BatchNorm2d``) has a gain and offset per channel,
parameters ``<conv>.bn_weight`` and ``<conv>.bn_bias`` ``(R, C)`` (initialised to 1 and 0),
and running statistics ``<conv>.running_mean``/``.running_var`` ``(R, C)`` held in
:attr:`BatchedResNet18.buffers` (not parameters: no learner acts on them; checkpoints save
them). The learning forward pass (:meth:`~BatchedResNet18.forward` without ``params``)
normalises by the batch's statistics and updates the running ones; every other pass (probes,
``outputs``, the plasticity probe's loss) is in evaluation mode, by the running statistics.

Units: the learners and probes look at the **first conv of each BasicBlock** (8 layers,
``layer<s>.<b>.conv1``): its channel i is read by that block's conv2 only, so its incoming
filter, its BN gain/offset/statistics and its outgoing weights ``conv2[:, i]`` are one unit's.
The other channels (stem, each block's conv2, downsample) sum into the residual stream, where
a channel is read by every later block through the skip connections: there is no one set of
outgoing weights to zero, so no unit reset is defined for them (the reference's ``ResGnT``
chains all layers in module order and zeroes only the next conv's slice, ignoring the skip).
Weight-wise learners (L2, L2-Init, shrink-and-perturb, the optimizers) act on every parameter,
BN gains and offsets included.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from contlearn.agents.conv_networks import image_shape
from contlearn.agents.networks import ACTIVATIONS, Layer, draw_initial_params, sample_layer_init
from contlearn.errors import ConfigError

#: suffixes of a conv's batch-norm gain and offset parameters
BN_WEIGHT, BN_BIAS = "bn_weight", "bn_bias"
BN_EPS, BN_MOMENTUM = 1e-5, 0.1
WIDTHS = (64, 128, 256, 512)


@dataclass(frozen=True)
class ResConv:
    """One conv of the ResNet, followed by its batch norm."""

    name: str
    in_ch: int
    out_ch: int
    kernel: int
    stride: int
    padding: int


def resnet18_convs(in_ch: int) -> list[ResConv]:
    """The convs in forward order (stem; per block conv1, conv2, then its downsample)."""
    convs = [ResConv("stem", in_ch, 64, 3, 1, 1)]
    width = 64
    for s, planes in enumerate(WIDTHS, start=1):
        for b in range(2):
            stride = 2 if s > 1 and b == 0 else 1
            p = f"layer{s}.{b}"
            convs.append(ResConv(f"{p}.conv1", width, planes, 3, stride, 1))
            convs.append(ResConv(f"{p}.conv2", planes, planes, 3, 1, 1))
            if stride != 1 or width != planes:
                convs.append(ResConv(f"{p}.downsample", width, planes, 1, stride, 0))
            width = planes
    return convs


class BatchedResNet18:
    """R replicas of the paper's ResNet-18 (see the module docstring).

    Args:
        input_shape: ``(C, H, W)``.
        out_dim: classes.
        activation: element-wise activation (paper: relu).
        init: init distribution of the conv and fc weights (biases 0 under the Kaiming and
            LeCun inits; the reference draws Kaiming-normal weights with fan-in, whose variance
            ``kaiming_uniform`` has).
        generators: one torch Generator per replica.
        batch_size: examples per learning step (batch norm in training mode needs more than
            one value per channel at the last stage).
    """

    family = "resnet18"

    def __init__(
        self,
        input_shape: Sequence[int],
        out_dim: int,
        activation: str,
        init: str,
        generators: Sequence[torch.Generator],
        batch_size: int = 2,
    ) -> None:
        if activation not in ACTIVATIONS:
            raise ConfigError(
                f"network=resnet18 takes an element-wise activation ({', '.join(ACTIVATIONS)}),"
                f" not {activation!r}"
            )
        c, h, w = image_shape(input_shape, "resnet18")
        if min(h, w) < 8:
            raise ConfigError(
                f"network=resnet18 needs images of at least 8×8 pixels (three stride-2 "
                f"stages), and this stream's are {h}×{w}; use network=mlp or larger images"
            )
        last = ((h + 7) // 8) * ((w + 7) // 8)  # positions after the three stride-2 stages
        if batch_size * last < 2:
            raise ConfigError(
                f"network=resnet18 at batch_size={batch_size} on {h}×{w} images leaves one value "
                "per channel at its last stage, where batch norm needs more; use batch_size >= 2 "
                "or images of at least 9×9"
            )
        self.input_shape = (c, h, w)
        self.activation, self.act_fn, self.init = activation, ACTIVATIONS[activation], init
        self.num_replicas = R = len(generators)
        self.convs = resnet18_convs(c)
        self.conv_by_name = {cv.name: cv for cv in self.convs}
        #: who reads each conv's channels as a unit (only a block's conv1 has one reader)
        order = [cv.name for cv in self.convs] + ["output"]
        fans = [cv.in_ch * cv.kernel**2 for cv in self.convs] + [WIDTHS[-1]]
        outs = [cv.out_ch for cv in self.convs] + [out_dim]
        self.layers = [
            Layer(
                n,
                fans[i],
                outs[i],
                n.replace("conv1", "conv2") if n.endswith("conv1") else _next(order, i),
                activation if n != "output" else "linear",
            )
            for i, n in enumerate(order)
        ]
        self.by_name = {layer.name: layer for layer in self.layers}
        self.shapes: dict[str, tuple[int, ...]] = {
            cv.name: (cv.out_ch, cv.in_ch, cv.kernel**2) for cv in self.convs
        }
        self.shapes["output"] = (out_dim, WIDTHS[-1])
        self.params: dict[str, torch.Tensor] = {}
        self.buffers: dict[str, torch.Tensor] = {}
        for layer in self.layers:
            self.params[f"{layer.name}.weight"] = torch.empty(R, *self.shapes[layer.name])
            self.params[f"{layer.name}.bias"] = torch.empty(R, layer.fan_out)
            if layer.name != "output":
                self.params[f"{layer.name}.{BN_WEIGHT}"] = torch.ones(R, layer.fan_out)
                self.params[f"{layer.name}.{BN_BIAS}"] = torch.zeros(R, layer.fan_out)
                self.buffers[f"{layer.name}.running_mean"] = torch.zeros(R, layer.fan_out)
                self.buffers[f"{layer.name}.running_var"] = torch.ones(R, layer.fan_out)
        draw_initial_params(self.params, self.layers, generators, self.sample_init)

    @property
    def hidden_layers(self) -> list[Layer]:
        """The layers whose channels are units: each BasicBlock's conv1 (module docstring)."""
        return [layer for layer in self.layers if layer.name.endswith("conv1")]

    def sample_init(
        self, name: str, rows: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Fresh incoming weights ``(rows, *shape[1:])`` and biases ``(rows,)`` of ``name``."""
        w, b = sample_layer_init(self.init, self.by_name[name], rows, generator)
        return w.reshape(rows, *self.shapes[name][1:]), b

    def reset_unit_stats(self, layer: str, r: torch.Tensor, i: torch.Tensor) -> None:
        """Running statistics of reset channels ``(r, i)`` back to their init (mean 0, var 1);
        :func:`~contlearn.learners.resets.reset_units` calls it."""
        if f"{layer}.running_mean" in self.buffers:
            self.buffers[f"{layer}.running_mean"][r, i] = 0.0
            self.buffers[f"{layer}.running_var"][r, i] = 1.0

    def _conv_bn(
        self, a: list[torch.Tensor], name: str, p: dict[str, torch.Tensor], train: bool
    ) -> list[torch.Tensor]:
        """conv then batch norm of each replica's ``(B, C, H, W)`` input (a list over R: the
        replicas stay separate tensors between layers, no stacking copies)."""
        cv = self.conv_by_name[name]
        # unbind, not w[r]: indexing's backward writes a whole-size zero gradient per replica
        w = p[f"{name}.weight"].reshape(-1, cv.out_ch, cv.in_ch, cv.kernel, cv.kernel).unbind(0)
        b, g, o = (p[f"{name}.{k}"].unbind(0) for k in ("bias", BN_WEIGHT, BN_BIAS))
        rm, rv = self.buffers[f"{name}.running_mean"], self.buffers[f"{name}.running_var"]
        outs = []
        for r, x in enumerate(a):
            z = F.conv2d(x, w[r], b[r], stride=cv.stride, padding=cv.padding)
            outs.append(F.batch_norm(z, rm[r], rv[r], g[r], o[r], train, BN_MOMENTUM, BN_EPS))
        return outs

    def _run(
        self, x: torch.Tensor, p: dict[str, torch.Tensor], train: bool
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Outputs ``(R, B, out)`` and each block's conv1 activation ``(R, B, C, h, w)``."""
        R, B = x.shape[:2]
        act = self.act_fn
        a = [
            act(z)
            for z in self._conv_bn(list(x.reshape(R, B, *self.input_shape)), "stem", p, train)
        ]
        acts = []
        for s in range(1, 5):
            for blk in range(2):
                pre = f"layer{s}.{blk}"
                h = [act(z) for z in self._conv_bn(a, f"{pre}.conv1", p, train)]
                acts.append(torch.stack(h))
                out = self._conv_bn(h, f"{pre}.conv2", p, train)
                skip = (
                    self._conv_bn(a, f"{pre}.downsample", p, train)
                    if f"{pre}.downsample" in self.conv_by_name
                    else a
                )
                a = [act(u + v) for u, v in zip(out, skip, strict=True)]
        pooled = torch.stack([t.mean((-2, -1)) for t in a])  # (R, B, 512)
        w, b = p["output.weight"], p["output.bias"]
        return torch.baddbmm(b.unsqueeze(1), pooled, w.transpose(1, 2)), acts

    def forward(
        self,
        x: torch.Tensor,
        params: dict[str, torch.Tensor] | None = None,
        train: bool | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Outputs and the activations learners read.

        Args:
            x: ``(R, B, D)`` or ``(R, B, C, H, W)``.
            params: parameters to use (default: the network's own).
            train: batch statistics, updating the running ones (default: when ``params`` is
                None, i.e. the learning step's pass; else evaluation).

        Returns:
            ``(out (R, B, out_dim), {block conv1: (R, B·h·w, C)})``.
        """
        train = params is None if train is None else train
        out, acts = self._run(x, self.params if params is None else params, train)
        feats = {
            layer.name: a.permute(0, 1, 3, 4, 2).reshape(a.shape[0], -1, a.shape[2])
            for layer, a in zip(self.hidden_layers, acts, strict=True)
        }
        return out, feats

    def forward_train(
        self, x: torch.Tensor, params: dict[str, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor], None]:
        """Outputs and what probes read, in evaluation mode: each block conv1 channel's mean
        over positions, ``[(R, B, C)]``."""
        out, acts = self._run(x, self.params if params is None else params, False)
        return out, [a.mean((-2, -1)) for a in acts], None


def _next(order: list[str], i: int) -> str | None:
    """The layer after ``order[i]`` in forward order (None for the output layer)."""
    return order[i + 1] if i + 1 < len(order) else None
