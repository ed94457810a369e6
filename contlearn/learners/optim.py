"""Base optimizers as transforms: SGD (with optional momentum) and Adam.

Both match ``torch.optim.SGD`` / ``torch.optim.Adam`` to float tolerance on the same gradients
(weight decay: ``chain(add_l2(λ), sgd(lr))`` is torch's ``weight_decay``, ``add_decayed_weights``
after Adam is AdamW; see :mod:`contlearn.learners.regularizers`). Adam keeps a **per-element**
step count so that a reset transform can restart the bias correction of exactly the weights it
re-initialises.

Speed: ``scale`` declares itself fusable (:mod:`contlearn.learners.fused`), so plain SGD can be
applied in place by the agent. Adam on CPU float32 tensors runs in one pass per tensor in the
compiled kernel (:mod:`contlearn.backends.kernels`; bias corrections read from tables of
``1 − βᵗ``).
Otherwise (other devices, no compiler) it takes torch ops, where the per-element bias
corrections cost several passes; while a tensor's counts are all equal (no reset has touched
it: checked through the tensor's version counter, or with one min/max pass after someone else
wrote to it) the corrections are scalars instead. Every form computes the same formula.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from contlearn.backends import kernels
from contlearn.learners.adam_form import AdamForm
from contlearn.learners.base import GradientTransformation, Params, chain, stateless
from contlearn.learners.fused import FusedPlan
from contlearn.spec import param


def scale(factor: float) -> GradientTransformation:
    """``u = factor · g`` (use a negative learning rate for descent)."""

    def fn(grads: Params, params: Params, **extra: Any) -> Params:
        keys = list(grads)
        return dict(zip(keys, torch._foreach_mul([grads[k] for k in keys], factor), strict=True))

    return stateless(fn, FusedPlan(factor, 0.0))


class TraceState(NamedTuple):
    """Momentum buffers, one per parameter."""

    trace: Params


def trace(decay: float, nesterov: bool = False) -> GradientTransformation:
    """Momentum as ``torch.optim.SGD`` (dampening 0): ``b ← μ b + g``; ``u = b`` (or
    ``g + μ b`` with Nesterov). The buffer starts at the first gradient, as in torch."""

    def init(params: Params) -> TraceState:
        return TraceState({k: torch.zeros_like(v) for k, v in params.items()})

    def update(grads: Params, state: TraceState, params: Params, **extra: Any):
        keys = list(grads)
        bufs = [state.trace[k] for k in keys]
        g = [grads[k] for k in keys]
        torch._foreach_mul_(bufs, decay)
        torch._foreach_add_(bufs, g)
        out = torch._foreach_add(g, bufs, alpha=decay) if nesterov else [b.clone() for b in bufs]
        return dict(zip(keys, out, strict=True)), state

    return GradientTransformation(init, update)


class ScaleByAdamState(NamedTuple):
    """Adam's per-element step counts and first and second moments."""

    count: Params  # type: ignore[assignment]  # optax's name; shadows tuple.count
    mu: Params
    nu: Params


class _UniformCounts:
    """Remembers, per count tensor, whether all its elements are equal and to what.

    Valid while the tensor's version counter is the one seen after our own increment; any
    other in-place write (a reset, ``load_state_dict``) invalidates it and costs one check.
    """

    def __init__(self) -> None:
        self._seen: dict[int, tuple[weakref.ref, int, float | None]] = {}

    def value(self, n: torch.Tensor) -> float | None:
        """The common value of ``n``'s elements, or None if they differ."""
        seen = self._seen.get(id(n))
        if seen is not None and seen[0]() is n and seen[1] == n._version:
            return seen[2]
        if n.numel() == 0:
            return None
        lo, hi = torch.aminmax(n)
        return float(lo) if bool(lo == hi) else None

    def record(self, n: torch.Tensor, value: float | None) -> None:
        """After our increment: ``n`` holds ``value`` everywhere (or mixed values, None)."""
        if len(self._seen) > 1024:  # forget tensors that no longer exist
            self._seen = {k: s for k, s in self._seen.items() if s[0]() is not None}
        self._seen[id(n)] = (weakref.ref(n), n._version, value)


def _corrections(b1: float, b2: float, t: float) -> tuple[float, float]:
    """``1 − β1ᵗ`` and ``√(1 − β2ᵗ)`` in float32, as the per-element form computes them."""
    n = torch.full((1,), t)
    return float(1.0 - torch.pow(b1, n)), float((1.0 - torch.pow(b2, n)).sqrt_())


def scale_by_adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> GradientTransformation:
    """Adam's direction ``m̂ / (√v̂ + ε)`` with per-element bias correction.

    ``m ← β1 m + (1−β1) g``, ``v ← β2 v + (1−β2) g²``, ``n ← n + 1`` per element;
    ``u = (m / (1−β1ⁿ)) / (√v / √(1−β2ⁿ) + ε)`` (Kingma & Ba 2015, in torch.optim's order).
    """
    uniform = _UniformCounts()

    def init(params: Params) -> ScaleByAdamState:
        zeros = lambda: {k: torch.zeros_like(v) for k, v in params.items()}  # noqa: E731
        return ScaleByAdamState(zeros(), zeros(), zeros())

    def update(grads: Params, state: ScaleByAdamState, params: Params, **extra: Any):
        keys = list(grads)
        g = [grads[k] for k in keys]
        n = [state.count[k] for k in keys]
        m = [state.mu[k] for k in keys]
        v = [state.nu[k] for k in keys]
        if all(kernels.adam_applies(*ts) for ts in zip(g, m, v, n, strict=True)):
            out = [kernels.adam_direction_(*ts, b1, b2, eps) for ts in zip(g, m, v, n, strict=True)]
            return dict(zip(keys, out, strict=True)), state
        before = [uniform.value(ni) for ni in n]
        torch._foreach_add_(n, 1.0)
        torch._foreach_lerp_(m, g, 1.0 - b1)
        torch._foreach_mul_(v, b2)
        torch._foreach_addcmul_(v, g, g, value=1.0 - b2)
        denom = torch._foreach_sqrt(v)
        out = []
        for ni, mi, di, t in zip(n, m, denom, before, strict=True):
            uniform.record(ni, None if t is None else t + 1.0)
            if t is not None:  # one count for the whole tensor: scalar corrections
                sc1, sc2 = _corrections(b1, b2, t + 1.0)
                di.div_(sc2).add_(eps)
                out.append(mi.div(sc1).div_(di))
                continue
            bc1 = torch.pow(b1, ni).neg_().add_(1.0)
            bc2 = torch.pow(b2, ni).neg_().add_(1.0).sqrt_()
            di.div_(bc2).add_(eps)
            out.append(mi.div(bc1).div_(di))
        return dict(zip(keys, out, strict=True)), state

    # declared for the block backend, which runs Adam in its C loop (learners/adam_form.py)
    return GradientTransformation(init, update, AdamForm(b1, b2, eps))


def sgd(lr: float, momentum: float = 0.0, nesterov: bool = False) -> GradientTransformation:
    """``torch.optim.SGD``: ``θ ← θ − lr · g`` (with momentum ``μ`` if > 0)."""
    if momentum > 0:
        return chain(trace(momentum, nesterov), scale(-lr))
    return scale(-lr)


def adam(
    lr: float, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8
) -> GradientTransformation:
    """``torch.optim.Adam``; "proper Adam" of Dohare et al. is ``b1 == b2``."""
    return chain(scale_by_adam(b1, b2, eps), scale(-lr))


@dataclass(frozen=True)
class OptimizerOptions:
    """The base optimizer's options, declared once for every agent that has one.

    An agent's Spec inherits these fields (they are listed first by ``contlearn list``) and may
    redeclare a field to change its default (PPO: ``optimizer=adam``, ``lr=1e-4``); the
    defaults here are the online agent's. The learner chain wraps :meth:`base_optimizer`.
    """

    optimizer: str = param("sgd", "base optimizer", choices=("sgd", "adam"))
    lr: float = param(0.01, "learning rate (step size)", low=0.0, low_open=True)
    momentum: float = param(0.0, "SGD momentum", low=0.0, high=1.0)
    beta1: float = param(0.9, "Adam β1 (proper Adam: β1 = β2 = 0.99)", low=0.0, high=1.0)
    beta2: float = param(0.999, "Adam β2", low=0.0, high=1.0)
    eps: float = param(1e-8, "Adam ε", low=0.0, low_open=True)

    def base_optimizer(self) -> GradientTransformation:
        """The base optimizer transform these options describe."""
        if self.optimizer == "adam":
            return adam(self.lr, self.beta1, self.beta2, self.eps)
        return sgd(self.lr, self.momentum)
