"""The credit-rule baselines of scripts/bench_online.py: each rule as one writes it without
contlearn.

One seed at a time, batch size 1, ``torch.nn.Linear`` layers, ``torch.optim.SGD`` and
``loss.backward()``, the rule's backward in a custom ``torch.autograd.Function``
(docs/credit.md): ``fa`` sends ``δ B`` down with a fixed random ``B`` per layer,
``sign-symmetry`` sends ``δ (s · sign W)`` with ``s = mean |W|``, ``kolen-pollack`` sends
``δ B`` and after the optimizer's step adds the update to ``B`` and shrinks ``W`` and ``B`` by
``1 − λ``; ``dfa`` passes each hidden layer's output through a function whose backward returns
``e D`` instead of the error from above (``e`` caught on its way through the output). It is an
independent implementation: the benchmark compares contlearn's speed against it.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from naive_online import NaiveLearner  # scripts/ is on sys.path

from contlearn.agents.networks import GAINS


def _uniform(rows: int, cols: int, fan_in: int, gain: float) -> torch.Tensor:
    bound = gain * math.sqrt(3.0 / fan_in)
    return torch.empty(rows, cols).uniform_(-bound, bound)


class FeedbackLinear(torch.autograd.Function):
    """``x Wᵀ + b`` whose backward sends ``g B`` (or ``g (s · sign W)`` if B is None) down."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, fb: Any) -> Any:
        ctx.save_for_backward(x, w)
        ctx.fb = fb
        return F.linear(x, w, b)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> Any:
        x, w = ctx.saved_tensors
        fb = ctx.fb if ctx.fb is not None else torch.sign(w) * w.abs().mean()
        return g @ fb, g.t() @ x, g.sum(0), None


class CatchError(torch.autograd.Function):
    """Identity; its backward keeps the output error e for :class:`DirectError`."""

    @staticmethod
    def forward(ctx: Any, y: torch.Tensor, store: dict) -> torch.Tensor:
        ctx.store = store
        return y.view_as(y)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> Any:
        ctx.store["e"] = g
        return g, None


class DirectError(torch.autograd.Function):
    """Identity on a hidden layer's output; its backward returns ``e D`` (dfa)."""

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, D: torch.Tensor, store: dict) -> torch.Tensor:
        ctx.store, ctx.D = store, D
        return h.view_as(h)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> Any:
        return ctx.store["e"] @ ctx.D, None, None


class NaiveRuleLearner(NaiveLearner):
    """:class:`NaiveLearner`'s protocol (data, permutations, online accuracy, SGD) with the
    forward and backward of credit rule ``rule``; ``decay`` is Kolen–Pollack's λ."""

    def __init__(self, cfg, seed: int, rule: str, decay: float = 1e-4) -> None:
        super().__init__(cfg, seed)
        self.rule, self.decay, self.lr = rule, decay, cfg.agent_spec.lr
        self.lin = [m for m in self.net if isinstance(m, nn.Linear)]
        relu = GAINS["relu"]
        # B_l for layers 2 … output (fa, kolen-pollack); D_l (outputs × units) per hidden layer
        self.B = [_uniform(m.out_features, m.in_features, m.in_features, relu) for m in self.lin]
        C = self.lin[-1].out_features
        self.D = [_uniform(C, m.out_features, m.out_features, 1.0) for m in self.lin[:-1]]
        self.store: dict = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for i, m in enumerate(self.lin):
            if self.rule == "dfa" or i == 0:
                h = F.linear(h, m.weight, m.bias)
            else:
                fb = None if self.rule == "sign-symmetry" else self.B[i]
                h = FeedbackLinear.apply(h, m.weight, m.bias, fb)
            if i < len(self.lin) - 1:
                h = torch.relu(h)
                if self.rule == "dfa":
                    h = DirectError.apply(h, self.D[i], self.store)
        return CatchError.apply(h, self.store) if self.rule == "dfa" else h

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        out = self.forward(x)
        loss = F.cross_entropy(out, y)
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        self.correct += (out.argmax(1) == y).sum()
        if self.rule == "kolen-pollack":
            with torch.no_grad():
                for i, m in enumerate(self.lin):
                    if i > 0:
                        self.B[i].add_(m.weight.grad, alpha=-self.lr)  # ΔB = ΔW
                        self.B[i].mul_(1.0 - self.decay)
                    m.weight.mul_(1.0 - self.decay)
