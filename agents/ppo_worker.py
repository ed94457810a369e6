"""PPO's update on two cores: the value net's minibatch updates in a second process.

With the base-optimizer learners (``bp``, ``adam``, ``proper-adam``) and no gradient clipping,
PPO's update is two independent sequences of minibatch updates: the policy's (clipped
surrogate, log-std) and the value net's (squared error). They share only the rollout, the
advantages and value targets (computed before the update) and the minibatch orders (drawn
before the update from the replicas' generators, which nothing else draws from during it).
:class:`ValueWorker` runs the value net's sequence in a forked process while the agent runs
the policy's, each on one core with one torch thread: no OpenMP barrier per op (2 torch
threads wait for a time slice at every op when the other core is busy) and no GIL between
the two (threads of one process ran slower than one thread here).

The value net's parameters and its learner state live in shared memory (moved there in place,
so the agent's tensors are the very ones the worker updates); the rollout's observations,
value targets and orders are copied into shared buffers before each update. Same ops on the
same numbers in the same order: the results are those of the one-process update, bit for bit
(``tests/test_ppo_worker.py``). The worker is forked at the first update and again after
:meth:`PPOAgent.load_state_dict` or :meth:`PPOAgent.to` (a forked process keeps its own
python-side learner bookkeeping, which must start from the restored state); it blocks between
updates and polls (``sched_yield``) during one.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import traceback
from typing import Any

import torch

from contlearn.agents import ppo_fast
from contlearn.envs.split_vector import wait_reply
from contlearn.errors import ConfigError

#: learners whose update acts on each parameter alone (the base optimizer only)
SEPARABLE_LEARNERS = ("bp", "adam", "proper-adam")


def check_supported(agent: Any) -> None:
    """Raise :class:`ConfigError` unless ``value_worker`` applies to ``agent``'s settings."""
    spec = agent.spec
    if agent.learner_spec.name not in SEPARABLE_LEARNERS:
        raise ConfigError(
            f"value_worker=true needs a learner acting on each parameter alone "
            f"({', '.join(SEPARABLE_LEARNERS)}), not {agent.learner_spec.name}"
        )
    if spec.max_grad_norm > 0 or not agent._fast:
        raise ConfigError(
            "value_worker=true needs max_grad_norm=0 (a norm over both nets) "
            "and the hand-written update (fast=true)"
        )


def value_keys(agent: Any) -> list[str]:
    """The value net's parameter names, in the agent's order."""
    return [k for k in agent._keys if k.startswith("value.")]


def value_updates(
    agent: Any,
    obs: torch.Tensor,
    ret: torch.Tensor,
    orders: torch.Tensor,
    stopped: torch.Tensor | None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The value net's minibatch updates of one PPO update, in the one-process order.

    Args:
        agent: the :class:`~contlearn.agents.ppo.PPOAgent`.
        obs: ``(R, N, D)`` the rollout's observations; ``ret``: ``(R, N)`` value targets.
        orders: ``(epochs, R, N)`` each epoch's minibatch order.
        stopped: replicas that do not learn, or None.

    Returns:
        Each minibatch's value loss ``(updates, R)`` and, per value parameter, Σ|g| of the
        first minibatch of every epoch ``(epochs, R)`` float64 (added up by the agent, in
        order).
    """
    spec, keys = agent.spec, value_keys(agent)
    views = {k: agent._views[k] for k in keys}
    rows = torch.arange(obs.shape[0]).unsqueeze(1)
    losses: list[torch.Tensor] = []
    grad_sums: dict[str, list[torch.Tensor]] = {k: [] for k in keys}
    with torch.no_grad():
        for order in orders:
            obs_s, ret_s = obs[rows, order], ret[rows, order]
            for start in range(0, obs.shape[1], spec.minibatch_size):
                end = start + spec.minibatch_size
                loss, grads, hs = ppo_fast._value_part(
                    agent.net,
                    {"obs": obs_s[:, start:end], "ret": ret_s[:, start:end]},
                    spec.vf_coef,
                )
                losses.append(loss)
                if start == 0:
                    for k in keys:
                        grad_sums[k].append(grads[k].abs().flatten(1).sum(1, dtype=torch.float64))
                features = {
                    f"value.{layer.name}": h
                    for layer, h in zip(agent.net.value.layers[:-1], hs, strict=True)
                }
                updates, agent.learner_state = agent.learner.update(
                    {k: grads[k] for k in keys},
                    agent.learner_state,
                    views,
                    features=features,
                    loss=loss,
                    task_start=False,
                )
                if stopped is not None:
                    for u in updates.values():
                        u[stopped] = 0.0
                torch._foreach_add_([views[k] for k in keys], [updates[k] for k in keys])
    return torch.stack(losses), {k: torch.stack(v) for k, v in grad_sums.items()}


def split_update(agent: Any, data: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """:meth:`PPOAgent._update`'s minibatch loop (``value_worker``) with the value net's half
    in the agent's value worker; the same numbers in the same order."""
    s = agent.spec
    R, N = data["adv"].shape
    orders = torch.stack([agent._order(N) for _ in range(s.epochs)])  # (epochs, R, N)
    if agent._worker is None:
        agent._worker = ValueWorker(agent)
    agent._worker.start(data["obs"], data["ret"], orders, agent._stopped)
    rows = torch.arange(R).unsqueeze(1)
    policy = []
    for order in orders:
        shuffled = {k: data[k][rows, order] for k in ("obs", "action", "logp", "adv")}
        for start in range(0, N, s.minibatch_size):
            mb = {k: v[:, start : start + s.minibatch_size] for k, v in shuffled.items()}
            policy.append(_policy_minibatch(agent, mb, record=start == 0))
    value_losses, grad_sums = agent._worker.result()
    for k, per_epoch in grad_sums.items():
        for total in per_epoch:
            agent.stats["grad_sum"][k] += total
    totals: dict[str, torch.Tensor] = {}
    for stats, value_loss in zip(policy, value_losses, strict=True):
        loss = stats["policy_loss"] + s.vf_coef * value_loss - s.ent_coef * stats["entropy"]
        out = {
            "loss": loss,
            "policy_loss": stats["policy_loss"],
            "value_loss": value_loss,
            **{k: stats[k] for k in ("entropy", "approx_kl", "clip_fraction")},
        }
        for k, v in out.items():
            totals[k] = totals[k] + v if k in totals else v
    return totals


def _policy_minibatch(
    agent: Any, mb: dict[str, torch.Tensor], record: bool
) -> dict[str, torch.Tensor]:
    """The policy's half of :meth:`PPOAgent._minibatch` (``value_worker``); its statistics."""
    keys = [k for k in agent._keys if not k.startswith("value.")]
    with torch.no_grad():
        stats, grads, hs = ppo_fast._policy_part(
            agent.net, mb, agent.spec.clip, agent.spec.ent_coef
        )
        if record:
            for k in keys:
                agent.stats["grad_sum"][k] += grads[k].abs().flatten(1).sum(1, dtype=torch.float64)
            agent.stats["minibatches"] += 1
        features = {
            f"policy.{layer.name}": h
            for layer, h in zip(agent.net.policy.layers[:-1], hs, strict=True)
        }
        updates, agent.learner_state = agent.learner.update(
            {k: grads[k] for k in keys},
            agent.learner_state,
            {k: agent._views[k] for k in keys},
            features=features,
            loss=stats["policy_loss"],
            task_start=False,
        )
        if agent._stopped is not None:
            for u in updates.values():
                u[agent._stopped] = 0.0
        torch._foreach_add_([agent._views[k] for k in keys], [updates[k] for k in keys])
    return stats


def _serve(conn: Any, agent: Any, inputs: dict[str, torch.Tensor]) -> None:
    """The worker's loop: one :func:`value_updates` per ``stopped`` message until ``None``,
    or until the agent's process is gone (the fork inherited open pipe ends, so no EOF
    would tell)."""
    torch.set_num_threads(1)
    parent = os.getppid()
    try:
        while True:
            while not conn.poll(1.0):
                if os.getppid() != parent:
                    return
            message = conn.recv()
            if message is None:
                break
            conn.send(
                (
                    "ok",
                    value_updates(
                        agent, inputs["obs"], inputs["ret"], inputs["orders"], message[0]
                    ),
                )
            )
    except Exception:  # noqa: BLE001 (handed to the agent, which raises)
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


class ValueWorker:
    """A forked process running the value net's half of each update (module docstring).

    Args:
        agent: the :class:`~contlearn.agents.ppo.PPOAgent` (its rollout buffer allocated).
    """

    def __init__(self, agent: Any) -> None:
        b, s = agent.buf, agent.spec
        R, T, E, D = b["obs"].shape
        for k in value_keys(agent):  # in place: the agent keeps the same tensors
            agent._views[k].share_memory_()
        for leaf in _state_tensors(agent.learner_state, value_keys(agent)):
            leaf.share_memory_()
        self.inputs = {
            "obs": torch.zeros(R, T * E, D).share_memory_(),
            "ret": torch.zeros(R, T * E).share_memory_(),
            "orders": torch.zeros(s.epochs, R, T * E, dtype=torch.long).share_memory_(),
        }
        ctx = mp.get_context("fork")  # the child uses the agent's objects as they are
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(child, agent, self.inputs), daemon=True)
        self._proc.start()
        child.close()

    def start(
        self,
        obs: torch.Tensor,
        ret: torch.Tensor,
        orders: torch.Tensor,
        stopped: torch.Tensor | None,
    ) -> None:
        """Hand the worker one update's inputs; it starts at once."""
        self.inputs["obs"].copy_(obs)
        self.inputs["ret"].copy_(ret)
        self.inputs["orders"].copy_(orders)
        self._conn.send((stopped,))

    def result(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Wait (polling) for the update started last; what :func:`value_updates` returns."""
        return wait_reply(self._conn, self._proc, "PPO value worker")

    def close(self) -> None:
        """End the worker."""
        with contextlib.suppress(BrokenPipeError, OSError):
            self._conn.send(None)
        self._proc.join(timeout=5)
        if self._proc.is_alive():
            self._proc.terminate()
        self._conn.close()


def _state_tensors(state: Any, keys: list[str]) -> list[torch.Tensor]:
    """The learner-state tensors of parameters ``keys`` (dicts keyed by parameter name)."""
    out: list[torch.Tensor] = []
    if isinstance(state, dict):
        out.extend(v for k, v in state.items() if k in keys and isinstance(v, torch.Tensor))
        for v in state.values():
            if not isinstance(v, torch.Tensor):
                out.extend(_state_tensors(v, keys))
    elif isinstance(state, (tuple, list)):
        for v in state:
            out.extend(_state_tensors(v, keys))
    return out
