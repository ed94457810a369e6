"""The credit-rule baselines of scripts/bench_online.py: each rule as one writes it without
contlearn.

One seed at a time, batch size 1, the weights of ``torch.nn.Linear`` layers, the rule's
backward pass written by hand (docs/credit.md): ``fa`` sends ``δ B`` down with a fixed random
``B`` per layer, ``dfa`` gives each hidden layer ``e D`` with a fixed ``D`` per layer,
``sign-symmetry`` sends ``δ (s · sign W)`` with ``s = mean |W|``, ``kolen-pollack`` sends
``δ B`` and then adds the update to ``B`` and shrinks ``W`` and ``B`` by ``1 − λ``. Plain SGD.
It is an independent implementation: the benchmark compares contlearn's speed against it.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from naive_online import NaiveLearner  # scripts/ is on sys.path

from contlearn.agents.networks import GAINS


def _uniform(rows: int, cols: int, fan_in: int, gain: float) -> torch.Tensor:
    bound = gain * math.sqrt(3.0 / fan_in)
    return torch.empty(rows, cols).uniform_(-bound, bound)


class NaiveRuleLearner(NaiveLearner):
    """:class:`NaiveLearner`'s protocol (data, permutations, online accuracy) with the step of
    credit rule ``rule`` written by hand; ``decay`` is Kolen–Pollack's λ."""

    def __init__(self, cfg, seed: int, rule: str, decay: float = 1e-4) -> None:
        super().__init__(cfg, seed)
        self.rule, self.decay, self.lr = rule, decay, cfg.agent_spec.lr
        self.lin = [m for m in self.net if isinstance(m, nn.Linear)]
        for m in self.lin:
            m.weight.requires_grad_(False)
            m.bias.requires_grad_(False)
        relu = GAINS["relu"]
        # B_l for layers 2 … output (fa, kolen-pollack); D_l (outputs × units) per hidden layer
        self.B = [_uniform(m.out_features, m.in_features, m.in_features, relu) for m in self.lin]
        C = self.lin[-1].out_features
        self.D = [_uniform(C, m.out_features, m.out_features, 1.0) for m in self.lin[:-1]]

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        hs, h = [x], x
        for i, m in enumerate(self.lin):
            h = F.linear(h, m.weight, m.bias)
            if i < len(self.lin) - 1:
                h = torch.relu(h)
            hs.append(h)
        out = hs.pop()
        self.correct += (out.argmax(1) == y).sum()
        e = torch.softmax(out, 1)
        e[0, y] -= 1.0  # ∂L/∂ŷ of the cross-entropy, batch 1
        delta, updates = e, []
        for i in range(len(self.lin) - 1, -1, -1):
            m = self.lin[i]
            updates.append((i, -self.lr * delta.t() @ hs[i], -self.lr * delta[0]))
            if i == 0:
                break
            if self.rule == "dfa":
                g = e @ self.D[i - 1]
            elif self.rule == "sign-symmetry":
                g = delta @ (torch.sign(m.weight) * m.weight.abs().mean())
            else:  # fa, kolen-pollack
                g = delta @ self.B[i]
            delta = g * (hs[i] > 0)
        for i, dw, db in updates:
            self.lin[i].weight += dw
            self.lin[i].bias += db
            if self.rule == "kolen-pollack" and i > 0:
                self.B[i] += dw
        if self.rule == "kolen-pollack" and self.decay:
            for i, m in enumerate(self.lin):
                m.weight *= 1.0 - self.decay
                if i > 0:
                    self.B[i] *= 1.0 - self.decay
