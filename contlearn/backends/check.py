"""Checking a backend against the reference: the same steps, the same numbers.

:func:`check_online_agent` builds the online agent twice from one configuration, once with its
backends (``fast=true``: the agent picks the first that supports the configuration) and once
with the reference step (``fast=false``), feeds both the same batches, and compares every
step's predictions and loss and, at the end, every parameter, every learner-state tensor and
every feedback matrix of the credit rule (the learned ones too: Kolen–Pollack's B), floats to a
tolerance, integers such as ages and generator states exactly. A backend that learns in blocks
is driven through :meth:`~contlearn.agents.online.OnlineAgent.learn_block` in blocks of uneven
lengths, as the engine drives it. ``tests/test_backends.py`` runs it over every
registered credit rule × learner × activation × optimizer × stream kind × batch size.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch

from contlearn.envs.base import StreamInfo
from contlearn.errors import ContlearnError
from contlearn.state import tree_leaves


class BackendMismatchError(ContlearnError):
    """A backend computed something other than the reference step."""


def synthetic_batches(
    info: StreamInfo, steps: int, seed: int = 0
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``steps`` random ``(obs (R, B, *input_shape), target)`` batches for ``info``'s kind."""
    gen = torch.Generator().manual_seed(seed)
    R, B = info.num_replicas, info.batch_size
    out = []
    for _ in range(steps):
        obs = torch.rand(R, B, *info.input_shape, generator=gen)
        if info.kind == "classification":
            target = torch.randint(info.num_outputs, (R, B), generator=gen)
        else:
            target = torch.randn(R, B, info.num_outputs, generator=gen)
        out.append((obs, target))
    return out


def _close(a: torch.Tensor, b: torch.Tensor, what: str, rtol: float, atol: float) -> None:
    a, b = a.cpu(), b.cpu()  # (the agent under check may be on another device)
    if a.is_floating_point():
        ok = torch.allclose(a, b, rtol=rtol, atol=atol, equal_nan=True)
        diff = float((a - b).abs().max()) if a.numel() else 0.0
    else:
        ok, diff = torch.equal(a, b), float("nan")
    if not ok:
        raise BackendMismatchError(f"{what} differs from the reference (max |Δ| {diff:.3g})")


def _blocks(steps: int) -> list[int]:
    """Uneven block lengths summing to ``steps`` (1, 2, 5, then the rest)."""
    sizes, left = [], steps
    for size in (1, 2, 5):
        if left <= 0:
            break
        sizes.append(min(size, left))
        left -= sizes[-1]
    return sizes + ([left] if left > 0 else [])


def _run(
    agent: Any, batches: Sequence[tuple[torch.Tensor, torch.Tensor]], task_starts: set[int]
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Step ``agent`` through ``batches``; the predictions and losses of every step."""
    preds, losses = [], []
    blocks = agent.block_ready(agent.info.batch_size)
    t = 0
    for size in _blocks(len(batches)) if blocks else [1] * len(batches):
        if t in task_starts:
            agent.on_task_start(t)
        chunk = batches[t : t + size]
        if blocks:
            obs = torch.stack([o for o, _ in chunk])
            target = torch.stack([y for _, y in chunk])
            pred, metrics = agent.learn_block(obs, target)
            preds.extend(pred.unbind(0))
            losses.extend(metrics["loss"].unbind(0))
        else:
            obs, target = chunk[0]
            pred = agent.act(obs)
            preds.append(pred)
            losses.append(agent.observe(obs, pred, target)["loss"])
        t += size
    return preds, losses


def check_online_agent(
    info: StreamInfo,
    seeds: Sequence[int],
    spec: Any,
    learner: Any,
    steps: int = 12,
    rtol: float = 1e-4,
    atol: float = 2e-5,
    device: str | None = None,
) -> str:
    """Compare the online agent's chosen backend with its reference step.

    Args:
        info: the stream the agents are built for (``batch_size`` included).
        seeds: the replicas' seeds.
        spec: the agent's options (:class:`~contlearn.agents.online.OnlineAgentSpec`); its
            ``fast`` field is set here.
        learner: the learner (:class:`~contlearn.learners.Learner`).
        steps: learning steps (the first and the middle one start a task).
        rtol, atol: the float tolerance.
        device: move the agent under check to this device (``cuda``: its backends there
            against the reference on the CPU); default: both on the CPU.

    Returns:
        The name of the backend that was checked.

    Raises:
        BackendMismatchError: a prediction, loss, parameter or learner-state tensor differs.
    """
    from contlearn.agents.online import OnlineAgent

    fast, ref = (
        OnlineAgent(info, seeds, dataclasses.replace(spec, fast=f), learner) for f in (True, False)
    )
    if device is not None:
        fast.to(device)
    for agent in (fast, ref):
        agent.watch_gradients()
    batches = synthetic_batches(info, steps)
    starts = {0, steps // 2} if info.boundaries_visible else set()
    (p_fast, l_fast), (p_ref, l_ref) = (_run(a, batches, starts) for a in (fast, ref))
    where = f"backend {fast.backend}"
    for t, (a, b) in enumerate(zip(p_fast, p_ref, strict=True)):
        _close(a, b, f"{where}: step {t}'s prediction", rtol, atol)
    for t, (a, b) in enumerate(zip(l_fast, l_ref, strict=True)):
        _close(a, b, f"{where}: step {t}'s loss", rtol, atol)
    params = ref.parameters()
    for k, v in fast.parameters().items():
        _close(v, params[k], f"{where}: parameter {k}", rtol, atol)
    for i, (a, b) in enumerate(
        zip(tree_leaves(fast.learner_state), tree_leaves(ref.learner_state), strict=True)
    ):
        _close(a, b, f"{where}: learner state tensor {i}", rtol, atol)
    feedback = ref.credit.state_dict()["feedback"]
    for k, v in fast.credit.state_dict()["feedback"].items():
        _close(v, feedback[k], f"{where}: {fast.credit.name} feedback {k}", rtol, atol)
    stats = ref.update_stats()
    for metric, by_layer in fast.update_stats().items():
        for layer, value in by_layer.items():
            _close(value, stats[metric][layer], f"{where}: {metric} {layer}", rtol, atol)
    return fast.backend
