"""Adam applied in place, in one compiled call per update: PPO's minibatch steps.

A learner that is plain Adam with a step size (``bp`` or ``adam`` with the base optimizer
``adam``, ``proper-adam``: :func:`adam_apply_form`) updates the weights as
``d = adam(g)`` (``cl_adam``, one pass per tensor), ``u = −lr · d`` (a pass), ``θ += u`` (a
pass). ``cl_adam_apply`` does the three in one pass over all the tensors of an update: the same
float operations in the same order (``cl_adam``'s, then the multiply by the step size, then the
add), so the same bits (``tests/test_adam_apply.py`` checks them against the learner's update
and the add, for every learner this applies to).

:class:`AdamApply` binds the weights and Adam's moments and counts: it checks them once
(dtype, device, layout, shapes) and, at every call, that they are still the same tensors in
the same memory (a value worker moves the value net's state into shared memory: the binding
then checks and binds them again); each call checks the gradients.
"""

from __future__ import annotations

import ctypes
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch

from contlearn.backends import binding
from contlearn.backends.kernels import adam_tables, need
from contlearn.learners.adam_form import AdamForm, adam_plan
from contlearn.learners.base import find_states
from contlearn.learners.optim import ScaleByAdamState

_F32 = torch.float32


def adam_apply_form(learner: Any) -> tuple[AdamForm, float] | None:
    """Adam's options and the step size (``θ += lr · d``, ``lr`` negative for descent) where
    ``learner`` is plain Adam and a step size (no affine part before or after it, no post-update
    edit); None otherwise."""
    plan = adam_plan(learner)
    if plan is None or plan.replacer is not None:
        return None
    if plan.pre_a != 1.0 or plan.pre_b != 0.0 or plan.post_b != 0.0:
        return None
    return plan.adam, plan.lr


class AdamApply:
    """The compiled in-place Adam update of one learner's parameters (module docstring).

    Args:
        learner: the learner (:func:`adam_apply_form` must not be None).
        state: its state, holding exactly one :class:`ScaleByAdamState`.
    """

    def __init__(self, learner: Any, state: Any) -> None:
        form = adam_apply_form(learner)
        if form is None:
            raise ValueError("the learner is not plain Adam with a step size")
        (self.b1, self.b2, self.eps), lr = form
        found = find_states(state, ScaleByAdamState)
        if len(found) != 1:
            raise ValueError(f"expected one Adam state in the learner's state, found {len(found)}")
        self.state: ScaleByAdamState = found[0]
        self.lr = lr
        self.tables = adam_tables(self.b1, self.b2)
        self._bound: dict[tuple[str, ...], _Bound] = {}

    def _tensors(
        self, keys: tuple[str, ...], params: Mapping[str, torch.Tensor]
    ) -> list[torch.Tensor]:
        """Weight, count, m and v of each of ``keys``, in that order."""
        s = self.state
        return [t for k in keys for t in (params[k], s.count[k], s.mu[k], s.nu[k])]

    def _bind(self, keys: tuple[str, ...], params: Mapping[str, torch.Tensor]) -> _Bound:
        """Check and bind the weights, moments and counts of ``keys``."""
        tensors = self._tensors(keys, params)
        for j, k in enumerate(keys):
            shape = tuple(binding.check(f"{k} (weight)", tensors[4 * j], _F32).shape)
            for name, t in zip(("count", "m", "v"), tensors[4 * j + 1 : 4 * j + 4], strict=True):
                binding.check(f"{k} (Adam {name})", t, _F32, shape)
        n = len(keys)
        pointers = [t.data_ptr() for t in tensors]
        arrays = [(ctypes.c_void_p * n)(*pointers[i::4]) for i in range(4)]  # (p, c, m, v)
        sizes = (ctypes.c_int64 * n)(*[t.numel() for t in tensors[::4]])
        bound = _Bound(tensors, pointers, arrays, sizes)
        self._bound[keys] = bound
        return bound

    def apply_(self, grads: Mapping[str, torch.Tensor], params: Mapping[str, torch.Tensor]) -> bool:
        """One Adam step on ``params`` in place from ``grads`` (same keys, float32 CPU);
        False (nothing done) where a gradient is not contiguous: the learner's update then
        takes the path it takes for such tensors (``kernels.adam_applies``), for its bits."""
        if not all(g.is_contiguous() for g in grads.values()):
            return False
        keys = tuple(grads)
        bound = self._bound.get(keys)
        now = self._tensors(keys, params)
        if bound is None or not all(  # (still the same tensors, in the same memory)
            t is old and t.data_ptr() == ptr
            for t, old, ptr in zip(now, bound.tensors, bound.pointers, strict=True)
        ):
            bound = self._bind(keys, params)
        g = [
            binding.check(f"{k} (gradient)", grads[k], _F32, bound.tensors[4 * j].shape)
            for j, k in enumerate(keys)
        ]
        p, c, m, v = bound.arrays
        t1, t2 = self.tables
        need().cl_adam_apply(
            len(keys),
            bound.sizes,
            (ctypes.c_void_p * len(g))(*[x.data_ptr() for x in g]),
            m,
            v,
            c,
            p,
            self.lr,
            1.0 - self.b1,
            self.b2,
            1.0 - self.b2,
            self.eps,
            t1.data_ptr(),
            len(t1),
            t2.data_ptr(),
            len(t2),
        )
        return True


class _Bound(NamedTuple):
    """The tensors bound for one set of keys (weight, count, m, v each), their data pointers
    then, the pointer arrays (weights, counts, m, v) and the sizes handed to C."""

    tensors: list[torch.Tensor]
    pointers: list[int]
    arrays: list[Any]
    sizes: Any
