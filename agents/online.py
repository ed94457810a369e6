"""The online supervised agent: a replica-batched MLP trained by a learner chain.

Each step, ``act`` runs the forward pass (kept for the update) and ``observe`` takes the loss
on the same batch (cross-entropy for classification, squared error for regression), computes
every replica's gradient of its own mean loss, and hands the gradients and this step's hidden
activations to the learner.

Two implementations of the step, selected by the ``fast`` option:

- ``fast=false``, the reference: autograd for the gradients, ``learner.update`` for the updates,
  ``θ += u``.
- ``fast=true`` (default): the network's hand-written backward (no autograd graph). When the
  learner has a fused form (:mod:`contlearn.learners.fused`: SGD, L2, shrink-and-perturb,
  continual backprop over those) the update is applied in place during the backward pass, with
  no gradient or update tensors at all; otherwise the gradients go through ``learner.update``.

Both give the same results up to float rounding (``tests/test_performance_paths.py``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F

from contlearn.agents.networks import ACTIVATIONS, INITS, BatchedMLP
from contlearn.backends import kernels
from contlearn.envs.base import StreamInfo
from contlearn.learners import Learner, build_learner, learner_diagnostics
from contlearn.learners.base import GradientTransformation
from contlearn.learners.fused import fused_plan
from contlearn.learners.optim import adam, sgd
from contlearn.seeding import torch_generator
from contlearn.spec import param, parse_int_list
from contlearn.state import load_tree, tree_leaves

#: below this many parameters (all replicas) a step is dominated by per-op overhead, which
#: extra threads only add to (measured in docs/performance.md).
SINGLE_THREAD_PARAMS = 4_000_000
#: the largest parameter set (bytes, all replicas) :meth:`OnlineAgent.probe_snapshot` copies
SNAPSHOT_MAX_BYTES = 256 << 20


@dataclass(frozen=True)
class OnlineAgentSpec:
    """Options of the online supervised agent (network and base optimizer)."""

    hidden: str = param("100,100,100", "hidden widths, comma-separated (paper: 2000,2000,2000)")
    activation: str = param("relu", "hidden nonlinearity", choices=tuple(ACTIVATIONS))
    init: str = param("kaiming_uniform", "weight init distribution", choices=INITS)
    optimizer: str = param("sgd", "base optimizer", choices=("sgd", "adam"))
    lr: float = param(0.01, "learning rate (step size)", low=0.0, low_open=True)
    momentum: float = param(0.0, "SGD momentum", low=0.0, high=1.0)
    beta1: float = param(0.9, "Adam β1", low=0.0, high=1.0)
    beta2: float = param(0.999, "Adam β2", low=0.0, high=1.0)
    eps: float = param(1e-8, "Adam ε", low=0.0, low_open=True)
    fast: bool = param(True, "hand-written backward and fused updates (false: the autograd "
                       "reference path; same results to float rounding)")

    def validate(self) -> None:
        """Check the hidden widths parse."""
        parse_int_list(self.hidden, "hidden")

    def base_optimizer(self) -> GradientTransformation:
        """The base optimizer transform these options describe."""
        if self.optimizer == "adam":
            return adam(self.lr, self.beta1, self.beta2, self.eps)
        return sgd(self.lr, self.momentum)


class OnlineAgent:
    """Replica-batched online learner (satisfies :class:`contlearn.agents.Agent`).

    Args:
        info: the stream's :class:`StreamInfo`.
        seeds: one root seed per replica.
        spec: network and optimizer options.
        learner: the learner definition (e.g. ``bp``, ``cbp``) and its options.
    """

    supports_replicas = True
    Spec = OnlineAgentSpec
    #: threads :meth:`learn_block` runs replicas on (0: one per core); a run sets it
    #: (``contlearn.running.runner.intra_op_threads``)
    replica_workers: int = 0

    def __init__(self, info: StreamInfo, seeds: Sequence[int], spec: OnlineAgentSpec,
                 learner: Learner) -> None:
        self.info = info
        self.spec = spec
        self.seeds = list(seeds)
        in_dim = 1
        for d in info.input_shape:
            in_dim *= d
        self.net = BatchedMLP(in_dim, parse_int_list(spec.hidden, "hidden"), info.num_outputs,
                              spec.activation, spec.init,
                              [torch_generator(s, "agent") for s in self.seeds])
        self.learner_spec = learner
        self.learner = build_learner(learner, spec.base_optimizer(), self.net, self.seeds)
        self.plan = fused_plan(self.learner) if spec.fast else None
        if self.plan is None and sum(p.numel() for p in self.net.params.values()) >= 1 << 20:
            kernels.retain_freed_memory()  # unfused learners allocate weight-sized temporaries
        self.device = torch.device("cpu")
        #: each layer's ‖∂L/∂θ‖₁ summed over the steps since the last :meth:`update_stats`
        #: ``(R, layers)`` float64, and those steps; None while gradients are not watched
        self._grad_l1: torch.Tensor | None = None
        self._grad_steps = 0
        self._setup()
        self._task_started = False

    def _setup(self) -> None:
        """(Re)build the views, the learner state and the caches for the current device."""
        self.net.on_read = None
        for p in self.net.params.values():
            p.requires_grad_(True)
        self._keys = list(self.net.params)
        self._views = {k: p.detach() for k, p in self.net.params.items()}
        self.learner_state = self.learner.init(self._views)
        self._cache: tuple[Any, ...] | None = None
        self._probe_cache: tuple[Any, ...] | None = None
        self._minus_one: torch.Tensor | None = None
        # The input layer's update can wait for the next forward pass, which then reads and
        # writes those weights once (kernels.input_layer_) instead of three times.
        first = self._keys[0]
        self._first = first
        self._defer = (self.plan is not None and first not in self.plan.col_l1
                       and kernels.applies(self._views[first], self._views[first][:, :1],
                                           self._views[first][:, :1]))
        self._pending: kernels.Pending | None = None
        self.net.on_read = self._flush
        # Whole steps in one compiled call per block of steps (learn_block), when the update is
        # fused and needs nothing per step but continual backprop's unit bookkeeping.
        plan = self.plan
        views = list(self._views.values())
        self._block_plan = plan if (
            plan is not None and (plan.post is None or plan.replacer is not None)
            and self.spec.activation in kernels.BLOCK_ACTIVATIONS
            and len(self.net.layers) <= kernels.MAX_BLOCK_LAYERS
            and self.info.kind in ("classification", "regression")
            and all(v.device.type == "cpu" and v.dtype == torch.float32 and v.is_contiguous()
                    for v in views)
            and kernels.library() is not None) else None

    def _flush(self) -> None:
        """Apply the deferred update of the input layer, if any."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            kernels.input_layer_(self._views[self._first], pending)

    def to(self, device: str | torch.device) -> OnlineAgent:
        """Move the network and a fresh learner state to ``device`` (call before the first
        step). Streams stay on the CPU: inputs are moved here, and predictions and metrics are
        handed back on the CPU."""
        self.device = torch.device(device)
        params = self.net.params  # (applies a deferred update)
        for k, p in params.items():
            params[k] = p.detach().to(self.device)
        if self._grad_l1 is not None:
            self._grad_l1 = self._grad_l1.to(self.device)
        self._setup()
        return self

    def preferred_threads(self) -> int:
        """torch's intra-op threads that suit this network (``threads=0``, auto): 1 for small
        networks, where per-op overhead dominates and more threads only add to it, and on
        machines with at most 2 cores, where a second thread waits on the other core's other
        work (measured 2-30× slower, docs/performance.md); else 0 (leave torch's setting:
        every core). Learning in blocks uses threads of its own (:meth:`block_workers`)."""
        return self.probe_threads()

    def block_workers(self) -> int:
        """Threads :meth:`learn_block` runs replicas on, at most one per replica:
        ``replica_workers`` if set (a run sets it from its ``threads`` option, or from the
        process's torch setting before the run), else one per core."""
        return max(1, min(len(self.seeds), self.replica_workers or os.cpu_count() or 1))

    def probe_threads(self) -> int:
        """Threads for torch ops on this network (step-by-step learning, and the probes even
        while learning takes blocks): 1 for small networks or on machines with at most 2 cores,
        else 0 (leave the setting). Block learning's threads each run whole replicas; a probe's
        products and SVDs split every op across threads, which on 2 busy cores made a probe
        event 2-30x slower."""
        size = sum(p.numel() for p in self._views.values())
        return 1 if size < SINGLE_THREAD_PARAMS or (os.cpu_count() or 1) <= 2 else 0

    def block_ready(self, batch_size: int) -> bool:
        """Whether :meth:`learn_block` can take steps of ``batch_size`` examples now."""
        plan = self._block_plan
        return plan is not None and batch_size == 1 and (
            plan.replacer is None or plan.replacer.kernel_state(self.learner_state) is not None)

    @torch.no_grad()
    def learn_block(self, obs: torch.Tensor, target: torch.Tensor
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """T online steps at once: the same as ``T`` calls of :meth:`act` and :meth:`observe`,
        each replica's steps in one compiled loop while its weights stay in cache
        (:func:`contlearn.backends.kernels.online_block_`). Call only if :meth:`block_ready`.

        Args:
            obs: ``(T, R, 1, *input_shape)``.
            target: ``(T, R, 1)`` labels, or ``(T, R, 1, C)`` regression targets.

        Returns:
            ``(predictions (T, R, 1, C) made before each step's update, {"loss": (T, R)})``.
        """
        plan = self._block_plan
        assert plan is not None
        T, R = obs.shape[:2]
        x = obs.reshape(T, R, -1).to(torch.float32).contiguous()
        C = self.info.num_outputs
        classification = self.info.kind == "classification"
        y = (target.reshape(T, R).to(torch.int64) if classification
             else target.reshape(T, R, C).to(torch.float32)).contiguous()
        self._flush()
        self._cache = self._probe_cache = None
        self._task_started = False  # a fused update without a post does not read it
        layers = self.net.layers
        weights = [self._views[f"{layer.name}.weight"] for layer in layers]
        biases = [self._views[f"{layer.name}.bias"] for layer in layers]
        out = torch.empty(T, R, C)
        loss = torch.empty(T, R)
        start = torch.zeros(R, dtype=torch.int64)
        events = torch.zeros(R, max(len(layers) - 1, 1), dtype=torch.int64)
        replacer = plan.replacer
        cbp = None if replacer is None else replacer.kernel_state(self.learner_state)
        pending = kernels.Pending1.empty(R, weights[0].shape[1])
        workers = self.block_workers()
        while True:
            kernels.online_block_(weights, biases, x, y, classification, plan.grad_scale,
                                  plan.param_scale, self.spec.activation, out, loss, start,
                                  events, cbp, pending, workers, self._grad_l1)
            if cbp is not None and bool(events.any()):
                assert replacer is not None
                replacer.replace(self.learner_state, self._views, list(events.T.contiguous()),
                                 pending.skip)
                events.zero_()
                continue  # (the next call also applies what is pending)
            if bool((start >= T).all()):
                break
        self._grad_steps += T
        return out.unsqueeze(2), {"loss": loss}

    def watch_gradients(self, on: bool = True) -> None:
        """Start (or stop) summing every training step's gradient L1 norm per layer, which
        :meth:`update_stats` reports as ``grad_magnitude``. A run turns it on when it records
        that probe; off, steps skip the work (a batch of several examples needs a product).
        Turning it on while on keeps the sums."""
        if on and self._grad_l1 is not None:
            return
        n = len(self.net.layers)
        self._grad_l1 = torch.zeros(len(self.seeds), n, dtype=torch.float64,
                                    device=self.device) if on else None
        self._grad_steps = 0

    def update_stats(self) -> dict[str, dict[str, torch.Tensor]]:
        """``{"grad_magnitude": {layer: (R,)}}``: mean |∂L/∂θ| of each layer (weights and bias;
        layer ``""``: all parameters) averaged over the training steps since the last call,
        which starts the next average (DESIGN.md §5). Empty if no step was taken since, or
        gradients are not watched (:meth:`watch_gradients`)."""
        total, steps = self._grad_l1, self._grad_steps
        if total is None or steps == 0:
            return {}
        sizes = torch.tensor([self._views[f"{layer.name}.weight"][0].numel()
                              + self._views[f"{layer.name}.bias"][0].numel()
                              for layer in self.net.layers], dtype=torch.float64)
        total = self._host(total)
        out = {layer.name: total[:, i] / (sizes[i] * steps)
               for i, layer in enumerate(self.net.layers)}
        out[""] = total.sum(1) / (sizes.sum() * steps)
        self._grad_l1.zero_()
        self._grad_steps = 0
        return {"grad_magnitude": out}

    def on_task_start(self, task: int) -> None:
        """Called at a visible task boundary: the next update gets ``task_start=True``."""
        self._task_started = True

    def _flat(self, obs: torch.Tensor) -> torch.Tensor:
        flat = obs.reshape(obs.shape[0], obs.shape[1], -1)
        return flat if flat.device == self.device else flat.to(self.device, non_blocking=True)

    def _host(self, t: torch.Tensor) -> torch.Tensor:
        return t if t.device.type == "cpu" else t.to("cpu")

    def act(self, obs: torch.Tensor) -> torch.Tensor:
        """Predictions ``(R, B, C)``; keeps what ``observe`` needs (no second forward)."""
        flat = self._flat(obs)
        if not self.spec.fast:
            with torch.enable_grad():
                out, features = self.net.forward(flat)
            self._cache = (obs, out, features)
            return self._host(out.detach())
        with torch.no_grad():
            first = None
            if self._defer and flat.shape[1] <= kernels.MAX_BATCH:
                w, b = self._views[self._first], self._views[self._keys[1]]
                pending, self._pending = self._pending, None
                first = kernels.input_layer_(w, pending, flat, b)  # update + forward, one pass
            else:
                self._flush()
            out, hs, zs = self.net.forward_train(flat, self._views, first)
        self._cache = (obs, flat, out, hs, zs)
        return self._host(out)

    def loss(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-replica mean loss ``(R,)``."""
        R, B = out.shape[:2]
        if self.info.kind == "classification":
            per = F.cross_entropy(out.reshape(R * B, -1), target.reshape(-1), reduction="none")
            return per.view(R, B).mean(1)
        return (out - target).pow(2).sum(-1).mean(1)

    def _loss_and_delta(self, out: torch.Tensor, target: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """The loss ``(R,)`` and its gradient with respect to ``out`` (summed over replicas)."""
        B = out.shape[1]
        if self.info.kind != "classification":
            diff = out - target
            return diff.pow(2).sum(-1).mean(1), diff.mul_(2.0 / B)
        logp = torch.log_softmax(out, -1)  # (R, B, C)
        idx = target.unsqueeze(-1)  # (R, B, 1)
        loss = logp.gather(-1, idx).mean((1, 2)).neg_()
        if self._minus_one is None or self._minus_one.shape != idx.shape:
            self._minus_one = torch.full(idx.shape, -1.0, dtype=out.dtype, device=out.device)
        delta = logp.exp_().scatter_add_(-1, idx, self._minus_one)  # softmax − one-hot
        return loss, (delta if B == 1 else delta.div_(B))

    def observe(self, obs: torch.Tensor, action: torch.Tensor, feedback: torch.Tensor
                ) -> dict[str, torch.Tensor]:
        """One learning step on the batch just answered; returns ``{"loss": (R,)}``."""
        if self._cache is None or self._cache[0] is not obs:
            self.act(obs)
        assert self._cache is not None
        cache, self._cache = self._cache, None
        target = feedback if feedback.device == self.device else feedback.to(self.device)
        flag, self._task_started = self._task_started, False
        if not self.spec.fast:
            loss = self._reference_step(cache[1], cache[2], target, flag)
        else:
            loss = self._fast_step(*cache[1:], target, flag)
        return {"loss": self._host(loss)}

    def _reference_step(self, out: torch.Tensor, features: dict[str, torch.Tensor],
                        target: torch.Tensor, task_start: bool) -> torch.Tensor:
        """Autograd gradients, ``learner.update``, ``θ += u``."""
        with torch.enable_grad():
            loss = self.loss(out, target)  # (R,)
            grads = torch.autograd.grad(loss.sum(), [self.net.params[k] for k in self._keys])
        with torch.no_grad():
            g = dict(zip(self._keys, grads, strict=True))
            self._add_grad_l1(g)
            feats = {k: v.detach() for k, v in features.items()}
            self._apply(g, feats, loss.detach(), task_start)
        return loss.detach()

    def _apply(self, grads: dict[str, torch.Tensor], feats: dict[str, torch.Tensor],
               loss: torch.Tensor, task_start: bool) -> None:
        updates, self.learner_state = self.learner.update(
            grads, self.learner_state, self._views, features=feats, loss=loss,
            task_start=task_start)
        torch._foreach_add_([self._views[k] for k in self._keys], [updates[k] for k in self._keys])

    @torch.no_grad()
    def _fast_step(self, flat: torch.Tensor, out: torch.Tensor, hs: list[torch.Tensor],
                   zs: list[torch.Tensor] | None, target: torch.Tensor, task_start: bool
                   ) -> torch.Tensor:
        """Hand-written backward; the fused in-place update when the learner has one."""
        loss, delta = self._loss_and_delta(out, target)
        feats = {layer.name: h for layer, h in zip(self.net.hidden_layers, hs, strict=True)}
        plan = self.plan
        if plan is None:
            grads = self.net.backward(delta, flat, hs, zs, self._views)
            self._add_grad_l1(grads)
            self._apply(grads, feats, loss, task_start)
            return loss
        defer = self._defer and flat.shape[1] <= kernels.MAX_BATCH
        cols, first = self.net.backward_update_(delta, flat, hs, zs, plan.grad_scale,
                                                plan.param_scale, plan.col_l1, self._views,
                                                defer_first=defer, grad_l1=self._grad_l1)
        if self._grad_l1 is not None:
            self._grad_steps += 1
        if first is not None:
            self._pending = (first, flat, plan.grad_scale, plan.param_scale)
        if plan.post is not None:
            params = _FlushOnRead(self._views, self._first, self._flush) if defer else self._views
            self.learner_state = plan.post(self.learner_state, params, features=feats,
                                           loss=loss, task_start=task_start, col_l1=cols)
        return loss

    def _add_grad_l1(self, grads: dict[str, torch.Tensor]) -> None:
        """Add one step's gradient L1 norms per layer (if gradients are watched)."""
        if self._grad_l1 is None:
            return
        for i, layer in enumerate(self.net.layers):
            for k in (f"{layer.name}.weight", f"{layer.name}.bias"):
                g = grads[k]
                self._grad_l1[:, i] += torch.linalg.vector_norm(
                    g.reshape(g.shape[0], -1), 1, dim=1).to(torch.float64)
        self._grad_steps += 1

    def diagnostics(self) -> dict[str, dict[str, torch.Tensor]]:
        """The learner's bookkeeping: ``{layer: {metric: (R,)}}`` (see ``LearnerDef``)."""
        return learner_diagnostics(self.learner_spec, self.learner_state)

    def _probe_forward(self, obs: torch.Tensor) -> tuple[Any, ...]:
        """``(flat, out, hs, zs)`` for a probe batch; reused while ``obs`` and the parameters
        are unchanged (the probes of one call share one forward pass)."""
        self._flush()
        versions = tuple(v._version for v in self._views.values())
        hit = self._probe_cache
        if hit is not None and hit[0] is obs and hit[1] == versions:
            return hit[2:]
        flat = self._flat(obs)
        with torch.no_grad():
            out, hs, zs = self.net.forward_train(flat, self._views)
        self._probe_cache = (obs, versions, flat, out, hs, zs)
        return flat, out, hs, zs

    def features(self, obs: torch.Tensor) -> dict[str, torch.Tensor]:
        """Hidden activations ``{layer: (R, B, H)}`` for ``obs`` (no learning)."""
        if self.spec.fast:
            hs = self._probe_forward(obs)[2]
            return {layer.name: h for layer, h in zip(self.net.hidden_layers, hs, strict=True)}
        with torch.no_grad():
            return self.net.forward(self._flat(obs))[1]

    def probe_snapshot(self) -> ProbeSnapshot | None:
        """The network as it stands, copied: what probes read (``features``, ``net.params``,
        ``net.activation``), safe to use on another thread while this agent learns on; None
        above :data:`SNAPSHOT_MAX_BYTES` of parameters (all replicas), where a copy would cost
        more memory than probing in line costs time."""
        if sum(v.numel() * v.element_size() for v in self._views.values()) > SNAPSHOT_MAX_BYTES:
            return None
        self._flush()
        return ProbeSnapshot(self.net, {k: v.clone() for k, v in self._views.items()},
                             self._flat)

    @torch.no_grad()
    def probe_loss(self, obs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Each replica's mean loss ``(R,)`` on ``(obs, target)`` with the current parameters;
        nothing is learned (the plasticity probe's L_after)."""
        self._flush()
        out = self.net.forward_train(self._flat(obs), self._views)[0]
        return self._host(self.loss(out, target.to(self.device)))

    def state_dict(self) -> dict[str, Any]:
        """Parameters, learner state and the gradient sums since the last probe, as plain
        tensors (``weights_only``-loadable)."""
        self._flush()
        state = {"params": {k: v.clone() for k, v in self._views.items()},
                 "learner": [t.clone() for t in tree_leaves(self.learner_state)]}
        if self._grad_l1 is not None:
            state["grad_l1"] = self._grad_l1.clone()
            state["grad_steps"] = self._grad_steps
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self._pending = None  # overwritten anyway
        for k, v in self._views.items():
            v.copy_(state["params"][k])
        load_tree(self.learner_state, state["learner"])
        if "grad_l1" in state:  # (watching since before the checkpoint)
            self._grad_l1 = state["grad_l1"].to(self.device, torch.float64, copy=True)
            self._grad_steps = int(state["grad_steps"])


class ProbeSnapshot:
    """A copy of an :class:`OnlineAgent`'s parameters at a probe point, with the agent's
    forward pass (:meth:`features`) over them; ``net.params`` and ``net.activation`` as the
    agent's."""

    def __init__(self, net: BatchedMLP, params: dict[str, torch.Tensor], flat: Any) -> None:
        self._mlp, self._flat = net, flat
        self.net = SimpleNamespace(params=params, activation=net.activation)

    @torch.no_grad()
    def features(self, obs: torch.Tensor) -> dict[str, torch.Tensor]:
        """Hidden activations ``{layer: (R, B, H)}`` of the copied network for ``obs``."""
        hs = self._mlp.forward_train(self._flat(obs), self.net.params)[1]
        return {layer.name: h for layer, h in zip(self._mlp.hidden_layers, hs, strict=True)}


class _FlushOnRead(dict):
    """The parameter dict a learner's post-update step gets while the input layer's update is
    deferred: reading that layer's weights applies the update first."""

    def __init__(self, params: dict[str, torch.Tensor], key: str, flush: Any) -> None:
        super().__init__(params)
        self._key, self._flush_fn = key, flush

    def __getitem__(self, key: str) -> torch.Tensor:
        if key == self._key:
            self._flush_fn()
        return super().__getitem__(key)

    def values(self):  # noqa: D102 - dict's
        self._flush_fn()
        return super().values()

    def items(self):  # noqa: D102 - dict's
        self._flush_fn()
        return super().items()
