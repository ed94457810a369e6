"""Continual backprop over Adam in the block backend's C loop (docs/design.md §4a, step 7).

Dohare et al.'s Slippery Ant setting, and CBP with ``optimizer=adam`` generally, wraps an Adam
chain. The whole-step kernel applies Adam (:class:`contlearn.learners.adam_form.AdamPlan`) and
continual backprop's steps 1–5 and stops a replica where units must be replaced; steps 6–7 run
as for SGD (:meth:`_ContinualBackprop._replace_counts`), and then the inner Adam state of the
replaced units' weights is cleared as :func:`contlearn.learners.resets.reset_units` clears it
in the reference: moments and per-element counts of ``W_l[i, :]``, ``b_l[i]`` and
``W_{l+1}[:, i]``, so Adam's bias correction restarts for exactly those weights.

Which units were replaced: every unit's age grew by one at the step the kernel stopped at
(step 1), so after the replacement exactly the replaced units have age 0.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from contlearn.learners.adam_form import AdamPlan, adam_plan
from contlearn.learners.base import Params, per_param_state
from contlearn.learners.fused import UnitReplacer

if TYPE_CHECKING:
    from contlearn.learners.cbp import CBPState, _ContinualBackprop


def adam_form(cbp: _ContinualBackprop) -> AdamPlan | None:
    """The declared form of continual backprop over an Adam chain: the chain's
    :class:`AdamPlan` with steps 1–7 as its replacer, where the kernel takes them (the paper's
    utility with carry rounding, as for SGD); else None."""
    inner = adam_plan(cbp.inner)
    if inner is None or inner.replacer is not None:
        return None
    if cbp.utility != "contribution" or cbp.rounding != "carry":
        return None
    if not len(cbp._correction_table(torch.float32, torch.device("cpu"))):
        return None
    cbp.adam_inner = True

    def replace(state: CBPState, params: Params, counts: list, skip: Any) -> None:
        cbp._replace_counts(state, params, counts, skip)
        clear_replaced(cbp, state, params)

    return inner._replace(replacer=UnitReplacer(cbp._kernel_state, replace))


@torch.no_grad()
def clear_replaced(cbp: _ContinualBackprop, state: CBPState, params: Params) -> None:
    """Zero the inner optimizer state (Adam's moments and counts) of the weights of every unit
    with age 0 (just replaced): ``W_l[i, :]``, ``b_l[i]``, ``W_{l+1}[:, i]``."""
    opt = per_param_state(state.inner, params)
    for name, nxt in cbp.layers:
        r, i = (state.stats.age[name] == 0).nonzero(as_tuple=True)  # (N,) each
        if not len(r):
            continue
        for s in opt:
            s[f"{name}.weight"][r, i] = 0
            s[f"{name}.bias"][r, i] = 0
            if nxt is not None:
                s[f"{nxt}.weight"][r, :, i] = 0
