"""The rules whose feedback is learned: Kolen–Pollack, weight mirror (Akrout et al. 2019) and
the alignment rules of Kunin et al. (2020); conventions as in :mod:`contlearn.credit.rules`.
Each learns in :meth:`~contlearn.credit.rules.FeedbackRule.learn`, after the step's forward
update."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch

from contlearn.agents.networks import BatchedMLP
from contlearn.credit.rules import FixedFeedback
from contlearn.learners.rng import draw
from contlearn.seeding import torch_generator


class KolenPollack(FixedFeedback):
    """``kolen-pollack`` (Akrout et al. 2019): ``B_i`` starts as ``fa``'s and gets the update
    of ``W_i``, ``ΔB_i = ΔW_i``; then every weight matrix and every ``B`` decay by the same
    factor: ``W ← (1 − λ) W``, ``B ← (1 − λ) B``, so ``W_i − B_i`` shrinks by ``1 − λ`` a step."""

    name = "kolen-pollack"
    learned = True

    def __init__(self, network: BatchedMLP, seeds: Sequence[int], decay: float) -> None:
        super().__init__(network, seeds)
        self.decay = decay

    def learn(
        self,
        params: dict[str, torch.Tensor],
        updates: dict[str, torch.Tensor],
        inputs: list[torch.Tensor],
    ) -> None:
        """``B += ΔW``, then the shared decay."""
        for name, b in self.feedback.items():
            b.add_(updates[f"{name}.weight"])
        if self.decay:
            keep = 1.0 - self.decay
            for layer in self.net.layers:
                params[f"{layer.name}.weight"].mul_(keep)
            for b in self.feedback.values():
                b.mul_(keep)


class WeightMirror(FixedFeedback):
    """``weight-mirror`` (Akrout et al. 2019): every ``every`` steps, layer i sees ``samples``
    noise inputs ``X ~ N(0, σ²)`` of its own, ``Y = X W_iᵀ``, and
    ``B_i ← (1 − λ) B_i + η Yᵀ X / samples``; in expectation ``B_i → (η σ² / λ) W_i``."""

    name = "weight-mirror"
    learned = True

    def __init__(
        self,
        network: BatchedMLP,
        seeds: Sequence[int],
        every: int,
        samples: int,
        noise_std: float,
        rate: float,
        decay: float,
    ) -> None:
        super().__init__(network, seeds)
        self.every, self.samples, self.noise_std = every, samples, noise_std
        self.rate, self.decay = rate, decay
        self.rng = torch.stack([torch_generator(s, "credit-noise").get_state() for s in seeds])
        self.steps = torch.zeros((), dtype=torch.int64)

    def learn(
        self,
        params: dict[str, torch.Tensor],
        updates: dict[str, torch.Tensor],
        inputs: list[torch.Tensor],
    ) -> None:
        """One mirror step every ``every`` steps."""
        self.steps += 1
        if int(self.steps) % self.every:
            return
        for layer in self.net.layers[1:]:
            w, b = params[f"{layer.name}.weight"], self.feedback[layer.name]
            noise = functools.partial(self._noise, layer.fan_in)
            X = torch.stack([draw(self.rng, r, noise) for r in range(len(self.seeds))])
            X = X.to(w.device, w.dtype) * self.noise_std  # (R, samples, in)
            Y = torch.bmm(X, w.transpose(1, 2))  # (R, samples, out)
            b.mul_(1.0 - self.decay).add_(
                torch.bmm(Y.transpose(1, 2), X), alpha=self.rate / self.samples
            )

    def _noise(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """``samples`` standard normal inputs of size ``n``."""
        return torch.randn(self.samples, n, generator=generator)

    def state_dict(self) -> dict[str, Any]:
        """Feedback, the noise generators' states and the step count."""
        return {**super().state_dict(), "rng": self.rng.clone(), "steps": self.steps.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        super().load_state_dict(state)
        self.rng.copy_(state["rng"])
        self.steps.copy_(state["steps"])


def alignment_loss(
    rule: str, coef: Sequence[float], w: torch.Tensor, b: torch.Tensor, x: torch.Tensor
) -> torch.Tensor:
    """Kunin et al. (2020)'s local loss of one layer, summed over replicas.

    With ``F = x Wᵀ`` (the forward projection) and ``P = x Bᵀ`` (the backward one), each
    ``(R, n, out)``, E the mean over the n inputs, Σ over units, and the primitives
    ``decay = ‖W‖² + ‖B‖²``, ``self = −Σ W ⊙ B``, ``sparse = Σ E F² + Σ E P²``,
    ``amp = −Σ E (P ⊙ F)``, ``null = Σ E (F B)²``:
    ``symmetric = α decay + β self``, ``activation = α sparse + β amp``,
    ``information = α amp + β null + γ decay``.
    """
    f, p = torch.bmm(x, w.transpose(1, 2)), torch.bmm(x, b.transpose(1, 2))

    def mean_sum(t: torch.Tensor) -> torch.Tensor:
        return t.mean(1).sum()

    decay = w.pow(2).sum() + b.pow(2).sum()
    if rule == "symmetric-alignment":
        return coef[0] * decay + coef[1] * -(w * b).sum()
    if rule == "activation-alignment":
        return coef[0] * (mean_sum(f.pow(2)) + mean_sum(p.pow(2))) + coef[1] * -mean_sum(p * f)
    if rule == "information-alignment":
        null = mean_sum(torch.bmm(f, b).pow(2))
        return coef[0] * -mean_sum(p * f) + coef[1] * null + coef[2] * decay
    raise ValueError(f"no alignment loss {rule!r}")


class LearnedAlignment(FixedFeedback):
    """Kunin et al. (2020)'s rules: ``B_i`` starts as ``fa``'s and takes one gradient step of
    its layer's local loss (:func:`alignment_loss`) on the layer's inputs of the step, the
    forward weights held fixed: ``B_i ← B_i − η ∂L_local/∂B_i``."""

    is_backprop = False
    learned = True

    def __init__(
        self,
        network: BatchedMLP,
        seeds: Sequence[int],
        rule: str,
        coef: Sequence[float],
        rate: float,
    ) -> None:
        super().__init__(network, seeds)
        self.name = rule
        self.coef, self.rate = tuple(coef), rate

    def learn(
        self,
        params: dict[str, torch.Tensor],
        updates: dict[str, torch.Tensor],
        inputs: list[torch.Tensor],
    ) -> None:
        """One step of each layer's local loss (autograd on B only)."""
        for i, layer in enumerate(self.net.layers):
            if i == 0:
                continue
            b = self.feedback[layer.name]
            w = params[f"{layer.name}.weight"].detach()
            with torch.enable_grad():
                leaf = b.detach().requires_grad_(True)
                loss = alignment_loss(self.name, self.coef, w, leaf, inputs[i].detach())
                (grad,) = torch.autograd.grad(loss, [leaf])
            b.sub_(grad, alpha=self.rate)
