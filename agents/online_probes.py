"""What the online agent's probes compute beyond a forward pass: the copy of the network
probes read while learning goes on (:class:`ProbeSnapshot`), the credit rule's alignment with
backprop and Hutchinson's Hessian-trace estimate. Plain functions of a
:class:`~contlearn.agents.networks.BatchedMLP` and its parameters; the agent's methods
(``probe_snapshot``, ``credit_alignment``, ``hessian_trace``) call them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from contlearn.agents.networks import BatchedMLP
from contlearn.credit import alignment

#: ``loss(outputs, target) -> (R,)``, each replica's mean loss
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def credit_alignment(
    net: BatchedMLP,
    params: dict[str, torch.Tensor],
    rule: Any,
    flat: torch.Tensor,
    target: torch.Tensor,
    loss: LossFn,
) -> dict[str, dict[str, torch.Tensor]]:
    """``{"feedback_alignment": ..., "weight_alignment": ...}`` (:mod:`contlearn.credit.
    alignment`) on inputs ``flat (R, P, D)``, the output error from autograd of ``loss``."""

    def output_error(out: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            leaf = out.detach().requires_grad_(True)
            (e,) = torch.autograd.grad(loss(leaf, target).sum(), [leaf])
        return e

    with torch.no_grad():
        fa = alignment.feedback_alignment(net, params, rule, flat, output_error)
        wa = alignment.weight_alignment(net, params, rule)
    return {"feedback_alignment": fa, "weight_alignment": wa}


def hessian_trace(
    net: BatchedMLP,
    params: dict[str, torch.Tensor],
    flat: torch.Tensor,
    target: torch.Tensor,
    loss: LossFn,
    samples: int,
) -> torch.Tensor:
    """Hutchinson's estimate of the trace of each replica's loss Hessian, ``(R,)`` float64.

    ``(1/S) Σ_s vᵀ H v`` over ``samples`` Rademacher vectors v drawn from a fixed-seed
    generator (every call draws the same v: deterministic, and a resumed run probes as an
    uninterrupted one). The replicas' losses are separate, so H is block-diagonal and each
    replica's share of vᵀHv is its own estimate. Costs one gradient and ``samples``
    Hessian-vector products (double backward).
    """
    leaves = [v.detach().requires_grad_(True) for v in params.values()]
    named = dict(zip(params, leaves, strict=True))
    gen = torch.Generator().manual_seed(0)
    R = flat.shape[0]
    total = torch.zeros(R, dtype=torch.float64)
    with torch.enable_grad():
        out = net.forward_train(flat, named)[0]
        grads = torch.autograd.grad(loss(out, target).sum(), leaves, create_graph=True)
        for _ in range(samples):
            vs = [(torch.randint(0, 2, p.shape, generator=gen) * 2 - 1).to(p) for p in leaves]
            dot = torch.stack([(g * v).sum() for g, v in zip(grads, vs, strict=True)]).sum()
            hvs = torch.autograd.grad(dot, leaves, retain_graph=True)
            for hv, v in zip(hvs, vs, strict=True):
                total += (hv * v).reshape(R, -1).sum(1).detach().to("cpu", torch.float64)
    return total / samples


class ProbeSnapshot:
    """A copy of an :class:`OnlineAgent`'s parameters at a probe point, with the agent's
    forward pass (:meth:`features`) over them; ``parameters()`` and ``activation`` as the
    agent's."""

    def __init__(
        self,
        net: BatchedMLP,
        params: dict[str, torch.Tensor],
        flat: Any,
        initial: Callable[[], dict[str, torch.Tensor]],
    ) -> None:
        self._mlp, self._flat, self._params = net, flat, params
        self.activation = net.activation
        #: the agent's :meth:`OnlineAgent.initial_parameters` (never changes: safe to share)
        self.initial_parameters = initial

    def parameters(self) -> dict[str, torch.Tensor]:
        """The copied parameters."""
        return self._params

    @torch.no_grad()
    def features(self, obs: torch.Tensor) -> dict[str, torch.Tensor]:
        """Hidden activations ``{layer: (R, B, H)}`` of the copied network for ``obs``."""
        hs = self._mlp.forward_train(self._flat(obs), self._params)[1]
        return {layer.name: h for layer, h in zip(self._mlp.hidden_layers, hs, strict=True)}
