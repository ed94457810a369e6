"""A user's ``torch.nn.Module`` seen as a learner's network: its units, parameters and
activations in the layout the learner transforms read (docs/learners.md, "On your own torch
module").

Units are the output features of ``nn.Linear`` and the output channels of ``nn.Conv2d``. The
layers are every Linear/Conv2d module in module order (the last is the output layer, each
one's ``next`` the following one), or the module names the user lists. Parameters are
presented with a replica dim R = 1, as views of the module's own tensors (in-place edits by a
transform are edits of the module):

- ``nn.Linear``: weight ``(1, out, in)``, bias ``(1, out)``;
- ``nn.Conv2d``: weight ``(1, out, in, kh·kw)``: unit i's incoming weights are row i, and the
  outgoing weights of unit j of the layer below are the column slice ``[:, :, j]``;
- an ``nn.Linear`` that reads the flattened output of a conv with C channels (``in_features =
  C·S``, the channel-major order of ``torch.flatten`` on ``(B, C, H, W)``, S positions per
  channel): weight ``(1, out, C, S)``, so channel j's S columns are ``[:, :, j]``.

Activations (``features``) are those of the module after each hidden layer (an element-wise
activation module such as ``nn.ReLU`` right after it, found automatically) or the layer's
output passed through a callable the user names. A conv's ``(B, C, H, W)`` activations are
presented as ``(1, B·H·W, C)``: every position counts as a sample, so a channel's statistics
are means over the batch and the positions (Dohare et al.'s conv CBP: ``mean`` over dims
``(0, 2, 3)``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from contlearn.agents.networks import INITS, Layer, sample_layer_init
from contlearn.errors import ConfigError
from contlearn.learners.base import Params

#: element-wise activation modules found automatically after a layer
ELEMENTWISE = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Tanh,
    nn.Sigmoid,
    nn.Softplus,
    nn.Hardtanh,
    nn.Hardswish,
    nn.Hardsigmoid,
)
#: the names (agents/networks.py ``GAINS``) of activations whose init gain is known
_MODULE_NAMES: dict[type, str] = {
    nn.ReLU: "relu",
    nn.Tanh: "tanh",
    nn.Sigmoid: "sigmoid",
    nn.ELU: "elu",
    nn.SiLU: "swish",
}
_FUNCTION_NAMES: dict[Any, str] = {
    torch.relu: "relu",
    F.relu: "relu",
    torch.tanh: "tanh",
    torch.sigmoid: "sigmoid",
    F.elu: "elu",
    F.silu: "swish",
}
#: ``init(layer, rows, generator) -> (weights (rows, fan_in), biases (rows,))``
InitFn = Callable[[Layer, int, torch.Generator], tuple[torch.Tensor, torch.Tensor]]
Activation = nn.Module | Callable[[torch.Tensor], torch.Tensor]


def _activation_name(act: Activation) -> str:
    """The init-gain name of an activation (``linear``, gain 1, when unknown)."""
    if isinstance(act, nn.LeakyReLU) and act.negative_slope == 0.01:
        return "leaky_relu"
    if isinstance(act, nn.Module):
        return _MODULE_NAMES.get(type(act), "linear")
    return _FUNCTION_NAMES.get(act, "linear")


class ModuleNetwork:
    """The layers of a user's module as a learner's ``network`` (module docstring).

    Attributes:
        layers: :class:`~contlearn.agents.networks.Layer` per Linear/Conv2d layer, in order;
            names are the module names (``"0"``, ``"features.conv1"``).
        by_name: the layers by name.
        modules: the ``nn.Linear``/``nn.Conv2d`` module of each layer.
        shapes: each layer's presented weight shape without R.
        acts: each hidden layer's activation (a module, or a callable of its output).
        activation: ``"relu"`` when every hidden activation is a ReLU (then ``|h| = h``).
        init: the init name, or ``"custom"`` for a callable.
    """

    def __init__(
        self,
        module: nn.Module,
        layers: Sequence[str] | None = None,
        output: str | None = None,
        activations: Mapping[str, str | Callable[[torch.Tensor], torch.Tensor]] | None = None,
        init: str | InitFn = "torch_default",
    ) -> None:
        if isinstance(init, str) and init not in INITS:
            raise ConfigError(f"unknown init {init!r}; choose one of {', '.join(INITS)}")
        self._init = init
        self.init = init if isinstance(init, str) else "custom"
        named = dict(module.named_modules(remove_duplicate=False))
        names = _layer_names(named, layers, output)
        self.modules = {n: cast("nn.Linear | nn.Conv2d", named[n]) for n in names}
        self.shapes = _shapes(names, self.modules)
        order = list(named)
        self.acts = {
            n: _find_activation(n, named, order, dict(activations or {})) for n in names[:-1]
        }
        _check_shared(self.acts)
        unknown = set(activations or {}) - set(names[:-1])
        if unknown:
            raise ConfigError(
                f"activations= names {sorted(unknown)}, which are not hidden layers; "
                f"hidden layers: {names[:-1]}"
            )
        self.layers = [
            Layer(
                n,
                _fan_in(self.modules[n]),
                self.shapes[n][0],
                names[i + 1] if i + 1 < len(names) else None,
                _activation_name(self.acts[n]) if n in self.acts else "linear",
            )
            for i, n in enumerate(names)
        ]
        self.by_name = {layer.name: layer for layer in self.layers}
        hidden = [_activation_name(a) for a in self.acts.values()]
        self.activation = "relu" if hidden and all(a == "relu" for a in hidden) else None

    @property
    def hidden_layers(self) -> list[Layer]:
        """Every layer but the output layer."""
        return self.layers[:-1]

    def sample_init(
        self, name: str, rows: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Fresh incoming weights ``(rows, *shape[1:])`` and biases ``(rows,)`` for layer
        ``name`` from its init distribution (weights drawn first)."""
        layer = self.by_name[name]
        if callable(self._init):
            w, b = self._init(layer, rows, generator)
        else:
            w, b = sample_layer_init(self._init, layer, rows, generator)
        return w.reshape(rows, *self.shapes[name][1:]), b.reshape(rows)

    def parameters(self) -> dict[str, torch.Tensor]:
        """The module's Parameters by presented key (``<layer>.weight``, ``<layer>.bias``)."""
        out: dict[str, torch.Tensor] = {}
        for n, m in self.modules.items():
            out[f"{n}.weight"] = m.weight
            out[f"{n}.bias"] = cast(torch.Tensor, m.bias)  # (checked: every layer has one)
        return out

    def present(self, key: str, t: torch.Tensor) -> torch.Tensor:
        """``t`` (shaped as parameter ``key``) as a view in the presented layout."""
        layer, kind = key.rsplit(".", 1)
        shape = (1, *self.shapes[layer]) if kind == "weight" else (1, self.shapes[layer][0])
        try:
            return t.detach().view(shape)
        except RuntimeError:
            raise ConfigError(
                f"{key} (or its gradient/optimizer state) is not contiguous; attach needs"
                " contiguous tensors (e.g. no channels_last memory format)"
            ) from None

    def params(self) -> Params:
        """The presented parameters (views of the module's tensors)."""
        return {k: self.present(k, p) for k, p in self.parameters().items()}

    def grads(self) -> Params:
        """The presented gradients (views of each parameter's ``.grad``)."""
        params = self.parameters()
        missing = [k for k, p in params.items() if p.grad is None]
        if missing:
            raise ConfigError(
                f"no gradient for {', '.join(missing)}: call loss.backward() before step()"
            )
        return {k: self.present(k, p.grad) for k, p in params.items() if p.grad is not None}


def _layer_names(
    named: dict[str, nn.Module], layers: Sequence[str] | None, output: str | None
) -> list[str]:
    """The layers in order, cut after ``output``."""
    if layers is None:
        names = [n for n, m in named.items() if isinstance(m, (nn.Linear, nn.Conv2d))]
    else:
        names = list(layers)
        for n in names:
            if n not in named:
                raise ConfigError(f"layers= names {n!r}, which is not a submodule of the module")
            if not isinstance(named[n], (nn.Linear, nn.Conv2d)):
                raise ConfigError(
                    f"layer {n!r} is a {type(named[n]).__name__}; attach supports nn.Linear and"
                    " nn.Conv2d layers"
                )
    if output is not None:
        if output not in names:
            raise ConfigError(f"output={output!r} is not one of the layers {names}")
        names = names[: names.index(output) + 1]
    if len(names) < 2:
        raise ConfigError(
            f"attach needs at least two nn.Linear/nn.Conv2d layers (hidden and output); found"
            f" {names or 'none'} (declare them with layers=[...])"
        )
    if len({id(named[n]) for n in names}) < len(names):
        raise ConfigError(
            f"one module is listed as two layers in {names} (shared weights); attach needs"
            " distinct layers"
        )
    for n in names:
        m = named[n]
        if m.bias is None:
            raise ConfigError(f"layer {n!r} has no bias; attach needs bias=True layers")
        if isinstance(m, nn.Conv2d) and m.groups != 1:
            raise ConfigError(f"conv layer {n!r} has groups={m.groups}; attach needs groups=1")
    return names


def _fan_in(m: nn.Linear | nn.Conv2d) -> int:
    return m.in_features if isinstance(m, nn.Linear) else m.weight[0].numel()


def _shapes(names: list[str], modules: Mapping[str, nn.Linear | nn.Conv2d]) -> dict[str, tuple]:
    """Presented weight shapes without R; checks that each layer reads the one before."""
    shapes: dict[str, tuple] = {}
    for i, n in enumerate(names):
        m = modules[n]
        below = modules[names[i - 1]] if i > 0 else None
        if isinstance(m, nn.Conv2d):
            if isinstance(below, nn.Linear):
                raise ConfigError(
                    f"conv layer {n!r} follows linear layer {names[i - 1]!r}; attach supports"
                    " linear→linear, conv→conv and conv→(flatten)→linear"
                )
            if below is not None and m.in_channels != below.out_channels:
                raise ConfigError(
                    f"layer {n!r} reads {m.in_channels} channels but {names[i - 1]!r} has"
                    f" {below.out_channels}; declare the layers in order with layers=[...]"
                )
            shapes[n] = (m.out_channels, m.in_channels, m.weight[0, 0].numel())
            continue
        if below is None or isinstance(below, nn.Linear):
            if below is not None and m.in_features != below.out_features:
                raise ConfigError(
                    f"layer {n!r} reads {m.in_features} inputs but {names[i - 1]!r} has"
                    f" {below.out_features} units; declare the layers in order with layers=[...]"
                )
            shapes[n] = (m.out_features, m.in_features)
            continue
        channels = below.out_channels  # the flattened (C, H, W) output of a conv
        if m.in_features % channels:
            raise ConfigError(
                f"layer {n!r} reads {m.in_features} inputs, not a multiple of the {channels}"
                f" channels of {names[i - 1]!r}; declare the layers with layers=[...]"
            )
        positions = m.in_features // channels
        shapes[n] = (
            (m.out_features, m.in_features)
            if positions == 1
            else (m.out_features, channels, positions)
        )
    return shapes


def _find_activation(
    name: str,
    named: dict[str, nn.Module],
    order: list[str],
    declared: dict[str, str | Callable[[torch.Tensor], torch.Tensor]],
) -> Activation:
    """The activation after hidden layer ``name``: declared (a module name or a callable), or
    the element-wise activation module right after it in module order."""
    if name in declared:
        act = declared[name]
        if isinstance(act, str):
            if act not in named:
                raise ConfigError(f"activations[{name!r}]={act!r} is not a submodule of the module")
            return named[act]
        if not callable(act):
            raise ConfigError(f"activations[{name!r}] must be a module name or a callable")
        return act
    i = order.index(name)
    after = named[order[i + 1]] if i + 1 < len(order) else None
    if isinstance(after, ELEMENTWISE):
        return after
    raise ConfigError(
        f"no activation module right after layer {name!r}; declare it:"
        f" activations={{{name!r}: '<module name>'}} or {{{name!r}: torch.relu}}"
    )


def _check_shared(acts: Mapping[str, Activation]) -> None:
    """An activation module used after two layers would report both layers' activations."""
    seen: dict[int, str] = {}
    for name, act in acts.items():
        if isinstance(act, nn.Module):
            if id(act) in seen:
                raise ConfigError(
                    f"layers {seen[id(act)]!r} and {name!r} share one activation module; declare"
                    f" activations={{{name!r}: torch.relu, ...}} (a callable per layer)"
                )
            seen[id(act)] = name


def unit_major(h: torch.Tensor, units: int, name: str, conv: bool) -> torch.Tensor:
    """Activations as ``(1, samples, units)``: a conv's ``(B, C, H, W)`` as ``(1, B·H·W, C)``,
    a linear layer's ``(B, ..., H)`` as ``(1, B·..., H)`` (copies: the module may reuse its
    output's memory)."""
    h = h.detach()
    if conv and h.dim() == 4 and h.shape[1] == units:
        return h.permute(0, 2, 3, 1).reshape(1, -1, units)
    if conv or h.dim() < 1 or h.shape[-1] != units:
        raise ConfigError(
            f"the activation of layer {name!r} has shape {tuple(h.shape)}, not {units} units"
            " (channels at dim 1, or features last); declare activations={...}"
        )
    return h.reshape(1, -1, units).clone()
