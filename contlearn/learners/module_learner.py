"""Learners on any torch module: :func:`attach` applies a registered learner (``cbp``,
``redo``, ``snp``, ``l2``, ``l2-init``, ``head-reset``, ...) to a user's ``torch.nn.Module``
trained with a ``torch.optim`` optimizer (docs/learners.md, "On your own torch module").

The learner is the registered one, built by its own ``build`` function: the user's optimizer
becomes the chain's base transform (:func:`torch_optimizer`), and the module's parameters,
gradients, optimizer state and activations are presented to the chain with R = 1
(:class:`~contlearn.learners.module_layers.ModuleNetwork`). Each :meth:`ModuleLearner.step`
is one ``learner.update``: terms before the optimizer (L2, L2-Init) edit the gradients, the
torch optimizer steps, then post-update maps (shrink-and-perturb) and resets (CBP, ReDo, head
reset) edit the parameters and zero the reset entries of the optimizer's state.

Example::

    model = nn.Sequential(nn.Linear(784, 100), nn.ReLU(), nn.Linear(100, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    learner = attach(model, "cbp", optimizer=opt, seed=0, replacement_rate=1e-4)
    for x, y in data:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        learner.step()  # instead of opt.step()
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, fields
from typing import Any, NamedTuple

import torch
from torch import nn

import contlearn.learners as learners_pkg  # (learner_def; this module is imported by it)
from contlearn.errors import ConfigError
from contlearn.learners.base import GradientTransformation, Params
from contlearn.learners.module_layers import InitFn, ModuleNetwork, unit_major
from contlearn.spec import build_spec
from contlearn.state import load_tree, tree_leaves


class TorchOptimizerState(NamedTuple):
    """The torch optimizer's per-element state as the chain sees it.

    Attributes:
        buffers: ``{state key: {param key: view}}`` for every state tensor shaped like its
            parameter (SGD ``momentum_buffer``, Adam ``exp_avg``, ``exp_avg_sq``,
            ``max_exp_avg_sq``), in the presented layout: views, so a reset that zeroes
            entries zeroes them in the optimizer. Rebuilt after each step (torch creates its
            state lazily at the first step).
    """

    buffers: dict[str, Params]


def torch_optimizer(
    optimizer: torch.optim.Optimizer, network: ModuleNetwork
) -> GradientTransformation:
    """A torch optimizer as a chain's base transform.

    ``update`` writes the gradients it receives (changed by any term before it in the chain)
    into the parameters' ``.grad``, calls ``optimizer.step()`` (which updates the module's
    parameters in place, so the ``params`` views the later transforms read hold ``θ'``), and
    returns zero updates with the optimizer's per-element state (:class:`TorchOptimizerState`).
    """

    def init(params: Params) -> TorchOptimizerState:
        return TorchOptimizerState({})

    def update(grads: Params, state: TorchOptimizerState, params: Params, **extra: Any):
        module_params = network.parameters()
        for k, g in grads.items():
            grad = module_params[k].grad
            assert grad is not None  # (ModuleNetwork.grads checked)
            dst = network.present(k, grad)
            if dst.data_ptr() != g.data_ptr():
                dst.copy_(g)
        optimizer.step()
        return {k: torch.zeros_like(v) for k, v in params.items()}, TorchOptimizerState(
            _state_views(optimizer, network)
        )

    return GradientTransformation(init, update)


def _state_views(optimizer: torch.optim.Optimizer, network: ModuleNetwork) -> dict[str, Params]:
    """Every optimizer state tensor shaped like its parameter, as presented views."""
    found: dict[str, Params] = {}
    for k, p in network.parameters().items():
        for key, t in optimizer.state.get(p, {}).items():
            if isinstance(t, torch.Tensor) and t.shape == p.shape:
                found.setdefault(key, {})[k] = network.present(k, t)
    return found


class _Features:
    """Forward hooks keeping each hidden layer's activations of the last forward pass run
    with gradients enabled (evaluation under ``torch.no_grad()`` leaves them alone), and the
    order the layers ran in (checked against the declared order at each step)."""

    def __init__(self, network: ModuleNetwork) -> None:
        self.network = network
        self.last: dict[str, torch.Tensor] = {}
        self.calls: list[str] = []
        self.handles: list[Any] = []
        for layer in network.layers:
            self.handles.append(
                network.modules[layer.name].register_forward_pre_hook(self._call(layer.name))
            )
        for layer in network.hidden_layers:
            act = network.acts[layer.name]
            conv = isinstance(network.modules[layer.name], nn.Conv2d)
            if isinstance(act, nn.Module):
                hook = self._keep(layer.name, layer.fan_out, conv, None)
                self.handles.append(act.register_forward_hook(hook))
            else:
                hook = self._keep(layer.name, layer.fan_out, conv, act)
                self.handles.append(network.modules[layer.name].register_forward_hook(hook))

    def _keep(
        self, name: str, units: int, conv: bool, fn: Callable[[torch.Tensor], torch.Tensor] | None
    ) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
            if torch.is_grad_enabled():
                with torch.no_grad():
                    h = output if fn is None else fn(output.detach())
                    self.last[name] = unit_major(h, units, name, conv)

        return hook

    def _call(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: Any) -> None:
            if torch.is_grad_enabled():
                self.calls.append(name)

        return hook

    def take(self) -> dict[str, torch.Tensor]:
        """This step's activations ``{layer: (1, samples, units)}``; each layer's are used once.

        Raises:
            ConfigError: a hidden layer has not run since the last step, or the layers ran in
                another order than declared (several whole passes are fine: accumulated
                gradients; the activations are the last pass's).
        """
        names = [layer.name for layer in self.network.layers]
        calls, self.calls = self.calls, []
        if calls and calls != names * (len(calls) // len(names)):
            raise ConfigError(
                f"the forward pass ran the layers as {calls[: 2 * len(names)]}, not once each in"
                f" the order {names}: declare layers=[...] in the order forward runs them"
            )
        missing = [
            layer.name for layer in self.network.hidden_layers if layer.name not in self.last
        ]
        if missing:
            raise ConfigError(
                f"no forward pass through layer {missing[0]!r} since the last step(): run the"
                " module (with gradients enabled) and loss.backward() before step()"
            )
        out, self.last = self.last, {}
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


class ModuleLearner:
    """A registered learner attached to a torch module (see :func:`attach`).

    Attributes:
        name: the learner's registered name.
        spec: its validated options.
        network: the module's layers as the learner sees them.
        transform: the learner's chain around the torch optimizer.
        state: the chain's state (CBP utilities and ages, anchors, generator states, ...).
        steps: updates taken.
    """

    def __init__(
        self,
        module: nn.Module,
        learner: str,
        optimizer: torch.optim.Optimizer,
        seed: int,
        network: ModuleNetwork,
        options: Mapping[str, Any],
    ) -> None:
        definition = learners_pkg.learner_def(learner)
        if definition.agent_defaults:
            raise ConfigError(
                f"learner {learner!r} only sets the agent's optimizer"
                f" ({dict(definition.agent_defaults)}); under attach pass that torch optimizer"
                " with learner 'bp'"
            )
        allowed = [f.name for f in fields(definition.Spec)]
        for key in options:
            if key not in allowed:
                raise ConfigError(
                    f"unknown option {key!r} for learner {learner!r}; its options:"
                    f" {', '.join(allowed) or 'none'}"
                )
        _check_optimizer(optimizer, network)
        self.module, self.name, self.optimizer, self.network = module, learner, optimizer, network
        self.spec = build_spec(definition.Spec, dict(options))
        self.transform = definition.build(
            self.spec, torch_optimizer(optimizer, network), network, [int(seed)]
        )
        with torch.no_grad():
            self.state = self.transform.init(network.params())
        self.steps = 0
        self._features = _Features(network)
        self._task_started = False

    def on_task_start(self) -> None:
        """Mark the next :meth:`step` as the first of a task (``head-reset`` resets then)."""
        self._task_started = True

    def step(self, *, loss: torch.Tensor | float | None = None, task_start: bool = False) -> None:
        """One update from the gradients of the last backward pass (instead of
        ``optimizer.step()``): the learner's gradient terms, the torch optimizer's step,
        then its post-update maps and resets.

        Args:
            loss: this step's loss, handed to the learner as the extra ``loss`` ``(1,)``.
            task_start: this is the first update of a task (or call :meth:`on_task_start`).

        Raises:
            ConfigError: no forward pass or no gradients since the last step.
        """
        params, grads = self.network.params(), self.network.grads()
        features = self._features.take()
        extra: dict[str, Any] = {
            "features": features,
            "task_start": task_start or self._task_started,
        }
        if loss is not None:
            value = torch.as_tensor(loss).detach()
            if value.numel() != 1:
                raise ConfigError(f"loss= must be a scalar, got shape {tuple(value.shape)}")
            extra["loss"] = value.reshape(1)
        with torch.no_grad():
            updates, self.state = self.transform.update(grads, self.state, params, **extra)
            keys = list(params)
            torch._foreach_add_([params[k] for k in keys], [updates[k] for k in keys])
        self._task_started = False
        self.steps += 1

    def diagnostics(self) -> dict[str, dict[str, float]]:
        """The learner's bookkeeping ``{layer: {metric: value}}`` (CBP/ReDo: ``replacements``
        (cumulative), ``eligible_units``, ``mean_age``, utility quantiles; head reset:
        ``head_resets``); empty for learners that keep none."""
        fn = learners_pkg.learner_def(self.name).diagnostics
        found = fn(self.state) if fn is not None else {}
        head = self.network.layers[-1].name
        if "output" in found and "output" not in self.network.by_name:  # (head reset's key)
            found[head] = found.pop("output")
        return {
            layer: {k: float(v.reshape(-1)[0]) for k, v in metrics.items()}
            for layer, metrics in found.items()
        }

    def state_dict(self) -> dict[str, Any]:
        """The learner's state as plain tensors (``torch.save``, ``weights_only``-loadable):
        its statistics, anchors and generator states, not the torch optimizer's state (save
        ``optimizer.state_dict()`` and the module's with it)."""
        leaves = tree_leaves(_without_optimizer(self.state))
        return {"steps": self.steps, "learner": [t.clone() for t in leaves]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (into a handle attached the same way)."""
        load_tree(_without_optimizer(self.state), list(state["learner"]))
        self.steps = int(state["steps"])

    def detach(self) -> None:
        """Remove the forward hooks (the module trains on without the learner)."""
        self._features.remove()


def _without_optimizer(tree: Any) -> Any:
    """``tree`` with every :class:`TorchOptimizerState` emptied (the same tensors elsewhere)."""
    if isinstance(tree, TorchOptimizerState):
        return TorchOptimizerState({})
    if isinstance(tree, dict):
        return {k: _without_optimizer(v) for k, v in tree.items()}
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        return type(tree)(*(_without_optimizer(v) for v in tree))
    if isinstance(tree, (tuple, list)):
        return type(tree)(_without_optimizer(v) for v in tree)
    return tree


def _check_optimizer(optimizer: Any, network: ModuleNetwork) -> None:
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ConfigError(
            f"optimizer= must be a torch.optim.Optimizer over the module's parameters, got"
            f" {type(optimizer).__name__}"
        )
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    missing = [k for k, p in network.parameters().items() if id(p) not in held]
    if missing:
        raise ConfigError(
            f"the optimizer does not hold {', '.join(missing)}; build it from module.parameters()"
        )


def attach(
    module: nn.Module,
    learner: str | learners_pkg.Learner,
    *,
    optimizer: torch.optim.Optimizer,
    seed: int = 0,
    layers: Sequence[str] | None = None,
    output: str | None = None,
    activations: Mapping[str, str | Callable[[torch.Tensor], torch.Tensor]] | None = None,
    init: str | InitFn = "torch_default",
    **options: Any,
) -> ModuleLearner:
    """Apply registered learner ``learner`` to ``module`` trained by ``optimizer``.

    Call the returned handle's :meth:`~ModuleLearner.step` after each ``loss.backward()``
    instead of ``optimizer.step()``.

    Args:
        module: the network; its ``nn.Linear``/``nn.Conv2d`` layers are the learner's layers.
        learner: a registered learner name (``contlearn list learners``), or the run's
            :class:`~contlearn.learners.Learner` a plug-in agent receives (its name and
            options; ``options`` given here override them).
        optimizer: a ``torch.optim`` optimizer holding the layers' parameters.
        seed: the learner's root seed (fresh weights, noise): same seed, same results.
        layers: the layers' module names in order, the last the output layer (default: every
            Linear/Conv2d in module order).
        output: the output layer's name; layers after it are left to the optimizer alone.
        activations: per hidden layer, the module whose output is its activation, or a
            callable applied to the layer's output (default: the element-wise activation
            module right after the layer).
        init: the distribution fresh weights are drawn from: a name of
            ``contlearn.agents.networks.INITS`` (default ``torch_default``, torch's own
            nn.Linear/nn.Conv2d init, U(±1/√fan_in) for weights and biases), or a callable
            ``init(layer, rows, generator) -> (weights (rows, fan_in), biases (rows,))``.
        **options: the learner's options (``replacement_rate=1e-4``, ``maturity=100``, ...).

    Raises:
        ConfigError: an unknown learner or option, no Linear/Conv2d layers, a layer or
            activation name that does not exist, an optimizer without the layers' parameters.
    """
    if isinstance(learner, learners_pkg.Learner):
        if learner.credit.name != "bp":
            raise ConfigError(
                f"attach learns from autograd's gradients (backprop), not credit rule "
                f"{learner.credit.name}; run with credit=bp"
            )
        options = {**asdict(learner.spec), **options}
        learner = learner.name
    learners_pkg.learner_def(learner)  # an unknown name: the registry's one-line error
    network = ModuleNetwork(module, layers, output, activations, init)
    return ModuleLearner(module, learner, optimizer, seed, network, options)
