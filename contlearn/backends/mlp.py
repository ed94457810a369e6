"""The online MLP agent's backends: three faster ways to compute its reference step.

The reference (:class:`contlearn.agents.online.ReferenceStep`) takes autograd's gradients of
each replica's mean loss, hands them to ``learner.update`` and adds the updates. The backends,
in the order the agent asks them (:data:`BACKENDS`):

- :class:`BlockLoop` (``block``): whole batch-1 steps in one compiled loop per replica
  (:func:`contlearn.backends.block_kernel.online_block_`: forward, loss, backward with the fused
  update, continual backprop's steps 1–5), for learners whose fused form needs nothing per
  step but continual backprop's unit bookkeeping, and under backprop for Adam between affine
  maps (:mod:`contlearn.learners.adam_form`, its moments and counts in the same pass), for
  L2-Init and for ReDo / ReGraMa (:mod:`contlearn.learners.block_forms`);
- :class:`FusedBackward` (``fused``): the network's hand-written backward applying the
  learner's declared affine update ``θ ← (1 + β) θ + α g`` in place while it back-propagates
  (no gradient or update tensor), then the learner's post-update edit;
- :class:`HandBackward` (``backward``): the hand-written backward's gradients through
  ``learner.update``, for any learner.

Each takes the credit rules it declares (:data:`RULES`, ``block_kernel.BLOCK_RULES``;
docs/credit.md, Backends): the error sent down is the rule's (``δ B``, ``e D``,
``δ s·sign W``), and Kolen–Pollack's ``B`` learns in the same pass as ``W``.

Each says in :meth:`supports` which configurations it computes exactly (float rounding aside);
everything else runs the reference. ``tests/test_backends.py`` checks every registered learner ×
credit rule × activation × optimizer × stream kind × batch size against the reference.

A backend is built per agent (``Backend(agent)``) and holds what its steps keep between calls:
the forward pass ``act`` made for ``observe``, and the fused path's deferred input-layer update
(:meth:`FusedBackward.sync` applies it; the agent calls ``sync`` before anything reads weights).

(Over 400 lines: the three backends side by side, each narrowing the one before, so that what
each declares supported can be read against the others.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from contlearn.agents.network_options import CONCAT_ACTIVATIONS
from contlearn.agents.networks import ACTIVATIONS
from contlearn.backends import block_kernel, kernels
from contlearn.backends.base import StepConfig, declares
from contlearn.credit.learned import KolenPollack
from contlearn.credit.rules import DirectFeedback, FixedFeedback, SignSymmetry
from contlearn.learners.adam_form import AdamPlan
from contlearn.learners.base import AnchorState, find_states
from contlearn.learners.block_forms import AnchorPlan, ReDoForm, redo_segments
from contlearn.learners.optim import ScaleByAdamState
from contlearn.learners.redo import ReDoState

if TYPE_CHECKING:
    from contlearn.agents.online import OnlineAgent
    from contlearn.learners.fused import FusedPlan

#: the stream kinds whose loss the hand-written backward knows (cross-entropy, squared error)
_TASKS = ("classification", "regression")
#: the credit rules the hand-written backward computes (docs/credit.md); weight mirror's and
#: Kunin et al.'s learned feedback run the reference step
RULES = ("bp", "fa", "dfa", "sign-symmetry", "kolen-pollack")
#: the network options the hand-written backward computes (under backprop; with crelu and
#: fourier, :mod:`contlearn.agents.network_backward`)
NETWORK_OPTIONS = frozenset({"layer_norm"})


def loss_and_delta(
    out: torch.Tensor,
    target: torch.Tensor,
    classification: bool,
    minus_one: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each replica's mean loss ``(R,)`` and its gradient with respect to ``out`` (summed over
    replicas): cross-entropy (``softmax − one-hot``, over B) or squared error (``2 (ŷ − y) / B``).

    Args:
        out: ``(R, B, C)`` network outputs.
        target: ``(R, B)`` labels or ``(R, B, C)`` targets.
        classification: which loss.
        minus_one: optional cached ``(R, B, 1)`` tensor of −1 (classification).
    """
    B = out.shape[1]
    if not classification:
        diff = out - target
        return diff.pow(2).sum(-1).mean(1), diff.mul_(2.0 / B)
    logp = torch.log_softmax(out, -1)  # (R, B, C)
    idx = target.unsqueeze(-1)  # (R, B, 1)
    loss = logp.gather(-1, idx).mean((1, 2)).neg_()
    if minus_one is None or minus_one.shape != idx.shape:
        minus_one = torch.full(idx.shape, -1.0, dtype=out.dtype, device=out.device)
    delta = logp.exp_().scatter_add_(-1, idx, minus_one)  # softmax − one-hot
    return loss, (delta if B == 1 else delta.div_(B))


class HandBackward:
    """``backward``: the hand-written backward pass, gradients through ``learner.update``."""

    name = "backward"
    description = "hand-written backward pass (no autograd graph), then learner.update"

    @staticmethod
    def supports(cfg: StepConfig) -> bool:
        """The MLP under backprop, ``fa``, ``dfa``, ``sign-symmetry`` or ``kolen-pollack``
        (:data:`RULES`), any learner, for the losses it knows; ``sign-symmetry`` only with
        learners that declare a fused form (SGD's family). Its error is a sum of ``±s δ_k``,
        and the softmax's output error sums to zero, so a unit whose outgoing weights share
        one sign gets 0 up to rounding, which Adam-like learners scale to a whole step: there
        the update is decided by float rounding, and only the reference's own arithmetic
        gives the reference's numbers. Under backprop also the network options: ``layer_norm``
        and the activations crelu and fourier (:mod:`contlearn.agents.network_backward`)."""
        return (
            cfg.network == "mlp"
            and cfg.credit in RULES
            and (cfg.credit != "sign-symmetry" or cfg.fused is not None)
            and cfg.task in _TASKS
            and (
                (cfg.activation in ACTIVATIONS and declares(cfg))
                or (  # the network options, under backprop (agents/network_backward.py)
                    cfg.credit == "bp"
                    and cfg.activation in (*ACTIVATIONS, *CONCAT_ACTIVATIONS)
                    and declares(cfg, NETWORK_OPTIONS)
                )
            )
        )

    def __init__(self, agent: OnlineAgent) -> None:
        self.agent = agent
        self._cache: tuple[Any, ...] | None = None
        self._minus_one: torch.Tensor | None = None

    def sync(self) -> None:
        """Nothing is deferred on this path."""

    def act(self, flat: torch.Tensor) -> torch.Tensor:
        """The forward pass ``(R, B, C)``, kept for :meth:`observe`."""
        self.sync()
        with torch.no_grad():
            out, hs, zs = self.agent.net.forward_train(flat, self.agent.views)
        self._cache = (flat, out, hs, zs)
        return out

    def _loss_and_delta(
        self, out: torch.Tensor, target: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        classification = self.agent.info.kind == "classification"
        if classification and (
            self._minus_one is None or self._minus_one.shape[:2] != out.shape[:2]
        ):
            self._minus_one = torch.full(
                (*out.shape[:2], 1), -1.0, dtype=out.dtype, device=out.device
            )
        return loss_and_delta(out, target, classification, self._minus_one)

    @torch.no_grad()
    def observe(self, target: torch.Tensor, task_start: bool) -> torch.Tensor:
        """One step on the batch of the last :meth:`act`; returns the loss ``(R,)``."""
        assert self._cache is not None
        (flat, out, hs, zs), self._cache = self._cache, None
        agent = self.agent
        loss, delta = self._loss_and_delta(out, target)
        if not agent.credit.is_backprop:  # the reference's rule step, from this e = ∂L/∂ŷ
            agent.rule_update(flat, hs, zs, delta, task_start)
            return loss
        grads = agent.net.backward(delta, flat, hs, zs, agent.views)
        agent.add_grad_l1(grads)
        agent.apply_updates(grads, _features(agent, hs), task_start)
        return loss


class FusedBackward(HandBackward):
    """``fused``: the hand-written backward applying the learner's declared affine update in
    place (:mod:`contlearn.learners.fused`), then its post-update edit. For learners without a
    post the input layer's update is deferred to the next forward pass, which applies it and
    takes the dot products in one pass over those weights (:func:`kernels.input_layer_`)."""

    name = "fused"
    description = "hand-written backward with the learner's affine update fused in place"

    @staticmethod
    def supports(cfg: StepConfig) -> bool:
        """As :class:`HandBackward`, for learners that declare a fused form; under a rule whose
        feedback is learned (``kolen-pollack``: ``ΔB = ΔW``), only without a post-update edit
        (noise, resets, which also reset B) and without ``credit.regularize`` (the learner
        acting on B), so that the affine step on W is the whole update B follows."""
        return (
            HandBackward.supports(cfg)
            and cfg.activation in ACTIVATIONS
            and declares(cfg)  # (no layer norm: BatchedMLP.backward_update_ has none)
            and cfg.fused is not None
            and not (
                cfg.credit_learned
                and (cfg.fused.post is not None or cfg.credit_options.get("regularize", False))
            )
        )

    def __init__(self, agent: OnlineAgent) -> None:
        super().__init__(agent)
        plan = agent.plan
        assert plan is not None
        self.plan: FusedPlan = plan
        first = agent.net.layers[0].name
        w = agent.views[f"{first}.weight"]
        self._first = (f"{first}.weight", f"{first}.bias")
        #: kolen-pollack's rule (its B learns with the update, W and B decay), else None
        self._kp = agent.credit if isinstance(agent.credit, KolenPollack) else None
        self._defer = (
            self.plan.post is None
            and self._kp is None  # (the decay follows the update at once)
            and kernels.applies(w, w[:, :1], w[:, :1])
        )
        self._pending: kernels.Pending | None = None

    def sync(self) -> None:
        """Apply the deferred update of the input layer, if any."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            kernels.input_layer_(self.agent.views[self._first[0]], pending)

    def act(self, flat: torch.Tensor) -> torch.Tensor:
        """The forward pass, applying a deferred input-layer update in the same pass."""
        views = self.agent.views
        with torch.no_grad():
            first = None
            if self._defer and flat.shape[1] <= kernels.MAX_BATCH:
                pending, self._pending = self._pending, None
                first = kernels.input_layer_(
                    views[self._first[0]], pending, flat, views[self._first[1]]
                )
            else:
                self.sync()
            out, hs, zs = self.agent.net.forward_train(flat, views, first)
        self._cache = (flat, out, hs, zs)
        return out

    @torch.no_grad()
    def observe(self, target: torch.Tensor, task_start: bool) -> torch.Tensor:
        """The fused step on the batch of the last :meth:`act`; returns the loss ``(R,)``."""
        assert self._cache is not None
        (flat, out, hs, zs), self._cache = self._cache, None
        agent, plan = self.agent, self.plan
        loss, delta = self._loss_and_delta(out, target)
        defer = self._defer and flat.shape[1] <= kernels.MAX_BATCH
        cols, first = agent.net.backward_update_(
            delta,
            flat,
            hs,
            zs,
            plan.grad_scale,
            plan.param_scale,
            plan.col_l1,
            agent.views,
            defer_first=defer,
            grad_l1=agent.grad_l1,
            signal=None if agent.credit.is_backprop else self._signal(delta, flat, hs),
        )
        if self._kp is not None and self._kp.decay:  # W ← (1 − λ) W after B ← (1 − λ)(B + u)
            torch._foreach_mul_(
                [agent.views[f"{la.name}.weight"] for la in agent.net.layers], 1.0 - self._kp.decay
            )
        if agent.grad_l1 is not None:
            agent.grad_steps += 1
        if first is not None:
            self._pending = (first, flat, plan.grad_scale, plan.param_scale)
        if plan.post is not None:
            agent.learner_state = plan.post(
                agent.learner_state,
                agent.views,
                features=_features(agent, hs),
                task_start=task_start,
                col_l1=cols,
            )
        return loss

    def _signal(
        self, e: torch.Tensor, flat: torch.Tensor, hs: list[torch.Tensor]
    ) -> Callable[[int, torch.Tensor], torch.Tensor]:
        """The rule's error sent down by layer i, taken before the layer's update
        (:meth:`~contlearn.credit.rules.FeedbackRule.signal`); for kolen-pollack also
        ``B_i ← (1 − λ)(B_i + u_i)`` with the layer's fused update ``u = α δᵀh + β W``."""
        agent, plan, kp = self.agent, self.plan, self._kp

        def signal(i: int, delta: torch.Tensor) -> torch.Tensor:
            below = agent.credit.signal(i, delta, e, agent.views)
            if kp is not None:
                name = agent.net.layers[i].name
                b, w = kp.feedback[name], agent.views[f"{name}.weight"]
                if plan.param_scale:
                    b.add_(w, alpha=plan.param_scale)
                b.baddbmm_(delta.transpose(1, 2), hs[i - 1], alpha=plan.grad_scale)
                if kp.decay:
                    b.mul_(1.0 - kp.decay)
            return below

        return signal


class BlockLoop(FusedBackward):
    """``block``: whole batch-1 steps in one compiled loop per replica while its weights stay
    in cache (:meth:`learn_block`); a replica stops at a step where continual backprop must
    replace units, whose fresh rows Python draws from the replica's generator. The update is
    the learner's fused affine form or its Adam form (Adam between affine maps,
    :mod:`contlearn.learners.adam_form`: moments and per-element counts in the same pass), or
    L2-Init's anchored form; under ReDo the block runs in pieces that end where its window
    opens and where it checks (the kernel adds to the window sums, ReDo's code resets).
    Single steps (``act``/``observe``) take the fused path (Adam: the hand-written backward
    through ``learner.update``)."""

    name = "block"
    description = "whole batch-1 steps in one compiled C loop per replica (cores in parallel)"

    @staticmethod
    def supports(cfg: StepConfig) -> bool:
        """Batch 1 on CPU float32 with the compiled kernels, an activation the loop knows, and
        a fused learner with no post-update edit but continual backprop's (in the form the
        loop takes: :class:`contlearn.learners.fused.UnitReplacer`) or, under backprop,
        shrink-and-perturb's noise (:class:`contlearn.learners.fused.NoiseForm`, drawn in the
        kernel by the same counter-based definition), or under backprop a
        learner with an Adam form (``adam``, ``proper-adam``, L2 over Adam, CBP over Adam) or
        a block-only form (:mod:`contlearn.learners.block_forms`: L2-Init over SGD's family,
        ReDo and ReGraMa over SGD's family or over Adam between affine maps)."""
        plan = cfg.fused
        loop = (
            cfg.batch_size == 1
            and cfg.kernels
            and cfg.device == "cpu"
            and cfg.dtype == "float32"
            and cfg.credit in block_kernel.BLOCK_RULES
            and cfg.activation in block_kernel.BLOCK_ACTIVATIONS
            and cfg.depth + 1 <= block_kernel.MAX_BLOCK_LAYERS
        )
        if plan is None and cfg.adam is None:  # L2-Init's anchored form, ReDo: backprop only
            return (
                loop
                and isinstance(cfg.block_form, (AnchorPlan, ReDoForm))
                and cfg.credit == "bp"
                and HandBackward.supports(cfg)
                and declares(cfg)
            )
        if plan is None:  # Adam's form: the kernel applies it under backprop only
            return (
                loop
                and cfg.adam is not None
                and cfg.credit == "bp"
                and HandBackward.supports(cfg)
                and declares(cfg)
            )
        return (
            loop
            and FusedBackward.supports(cfg)
            and (
                plan.post is None
                or plan.replacer is not None
                or (plan.noise is not None and cfg.credit == "bp")  # (shrink-and-perturb)
            )
        )

    def __init__(self, agent: OnlineAgent) -> None:
        self._adam: AdamPlan | None = agent.adam_plan if agent.plan is None else None
        #: L2-Init's anchored form or ReDo's (contlearn/learners/block_forms.py), else None
        self._form: AnchorPlan | ReDoForm | None = (
            agent.block_form if agent.plan is None and self._adam is None else None
        )
        self._hand = self._adam is not None or self._form is not None
        if not self._hand:
            super().__init__(agent)
        else:  # single steps: the hand-written backward through learner.update
            HandBackward.__init__(self, agent)
            self._pending = None

    def act(self, flat: torch.Tensor) -> torch.Tensor:
        """The fused path's forward pass (Adam, L2-Init, ReDo: the hand-written backward's)."""
        if self._hand:
            return HandBackward.act(self, flat)
        return super().act(flat)

    @torch.no_grad()
    def observe(self, target: torch.Tensor, task_start: bool) -> torch.Tensor:
        """The fused path's step (Adam, L2-Init, ReDo: the hand-written backward's, then
        ``learner.update``); returns the loss ``(R,)``."""
        if self._hand:
            return HandBackward.observe(self, target, task_start)
        return super().observe(target, task_start)

    @torch.no_grad()
    def learn_block(
        self, obs: torch.Tensor, target: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """T online steps at once: the same as T calls of ``act`` and ``observe``.

        Args:
            obs: ``(T, R, 1, *input_shape)``.
            target: ``(T, R, 1)`` labels, or ``(T, R, 1, C)`` regression targets.

        Returns:
            ``(predictions (T, R, 1, C) made before each step's update, {"loss": (T, R)})``.
        """
        agent, adam = self.agent, self._adam
        T, R = obs.shape[:2]
        x = obs.reshape(T, R, -1).to(torch.float32).contiguous()
        C = agent.info.num_outputs
        classification = agent.info.kind == "classification"
        y = (
            target.reshape(T, R).to(torch.int64)
            if classification
            else target.reshape(T, R, C).to(torch.float32)
        ).contiguous()
        self.sync()
        self._cache = None
        layers = agent.net.layers
        weights = [agent.views[f"{layer.name}.weight"] for layer in layers]
        biases = [agent.views[f"{layer.name}.bias"] for layer in layers]
        out = torch.empty(T, R, C)
        loss = torch.empty(T, R)
        start = torch.zeros(R, dtype=torch.int64)
        events = torch.zeros(R, max(len(layers) - 1, 1), dtype=torch.int64)
        form = self._form
        redo = form if isinstance(form, ReDoForm) else None
        # (L2-Init, ReDo: no replacer)
        inner = form.inner if isinstance(form, ReDoForm) else form
        affine: FusedPlan | AnchorPlan | None = None
        if isinstance(inner, AdamPlan):  # ReDo over Adam
            adam = inner
        else:
            affine = inner
        if adam is None and affine is None:
            alpha, beta, replacer = self.plan.grad_scale, self.plan.param_scale, self.plan.replacer
        elif adam is None:
            assert affine is not None
            alpha, beta, replacer = affine.grad_scale, affine.param_scale, None
        else:
            alpha, beta, replacer = 0.0, 0.0, adam.replacer
        block_adam = None if adam is None else _block_adam(agent, adam)
        anchor = _block_anchor(agent, affine) if isinstance(affine, AnchorPlan) else None
        cbp = None
        if replacer is not None:
            cbp = replacer.kernel_state(agent.learner_state)
            if cbp is None:  # supports() promised otherwise: a bug, never a silent other path
                raise RuntimeError(
                    "the block backend was chosen but continual backprop's "
                    "state is not in the kernel's form"
                )
        pending = block_kernel.Pending1.empty(R, weights[0].shape[1])
        workers = agent.block_workers()
        credit = _block_credit(agent)
        plan = agent.plan if adam is None and self._form is None else None  # (S&P: its noise)
        noise = None if plan is None else _block_noise(agent, plan)
        # ReDo: the block in pieces, ending where its window starts and where it checks
        state = _redo_state(agent) if redo is not None else None
        pieces = [(0, T, False, False)]
        if redo is not None and state is not None:
            pieces = redo_segments(int(state.count), T, redo.period, redo.window)
        for first, end, in_window, check in pieces:
            start.fill_(first)
            sums = None
            if in_window and redo is not None and state is not None:
                names = [layer.name for layer in agent.net.hidden_layers]
                sums = block_kernel.BlockReDo([state.act_sum[n] for n in names], redo.score)
            while True:
                block_kernel.online_block_(
                    weights,
                    biases,
                    x[:end],
                    y[:end],
                    classification,
                    alpha,
                    beta,
                    agent.spec.activation,
                    out[:end],
                    loss[:end],
                    start,
                    events,
                    cbp,
                    pending,
                    workers,
                    agent.grad_l1,
                    credit,
                    block_adam,
                    noise=noise,
                    anchor=anchor,
                    redo=sums,
                )
                if cbp is not None and bool(events.any()):
                    assert replacer is not None
                    replacer.replace(
                        agent.learner_state, agent.views, list(events.T.contiguous()), pending.skip
                    )
                    events.zero_()
                    continue  # (the next call also applies what is pending)
                if bool((start >= end).all()):
                    break
            if redo is not None and state is not None:  # (every update of the piece applied)
                state.count.add_(end - first)
                for age in state.stats.age.values():
                    age.add_(end - first)
                if check:
                    redo.recycle(state, agent.views)
        agent.grad_steps += T
        if plan is not None and plan.noise is not None:  # (the noise of T updates drawn)
            plan.noise.state(agent.learner_state).count.add_(T)
        return out.unsqueeze(2), {"loss": loss}


def _block_noise(agent: OnlineAgent, plan: FusedPlan) -> block_kernel.BlockNoise | None:
    """Shrink-and-perturb's noise for the kernel: keys, update count, each layer's weight and
    bias index in the parameter order (the order of ``agent.views``, which the post reads)."""
    if plan.noise is None or not plan.noise.sigma:
        return None
    state = plan.noise.state(agent.learner_state)
    order = {k: i for i, k in enumerate(agent.views)}
    index = [(order[f"{la.name}.weight"], order[f"{la.name}.bias"]) for la in agent.net.layers]
    if len(order) != 2 * len(index):  # (supports() promised an MLP's weights and biases only)
        raise RuntimeError("the block backend was chosen for a network with other parameters")
    return block_kernel.BlockNoise(plan.noise.sigma, state.key, int(state.count), index)


def _block_credit(agent: OnlineAgent) -> block_kernel.BlockCredit:
    """The agent's credit rule as the whole-step kernel takes it (its feedback tensors, which
    kolen-pollack's steps update in place)."""
    rule, layers = agent.credit, agent.net.layers
    feedback: tuple[torch.Tensor | None, ...] = ()
    if isinstance(rule, DirectFeedback):  # layer i sends e D of the layer below it
        feedback = (None, *(rule.feedback[layers[i - 1].name] for i in range(1, len(layers))))
    elif isinstance(rule, FixedFeedback):  # fa, kolen-pollack: B_i
        feedback = (None, *(rule.feedback[layer.name] for layer in layers[1:]))
    if not all(f is None or (f.is_contiguous() and f.dtype == torch.float32) for f in feedback):
        raise RuntimeError("the block backend was chosen but the feedback is not in its form")
    keep = 1.0 - rule.decay if isinstance(rule, KolenPollack) else 1.0
    unit = isinstance(rule, SignSymmetry) and rule.scale == "unit"
    return block_kernel.BlockCredit(rule.name, feedback, keep, unit)


def _block_adam(agent: OnlineAgent, plan: AdamPlan) -> block_kernel.BlockAdam:
    """The learner's Adam state (its one :class:`ScaleByAdamState`, updated in place by the
    kernel) and the plan's options as the whole-step kernel takes them."""
    found = find_states(agent.learner_state, ScaleByAdamState)
    if len(found) != 1:  # supports() promised one Adam: a bug, never a silent other path
        raise RuntimeError(f"the block backend was chosen but the learner has {len(found)} Adams")
    s = found[0]
    ws = [f"{layer.name}.weight" for layer in agent.net.layers]
    bs = [f"{layer.name}.bias" for layer in agent.net.layers]
    o = plan.adam
    return block_kernel.BlockAdam(
        [s.mu[n] for n in ws], [s.nu[n] for n in ws], [s.count[n] for n in ws],
        [s.mu[n] for n in bs], [s.nu[n] for n in bs], [s.count[n] for n in bs],
        plan.pre_a, plan.pre_b, o.b1, o.b2, o.eps, plan.lr, plan.post_b,
    )  # fmt: skip


def _block_anchor(agent: OnlineAgent, plan: AnchorPlan) -> block_kernel.BlockAnchor:
    """L2-Init's anchors (the learner's one :class:`AnchorState`) and γ, for the kernel."""
    found = find_states(agent.learner_state, AnchorState)
    if len(found) != 1:  # supports() promised one L2-Init: a bug, never a silent other path
        raise RuntimeError(f"the block backend was chosen but the learner has {len(found)} anchors")
    anchor, layers = found[0].anchor, agent.net.layers
    return block_kernel.BlockAnchor(
        [anchor[f"{layer.name}.weight"] for layer in layers],
        [anchor[f"{layer.name}.bias"] for layer in layers],
        plan.anchor_scale,
    )


def _redo_state(agent: OnlineAgent) -> ReDoState:
    """ReDo's state: the whole learner's (ReDo declares its form only as the outermost)."""
    state = agent.learner_state
    if not isinstance(state, ReDoState):
        raise RuntimeError("the block backend was chosen for ReDo but its state is not ReDo's")
    return state


def _features(agent: OnlineAgent, hs: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    return {layer.name: h for layer, h in zip(agent.net.hidden_layers, hs, strict=True)}


#: the online agent's backends, in the order it asks them
BACKENDS: list[type[HandBackward]] = [BlockLoop, FusedBackward, HandBackward]
