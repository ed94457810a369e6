"""PPO under a credit rule other than backprop: one rule per net (docs/credit.md, "PPO").

The output error of each net is the gradient of the PPO minibatch loss L (each replica's mean
over its minibatch of the clipped surrogate, plus ``c_V`` times the squared value error, minus
``c_H`` times the entropy; :func:`~contlearn.agents.ppo_loss.output_loss`) with respect to that
net's output, by autograd through the loss alone: ``e_π = ∂L/∂μ`` ``(R, M, A)`` for the policy
net (the action means) and ``e_V = ∂L/∂V`` ``(R, M, 1)`` for the value net; the log-std ``s``
gets its true gradient ``∂L/∂s``. Each net's forward gradients are then
:func:`~contlearn.credit.rules.rule_gradients` with the net's own rule instance, and the
minibatch goes on exactly as under backprop: clipping (``max_grad_norm``), the learner's
update and its application (:meth:`~contlearn.agents.ppo.PPOAgent.learn`); then each rule's
:meth:`~contlearn.credit.rules.FeedbackRule.learn` on its own net.

Randomness: the policy's rule is built for the replica seeds ``purpose_seed(s_r,
"credit-policy")``, the value's for ``purpose_seed(s_r, "credit-value")``
(:func:`contlearn.seeding.purpose_seed`), so the two nets' feedback is drawn independently
and replica r's from its own seed only.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from contlearn.agents.actor_critic import ActorCritic
from contlearn.agents.ppo_loss import StepResult, output_loss
from contlearn.backends.base import REFERENCE, StepConfig
from contlearn.credit import Credit, alignment, build_credit
from contlearn.credit.rules import FeedbackRule, rule_gradients
from contlearn.learners.resets import FEEDBACK, FeedbackReset
from contlearn.probes.measures import with_layer_mean
from contlearn.seeding import purpose_seed

#: the nets that get a rule each, in the order they are built and their feedback drawn
NETS = ("policy", "value")
#: the parameter outside both MLPs (its gradient is autograd's)
LOG_STD = "policy.log_std"

#: the key of the minibatch kept for the probes in :meth:`PPOCredit.state_dict`
PROBE_MINIBATCH = "probe_minibatch"

#: each net's layer inputs of a minibatch, ``{net: [x, h_1, ..., h_L]}`` (each ``(R, M, ·)``)
Inputs = dict[str, list[torch.Tensor]]


def net_part(tree: Mapping[str, torch.Tensor], net: str) -> dict[str, torch.Tensor]:
    """The entries of ``tree`` (keyed by the actor-critic's prefixed names) that belong to MLP
    ``net``, keyed by the MLP's own names (``policy.hidden1.weight`` -> ``hidden1.weight``)."""
    prefix = f"{net}."
    return {
        k.removeprefix(prefix): v for k, v in tree.items() if k.startswith(prefix) and k != LOG_STD
    }


class PPOCredit:
    """A credit rule for each of :class:`ActorCritic`'s nets (see the module docstring).

    Args:
        credit: the rule and its options.
        net: the actor-critic.
        seeds: the replicas' root seeds.
        lr: the agent's learning rate (learned feedback's default rate).
    """

    def __init__(self, credit: Credit, net: ActorCritic, seeds: Sequence[int], lr: float) -> None:
        self.name = credit.name
        #: ``{net: rule}``
        self.rules: dict[str, FeedbackRule] = {
            n: build_credit(
                credit, net.nets[n], [purpose_seed(s, f"credit-{n}") for s in seeds], lr
            )
            for n in NETS
        }
        #: the last update's last minibatch, kept for the ``feedback_alignment`` probe (RL
        #: probe batches hold observations only; the angle needs a loss)
        self.probe_minibatch: dict[str, torch.Tensor] | None = None

    @property
    def feedback(self) -> dict[str, torch.Tensor]:
        """Every feedback matrix, ``{prefixed layer name: (R, rows, cols)}`` (the tensors)."""
        return {f"{n}.{k}": v for n, rule in self.rules.items() for k, v in rule.feedback.items()}

    @property
    def learned(self) -> bool:
        """Whether the feedback is learned (resets re-initialise it with the units)."""
        return any(rule.learned for rule in self.rules.values())

    @property
    def regularized(self) -> bool:
        """Whether the learner chain also acts on the feedback (``credit.regularize``)."""
        return any(rule.regularized for rule in self.rules.values())

    def learner_params(self, params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """What the learner chain acts on: ``params``, and with ``credit.regularize`` the
        learned feedback as ``feedback.policy.hidden2`` … (zero loss gradient)."""
        if not self.regularized:
            return dict(params)
        return {**params, **{FEEDBACK + k: b for k, b in self.feedback.items()}}

    def weight_alignment(self, net: ActorCritic) -> dict[str, torch.Tensor]:
        """``{prefixed layer: (R,)}`` angles (degrees) between each net's feedback and the
        forward weights it stands in for (:func:`contlearn.credit.alignment.weight_alignment`),
        and ``""``, their mean over both nets' layers."""
        per_layer: dict[str, torch.Tensor] = {}
        for n, rule in self.rules.items():
            found = alignment.weight_alignment(net.nets[n], net.nets[n].params, rule)
            per_layer.update({f"{n}.{k}": v for k, v in found.items() if k})
        return with_layer_mean(per_layer)

    def feedback_alignment(
        self, net: ActorCritic, clip: float, vf_coef: float, ent_coef: float
    ) -> dict[str, torch.Tensor]:
        """``{prefixed hidden layer: (R,)}`` angles (degrees) between the error each net's
        rule sends to its hidden layers and backprop's, on the last update's last minibatch
        with the current networks (:func:`contlearn.credit.alignment.feedback_alignment`; the
        output errors ``e_π``, ``e_V`` as in training), and ``""``, their mean; empty before
        the first update."""
        mb = self.probe_minibatch
        if mb is None:
            return {}
        params = {n: {k: v.detach() for k, v in net.nets[n].params.items()} for n in NETS}
        with torch.no_grad():
            passes = {n: net.nets[n].forward_train(mb["obs"], params[n]) for n in NETS}
        errors = output_errors(net, params, passes, mb, clip, vf_coef, ent_coef)[2]
        per_layer: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for n, rule in self.rules.items():
                found = alignment.feedback_alignment(
                    net.nets[n], params[n], rule, mb["obs"], functools.partial(_given, errors[n])
                )
                per_layer.update({f"{n}.{k}": v for k, v in found.items() if k})
        return with_layer_mean(per_layer)

    def update_extras(self) -> dict[str, Any]:
        """The extras of ``learner.update``: learned feedback for resets (``feedback=``, keyed
        by the prefixed layer names the learner's network uses), none for fixed feedback."""
        return {"feedback": FeedbackReset(self.feedback, {})} if self.learned else {}

    def learn(
        self,
        views: Mapping[str, torch.Tensor],
        updates: Mapping[str, torch.Tensor],
        inputs: Inputs,
        stopped: torch.Tensor | None = None,
    ) -> None:
        """Each rule's feedback learning after the minibatch update ``views += updates``.

        Args:
            views: the agent's parameters (prefixed names; a rule may edit them in place).
            updates: the update just applied (prefixed names).
            inputs: each net's layer inputs on this minibatch.
            stopped: ``(R,)`` replicas that do not learn: their weights and feedback are kept.
        """
        kept = None
        if stopped is not None:
            kept = [(t, t[stopped].clone()) for t in [*views.values(), *self.feedback.values()]]
        for n, rule in self.rules.items():
            rule.learn(net_part(views, n), net_part(updates, n), inputs[n])
        for t, saved in kept or ():
            t[stopped] = saved

    def state_dict(self) -> dict[str, Any]:
        """Each rule's :meth:`~contlearn.credit.rules.FeedbackRule.state_dict`, by net, and
        the minibatch kept for the probes (``probe_minibatch``, if any)."""
        state: dict[str, Any] = {n: rule.state_dict() for n, rule in self.rules.items()}
        if self.probe_minibatch is not None:
            state[PROBE_MINIBATCH] = {k: v.clone() for k, v in self.probe_minibatch.items()}
        return state

    def load_state_dict(self, state: Mapping[str, Any] | None) -> None:
        """Restore what :meth:`state_dict` returned (None: a checkpoint without it)."""
        if state is None:
            raise ValueError(f"the checkpoint holds no feedback for credit rule {self.name}")
        nets = set(state) - {PROBE_MINIBATCH}
        if nets != set(NETS):
            raise ValueError(f"the checkpoint's credit state has nets {sorted(nets)}, not {NETS}")
        for n, rule in self.rules.items():
            rule.load_state_dict(state[n])
        kept = state.get(PROBE_MINIBATCH)
        self.probe_minibatch = None if kept is None else {k: v.clone() for k, v in kept.items()}

    def to(self, device: torch.device) -> None:
        """Move every rule's feedback to ``device`` (generators stay on the CPU)."""
        for rule in self.rules.values():
            rule.to(device)


def _given(error: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """The output error ``error``, computed beforehand (whatever the outputs ``out``)."""
    return error


def output_errors(
    net: ActorCritic,
    params: Mapping[str, Mapping[str, torch.Tensor]],
    passes: Mapping[str, Any],
    mb: Mapping[str, torch.Tensor],
    clip: float,
    vf_coef: float,
    ent_coef: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor]:
    """The minibatch loss ``(R,)``, its statistics, each net's output error ``{net: (R, M,
    outputs)}`` (``e_π = ∂L/∂μ``, ``e_V = ∂L/∂V``, by autograd through the loss alone) and
    the log-std's gradient, from each net's ``forward_train`` pass ``passes[net]``."""
    with torch.no_grad():
        mean = passes["policy"][0]  # (R, M, A)
        value = net.value_output(passes["value"][1][-1], dict(params["value"]))  # (R, M)
    with torch.enable_grad():
        mu, v, s = (t.detach().requires_grad_(True) for t in (mean, value, net.params[LOG_STD]))
        loss, stats = output_loss(mu, v, s, mb, clip, vf_coef, ent_coef)
        e_mean, e_value, g_log_std = torch.autograd.grad(loss.sum(), [mu, v, s])
    errors = {"policy": e_mean, "value": e_value.unsqueeze(-1)}
    return loss.detach(), stats, errors, g_log_std


def credit_loss_and_grads(
    net: ActorCritic,
    credit: PPOCredit,
    mb: Mapping[str, torch.Tensor],
    clip: float,
    vf_coef: float,
    ent_coef: float,
) -> tuple[StepResult, Inputs]:
    """One minibatch's loss, statistics, the gradients ``credit`` assigns (keyed and ordered
    like ``net.params``) and hidden activations, all detached; and each net's layer inputs.

    Args:
        net: the actor-critic.
        credit: its rules.
        mb: ``obs (R, M, D)``, ``action (R, M, A)``, ``logp``, ``adv``, ``ret`` ``(R, M)``.
        clip, vf_coef, ent_coef: as in :class:`~contlearn.agents.ppo.PPOSpec`.
    """
    x = mb["obs"]
    params = {n: {k: v.detach() for k, v in net.nets[n].params.items()} for n in NETS}
    with torch.no_grad():
        passes = {n: net.nets[n].forward_train(x, params[n]) for n in NETS}  # (out, hs, zs)
    loss, stats, errors, g_log_std = output_errors(net, params, passes, mb, clip, vf_coef, ent_coef)
    grads, feats, inputs = {LOG_STD: g_log_std}, {}, {}
    with torch.no_grad():
        for n in NETS:
            mlp, (_, hs, zs) = net.nets[n], passes[n]
            g = rule_gradients(mlp, params[n], credit.rules[n], x, hs, zs, errors[n])
            grads.update({f"{n}.{k}": v for k, v in g.items()})
            feats.update(
                {f"{n}.{layer.name}": h for layer, h in zip(mlp.hidden_layers, hs, strict=True)}
            )
            inputs[n] = [x, *hs]
    ordered = {k: grads[k] for k in net.params}
    return (loss.detach(), stats, ordered, feats), inputs


class CreditStep:
    """PPO's reference minibatch step under a credit rule other than backprop: the gradients
    of :func:`credit_loss_and_grads`, :meth:`~contlearn.agents.ppo.PPOAgent.learn` as under
    backprop, then :meth:`PPOCredit.learn`. Its name is ``reference``: it is the definition."""

    name = REFERENCE
    description = "PPO's minibatch loss in torch ops; autograd for ∂L/∂outputs, then the rule"

    def __init__(self, credit: PPOCredit) -> None:
        self.credit = credit

    def supports(self, cfg: StepConfig) -> bool:
        """Configurations of this step's rule."""
        return cfg.credit == self.credit.name

    def loss_and_grads(
        self,
        net: Any,
        mb: Mapping[str, torch.Tensor],
        clip: float,
        vf_coef: float,
        ent_coef: float,
        pool: ThreadPoolExecutor | None = None,
    ) -> StepResult:
        """See :meth:`~contlearn.agents.ppo_loss.PPOBackend.loss_and_grads` (``pool`` is not
        used)."""
        return credit_loss_and_grads(net, self.credit, mb, clip, vf_coef, ent_coef)[0]

    def update(
        self, agent: Any, data: dict[str, torch.Tensor], orders: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """One update's minibatch steps in this process; statistics summed."""
        s = agent.spec
        totals: dict[str, torch.Tensor] = {}
        for mb, first in agent.minibatches(data, orders):
            (_, stats, grads, features), inputs = credit_loss_and_grads(
                agent.net, self.credit, mb, s.clip, s.vf_coef, s.ent_coef
            )
            updates = agent.learn(grads, features, first)
            with torch.no_grad():
                self.credit.learn(agent._views, updates, inputs, agent._stopped)
            last = mb
            for k, v in stats.items():
                totals[k] = totals[k] + v if k in totals else v
        if totals:  # (the feedback_alignment probe's minibatch)
            self.credit.probe_minibatch = {k: v.detach().clone() for k, v in last.items()}
        return totals
