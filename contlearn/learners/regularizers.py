"""Regularisers as transforms: L2 (coupled and decoupled), L2-Init, shrink-and-perturb.

Two kinds, by where they sit in a chain:

- **gradient terms** (before the optimizer; they change what the optimizer sees):
  :func:`add_l2` (``g ← g + λθ``, torch's ``weight_decay``) and :func:`add_l2_init`
  (``g ← g + λ(θ − θ₀)``);
- **post-update maps** (after the optimizer; they receive its updates ``u``): with
  ``θ' = θ + u`` the value the optimizer alone would produce, they return ``u'`` such that
  ``θ + u'`` is the regularised value: :func:`add_decayed_weights` (``θ' − rλθ``),
  :func:`shrink_perturb` (``(1−λ)θ' + σε``) and :func:`shrink_toward_init`
  (``λθ' + (1−λ)θ₀``). The agent adds ``u'`` to ``θ``, so results equal the formulas up to
  float rounding of that one addition.

Example (Dohare et al. 2024, Slippery Ant: L2 with Adam)::

    chain(add_l2(1e-4), adam(1e-4, 0.99, 0.99))
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

from contlearn.learners import philox
from contlearn.learners.base import AnchorState, GradientTransformation, Params, stateless
from contlearn.learners.block_forms import L2InitForm
from contlearn.learners.fused import FusedPlan, NoiseForm


def add_l2(weight_decay: float) -> GradientTransformation:
    """Coupled L2 regularisation: ``g ← g + λθ`` (λ = ``weight_decay``).

    Put it before the optimizer: ``chain(add_l2(λ), sgd(lr))`` is ``torch.optim.SGD(lr,
    weight_decay=λ)`` and ``chain(add_l2(λ), adam(lr))`` is ``torch.optim.Adam(lr,
    weight_decay=λ)``. It is the gradient of ``λ/2 ‖θ‖²`` (all weights and biases).

    Args:
        weight_decay: λ ≥ 0.
    """

    def fn(grads: Params, params: Params, **extra: Any) -> Params:
        keys = list(grads)
        out = torch._foreach_add(
            [grads[k] for k in keys], [params[k] for k in keys], alpha=weight_decay
        )
        return dict(zip(keys, out, strict=True))

    return stateless(fn, FusedPlan(1.0, weight_decay))


def add_decayed_weights(weight_decay: float, lr: float = 1.0) -> GradientTransformation:
    """Decoupled weight decay, after the optimizer: ``u ← u − lr·λ·θ``.

    ``chain(adam(lr, b1, b2), add_decayed_weights(λ, lr))`` is ``torch.optim.AdamW(lr, (b1, b2),
    weight_decay=λ)`` (Loshchilov & Hutter 2019): the shrink ``θ ← (1 − lr·λ)θ`` does not pass
    through Adam's normalisation. With the default ``lr=1``, ``weight_decay`` is the per-step
    shrink itself.

    Args:
        weight_decay: λ ≥ 0.
        lr: the optimizer's learning rate (the decay per update is ``lr·λ``).
    """
    rate = weight_decay * lr

    def fn(grads: Params, params: Params, **extra: Any) -> Params:
        keys = list(grads)
        out = torch._foreach_add([grads[k] for k in keys], [params[k] for k in keys], alpha=-rate)
        return dict(zip(keys, out, strict=True))

    return stateless(fn, FusedPlan(1.0, -rate))


def _anchor(params: Params) -> AnchorState:
    return AnchorState({k: v.detach().clone() for k, v in params.items()})


def add_l2_init(weight_decay: float) -> GradientTransformation:
    """L2-Init (Kumar et al. 2023, "Maintaining plasticity via regenerative regularization"):
    ``g ← g + λ(θ − θ₀)``, θ₀ the parameters at ``init``.

    Put it before the optimizer. θ₀ is kept in an :class:`AnchorState`; when a reset transform
    re-initialises a unit, θ₀ of that unit's weights becomes their new initial values.

    Args:
        weight_decay: λ ≥ 0.
    """

    def update(grads: Params, state: AnchorState, params: Params, **extra: Any):
        keys = list(grads)
        diff = torch._foreach_sub([params[k] for k in keys], [state.anchor[k] for k in keys])
        out = torch._foreach_add([grads[k] for k in keys], diff, alpha=weight_decay)
        return dict(zip(keys, out, strict=True)), state

    # (declared for the block loop only: contlearn/learners/block_forms.py)
    return GradientTransformation(_anchor, update, L2InitForm(weight_decay))


#: above this many bytes of one parameter's noise for all replicas, the fused form draws it
#: replica by replica.
_NOISE_BYTES = 64 << 20


class ShrinkPerturbState(NamedTuple):
    """What the counter-based noise needs: each replica's Philox key ``(R, 2)`` int64 (two
    words in [0, 2³²), :func:`contlearn.learners.philox.replica_keys`), the number of
    updates so far (a 0-d int64 tensor, t of ε[r, t, p, e]) and the noise definition's
    version (a 0-d int64, :data:`contlearn.learners.philox.VERSION`: a checkpoint written
    under another definition has another layout, and refuses to resume)."""

    key: torch.Tensor
    count: torch.Tensor  # type: ignore[assignment]  # optax's name; shadows tuple.count
    version: torch.Tensor


def _reference_noise(key: torch.Tensor, t: int, p: int, like: torch.Tensor) -> torch.Tensor:
    """ε[:, t, p, :] shaped like ``like`` ``(R, ...)``, from the numpy definition (CPU, then
    moved to ``like``'s device and dtype): ~0.2 µs a number."""
    flat = philox.snp_normals(key.cpu().numpy(), t, p, like[0].numel())
    return torch.from_numpy(flat).reshape(like.shape).to(device=like.device, dtype=like.dtype)


def _fast_noise(key: torch.Tensor, t: int, p: int, like: torch.Tensor) -> torch.Tensor:
    """:func:`_reference_noise`'s numbers, bit for bit (``tests/test_philox.py``), from the
    compiled kernel where it is built (~1 ns a number), else from numpy. Both the update and
    the fused post draw through it: with numpy alone, S&P over Adam, PPO or a conv net would
    spend ~20 ms a step per 100k weights on noise. Tests that check a fast path against the
    reference make the reference draw from numpy (``tests/test_block_kernel.py``)."""
    from contlearn.backends import noise_kernel  # (backends import learners: import late)

    if not noise_kernel.available():
        return _reference_noise(key, t, p, like)
    flat = noise_kernel.snp_normals(key.cpu(), t, p, like[0].numel())
    return flat.reshape(like.shape).to(device=like.device, dtype=like.dtype)


def shrink_perturb(
    shrink: float, sigma: float, seeds: Sequence[int], rng_stream: int = 1
) -> GradientTransformation:
    """Shrink-and-perturb after every update (Ash & Adams 2020, as used by Dohare et al. 2024):
    ``θ ← (1 − λ)θ' + σε``, ``θ' = θ + u`` the optimizer's result, ``ε ~ N(0, 1)`` fresh on
    every weight and bias each step.

    Put it after the optimizer; it returns ``u' = u − λθ' + σε``. The noise is counter-based
    (docs/design.md §4d, :mod:`contlearn.learners.philox`): element e of parameter p (its
    index in the parameter order) of replica r at update t is ε[r, t, p, e], xoshiro128++
    lanes seeded by Philox4x32-10 keyed by stream ``rng_stream`` of replica r's seed, so it
    depends on nothing but (seed, t, p, e): not on blocks, threads, devices or resumes.

    Args:
        shrink: λ, the per-step shrink (≥ 0).
        sigma: σ, the noise standard deviation (≥ 0).
        seeds: the replicas' root seeds.
        rng_stream: which independent learner stream keys the noise.
    """

    def init(params: Params) -> ShrinkPerturbState:
        key = torch.from_numpy(philox.replica_keys(seeds, rng_stream))
        version = torch.tensor(philox.VERSION, dtype=torch.int64)
        return ShrinkPerturbState(key, torch.zeros((), dtype=torch.int64), version)

    def update(grads: Params, state: ShrinkPerturbState, params: Params, **extra: Any):
        keys = list(grads)
        order = {k: i for i, k in enumerate(params)}
        u = [grads[k] for k in keys]
        post = torch._foreach_add([params[k] for k in keys], u)  # θ'
        out = torch._foreach_add(u, post, alpha=-shrink)
        if sigma:
            t = int(state.count)
            noise = [_fast_noise(state.key, t, order[k], params[k]) for k in keys]
            torch._foreach_add_(out, noise, alpha=sigma)
        state.count.add_(1)
        return dict(zip(keys, out, strict=True)), state

    def perturb(state: ShrinkPerturbState, params: Params, **extra: Any) -> ShrinkPerturbState:
        """Fused form: the agent applied the shrink; add ``σε`` to θ in place (the same
        numbers as the reference's, parameter by parameter; replica by replica where one
        parameter's noise for all replicas would be large)."""
        if sigma:
            t = int(state.count)
            for p, theta in enumerate(params.values()):
                R = theta.shape[0]
                if R == 1 or theta.numel() * 4 <= _NOISE_BYTES:
                    theta.add_(_fast_noise(state.key, t, p, theta), alpha=sigma)
                    continue
                for r in range(R):
                    row = theta[r : r + 1]
                    row.add_(_fast_noise(state.key[r : r + 1], t, p, row), alpha=sigma)
        state.count.add_(1)
        return state

    noise = NoiseForm(sigma, lambda state: state)
    return GradientTransformation(
        init, update, FusedPlan(1.0 - shrink, -shrink, perturb, noise=noise)
    )


class ShrinkTowardInitState(NamedTuple):
    """θ₀ and the number of updates so far (a 0-d int64 tensor)."""

    init: AnchorState
    count: torch.Tensor  # type: ignore[assignment]  # optax's name; shadows tuple.count


def shrink_toward_init(lam: float, period: int = 1) -> GradientTransformation:
    """Shrink toward the initial parameters: ``θ ← λθ' + (1 − λ)θ₀`` on every ``period``-th
    update (updates ``period``, ``2·period``, ...), ``θ' = θ + u``; other updates pass through.

    The "toward θ₀" variant of shrink-and-perturb (without noise), a step-wise form of pulling
    weights back to their initialisation (cf. L2-Init, Kumar et al. 2023). Put it after the
    optimizer; it returns ``u' = u + (1 − λ)(θ₀ − θ')``.

    Args:
        lam: λ in [0, 1], the share of the current value kept (1: no-op, 0: full reset).
        period: apply every this many updates (≥ 1).
    """
    if period < 1:
        raise ValueError(f"period must be >= 1, got {period}")

    def init(params: Params) -> ShrinkTowardInitState:
        return ShrinkTowardInitState(_anchor(params), torch.zeros((), dtype=torch.int64))

    def update(grads: Params, state: ShrinkTowardInitState, params: Params, **extra: Any):
        state.count.add_(1)
        if int(state.count) % period:
            return grads, state
        keys = list(grads)
        u = [grads[k] for k in keys]
        post = torch._foreach_add([params[k] for k in keys], u)  # θ'
        pull = torch._foreach_sub([state.init.anchor[k] for k in keys], post)  # θ₀ − θ'
        out = torch._foreach_add(u, pull, alpha=1.0 - lam)
        return dict(zip(keys, out, strict=True)), state

    return GradientTransformation(init, update)
