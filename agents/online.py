"""The online supervised agent: a replica-batched MLP trained by a learner chain.

Each step, ``act`` runs the forward pass (kept for the update) and ``observe`` takes the loss
on the same batch (cross-entropy for classification, squared error for regression), computes
every replica's gradient of its own mean loss, and hands the gradients and this step's hidden
activations to the learner.

What a step computes is :class:`ReferenceStep`: autograd's gradients, ``learner.update``,
``θ += u``. How fast it runs is a backend's business (:mod:`contlearn.backends.mlp`: the C block
loop, the fused hand-written backward, the hand-written backward). The agent describes its
configuration once (:attr:`OnlineAgent.step_config`), asks the backends in order and runs the
first that declares it supported, else the reference; ``fast=false`` runs the reference.
:attr:`OnlineAgent.backend` names the one chosen (recorded in ``meta.json``). Every backend
gives the reference's results up to float rounding (``tests/test_backends.py``).

(Over 400 lines: the agent's whole capability set — stepping, blocks, probing, threads,
checkpoints — in one class, as the Agent protocol lists it.)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F

from contlearn.agents import online_probes
from contlearn.agents.conv_networks import network_for
from contlearn.agents.injected_head import InjectedHeadMLP
from contlearn.agents.networks import BatchedMLP
from contlearn.agents.online_probes import ProbeSnapshot
from contlearn.agents.online_spec import (
    OnlineAgentSpec,
    injected_head_layers,
    network_options,
    spec_problem,
)
from contlearn.backends import kernels
from contlearn.backends.base import REFERENCE, StepConfig, choose
from contlearn.backends.mlp import BACKENDS, HandBackward
from contlearn.credit import build_credit, credit_def, credit_options
from contlearn.credit.rules import FeedbackRule, rule_gradients
from contlearn.envs.base import StreamInfo
from contlearn.errors import ConfigError
from contlearn.learners import Learner, build_learner, learner_diagnostics
from contlearn.learners.adam_form import adam_plan
from contlearn.learners.block_forms import block_form
from contlearn.learners.fused import fused_plan
from contlearn.learners.resets import FEEDBACK, FeedbackReset
from contlearn.seeding import torch_generator
from contlearn.spec import parse_int_list
from contlearn.state import load_tree, tree_leaves

#: below this many parameters (all replicas) a step is dominated by per-op overhead, which
#: extra threads only add to (measured in docs/performance.md).
SINGLE_THREAD_PARAMS = 4_000_000
#: the largest parameter set (bytes, all replicas) :meth:`OnlineAgent.probe_snapshot` copies
SNAPSHOT_MAX_BYTES = 256 << 20


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
    #: the stream kinds it learns on (the config refuses others up front)
    stream_kinds = ("classification", "regression")
    #: every registered credit rule (:mod:`contlearn.credit`)
    credit_rules = "*"
    #: threads :meth:`learn_block` runs replicas on (0: one per core); a run sets it
    #: (``contlearn.running.runner.intra_op_threads``)
    replica_workers: int = 0

    @staticmethod
    def options_problem(spec: OnlineAgentSpec, learner: Learner) -> str | None:
        """Why ``spec``'s network options cannot run with ``learner`` (None: they can)."""
        return spec_problem(spec, learner)

    def __init__(
        self, info: StreamInfo, seeds: Sequence[int], spec: OnlineAgentSpec, learner: Learner
    ) -> None:
        if why := self.options_problem(spec, learner):
            raise ConfigError(why)
        self.info = info
        self.spec = spec
        self.seeds = list(seeds)
        in_dim = 1
        for d in info.input_shape:
            in_dim *= d
        self._in_dim = in_dim
        self.learner_spec = learner
        self.net = self._initial_network()
        self._initial: dict[str, torch.Tensor] | None = None
        self.learner = build_learner(learner, spec.base_optimizer(), self.net, self.seeds)
        #: the credit-assignment rule (its feedback matrices; backprop: none)
        self.credit: FeedbackRule = build_credit(learner.credit, self.net, self.seeds, spec.lr)
        #: the learner chain's declared fused form (None: it has none)
        self.plan = fused_plan(self.learner)
        #: its declared Adam form (Adam between affine maps; None: it has none)
        self.adam_plan = adam_plan(self.learner) if self.plan is None else None
        #: its form for the block loop only (L2-Init's anchored update, ReDo; None: none)
        self.block_form = (
            block_form(self.learner) if self.plan is None and self.adam_plan is None else None
        )
        if self.plan is None and sum(p.numel() for p in self.net.params.values()) >= 1 << 20:
            kernels.retain_freed_memory()  # unfused learners allocate weight-sized temporaries
        self.device = torch.device("cpu")
        #: each layer's ‖∂L/∂θ‖₁ summed over the steps since the last :meth:`update_stats`
        #: ``(R, layers)`` float64, and those steps; None while gradients are not watched
        self.grad_l1: torch.Tensor | None = None
        self.grad_steps = 0
        self._setup()
        self._task_started = False

    def _initial_network(self) -> BatchedMLP:
        """The network as drawn at the start, from the seeds alone (the same every call). A
        conv network (docs/conv_networks.md) has the surface the reference step and the
        probes use (``params``, ``layers``, ``forward``, ``forward_train``, ``sample_init``);
        the backends that use the MLP's hand-written backward refuse it (``network``)."""
        gens = [torch_generator(s, "agent") for s in self.seeds]
        if self.spec.network != "mlp":
            return cast(BatchedMLP, network_for(self.spec, self.info, gens))
        if (head := injected_head_layers(self.learner_spec)) > 1:
            hidden = parse_int_list(self.spec.hidden, "hidden")
            return InjectedHeadMLP(
                self._in_dim,
                hidden,
                self.info.num_outputs,
                self.spec.activation,
                self.spec.init,
                gens,
                head,
            )
        return BatchedMLP(
            self._in_dim,
            parse_int_list(self.spec.hidden, "hidden"),
            self.info.num_outputs,
            self.spec.activation,
            self.spec.init,
            gens,
            layer_norm=self.spec.layer_norm,
        )

    def initial_parameters(self) -> dict[str, torch.Tensor]:
        """The parameters the run started from (redrawn from the seeds on first use, not
        stored in checkpoints; the ``distance_from_init`` probe)."""
        if self._initial is None:
            fresh = self._initial_network().params
            self._initial = {k: v.detach().to(self.device) for k, v in fresh.items()}
        return self._initial

    def _step_config(self) -> StepConfig:
        """What the backends decide on: this agent's resolved configuration."""
        first = next(iter(self.views.values()))
        return StepConfig(
            network=self.spec.network,
            activation=self.spec.activation,
            depth=len(self.net.hidden_layers),
            task=self.info.kind,
            learner=self.learner_spec.name,
            optimizer=self.spec.optimizer,
            credit=self.credit.name,
            credit_learned=credit_def(self.credit.name).learned,
            credit_options=credit_options(self.learner_spec.credit),
            batch_size=self.info.batch_size,
            device=first.device.type,
            dtype=str(first.dtype).removeprefix("torch."),
            fused=self.plan,
            adam=self.adam_plan,
            block_form=self.block_form,
            kernels=kernels.library() is not None,
            network_options=network_options(self.spec, self.learner_spec),
        )

    def _setup(self) -> None:
        """(Re)build the views, the learner state and the step's backend for the current
        device."""
        for p in self.net.params.values():
            p.requires_grad_(True)
        self._keys = list(self.net.params)
        #: the parameters as plain tensors (what every path reads and updates in place)
        self.views = {k: p.detach() for k, p in self.net.params.items()}
        self.learner_state = self.learner.init(self.learner_params())
        self._probe_cache: tuple[Any, ...] | None = None
        self._acted: torch.Tensor | None = None  # the obs the last act() answered
        #: the resolved configuration the backends were asked about
        self.step_config = self._step_config()
        chosen = choose(BACKENDS, self.step_config) if self.spec.fast else None
        self._step: HandBackward | ReferenceStep = (chosen or ReferenceStep)(self)
        #: the name of the backend that runs this agent's steps (``reference`` if none)
        self.backend: str = chosen.name if chosen is not None else REFERENCE

    def sync(self) -> None:
        """Apply any update a backend deferred (the fused path defers the input layer's to the
        next forward pass). Everything that reads the weights calls this first; it is the only
        place a deferred update is applied outside a step."""
        self._step.sync()

    def learner_params(self) -> dict[str, torch.Tensor]:
        """What the learner chain acts on: the parameters, and with ``credit.regularize`` the
        learned feedback as ``feedback.<layer>`` (:data:`~contlearn.learners.resets.FEEDBACK`)."""
        if not self.credit.regularized:
            return self.views
        return {**self.views, **{FEEDBACK + k: b for k, b in self.credit.feedback.items()}}

    def parameters(self) -> dict[str, torch.Tensor]:
        """The current parameters ``{"<layer>.weight": (R, out, in), "<layer>.bias": (R, out)}``
        (what probes read)."""
        self.sync()
        return self.views

    @property
    def activation(self) -> str:
        """The hidden nonlinearity's name."""
        return self.net.activation

    def to(self, device: str | torch.device) -> OnlineAgent:
        """Move the network and a fresh learner state to ``device`` (call before the first
        step). Streams stay on the CPU: inputs are moved here, and predictions and metrics are
        handed back on the CPU."""
        self.sync()
        self.device = torch.device(device)
        params = self.net.params
        for k, p in params.items():
            params[k] = p.detach().to(self.device)
        buffers = getattr(self.net, "buffers", {})  # (batch norm's statistics)
        for k, b in buffers.items():
            buffers[k] = b.to(self.device)
        if self.grad_l1 is not None:
            self.grad_l1 = self.grad_l1.to(self.device)
        self.credit.to(self.device)
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
        size = sum(p.numel() for p in self.views.values())
        return 1 if size < SINGLE_THREAD_PARAMS or (os.cpu_count() or 1) <= 2 else 0

    def block_ready(self, batch_size: int) -> bool:
        """Whether :meth:`learn_block` takes steps of ``batch_size`` examples: the chosen
        backend is the block loop (it declared this configuration, batch 1, supported)."""
        return hasattr(self._step, "learn_block") and batch_size == self.info.batch_size

    def learn_block(
        self, obs: torch.Tensor, target: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """T online steps at once: the same as ``T`` calls of :meth:`act` and :meth:`observe`
        (:meth:`contlearn.backends.mlp.BlockLoop.learn_block`). Call only if
        :meth:`block_ready`.

        Args:
            obs: ``(T, R, 1, *input_shape)``.
            target: ``(T, R, 1)`` labels, or ``(T, R, 1, C)`` regression targets.

        Returns:
            ``(predictions (T, R, 1, C) made before each step's update, {"loss": (T, R)})``.
        """
        learn = getattr(self._step, "learn_block", None)
        if learn is None:
            raise RuntimeError(f"backend {self.backend} does not learn in blocks")
        self._acted = self._probe_cache = None  # (the kernel's writes bump no tensor version)
        self._task_started = False  # no block-learned update reads it (none is a head reset)
        return learn(obs, target)

    def watch_gradients(self, on: bool = True) -> None:
        """Start (or stop) summing every training step's gradient L1 norm per layer, which
        :meth:`update_stats` reports as ``grad_magnitude``. A run turns it on when it records
        that probe; off, steps skip the work (a batch of several examples needs a product).
        Turning it on while on keeps the sums."""
        if on and self.grad_l1 is not None:
            return
        n = len(self.net.layers)
        self.grad_l1 = (
            torch.zeros(len(self.seeds), n, dtype=torch.float64, device=self.device) if on else None
        )
        self.grad_steps = 0

    def update_stats(self) -> dict[str, dict[str, torch.Tensor]]:
        """``{"grad_magnitude": {layer: (R,)}}``: mean |∂L/∂θ| of each layer (weights and bias;
        layer ``""``: all parameters) averaged over the training steps since the last call,
        which starts the next average (docs/design.md §5). Empty if no step was taken since, or
        gradients are not watched (:meth:`watch_gradients`)."""
        grad_l1, steps = self.grad_l1, self.grad_steps
        if grad_l1 is None or steps == 0:
            return {}
        sizes = torch.tensor(
            [
                self.views[f"{layer.name}.weight"][0].numel()
                + self.views[f"{layer.name}.bias"][0].numel()
                for layer in self.net.layers
            ],
            dtype=torch.float64,
        )
        total = self._host(grad_l1)
        out = {
            layer.name: total[:, i] / (sizes[i] * steps) for i, layer in enumerate(self.net.layers)
        }
        out[""] = total.sum(1) / (sizes.sum() * steps)
        grad_l1.zero_()
        self.grad_steps = 0
        return {"grad_magnitude": out}

    def on_task_start(self, task: int) -> None:
        """Called at a visible task boundary: the next update gets ``task_start=True``."""
        self._task_started = True

    def flat(self, obs: torch.Tensor) -> torch.Tensor:
        """``(R, B, *input_shape)`` inputs as ``(R, B, D)`` on the agent's device."""
        flat = obs.reshape(obs.shape[0], obs.shape[1], -1)
        return flat if flat.device == self.device else flat.to(self.device, non_blocking=True)

    def _host(self, t: torch.Tensor) -> torch.Tensor:
        return t if t.device.type == "cpu" else t.to("cpu")

    def act(self, obs: torch.Tensor) -> torch.Tensor:
        """Predictions ``(R, B, C)``; keeps what ``observe`` needs (no second forward)."""
        out = self._step.act(self.flat(obs))
        self._acted = obs
        return self._host(out.detach())

    def loss(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-replica mean loss ``(R,)``: cross-entropy or squared error (the reference's
        definition)."""
        R, B = out.shape[:2]
        if self.info.kind == "classification":
            per = F.cross_entropy(out.reshape(R * B, -1), target.reshape(-1), reduction="none")
            return per.view(R, B).mean(1)
        return (out - target).pow(2).sum(-1).mean(1)

    def observe(
        self, obs: torch.Tensor, action: torch.Tensor, feedback: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """One learning step on the batch just answered; returns ``{"loss": (R,)}``."""
        if self._acted is not obs:
            self.act(obs)
        self._acted = None
        target = feedback if feedback.device == self.device else feedback.to(self.device)
        flag, self._task_started = self._task_started, False
        return {"loss": self._host(self._step.observe(target, flag))}

    def apply_updates(
        self, grads: dict[str, torch.Tensor], features: dict[str, torch.Tensor], task_start: bool
    ) -> dict[str, torch.Tensor]:
        """``learner.update`` on this step's gradients and hidden activations, then
        ``θ += u``; returns ``u``, where a reset wrote ``θ + u`` itself the update it
        replaced (zero at the reset units: what learned feedback follows)."""
        extra: dict[str, Any] = {}
        if self.credit.learned:  # resets re-initialise learned feedback with the units
            extra["feedback"] = FeedbackReset(self.credit.feedback, {})
        params = self.learner_params()
        if self.credit.regularized:  # the feedback, as weights the loss does not reach
            grads = {**grads, **{k: torch.zeros_like(params[k]) for k in params if k not in grads}}
        updates, self.learner_state = self.learner.update(
            grads,
            self.learner_state,
            params,
            features=features,
            task_start=task_start,
            **extra,
        )
        torch._foreach_add_([params[k] for k in params], [updates[k] for k in params])
        if extra:
            return {**updates, **extra["feedback"].updates}
        return updates

    def rule_update(
        self,
        flat: torch.Tensor,
        hs: list[torch.Tensor],
        zs: list[torch.Tensor] | None,
        e: torch.Tensor,
        task_start: bool,
    ) -> None:
        """A credit rule's step from the output error ``e = ∂L/∂ŷ`` ``(R, B, C)`` of the forward
        pass ``(flat, hs, zs)``: the rule's gradients, ``learner.update`` and ``θ += u``, then
        the rule's feedback learning (the reference's definition; the ``backward`` backend runs
        it too)."""
        g = rule_gradients(self.net, self.views, self.credit, flat, hs, zs, e)
        self.add_grad_l1(g)
        features = {layer.name: h for layer, h in zip(self.net.hidden_layers, hs, strict=True)}
        updates = self.apply_updates(g, features, task_start)
        self.credit.learn(self.views, updates, [flat, *hs])

    def add_grad_l1(self, grads: dict[str, torch.Tensor]) -> None:
        """Add one step's gradient L1 norms per layer (if gradients are watched)."""
        if self.grad_l1 is None:
            return
        for i, layer in enumerate(self.net.layers):
            for k in (f"{layer.name}.weight", f"{layer.name}.bias"):
                g = grads[k]
                self.grad_l1[:, i] += torch.linalg.vector_norm(
                    g.reshape(g.shape[0], -1), 1, dim=1
                ).to(torch.float64)
        self.grad_steps += 1

    def diagnostics(self) -> dict[str, dict[str, torch.Tensor]]:
        """The learner's bookkeeping: ``{layer: {metric: (R,)}}`` (see ``LearnerDef``)."""
        return learner_diagnostics(self.learner_spec, self.learner_state)

    def _probe_forward(self, obs: torch.Tensor) -> list[torch.Tensor]:
        """The hidden activations for a probe batch; reused while ``obs`` and the parameters
        are unchanged (the probes of one call share one forward pass)."""
        self.sync()
        versions = tuple(v._version for v in self.views.values())
        hit = self._probe_cache
        if hit is not None and hit[0] is obs and hit[1] == versions:
            return hit[2]
        with torch.no_grad():
            hs = self.net.forward_train(self.flat(obs), self.views)[1]
        self._probe_cache = (obs, versions, hs)
        return hs

    @torch.no_grad()
    def outputs(self, obs: torch.Tensor) -> torch.Tensor:
        """The network's outputs ``(R, B, C)`` for ``obs`` (logits or predictions; no
        learning, nothing kept for ``observe``)."""
        self.sync()
        return self.net.forward(self.flat(obs), self.views)[0]

    def features(self, obs: torch.Tensor) -> dict[str, torch.Tensor]:
        """Hidden activations ``{layer: (R, B, H)}`` for ``obs`` (no learning)."""
        hs = self._probe_forward(obs)
        return {layer.name: h for layer, h in zip(self.net.hidden_layers, hs, strict=True)}

    def probe_snapshot(self) -> ProbeSnapshot | None:
        """The network as it stands, copied: what probes read (``features``, ``parameters()``,
        ``activation``), safe to use on another thread while this agent learns on; None
        above :data:`SNAPSHOT_MAX_BYTES` of parameters (all replicas), where a copy would cost
        more memory than probing in line costs time, and for a network with running statistics
        (ResNet-18's batch norm), which the learning thread would change under the probe."""
        size = sum(v.numel() * v.element_size() for v in self.views.values())
        if size > SNAPSHOT_MAX_BYTES or getattr(self.net, "buffers", None):
            return None
        self.sync()
        params = {k: v.clone() for k, v in self.views.items()}
        return ProbeSnapshot(self.net, params, self.flat, self.initial_parameters)

    @torch.no_grad()
    def probe_loss(self, obs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Each replica's mean loss ``(R,)`` on ``(obs, target)`` with the current parameters;
        nothing is learned (the plasticity probe's L_after)."""
        self.sync()
        out = self.net.forward_train(self.flat(obs), self.views)[0]
        return self._host(self.loss(out, target.to(self.device)))

    def hessian_trace(self, obs: torch.Tensor, target: torch.Tensor, samples: int) -> torch.Tensor:
        """Hutchinson's estimate of each replica's loss-Hessian trace on a batch ``(R,)``
        (:func:`~contlearn.agents.online_probes.hessian_trace`; nothing learned)."""
        self.sync()
        return online_probes.hessian_trace(
            self.net, self.views, self.flat(obs), target.to(self.device), self.loss, samples
        )

    def has_feedback(self) -> bool:
        """Whether the credit rule is not backprop (the alignment probes apply)."""
        return not self.credit.is_backprop

    def credit_alignment(
        self, obs: torch.Tensor, target: torch.Tensor | None
    ) -> dict[str, dict[str, torch.Tensor]]:
        """``{"feedback_alignment": {layer: (R,)}, "weight_alignment": ...}`` in degrees on a
        probe batch (:mod:`contlearn.credit.alignment`; nothing learned); empty for backprop."""
        if self.credit.is_backprop or target is None:
            return {}
        self.sync()
        found = online_probes.credit_alignment(
            self.net, self.views, self.credit, self.flat(obs), target.to(self.device), self.loss
        )
        return {p: {k: self._host(v) for k, v in d.items()} for p, d in found.items()}

    def state_dict(self) -> dict[str, Any]:
        """Parameters, learner state and the gradient sums since the last probe, as plain
        tensors (``weights_only``-loadable)."""
        self.sync()
        state: dict[str, Any] = {
            "params": {k: v.clone() for k, v in self.views.items()},
            "learner": [t.clone() for t in tree_leaves(self.learner_state)],
        }
        if not self.credit.is_backprop:
            state["credit"] = self.credit.state_dict()
        if buffers := getattr(self.net, "buffers", None):  # batch norm's running statistics
            state["buffers"] = {k: v.clone() for k, v in buffers.items()}
        if self.grad_l1 is not None:
            state["grad_l1"] = self.grad_l1.clone()
            state["grad_steps"] = self.grad_steps
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.sync()  # (then overwritten)
        for k, v in self.views.items():
            v.copy_(state["params"][k])
        load_tree(self.learner_state, state["learner"])
        for k, v in getattr(self.net, "buffers", {}).items():
            v.copy_(state["buffers"][k])
        if not self.credit.is_backprop:
            if "credit" not in state:
                raise ValueError(
                    f"the checkpoint holds no feedback for credit rule {self.credit.name}"
                )
            self.credit.load_state_dict(state["credit"])
        if "grad_l1" in state:  # (watching since before the checkpoint)
            self.grad_l1 = state["grad_l1"].to(self.device, torch.float64, copy=True)
            self.grad_steps = int(state["grad_steps"])


class ReferenceStep:
    """The online agent's step as defined: the gradients of each replica's mean loss
    (:meth:`OnlineAgent.loss`) that the credit rule assigns (backprop: autograd's), then
    ``learner.update`` with this step's hidden activations, ``θ += u``, then the rule's
    feedback learning (:meth:`~contlearn.credit.rules.FeedbackRule.learn`). Run by
    ``fast=false`` and by every configuration no backend supports."""

    name = REFERENCE

    def __init__(self, agent: OnlineAgent) -> None:
        self.agent = agent
        self._cache: tuple[torch.Tensor, dict[str, torch.Tensor]] | None = None
        self._rule_cache: tuple[Any, ...] | None = None

    def sync(self) -> None:
        """Nothing is deferred on the reference path."""

    def act(self, flat: torch.Tensor) -> torch.Tensor:
        """The forward pass, kept for :meth:`observe` (with autograd recording for backprop)."""
        agent = self.agent
        if not agent.credit.is_backprop:
            with torch.no_grad():
                out, hs, zs = agent.net.forward_train(flat, agent.views)
            self._rule_cache = (flat, out, hs, zs)
            return out
        with torch.enable_grad():
            self._cache = agent.net.forward(flat)
        return self._cache[0]

    def _observe_rule(self, target: torch.Tensor, task_start: bool) -> torch.Tensor:
        """A step of a credit rule other than backprop (plain torch; autograd only for
        ``∂L/∂ŷ``)."""
        assert self._rule_cache is not None
        (flat, out, hs, zs), self._rule_cache = self._rule_cache, None
        agent = self.agent
        with torch.enable_grad():
            leaf = out.detach().requires_grad_(True)
            loss = agent.loss(leaf, target)  # (R,)
            (e,) = torch.autograd.grad(loss.sum(), [leaf])
        with torch.no_grad():
            agent.rule_update(flat, hs, zs, e, task_start)
        return loss.detach()

    def observe(self, target: torch.Tensor, task_start: bool) -> torch.Tensor:
        """One step on the batch of the last :meth:`act`; returns the loss ``(R,)``."""
        if not self.agent.credit.is_backprop:
            return self._observe_rule(target, task_start)
        assert self._cache is not None
        (out, features), self._cache = self._cache, None
        agent = self.agent
        with torch.enable_grad():
            loss = agent.loss(out, target)  # (R,)
            grads = torch.autograd.grad(loss.sum(), [agent.net.params[k] for k in agent._keys])
        with torch.no_grad():
            g = dict(zip(agent._keys, grads, strict=True))
            agent.add_grad_l1(g)
            agent.apply_updates(g, {k: v.detach() for k, v in features.items()}, task_start)
        return loss.detach()
