"""The baseline of scripts/bench_online.py: online learning as one writes it without contlearn.

One seed at a time, ``torch.nn.Sequential`` + ``torch.optim``, batch size 1, continual backprop
replacing one unit at a time (Dohare et al. 2024). It is an independent implementation: the
benchmark compares contlearn's speed against it at the same hyper-parameters.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from contlearn.agents.networks import GAINS
from contlearn.data.datasets import load_mnist


class NaiveCBP:
    """Continual backprop written plainly: per layer utilities, one unit at a time replaced."""

    def __init__(self, net: nn.Sequential, opt: torch.optim.Optimizer, spec) -> None:
        self.lin = [m for m in net if isinstance(m, nn.Linear)]
        self.opt, self.spec = opt, spec
        self.age = [torch.zeros(m.out_features) for m in self.lin[:-1]]
        self.util = [torch.zeros(m.out_features) for m in self.lin[:-1]]
        self.mean = [torch.zeros(m.out_features) for m in self.lin[:-1]]
        self.carry = [0.0] * len(self.age)

    def step(self, feats: list[torch.Tensor]) -> None:
        d = self.spec.decay
        for layer, h in enumerate(feats):
            self.age[layer] += 1
            self.mean[layer] = d * self.mean[layer] + (1 - d) * h.mean(0)
            out_w = self.lin[layer + 1].weight.abs().sum(0)
            self.util[layer] = d * self.util[layer] + (1 - d) * h.abs().mean(0) * out_w
            eligible = torch.nonzero(self.age[layer] > self.spec.maturity).flatten()
            self.carry[layer] += self.spec.replacement_rate * len(eligible)
            k = int(self.carry[layer])
            self.carry[layer] -= k
            if k:
                self.replace(layer, eligible, k)

    def replace(self, layer: int, eligible: torch.Tensor, k: int) -> None:
        lin, nxt = self.lin[layer], self.lin[layer + 1]
        correction = 1 - self.spec.decay ** self.age[layer]
        f_hat = self.mean[layer] / correction
        worst = torch.topk(-(self.util[layer] / correction)[eligible], k).indices
        for i in eligible[worst].tolist():
            nxt.bias += nxt.weight[:, i] * f_hat[i]
            reset_unit(lin, nxt, self.opt, i)
            self.util[layer][i] = self.mean[layer][i] = self.age[layer][i] = 0


def reset_unit(lin: nn.Linear, nxt: nn.Linear, opt: torch.optim.Optimizer, i: int) -> None:
    """Unit i of ``lin``: fresh incoming weights, zero bias and outgoing weights, and the
    optimizer state of those weights zeroed (continual backprop's and ReDo's reset)."""
    bound = GAINS["relu"] * math.sqrt(3 / lin.in_features)
    lin.weight[i].uniform_(-bound, bound)
    lin.bias[i] = 0
    nxt.weight[:, i] = 0
    for p, idx in ((lin.weight, i), (lin.bias, i), (nxt.weight, (slice(None), i))):
        for s in opt.state.get(p, {}).values():  # optimizer-aware: zero moments
            if isinstance(s, torch.Tensor) and s.shape == p.shape:
                s[idx] = 0


class NaiveReDo:
    """ReDo written plainly (Sokar et al. 2023): sum |h| over the last ``window`` steps of each
    period; every ``period`` steps reset the units whose score E|h_i| / mean_j E|h_j| <= τ."""

    def __init__(self, net: nn.Sequential, opt: torch.optim.Optimizer, spec) -> None:
        self.lin = [m for m in net if isinstance(m, nn.Linear)]
        self.opt, self.spec, self.t = opt, spec, 0
        self.sums = [torch.zeros(m.out_features) for m in self.lin[:-1]]

    def step(self, feats: list[torch.Tensor]) -> None:
        period, window = self.spec.period, self.spec.window
        self.t += 1
        if (self.t - 1) % period >= period - window:
            for s, h in zip(self.sums, feats, strict=True):
                s += h.abs().mean(0)
        if self.t % period:
            return
        for layer, s in enumerate(self.sums):
            mean = s / window
            score = mean / mean.mean() if mean.mean() > 0 else torch.zeros_like(mean)
            for i in torch.nonzero(score <= self.spec.threshold).flatten().tolist():
                reset_unit(self.lin[layer], self.lin[layer + 1], self.opt, i)
            s.zero_()


class NaiveLearner:
    """One seed of the online protocol: ``torch.nn``, ``torch.optim``, batch size 1, the data
    permuted once per task, the online accuracy summed on the side. Same hyper-parameters as
    the contlearn run of ``cfg``."""

    def __init__(self, cfg, seed: int) -> None:
        torch.manual_seed(seed)
        spec, lspec, widths = (
            cfg.agent_spec,
            cfg.learner.spec,
            [784, *map(int, cfg.agent_spec.hidden.split(","))],
        )
        layers: list[nn.Module] = []
        for a, b in zip(widths, widths[1:], strict=False):
            layers += [nn.Linear(a, b), nn.ReLU()]
        self.net = nn.Sequential(*layers, nn.Linear(widths[-1], 10))
        wd = getattr(lspec, "l2", 0.0)
        if spec.optimizer == "adam":
            self.opt: torch.optim.Optimizer = torch.optim.Adam(
                self.net.parameters(), spec.lr, (spec.beta1, spec.beta2), spec.eps, wd
            )
        else:
            self.opt = torch.optim.SGD(
                self.net.parameters(), spec.lr, spec.momentum, weight_decay=wd
            )
        self.spec_l2_init = getattr(lspec, "l2_init", 0.0)
        self.snp = (lspec.shrink, lspec.sigma) if cfg.learner.name == "snp" else None
        self.cbp = NaiveCBP(self.net, self.opt, lspec) if cfg.learner.name == "cbp" else None
        self.redo = NaiveReDo(self.net, self.opt, lspec) if cfg.learner.name == "redo" else None
        #: L2-Init (Kumar et al. 2023): g += λ (θ − θ₀) before the optimizer
        self.anchor = (
            [p.detach().clone() for p in self.net.parameters()]
            if cfg.learner.name == "l2-init"
            else None
        )
        images, labels = load_mnist("test")
        self.images = torch.from_numpy(images.reshape(-1, 784)).float() / 255
        self.labels = torch.from_numpy(labels).long()
        self.rng, self.t, self.correct = np.random.default_rng(seed), 0, torch.zeros(())

    def run(self, steps: int) -> None:
        for _ in range(steps):
            if self.t % 10_000 == 0:  # a new task: permute the pixels, reshuffle
                self.x = self.images[:, torch.from_numpy(self.rng.permutation(784))]
                self.order = self.rng.permutation(len(self.labels))
            i = self.order[self.t % 10_000]
            self.t += 1
            self.step(self.x[i : i + 1], self.labels[i : i + 1])

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        feats, h = [], x
        for module in self.net:
            h = module(h)
            if isinstance(module, nn.ReLU):
                feats.append(h)
        loss = F.cross_entropy(h, y)
        self.opt.zero_grad()
        loss.backward()
        if self.anchor is not None:
            with torch.no_grad():
                for p, p0 in zip(self.net.parameters(), self.anchor, strict=True):
                    p.grad.add_(p - p0, alpha=self.spec_l2_init)
        self.opt.step()
        self.correct += (h.argmax(1) == y).sum()
        with torch.no_grad():
            if self.snp is not None:
                for p in self.net.parameters():
                    p.mul_(1 - self.snp[0]).add_(torch.randn_like(p), alpha=self.snp[1])
            if self.cbp is not None:
                self.cbp.step([f.detach() for f in feats])
            if self.redo is not None:
                self.redo.step([f.detach() for f in feats])
