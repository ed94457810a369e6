"""Optimizer-aware unit resets, shared by continual backprop, ReDo and the head reset.

A reset transform wraps an inner chain (the optimizer and any regularisers). Each step it lets
the inner chain compute its updates ``u`` first, then edits the *post-update* values
``θ' = θ + u``: for every tensor it touches it writes ``θ'`` into the parameter in place, makes
its edits there, and returns a zero update for that tensor. Tensors it does not touch keep
their update, so every final value is exact (no float round trip).

:func:`reset_units` re-initialises a set of units of one layer (per replica, a boolean mask
``(R, H)``):

- incoming weights ``W_l[i, :]`` redrawn from the layer's own init distribution
  (``network.sample_init``) with the replica's own generator, replica by replica, the rows in
  increasing unit order; incoming bias ``b_l[i] = 0`` (or redrawn, for a whole-layer reset);
- optionally bias folding ``b_{l+1} += W_{l+1}[:, i] · f̂_i`` (continual backprop);
- outgoing weights ``W_{l+1}[:, i] = 0``;
- the inner optimizer state of ``W_l[i, :]``, ``b_l[i]`` and ``W_{l+1}[:, i]`` cleared: every
  per-parameter state tensor (Adam moments and per-element step counts, momentum buffers;
  found by :func:`~contlearn.learners.base.per_param_state`) is zeroed there;
- with layer norm or batch norm (``<layer>.ln_weight``/``.ln_bias``, ``.bn_weight``/
  ``.bn_bias`` among the parameters), the units' gain and offset set back to their init, 1
  and 0, and their optimizer state cleared too; a network with running statistics (batch
  norm) resets the units' own (``network.reset_unit_stats``: mean 0, variance 1);
- anchors (θ₀ of L2-Init / shrink-toward-init) of those weights set to their new values;
- a *learned* feedback matrix (a credit rule's ``B``, docs/credit.md), if the agent passes them
  (:class:`FeedbackReset`, the extra ``feedback=``), treated like the forward weights of the
  same shape: ``B_l[i, :]`` redrawn from layer l's init distribution (after the incoming
  weights, from the same generator) and ``B_{l+1}[:, i] = 0``. Learned feedback keeps no
  optimizer state, so there is none to clear. Fixed feedback is never passed, never changed.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any, NamedTuple, overload

import torch

from contlearn.agents.network_options import CONCAT_ACTIVATIONS, LN_BIAS, LN_WEIGHT
from contlearn.agents.resnet import BN_BIAS, BN_WEIGHT
from contlearn.errors import ConfigError
from contlearn.learners.base import (
    AnchorState,
    GradientTransformation,
    Params,
    find_states,
    per_param_state,
)
from contlearn.learners.rng import draw, replica_rng_states

#: the prefix of learned feedback among a learner's parameters (``feedback.<layer>``, when a
#: credit rule's option ``regularize`` hands the learner its feedback matrices)
FEEDBACK = "feedback."


class FeedbackReset(NamedTuple):
    """The learned feedback of a credit rule, for resets (the extra ``feedback=`` of
    ``learner.update``).

    Attributes:
        matrices: ``{layer: (R, out, in)}``, ``B_l`` of the shape of ``W_l``; resets edit them
            in place.
        updates: filled by resets: for each weight with feedback that a reset materialised
            (:func:`materialize`), the inner chain's update of it, zero at the reset units'
            rows and columns. Kolen–Pollack's ``ΔB = ΔW`` reads these where the returned
            update is zero because the reset wrote ``θ + u`` itself.
    """

    matrices: Params
    updates: Params


def materialize(
    params: Params, updates: Params, names: Sequence[str], feedback: FeedbackReset | None = None
) -> Params:
    """Write ``θ + u`` into ``params[n]`` for ``names``; return the updates, zero there (the
    first update of each weight with feedback kept in ``feedback.updates``)."""
    out = dict(updates)
    if feedback is not None:
        for n in names:
            layer = n.rsplit(".", 1)[0]
            if n.endswith(".weight") and layer in feedback.matrices:
                feedback.updates.setdefault(n, updates[n].clone())
    for n in names:
        params[n].add_(updates[n])
        out[n] = torch.zeros_like(updates[n])
    return out


def _fresh_rows(
    network: Any, layer: str, mask: torch.Tensor, rng: torch.Tensor, init_bias: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """New incoming weights and biases for the masked units, replica by replica, stacked in
    ``mask``'s row-major order (replica, then unit): ``((N, fan_in), (N,))``, on the CPU."""
    ws, bs = [], []
    for r, k in enumerate(mask.sum(1).tolist()):
        if k:
            w, b = draw(rng, r, partial(network.sample_init, layer, k))  # (layer, k, g)
            ws.append(w)
            bs.append(b if init_bias else torch.zeros_like(b))
    return torch.cat(ws), torch.cat(bs)


@overload
def reset_units(
    params: Params,
    updates: Params,
    inner_state: Any,
    network: Any,
    layer: str,
    mask: torch.Tensor,
    rng: torch.Tensor,
    *,
    fold: torch.Tensor | None = None,
    init_bias: bool = False,
    feedback: FeedbackReset | None = None,
) -> Params: ...
@overload
def reset_units(
    params: Params,
    updates: None,
    inner_state: Any,
    network: Any,
    layer: str,
    mask: torch.Tensor,
    rng: torch.Tensor,
    *,
    fold: torch.Tensor | None = None,
    init_bias: bool = False,
    feedback: FeedbackReset | None = None,
) -> None: ...
def reset_units(
    params: Params,
    updates: Params | None,
    inner_state: Any,
    network: Any,
    layer: str,
    mask: torch.Tensor,
    rng: torch.Tensor,
    *,
    fold: torch.Tensor | None = None,
    init_bias: bool = False,
    feedback: FeedbackReset | None = None,
) -> Params | None:
    """Re-initialise the units ``mask`` of ``layer`` (see the module docstring).

    Only the replaced rows and columns are read or written (index ops, not whole-tensor masks).

    Args:
        params: the parameters (edited in place).
        updates: the inner chain's updates; returned with zeros where ``params`` was set. None
            when ``params`` already hold the post-update values (fused updates).
        inner_state: the inner chain's state (optimizer state and anchors edited in place).
        network: has ``by_name`` (``Layer`` with ``next``) and ``sample_init``.
        layer: the layer whose units are reset.
        mask: ``(R, H)`` bool, the units to reset in each replica.
        rng: ``(R, S)`` generator states of the replicas (advanced in place).
        fold: ``(R, H)`` mean activations f̂ to fold into the next layer's bias, or None.
        init_bias: redraw incoming biases from the init instead of zeroing them.
        feedback: the learned feedback to reset with the units (None: no learned feedback).

    Returns:
        The updates to return to the agent (None if ``updates`` was None).
    """
    if not bool(mask.any()):
        return updates
    nxt = network.by_name[layer].next
    if nxt is not None and getattr(network, "activation", "") in CONCAT_ACTIVATIONS:
        raise ConfigError(
            f"unit resets read one feature per unit; activation={network.activation} has two"
        )
    w, b = f"{layer}.weight", f"{layer}.bias"
    wn, bn = f"{nxt}.weight", f"{nxt}.bias"
    norms = (LN_WEIGHT, LN_BIAS, BN_WEIGHT, BN_BIAS)
    ln = [n for n in (f"{layer}.{s}" for s in norms) if n in params]
    if updates is not None:
        names = [w, b, *ln] + ([wn, bn] if nxt is not None else [])
        if feedback is not None:  # feedback the learner updates is reset as θ + u too
            names += [FEEDBACK + str(n) for n in (layer, nxt) if FEEDBACK + str(n) in params]
        updates = materialize(params, updates, names, feedback)
    new_w, new_b = _fresh_rows(network, layer, mask, rng, init_bias)
    r, i = mask.nonzero(as_tuple=True)  # (N,) each, row-major as the fresh rows
    params[w][r, i] = new_w.to(params[w])  # rows W_l[i, :]
    params[b][r, i] = new_b.to(params[b])
    rows: dict[str, tuple[torch.Tensor | slice, ...]] = {w: (r, i), b: (r, i)}
    for n in ln:  # a norm's gain 1 and offset 0, as initialised
        params[n][r, i] = 1.0 if n.endswith((LN_WEIGHT, BN_WEIGHT)) else 0.0
        rows[n] = (r, i)
    if (reset_stats := getattr(network, "reset_unit_stats", None)) is not None:
        reset_stats(layer, r, i)
    if nxt is not None:
        cols = (r, slice(None), i)  # columns W_{l+1}[:, i] as (N, K)
        if fold is not None:
            w_cols = params[wn][cols]  # (N, K), or (N, K, S): a unit read at S positions
            if w_cols.dim() > 2:
                w_cols = w_cols.sum(2)
            contrib = w_cols * fold[r, i].unsqueeze(1)  # (N, K)
            params[bn].index_add_(0, r, contrib)
        params[wn][cols] = 0.0
        rows[wn] = cols
    if feedback is not None:
        _reset_feedback(feedback, network, layer, nxt, mask, rng, (r, i))
        indexes: list[tuple[str | None, tuple[torch.Tensor | slice, ...]]] = [
            (layer, (r, i)),
            (nxt, (r, slice(None), i)),
        ]
        for name, index in indexes:
            if FEEDBACK + str(name) in params:  # the learner acts on feedback: its state too
                rows[FEEDBACK + str(name)] = index
    for s in per_param_state(inner_state, params):
        for n, index in rows.items():
            s[n][index] = 0
    for anchor in find_states(inner_state, AnchorState):
        for n, index in rows.items():
            anchor.anchor[n][index] = params[n][index]
    return updates


def _reset_feedback(
    feedback: FeedbackReset,
    network: Any,
    layer: str,
    nxt: str | None,
    mask: torch.Tensor,
    rng: torch.Tensor,
    rows: tuple[torch.Tensor, torch.Tensor],
) -> None:
    """``B_layer[i, :]`` redrawn (drawn after the weights' rows), ``B_nxt[:, i] = 0``, and the
    kept updates zero there."""
    r, i = rows
    fb, kept = feedback.matrices, feedback.updates
    if layer in fb:
        fresh, _ = _fresh_rows(network, layer, mask, rng, False)
        fb[layer][r, i] = fresh.to(fb[layer])
        if f"{layer}.weight" in kept:
            kept[f"{layer}.weight"][r, i] = 0
    if nxt is not None and nxt in fb:
        fb[nxt][r, slice(None), i] = 0
        if f"{nxt}.weight" in kept:
            kept[f"{nxt}.weight"][r, slice(None), i] = 0


class UnitStats(NamedTuple):
    """Bookkeeping a reset transform reports (see :func:`reset_diagnostics`).

    Attributes:
        age: ``{layer: (R, H) int64}`` updates since each unit was (re)initialised.
        utility: ``{layer: (R, H)}`` the score units are ranked by (CBP: û; ReDo: s).
        eligible: ``{layer: (R,) int64}`` units that could be replaced on the last step/check.
        replacements: ``{layer: (R,) int64}`` cumulative number of units reset.
    """

    age: Params
    utility: Params
    eligible: Params
    replacements: Params


def unit_stats(params: Params, layers: Sequence[str], stacked: bool = False) -> UnitStats:
    """Zeroed :class:`UnitStats` for ``layers`` (shapes from ``params``).

    With ``stacked`` (all layers the same width), each dict's entries are views into one
    ``(L, R, H)`` (or ``(L, R)``) tensor, so per-step bookkeeping can be one op for all layers.
    """
    bias = params[f"{layers[0]}.bias"]

    def make(shape: Sequence[int], dtype: torch.dtype) -> Params:
        if stacked:
            buf = torch.zeros(len(layers), *shape, dtype=dtype, device=bias.device)
            return {n: buf[i] for i, n in enumerate(layers)}
        return {
            n: torch.zeros(params[f"{n}.bias"].shape[: len(shape)], dtype=dtype, device=bias.device)
            for n in layers
        }

    return UnitStats(
        make(bias.shape, torch.int64),
        make(bias.shape, bias.dtype),
        make(bias.shape[:1], torch.int64),
        make(bias.shape[:1], torch.int64),
    )


def reset_diagnostics(state: Any) -> dict[str, dict[str, torch.Tensor]]:
    """``{layer: {metric: (R,)}}`` from every :class:`UnitStats` in a learner's state.

    Metrics: ``replacements`` (cumulative), ``eligible_units``, ``mean_age`` and the
    ``utility_q10``/``utility_q50``/``utility_q90`` quantiles over the layer's units.
    """
    out: dict[str, dict[str, torch.Tensor]] = {}
    for stats in find_states(state, UnitStats):
        for layer, age in stats.age.items():
            util = stats.utility[layer].to(torch.float64)
            q = torch.quantile(
                util, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64, device=util.device), dim=1
            )
            out.setdefault(layer, {}).update(
                {
                    "replacements": stats.replacements[layer].clone(),
                    "eligible_units": stats.eligible[layer].clone(),
                    "mean_age": age.to(torch.float64).mean(1),
                    "utility_q10": q[0],
                    "utility_q50": q[1],
                    "utility_q90": q[2],
                }
            )
    return out


class HeadResetState(NamedTuple):
    """The inner chain's state, the generators, and the cumulative head resets ``(R,)``."""

    inner: Any
    rng: torch.Tensor
    resets: torch.Tensor


def head_reset(
    inner: GradientTransformation,
    network: Any,
    seeds: Sequence[int],
    layer: str | None = None,
    rng_stream: int = 0,
) -> GradientTransformation:
    """Re-initialise the output layer at every visible task start.

    When ``update`` gets ``task_start=True`` (the agent passes it on the first update of a
    task, only if the stream's boundaries are visible), after the inner update the whole layer
    is redrawn from its own init distribution (weights and biases, replica by replica from its
    own generator) and its optimizer state is cleared (:func:`reset_units` on every unit). The
    first update of the new task therefore trains the hidden layers through the old head and
    then replaces the head.

    Args:
        inner: the wrapped chain (optimizer and regularisers).
        network: the network (``by_name``, ``sample_init``).
        seeds: the replicas' root seeds.
        layer: the layer to reset (default: the network's output layer, the last of
            ``network.layers``).
        rng_stream: which independent learner stream to draw from.
    """
    head = layer if layer is not None else str(network.layers[-1].name)

    def init(params: Params) -> HeadResetState:
        bias = params[f"{head}.bias"]
        return HeadResetState(
            inner.init(params),
            replica_rng_states(seeds, rng_stream),
            torch.zeros(bias.shape[0], dtype=torch.int64, device=bias.device),
        )

    def update(
        grads: Params,
        state: HeadResetState,
        params: Params,
        *,
        task_start: bool = False,
        **extra: Any,
    ):
        updates, inner_state = inner.update(
            grads, state.inner, params, task_start=task_start, **extra
        )
        if task_start:
            bias = params[f"{head}.bias"]
            mask = torch.ones(bias.shape, dtype=torch.bool, device=bias.device)  # (R, C)
            updates = reset_units(
                params,
                updates,
                inner_state,
                network,
                head,
                mask,
                state.rng,
                init_bias=True,
                feedback=extra.get("feedback"),
            )
            state.resets.add_(1)
        return updates, HeadResetState(inner_state, state.rng, state.resets)

    return GradientTransformation(init, update)


def head_reset_diagnostics(state: Any) -> dict[str, dict[str, torch.Tensor]]:
    """``{"output": {"head_resets": (R,)}}``: cumulative head resets."""
    found = find_states(state, HeadResetState)
    return {"output": {"head_resets": found[0].resets.clone()}} if found else {}
