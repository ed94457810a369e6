"""The credit-assignment rules, on the replica-batched MLP (docs/credit.md).

Conventions (torch's): layer i computes ``z_i = h_{i-1} W_iᵀ + b_i`` with ``W_i (out, in)``,
``h_i = f(z_i)``; the output layer's ``z`` is the prediction ŷ and ``e = ∂L/∂ŷ`` (L: each
replica's mean loss over its batch). Going down, layer i hands layer i − 1 the error
``g_{i-1} = signal_i`` and ``δ_{i-1} = g_{i-1} ⊙ f'(z_{i-1})``; every rule's forward-weight
gradient is then ``∂W_i = δ_iᵀ h_{i-1}``, ``∂b_i = Σ_batch δ_i`` (the learner chain turns it into
the update). The signal:

- ``bp``: ``δ_i W_i``;
- ``fa``, ``kolen-pollack``, ``weight-mirror``, the Kunin rules: ``δ_i B_i``, ``B_i`` of the
  shape of ``W_i`` (layers 2 … output; the first layer sends nothing);
- ``sign-symmetry``: ``δ_i (s · sign W_i)``;
- ``dfa``: ``e D_{i-1}``, one fixed ``D (outputs, units)`` per hidden layer.

Learned feedback learns after the step's forward update (:meth:`FeedbackRule.learn`), from the
updated forward weights. Feedback and its random stream are in :meth:`FeedbackRule.state_dict`
(checkpoints, exact resume). Replica r's feedback and noise come from generators of replica
r's seed only (docs/design.md §2).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from contlearn.agents.networks import BatchedMLP, Layer, activation_backward, init_bounds
from contlearn.seeding import torch_generator


class FeedbackRule:
    """Backprop, and the base of every rule: what the error signal is, and how feedback learns.

    Args:
        network: the agent's network (its layers and init distribution).
        seeds: the replicas' root seeds.
    """

    #: the registered name
    name = "bp"
    #: whether the agent may compute this rule's gradients with autograd (backprop only)
    is_backprop = True
    #: whether the feedback is learned: resets re-initialise it with the units' forward
    #: weights (:class:`~contlearn.learners.resets.FeedbackReset`); fixed feedback never changes
    learned = False
    #: whether the learner chain also acts on the feedback (``credit.regularize``): the agent
    #: then hands it the matrices as parameters ``feedback.<layer>`` with zero gradient
    regularized = False

    def __init__(self, network: BatchedMLP, seeds: Sequence[int]) -> None:
        self.net = network
        self.seeds = list(seeds)
        #: ``{layer name: (R, rows, cols)}``: the feedback matrices (none for backprop)
        self.feedback: dict[str, torch.Tensor] = {}

    def signal(
        self, i: int, delta: torch.Tensor, e: torch.Tensor, params: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """The error layer ``i`` (> 0) sends down, ``(R, B, fan_in)``.

        Args:
            i: the index of the sending layer in ``network.layers``.
            delta: its error at the pre-activation ``δ_i``, ``(R, B, fan_out)``.
            e: the output error ``∂L/∂ŷ``, ``(R, B, outputs)``.
            params: the parameters the forward pass used.
        """
        return torch.bmm(delta, params[f"{self.net.layers[i].name}.weight"])

    def learn(
        self,
        params: dict[str, torch.Tensor],
        updates: dict[str, torch.Tensor],
        inputs: list[torch.Tensor],
    ) -> None:
        """After the step's update ``params += updates``: learn the feedback (fixed: nothing).

        Args:
            params: the updated parameters (a rule may edit them: Kolen–Pollack's decay).
            updates: the update the learner chain just applied.
            inputs: each layer's input on this step, ``[(R, B, fan_in)]`` (the first is x).
        """

    def state_dict(self) -> dict[str, Any]:
        """The feedback (and any random stream), as plain tensors."""
        return {"feedback": {k: v.clone() for k, v in self.feedback.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        saved = state.get("feedback", {})
        if set(saved) != set(self.feedback):
            raise ValueError(
                f"the checkpoint's feedback has layers {sorted(saved)}, the {self.name} rule "
                f"{sorted(self.feedback)}"
            )
        for k, v in self.feedback.items():
            v.copy_(saved[k])

    def to(self, device: torch.device) -> None:
        """Move the feedback to ``device``."""
        for k, v in self.feedback.items():
            self.feedback[k] = v.to(device)


def rule_gradients(
    net: BatchedMLP,
    params: dict[str, torch.Tensor],
    rule: FeedbackRule,
    x: torch.Tensor,
    hs: list[torch.Tensor],
    zs: list[torch.Tensor] | None,
    e: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """The forward-weight gradients ``rule`` assigns, layer by layer from the top.

    Args:
        net, params: the network and the parameters of the forward pass.
        rule: the credit rule.
        x, hs, zs: the input and what :meth:`BatchedMLP.forward_train` returned for it.
        e: ``∂L/∂ŷ`` ``(R, B, outputs)``.

    Returns:
        ``{name: gradient}`` in the order of ``params``.
    """
    grads: dict[str, torch.Tensor] = {}
    delta = e
    for i in range(len(net.layers) - 1, -1, -1):
        name = net.layers[i].name
        h_in = x if i == 0 else hs[i - 1]
        grads[f"{name}.weight"] = torch.bmm(delta.transpose(1, 2), h_in)
        grads[f"{name}.bias"] = delta.sum(1)
        if i > 0:
            g = rule.signal(i, delta, e, params)
            delta = activation_backward(
                net.activation, g, hs[i - 1], None if zs is None else zs[i - 1]
            )
    return {k: grads[k] for k in params}


def _draw_like_weights(net: BatchedMLP, layers: Sequence[Layer], seeds: Sequence[int]) -> dict:
    """``{layer: (R, out, in)}`` drawn from each layer's own init distribution, replica by
    replica and layer by layer, with the replica's ``credit`` generator."""
    out = {layer.name: torch.empty(len(seeds), layer.fan_out, layer.fan_in) for layer in layers}
    for r, seed in enumerate(seeds):
        gen = torch_generator(seed, "credit")
        for layer in layers:
            out[layer.name][r] = net.sample_init(layer.name, layer.fan_out, gen)[0]
    return out


class FixedFeedback(FeedbackRule):
    """``fa`` (Lillicrap et al. 2016): ``B_i`` fixed, drawn like ``W_i``."""

    name = "fa"
    is_backprop = False

    def __init__(self, network: BatchedMLP, seeds: Sequence[int]) -> None:
        super().__init__(network, seeds)
        self.feedback = _draw_like_weights(network, network.layers[1:], seeds)

    def signal(
        self, i: int, delta: torch.Tensor, e: torch.Tensor, params: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """``δ_i B_i``."""
        return torch.bmm(delta, self.feedback[self.net.layers[i].name])


class DirectFeedback(FeedbackRule):
    """``dfa`` (Nøkland 2016): hidden layer l gets ``e D_l``, ``D_l (outputs, units)`` fixed and
    independent per layer, drawn uniform with the bound the init gives a linear layer of
    ``units`` inputs and ``outputs`` outputs; the output layer gets its true gradient."""

    name = "dfa"
    is_backprop = False

    def __init__(self, network: BatchedMLP, seeds: Sequence[int]) -> None:
        super().__init__(network, seeds)
        C = network.layers[-1].fan_out
        shapes = [Layer("dfa", h.fan_out, C, None, "linear") for h in network.hidden_layers]
        self.feedback = {
            h.name: torch.empty(len(seeds), C, h.fan_out) for h in network.hidden_layers
        }
        for r, seed in enumerate(seeds):
            gen = torch_generator(seed, "credit")
            for h, shape in zip(network.hidden_layers, shapes, strict=True):
                bound = init_bounds(network.init, shape)[0]
                self.feedback[h.name][r].uniform_(-bound, bound, generator=gen)

    def signal(
        self, i: int, delta: torch.Tensor, e: torch.Tensor, params: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """``e D_{i-1}``."""
        return torch.bmm(e, self.feedback[self.net.layers[i - 1].name])


class SignSymmetry(FeedbackRule):
    """``sign-symmetry`` (Liao et al. 2016; Xiao et al. 2018's uniform sign-concordant
    feedback): ``B_i = s · sign(W_i)`` of the current weights, ``s`` each replica's mean
    ``|W_i|`` (``scale=mean_abs``, so the feedback has the forward weights' magnitude) or 1
    (``scale=unit``)."""

    name = "sign-symmetry"
    is_backprop = False

    def __init__(self, network: BatchedMLP, seeds: Sequence[int], scale: str) -> None:
        super().__init__(network, seeds)
        self.scale = scale

    def matrix(self, w: torch.Tensor) -> torch.Tensor:
        """``s · sign(w)`` for weights ``w (R, out, in)``."""
        b = torch.sign(w)
        if self.scale == "mean_abs":
            b = b * w.abs().mean((1, 2), keepdim=True)
        return b

    def signal(
        self, i: int, delta: torch.Tensor, e: torch.Tensor, params: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """``δ_i (s · sign W_i)``."""
        return torch.bmm(delta, self.matrix(params[f"{self.net.layers[i].name}.weight"]))
