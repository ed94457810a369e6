"""The online supervised agent: a replica-batched MLP trained by a learner chain.

Each step, ``act`` runs the forward pass (kept for the update) and ``observe`` takes the loss
on the same batch (cross-entropy for classification, squared error for regression), computes
every replica's gradient of its own mean loss in one backward pass, and hands the gradients
and this step's hidden activations to the learner.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from contlearn.agents.networks import ACTIVATIONS, INITS, BatchedMLP
from contlearn.envs.base import StreamInfo
from contlearn.learners import Learner, build_learner, learner_diagnostics
from contlearn.learners.base import GradientTransformation
from contlearn.learners.optim import adam, sgd
from contlearn.seeding import torch_generator
from contlearn.spec import param, parse_int_list
from contlearn.state import load_tree, tree_leaves


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
        for p in self.net.params.values():
            p.requires_grad_(True)
        self._keys = list(self.net.params)
        self._views = {k: p.detach() for k, p in self.net.params.items()}
        self.learner_state = self.learner.init(self._views)
        self._cache: tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]] | None = None
        self._task_started = False
        self._stopped: torch.Tensor | None = None  # (R,) replicas that no longer learn

    def stop_replicas(self, mask: torch.Tensor) -> None:
        """Stop learning for the replicas in ``mask`` (R,) (e.g. diverged ones)."""
        self._stopped = mask.clone() if bool(mask.any()) else None

    def on_task_start(self, task: int) -> None:
        """Called at a visible task boundary: the next update gets ``task_start=True``."""
        self._task_started = True

    def act(self, obs: torch.Tensor) -> torch.Tensor:
        """Predictions ``(R, B, C)``; keeps the graph so ``observe`` needs no second forward."""
        flat = obs.reshape(obs.shape[0], obs.shape[1], -1)
        with torch.enable_grad():
            out, features = self.net.forward(flat)
        self._cache = (obs, out, features)
        return out.detach()

    def loss(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-replica mean loss ``(R,)``."""
        R, B = out.shape[:2]
        if self.info.kind == "classification":
            per = F.cross_entropy(out.reshape(R * B, -1), target.reshape(-1), reduction="none")
            return per.view(R, B).mean(1)
        return (out - target).pow(2).sum(-1).mean(1)

    def observe(self, obs: torch.Tensor, action: torch.Tensor, feedback: torch.Tensor
                ) -> dict[str, torch.Tensor]:
        """One learning step on the batch just answered; returns ``{"loss": (R,)}``."""
        if self._cache is None or self._cache[0] is not obs:
            self.act(obs)
        assert self._cache is not None
        _, out, features = self._cache
        self._cache = None
        with torch.enable_grad():
            loss = self.loss(out, feedback)  # (R,)
            grads = torch.autograd.grad(loss.sum(), [self.net.params[k] for k in self._keys])
        with torch.no_grad():
            g = dict(zip(self._keys, grads, strict=True))
            feats = {k: v.detach() for k, v in features.items()}
            updates, self.learner_state = self.learner.update(
                g, self.learner_state, self._views, features=feats, loss=loss.detach(),
                task_start=self._task_started)
            self._task_started = False
            if self._stopped is not None:
                for u in updates.values():
                    u[self._stopped] = 0.0
            torch._foreach_add_([self._views[k] for k in self._keys],
                                [updates[k] for k in self._keys])
        return {"loss": loss.detach()}

    def diagnostics(self) -> dict[str, dict[str, torch.Tensor]]:
        """The learner's bookkeeping: ``{layer: {metric: (R,)}}`` (see ``LearnerDef``)."""
        return learner_diagnostics(self.learner_spec, self.learner_state)

    def features(self, obs: torch.Tensor) -> dict[str, torch.Tensor]:
        """Hidden activations ``{layer: (R, B, H)}`` for ``obs`` (no learning)."""
        with torch.no_grad():
            return self.net.forward(obs.reshape(obs.shape[0], obs.shape[1], -1))[1]

    def probe_gradients(self, obs: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """Gradients of each replica's mean loss on ``(obs, target)``; nothing is updated."""
        flat = obs.reshape(obs.shape[0], obs.shape[1], -1)
        with torch.enable_grad():
            out, _ = self.net.forward(flat)
            loss = self.loss(out, target)
            grads = torch.autograd.grad(loss.sum(), [self.net.params[k] for k in self._keys])
        return dict(zip(self._keys, grads, strict=True))

    def probe_plasticity(self, obs: torch.Tensor, target: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss ``(R,)`` on a batch before and after one learning step on it; the step (and
        every learner state change, random draws included) is undone afterwards."""
        saved, flag = self.state_dict(), self._task_started
        self._task_started = False
        try:
            before = self.observe(obs, self.act(obs), target)["loss"]
            with torch.no_grad():
                after = self.loss(self.net.forward(obs.reshape(*obs.shape[:2], -1))[0], target)
        finally:
            self.load_state_dict(saved)
            self._task_started = flag
        return before, after

    def state_dict(self) -> dict[str, Any]:
        """Parameters and learner state as plain tensors (``weights_only``-loadable)."""
        return {"params": {k: v.clone() for k, v in self._views.items()},
                "learner": [t.clone() for t in tree_leaves(self.learner_state)]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        for k, v in self._views.items():
            v.copy_(state["params"][k])
        load_tree(self.learner_state, state["learner"])
