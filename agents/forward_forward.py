"""The Forward-Forward agent (``--agent ff``): Hinton's (2022) local learning, replica-batched
and online, on every classification stream (docs/forward_forward.md, docs/design.md §4c).

Each step, ``act`` predicts (before any update, as for every agent) and ``observe`` learns:

- the positive input is the example with its true label embedded (``embed=replace``: the first
  C input values become the one-hot label, Hinton's MNIST setup; ``append``: the one-hot is
  concatenated); the negative input is the same example with a label drawn uniformly from the
  C − 1 *wrong* ones (replica r's own generator, seed purpose ``ff-negatives``);
- every hidden layer takes its local loss (:mod:`contlearn.agents.ff_step`) on both, reading
  the normalised, detached activity of the layer below; every layer's gradient goes through
  the learner chain (SGD/Adam, L2, L2-Init, S&P, CBP, ReDo) together, then ``θ += u``;
- ``predict=goodness``: the label whose embedded input gives the largest goodness summed over
  the layers from ``from_layer`` on, all C labels in one batched pass; ``predict=head``: a
  linear softmax head on the normalised activities (layers from ``from_layer`` on) of a
  neutral-label pass, trained by cross-entropy on those detached features.

The hand-written gradients run by default; ``fast=false`` runs the autograd reference
(same numbers to float rounding).

(Over 400 lines: the agent's whole capability set — stepping, probing, checkpoints — in one
class, as the Agent protocol lists it.)
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from contlearn.agents.ff_network import EMBEDS, GOODNESS, NORMS, FFNetwork, embed, embed_all
from contlearn.agents.ff_network import goodness as goodness_of
from contlearn.agents.ff_step import (
    LayerOptions,
    LocalStep,
    ff_loss,
    hand_step,
    head_gradients,
    reference_step,
)
from contlearn.agents.networks import ACTIVATIONS, INITS, gradient_l1
from contlearn.backends import ff_block
from contlearn.envs.base import StreamInfo
from contlearn.errors import ConfigError
from contlearn.learners import Learner, build_learner, learner_diagnostics
from contlearn.learners.adam_form import adam_plan
from contlearn.learners.block_forms import anchor_plan
from contlearn.learners.fused import fused_plan
from contlearn.learners.optim import OptimizerOptions
from contlearn.seeding import torch_generator
from contlearn.spec import param, parse_int_list
from contlearn.state import load_tree, tree_leaves

PREDICTS = ("goodness", "head")


class Acted(NamedTuple):
    """What ``act`` computed that ``observe`` reuses for the same inputs."""

    obs: torch.Tensor
    features: torch.Tensor | None  # the head's input on the neutral-label pass
    passes: list[tuple[torch.Tensor, torch.Tensor]] | None  # every layer's (z, h), all labels


@dataclass(frozen=True)
class FFAgentSpec(OptimizerOptions):
    """Options of the Forward-Forward agent (the base optimizer's are inherited)."""

    optimizer: str = param("adam", "base optimizer", choices=("sgd", "adam"))
    lr: float = param(1e-3, "learning rate (step size)", low=0.0, low_open=True)
    hidden: str = param("100,100,100", "hidden widths, comma-separated (Hinton: 2000 × 4)")
    activation: str = param("relu", "hidden nonlinearity", choices=tuple(ACTIVATIONS))
    init: str = param("kaiming_uniform", "weight init distribution", choices=INITS)
    goodness: str = param(
        "sum", "goodness G: sum of squared activities, or their mean", choices=GOODNESS
    )
    threshold: float = param(
        0.0, "θ of p = σ(G − θ) (0: the layer's width for sum, 1 for mean)", low=0.0
    )
    norm: str = param(
        "rms", "normalisation of each layer's input: RMS (θ = width fits) or length", choices=NORMS
    )
    embed: str = param(
        "replace",
        "label embedding: replace the first C inputs by the one-hot label, or append it",
        choices=EMBEDS,
    )
    predict: str = param(
        "goodness",
        "prediction: largest goodness over all labels (C passes), or a linear head on a "
        "neutral-label pass",
        choices=PREDICTS,
    )
    from_layer: int = param(
        0,
        "first hidden layer (1-based) whose goodness / activity predicts (0: the second, "
        "or the first of one; Hinton's choice)",
        low=0,
    )
    peer_norm: float = param(0.0, "λ of peer normalisation (0: off; reference code: 0.03)", low=0.0)
    peer_momentum: float = param(
        0.9, "μ of peer normalisation's running mean activity", low=0.0, high=1.0
    )
    fast: bool = param(True, "closed-form gradients (false: the autograd reference)")

    def validate(self) -> None:
        """The widths parse and ``from_layer`` names one of them; ``peer_momentum`` < 1."""
        depth = len(parse_int_list(self.hidden, "hidden"))
        if self.from_layer > depth:
            raise ConfigError(
                f"from_layer={self.from_layer} but there are {depth} hidden layers; "
                f"use 1..{depth} (or 0: auto)"
            )
        if self.peer_momentum >= 1.0:
            raise ConfigError(f"peer_momentum={self.peer_momentum} must be < 1")

    def first_layer(self) -> int:
        """``from_layer`` resolved (0: 2, or 1 with one hidden layer)."""
        depth = len(parse_int_list(self.hidden, "hidden"))
        return self.from_layer or min(2, depth)


class FFAgent:
    """Replica-batched online Forward-Forward learner (satisfies :class:`contlearn.agents.Agent`).

    Args:
        info: the stream's :class:`StreamInfo` (a classification stream).
        seeds: one root seed per replica.
        spec: the agent's options.
        learner: the learner definition and its options.

    Raises:
        ConfigError: the stream is not a classification stream, or its inputs have fewer
            values than classes with ``embed=replace``.
    """

    supports_replicas = True
    #: threads :meth:`learn_block` may run replicas on (0: one per core; the runner sets it)
    replica_workers: int = 0
    Spec = FFAgentSpec
    #: the stream kinds it learns on (checked when a run's config is resolved)
    stream_kinds = ("classification",)
    unsupported_learners = {
        "head-reset": "FF has no output layer learned from the stream's loss "
        "(its readout head is optional); use cbp, redo, snp, l2 or l2-init",
        "plasticity-injection": "it injects a fresh output layer, and FF has no output layer "
        "learned from the stream's loss; use snr, cbp or redo",
        "normalize-and-project": "its layer norm is a network option of the online agent "
        "only (FF normalises each layer's output already); use cbp, redo, snp, l2 or l2-init",
    }
    #: defaults this agent sets on learner options (users may still override them)
    learner_defaults = {"cbp": {"utility": "goodness", "bias_folding": False}}

    def __init__(
        self, info: StreamInfo, seeds: Sequence[int], spec: FFAgentSpec, learner: Learner
    ) -> None:
        if info.kind != "classification":
            raise ConfigError(f"agent ff needs a classification stream; {info.name} is {info.kind}")
        problem = self.learner_problem(learner)
        if problem:
            raise ConfigError(problem)
        self.info, self.spec, self.seeds = info, spec, list(seeds)
        self.classes = info.num_outputs
        in_dim = math.prod(info.input_shape)
        if spec.embed == "replace" and in_dim < self.classes:
            raise ConfigError(
                f"embed=replace needs at least {self.classes} input values, {info.name} has "
                f"{in_dim}; use embed=append"
            )
        hidden = parse_int_list(spec.hidden, "hidden")
        self.first = spec.first_layer()
        self.net = FFNetwork(
            in_dim + (self.classes if spec.embed == "append" else 0),
            hidden,
            spec.activation,
            spec.init,
            [torch_generator(s, "agent") for s in self.seeds],
            spec.norm,
            head_classes=self.classes if spec.predict == "head" else 0,
            from_layer=self.first,
        )
        default = 1.0 if spec.goodness == "mean" else None
        self.options = LayerOptions(
            spec.goodness,
            tuple(spec.threshold or default or float(h) for h in hidden),
            spec.peer_norm,
            spec.peer_momentum,
        )
        self.learner_spec = learner
        self.learner = build_learner(learner, spec.base_optimizer(), self.net, self.seeds)
        self.negatives = [torch_generator(s, "ff-negatives") for s in self.seeds]
        self.probe_seeds = [torch_generator(s, "ff-probe").initial_seed() for s in self.seeds]
        #: the learner chain's declared affine form (None: it has none); fast steps with one
        #: apply ``θ ← (1 + β) θ + α g`` in place from each layer's δ, then its post
        self.plan = fused_plan(self.learner) if spec.fast else None
        #: its Adam form (Adam between affine maps), which only the block loop takes
        self.adam_plan = adam_plan(self.learner) if spec.fast and self.plan is None else None
        #: its L2-Init form (an affine chain with one L2-Init term), likewise
        self.anchor_plan = anchor_plan(self.learner) if spec.fast and self.plan is None else None
        #: why whole steps do not run in the compiled block loop (None: they do, when the
        #: stream feeds blocks; contlearn/backends/ff_block.py)
        self.block_problem = ff_block.unsupported(
            fast=spec.fast, predict=spec.predict, peer=spec.peer_norm,
            activation=spec.activation, plan=self.plan, adam=self.adam_plan,
            anchor=self.anchor_plan, batch=info.batch_size,
        )  # fmt: skip
        self.backend = (
            "ff-block"
            if self.block_problem is None
            else "ff-fused"
            if self.plan is not None
            else "ff-hand"
            if spec.fast
            else "ff-reference"
        )
        self.views = {k: p for k, p in self.net.params.items()}
        self.learner_state = self.learner.init(self.views)
        self.running = {
            layer.name: torch.zeros(len(self.seeds), layer.fan_out)
            for layer in self.net.hidden_layers
        }
        self.grad_l1: torch.Tensor | None = None
        self.grad_steps = 0
        # what act computed for observe: (obs, the head's features, the all-label pass)
        self._acted: Acted | None = None
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None  # (obs, negatives)
        self._task_started = False

    @staticmethod
    def learner_problem(learner: Learner) -> str | None:
        """Why ``learner`` cannot train FF layers, or None (checked when a config is resolved).

        CBP's ``contribution`` utilities read the next layer's weights: FF's last hidden layer
        has no next layer, and no unit's output is learned through them."""
        utility = getattr(learner.spec, "utility", None)
        if learner.name == "cbp" and utility != "goodness":
            return (
                f"learner.utility={utility} reads the next layer's weights, which FF's layers "
                "do not learn through; use learner.utility=goodness (the default for ff)"
            )
        return None

    # -- stepping ---------------------------------------------------------------------------

    @property
    def activation(self) -> str:
        """The hidden nonlinearity's name."""
        return self.net.activation

    def parameters(self) -> dict[str, torch.Tensor]:
        """``{"<layer>.weight": (R, out, in), "<layer>.bias": (R, out)}`` (what probes read)."""
        return self.views

    def preferred_threads(self) -> int:
        """One intra-op thread: a step of small batched products is per-op overhead."""
        return 1

    def on_task_start(self, task: int) -> None:
        """Called at a visible task boundary: the next update gets ``task_start=True``."""
        self._task_started = True

    def _flat(self, obs: torch.Tensor) -> torch.Tensor:
        return obs.reshape(obs.shape[0], obs.shape[1], -1)

    def goodness_scores(
        self, flat: torch.Tensor, hs: Sequence[torch.Tensor] | None = None
    ) -> torch.Tensor:
        """Goodness summed over the layers from ``from_layer`` on for every label:
        ``(R, B, D) -> (R, B, C)``, all C labels as one batch of C·B inputs (or from ``hs``,
        that batch's activities)."""
        R, B = flat.shape[:2]
        if hs is None:
            hs = self.net.activities(embed_all(flat, self.classes, self.spec.embed), self.views)
        total = sum(goodness_of(h, self.spec.goodness) for h in hs[self.first - 1 :])
        assert isinstance(total, torch.Tensor)
        return total.view(R, self.classes, B).transpose(1, 2)

    def neutral_features(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Every layer's activity ``(R, B, H)`` on the neutral-label pass."""
        return self.net.activities(embed(flat, None, self.classes, self.spec.embed), self.views)

    @torch.no_grad()
    def act(self, obs: torch.Tensor) -> torch.Tensor:
        """Scores ``(R, B, C)`` whose argmax is the prediction (goodness per label, or the
        head's logits); keeps the head's features for ``observe``."""
        scores, self._acted = self._answer(obs)
        return scores

    @torch.no_grad()
    def outputs(self, obs: torch.Tensor) -> torch.Tensor:
        """:meth:`act`'s scores ``(R, B, C)`` without keeping anything for ``observe`` (the
        held-out score of the image streams, ``churn``)."""
        return self._answer(obs)[0]

    def _answer(self, obs: torch.Tensor) -> tuple[torch.Tensor, Acted]:
        """The scores for ``obs`` and what ``observe`` may reuse of their computation."""
        flat = self._flat(obs)
        if self.spec.predict == "goodness":
            if not self.spec.fast:  # (the reference: every embedded input through every layer)
                return self.goodness_scores(flat), Acted(obs, None, None)
            # the hand-written step: one pass serves the prediction and the step's positive
            # and negative inputs (their rows of it)
            passes = self.net.label_pass(flat, self.classes, self.spec.embed, self.views)
            return self.goodness_scores(flat, [h for _, h in passes]), Acted(obs, None, passes)
        feat = self.net.head_input(self.neutral_features(flat))
        return self.net.layer_forward("head", feat, self.views), Acted(obs, feat, None)

    def _step_rows(
        self, acted: Acted | None, obs: torch.Tensor, labels: torch.Tensor, neg: torch.Tensor
    ) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """The positive then negative rows ``(R, 2B, H)`` of act's all-label pass, if act
        made one for these inputs (with the parameters not yet updated)."""
        if acted is None or acted.passes is None or acted.obs is not obs:
            return None
        B = labels.shape[1]
        at = torch.arange(B, device=labels.device)
        rows = torch.cat([labels * B + at, neg * B + at], 1).unsqueeze(-1)  # (R, 2B, 1)
        return [
            (
                z.gather(1, rows.expand(-1, -1, z.shape[-1])),
                h.gather(1, rows.expand(-1, -1, h.shape[-1])),
            )
            for z, h in acted.passes
        ]

    def draw_negatives(self, labels: torch.Tensor) -> torch.Tensor:
        """A uniformly drawn wrong label per example: ``(y + 1 + k) mod C``, k ~ U{0..C−2}
        from replica r's own generator: ``(R, B)``."""
        B = labels.shape[1]
        k = torch.stack(
            [torch.randint(self.classes - 1, (B,), generator=g) for g in self.negatives]
        )
        return (labels + 1 + k) % self.classes

    def _inputs(self, flat: torch.Tensor, labels: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
        """Positive then negative embedded inputs ``(R, 2B, D')``."""
        mode = self.spec.embed
        return torch.cat(
            [embed(flat, labels, self.classes, mode), embed(flat, neg, self.classes, mode)], 1
        )

    def observe(
        self, obs: torch.Tensor, action: torch.Tensor, feedback: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """One local-learning step on the batch just answered; returns ``{"loss": (R,)}`` (the
        FF loss summed over layers, before the update) and, with a head, ``head_loss``."""
        acted, self._acted = self._acted, None
        flat = self._flat(obs)
        labels = feedback.to(torch.int64)
        neg = self.draw_negatives(labels)
        self._last = (obs, neg)
        x = self._inputs(flat, labels, neg)
        if self.spec.fast:
            rows = self._step_rows(acted, obs, labels, neg)
            step = hand_step(
                self.net, self.views, x, labels.shape[1], self.options, self.running,
                materialize=self.plan is None, forward=rows,
            )  # fmt: skip
        else:
            step = reference_step(
                self.net, self.views, x, labels.shape[1], self.options, self.running
            )
        grads, metrics = dict(step.grads), {"loss": step.losses.sum(1)}
        if self.net.has_head:
            feat = acted.features if acted is not None and acted.obs is obs else None
            if feat is None:
                with torch.no_grad():
                    feat = self.net.head_input(self.neutral_features(flat))
            head, metrics["head_loss"] = head_gradients(self.net, self.views, feat, labels)
            grads.update(head)
        flag, self._task_started = self._task_started, False
        for name, m in step.running.items():
            self.running[name].copy_(m)
        if self.plan is not None:
            self._fused_update(step, grads, flag)
            return metrics
        self._add_grad_l1(grads)
        with torch.no_grad():
            updates, self.learner_state = self.learner.update(
                grads, self.learner_state, self.views, features=step.features, task_start=flag
            )
            keys = list(self.views)
            torch._foreach_add_([self.views[k] for k in keys], [updates[k] for k in keys])
        return metrics

    @torch.no_grad()
    def _fused_update(self, step: LocalStep, grads: dict[str, torch.Tensor], flag: bool) -> None:
        """The learner's affine form in place: ``W ← (1 + β) W + α δᵀ x`` per layer (no
        gradient materialised; the head's ``grads`` as given), then its post."""
        assert self.plan is not None and step.deltas is not None
        alpha, beta = self.plan.grad_scale, self.plan.param_scale
        l1: list[torch.Tensor] | None = [] if self.grad_l1 is not None else None
        for name, (delta, h_in) in step.deltas.items():
            if l1 is not None:
                l1.append(gradient_l1(delta, h_in))
            w, b = self.views[f"{name}.weight"], self.views[f"{name}.bias"]
            w.baddbmm_(delta.transpose(1, 2), h_in, beta=1.0 + beta, alpha=alpha)
            b.mul_(1.0 + beta).add_(delta.sum(1), alpha=alpha)
        for k, g in grads.items():  # the head's
            self.views[k].mul_(1.0 + beta).add_(g, alpha=alpha)
            if l1 is not None and k == "head.weight":
                l1.append(g.abs().sum((1, 2)).double() + grads["head.bias"].abs().sum(1).double())
        if l1 is not None and self.grad_l1 is not None:
            self.grad_l1 += torch.stack(l1, 1)
            self.grad_steps += 1
        if self.plan.post is not None:
            self.learner_state = self.plan.post(
                self.learner_state, self.views, features=step.features, task_start=flag
            )

    def block_workers(self) -> int:
        """Threads :meth:`learn_block` runs replicas on: ``replica_workers`` if set, else one
        per core (at most one per replica)."""
        return max(1, min(len(self.seeds), self.replica_workers or os.cpu_count() or 1))

    def block_ready(self, batch_size: int) -> bool:
        """Whether :meth:`learn_block` takes steps of ``batch_size`` examples (the block loop
        computes this configuration: :attr:`block_problem` is None, and batch size 1)."""
        return self.block_problem is None and batch_size == 1

    @torch.no_grad()
    def learn_block(
        self, obs: torch.Tensor, target: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """T online steps at once, the same as T calls of :meth:`act` and :meth:`observe` (to
        float rounding; :mod:`contlearn.backends.ff_block`). Call only if :meth:`block_ready`.

        Args:
            obs: ``(T, R, 1, *input_shape)``.
            target: ``(T, R, 1)`` labels.

        Returns:
            ``(scores (T, R, 1, C) before each step's update, {"loss": (T, R)})``.
        """
        if self.block_problem is not None:
            raise RuntimeError(f"agent ff does not learn in blocks here: {self.block_problem}")
        T, R = obs.shape[:2]
        labels = target.to(torch.int64).reshape(T, R)
        neg = self.draw_negatives(labels.T).T  # (T, R): each replica's draws in step order
        names = [layer.name for layer in self.net.hidden_layers]
        weights = [self.views[f"{n}.weight"] for n in names]
        biases = [self.views[f"{n}.bias"] for n in names]
        plan = self.plan or self.anchor_plan
        state = self.learner_state
        adam = ff_block.block_adam(state, self.adam_plan, names)
        anchor = ff_block.block_anchor(state, self.anchor_plan, names)
        noise = ff_block.block_noise(state, self.plan, list(self.views), names)
        scores, loss = ff_block.ff_block_(
            weights, biases, obs.reshape(T, R, -1).to(torch.float32).contiguous(),
            labels.contiguous(), neg.contiguous(), self.options.thresholds,
            classes=self.classes, alpha=plan.grad_scale if plan else 1.0,
            scale=1.0 + plan.param_scale if plan else 1.0, adam=adam, anchor=anchor, noise=noise,
            activation=self.spec.activation, append=self.spec.embed == "append",
            length=self.spec.norm == "length", mean=self.spec.goodness == "mean",
            first=self.first - 1, gsum=self.grad_l1, workers=self.block_workers(),
        )  # fmt: skip
        if self.grad_l1 is not None:
            self.grad_steps += T
        if self.plan is not None and self.plan.noise is not None:  # (T updates' noise drawn)
            self.plan.noise.state(state).count.add_(T)
        self._acted, self._task_started = None, False
        if T:
            self._last = (obs[-1], neg[-1].unsqueeze(-1))
        return scores.unsqueeze(2), {"loss": loss}

    # -- probing ----------------------------------------------------------------------------

    @torch.no_grad()
    def features(self, obs: torch.Tensor) -> dict[str, torch.Tensor]:
        """Hidden activities ``{layer: (R, B, H)}`` on the neutral-label pass (no learning)."""
        hs = self.neutral_features(self._flat(obs))
        return {layer.name: h for layer, h in zip(self.net.hidden_layers, hs, strict=True)}

    def probe_negatives(self, labels: torch.Tensor) -> torch.Tensor:
        """Wrong labels for a probe batch from each replica's ``ff-probe`` seed, the same at
        every probe call (the training generators are not touched)."""
        gens = [torch.Generator().manual_seed(s) for s in self.probe_seeds]
        B = labels.shape[1]
        k = torch.stack([torch.randint(self.classes - 1, (B,), generator=g) for g in gens])
        return (labels + 1 + k) % self.classes

    @torch.no_grad()
    def _layer_goodness(
        self, obs: torch.Tensor, labels: torch.Tensor, neg: torch.Tensor
    ) -> list[torch.Tensor]:
        """Each layer's goodness ``(R, 2B)`` on positive then negative inputs."""
        x = self._inputs(self._flat(obs), labels, neg)
        return [goodness_of(h, self.spec.goodness) for h in self.net.activities(x, self.views)]

    def goodness_gap(self, obs: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{layer: (R,)}``: mean goodness on positive minus on negative inputs of the probe
        batch (negatives from :meth:`probe_negatives`); layer ``""``: summed over the layers
        from ``from_layer`` on (what ``predict=goodness`` compares)."""
        labels = target.to(torch.int64)
        B = labels.shape[1]
        gs = self._layer_goodness(obs, labels, self.probe_negatives(labels))
        gaps = [(g[:, :B].mean(1) - g[:, B:].mean(1)).to(torch.float64) for g in gs]
        out = {layer.name: gap for layer, gap in zip(self.net.hidden_layers, gaps, strict=True)}
        out[""] = torch.stack(gaps[self.first - 1 :]).sum(0)
        return out

    def probe_loss(self, obs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The FF loss summed over layers ``(R,)`` on ``(obs, target)`` with the current
        weights: with the negatives of the last step if ``obs`` is its batch (the plasticity
        probe's L_after), else the probe negatives."""
        labels = target.to(torch.int64)
        last = self._last
        neg = last[1] if last is not None and _same(last[0], obs) else self.probe_negatives(labels)
        B = labels.shape[1]
        gs = self._layer_goodness(obs, labels, neg)
        return sum(ff_loss(g, B, t) for g, t in zip(gs, self.options.thresholds, strict=True))  # type: ignore[return-value]

    def watch_gradients(self, on: bool = True) -> None:
        """Start (or stop) summing each layer's gradient L1 norm for ``grad_magnitude``."""
        if on and self.grad_l1 is not None:
            return
        n = len(self.net.layers)
        self.grad_l1 = torch.zeros(len(self.seeds), n, dtype=torch.float64) if on else None
        self.grad_steps = 0

    def _add_grad_l1(self, grads: dict[str, torch.Tensor]) -> None:
        if self.grad_l1 is None:
            return
        for i, layer in enumerate(self.net.layers):
            for k in (f"{layer.name}.weight", f"{layer.name}.bias"):
                g = grads[k].reshape(grads[k].shape[0], -1)
                self.grad_l1[:, i] += g.abs().sum(1).to(torch.float64)
        self.grad_steps += 1

    def update_stats(self) -> dict[str, dict[str, torch.Tensor]]:
        """``{"grad_magnitude": {layer: (R,)}}``: mean |∂L/∂θ| per layer (layer ``""``: all)
        over the steps since the last call; empty if none or not watched."""
        if self.grad_l1 is None or self.grad_steps == 0:
            return {}
        sizes = torch.tensor(
            [
                self.views[f"{layer.name}.weight"][0].numel() + layer.fan_out
                for layer in self.net.layers
            ],
            dtype=torch.float64,
        )
        total, steps = self.grad_l1.clone(), self.grad_steps
        out = {
            layer.name: total[:, i] / (sizes[i] * steps) for i, layer in enumerate(self.net.layers)
        }
        out[""] = total.sum(1) / (sizes.sum() * steps)
        self.grad_l1.zero_()
        self.grad_steps = 0
        return {"grad_magnitude": out}

    def diagnostics(self) -> dict[str, dict[str, torch.Tensor]]:
        """The learner's bookkeeping ``{layer: {metric: (R,)}}``."""
        return learner_diagnostics(self.learner_spec, self.learner_state)

    # -- checkpoints ------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Parameters, learner state, running means, the negatives' generators and the
        gradient sums, as plain tensors (``weights_only``-loadable)."""
        state: dict[str, Any] = {
            "params": {k: v.clone() for k, v in self.views.items()},
            "learner": [t.clone() for t in tree_leaves(self.learner_state)],
            "running": {k: v.clone() for k, v in self.running.items()},
            "negatives": torch.stack([g.get_state() for g in self.negatives]),
        }
        if self.grad_l1 is not None:
            state["grad_l1"], state["grad_steps"] = self.grad_l1.clone(), self.grad_steps
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        for k, v in self.views.items():
            v.copy_(state["params"][k])
        load_tree(self.learner_state, state["learner"])
        for k, v in self.running.items():
            v.copy_(state["running"][k])
        for g, s in zip(self.negatives, state["negatives"], strict=True):
            g.set_state(s.clone())
        if "grad_l1" in state:
            self.grad_l1 = state["grad_l1"].to(torch.float64, copy=True)
            self.grad_steps = int(state["grad_steps"])


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``b`` is ``a`` or a view of the same memory as ``a`` (a block's last step's
    batch, which the engine passes again as ``batch.obs[-1]``)."""
    return a is b or (
        a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
    )
