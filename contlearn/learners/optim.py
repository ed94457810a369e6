"""Base optimizers as transforms: SGD (with optional momentum) and Adam.

Both match ``torch.optim.SGD`` / ``torch.optim.Adam`` to float tolerance on the same gradients
(weight decay: ``chain(add_l2(λ), sgd(lr))`` is torch's ``weight_decay``, ``add_decayed_weights``
after Adam is AdamW; see :mod:`contlearn.learners.regularizers`). Adam keeps a **per-element**
step count so that a reset transform can restart the bias correction of exactly the weights it
re-initialises.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from contlearn.learners.base import GradientTransformation, Params, chain, stateless


def scale(factor: float) -> GradientTransformation:
    """``u = factor · g`` (use a negative learning rate for descent)."""

    def fn(grads: Params, params: Params, **extra: Any) -> Params:
        keys = list(grads)
        return dict(zip(keys, torch._foreach_mul([grads[k] for k in keys], factor), strict=True))

    return stateless(fn)


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

    count: Params
    mu: Params
    nu: Params


def scale_by_adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> GradientTransformation:
    """Adam's direction ``m̂ / (√v̂ + ε)`` with per-element bias correction.

    ``m ← β1 m + (1−β1) g``, ``v ← β2 v + (1−β2) g²``, ``n ← n + 1`` per element;
    ``u = (m / (1−β1ⁿ)) / (√v / √(1−β2ⁿ) + ε)`` (Kingma & Ba 2015, in torch.optim's order).
    """

    def init(params: Params) -> ScaleByAdamState:
        zeros = lambda: {k: torch.zeros_like(v) for k, v in params.items()}  # noqa: E731
        return ScaleByAdamState(zeros(), zeros(), zeros())

    def update(grads: Params, state: ScaleByAdamState, params: Params, **extra: Any):
        keys = list(grads)
        g = [grads[k] for k in keys]
        n = [state.count[k] for k in keys]
        m = [state.mu[k] for k in keys]
        v = [state.nu[k] for k in keys]
        torch._foreach_add_(n, 1.0)
        torch._foreach_lerp_(m, g, 1.0 - b1)
        torch._foreach_mul_(v, b2)
        torch._foreach_addcmul_(v, g, g, value=1.0 - b2)
        out = []
        for ni, mi, vi in zip(n, m, v, strict=True):
            bc1 = 1.0 - torch.pow(b1, ni)
            bc2 = 1.0 - torch.pow(b2, ni)
            denom = vi.sqrt().div_(bc2.sqrt_()).add_(eps)
            out.append(mi.div(bc1).div_(denom))
        return dict(zip(keys, out, strict=True)), state

    return GradientTransformation(init, update)


def sgd(lr: float, momentum: float = 0.0, nesterov: bool = False) -> GradientTransformation:
    """``torch.optim.SGD``: ``θ ← θ − lr · g`` (with momentum ``μ`` if > 0)."""
    if momentum > 0:
        return chain(trace(momentum, nesterov), scale(-lr))
    return scale(-lr)


def adam(lr: float, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8
         ) -> GradientTransformation:
    """``torch.optim.Adam``; "proper Adam" of Dohare et al. is ``b1 == b2``."""
    return chain(scale_by_adam(b1, b2, eps), scale(-lr))
