"""The ``ppo-gradients+value-worker`` backend: the value net's minibatch updates in a second
process.

With the base-optimizer learners (``bp``, ``adam``, ``proper-adam``) and no gradient clipping,
PPO's update is two independent sequences of minibatch updates: the policy's (clipped
surrogate, log-std) and the value net's (squared error). They share only the rollout, the
advantages and value targets (computed before the update) and the minibatch orders (drawn
before the update from the replicas' generators, which nothing else draws from during it).
:class:`ValueWorker` runs the value net's sequence in a forked process while the agent runs
the policy's, each on one core with one torch thread: no OpenMP barrier per op (2 torch
threads wait for a time slice at every op when the other core is busy) and no GIL between
the two (threads of one process ran slower than one thread here).

Both halves run the agent's own minibatch step, :meth:`contlearn.agents.ppo.PPOAgent.learn`,
on the gradients of :func:`~contlearn.backends.ppo_gradients.policy_part` and
:func:`~contlearn.backends.ppo_gradients.value_part` (the two halves of the ``ppo-gradients``
backend, which this one extends). The value net's parameters and its learner state live in
shared memory (moved there in place, so the agent's tensors are the very ones the worker
updates); the rollout's observations, value targets and orders are copied into shared buffers
before each update. Same ops on the same numbers in the same order: the results are those of
the one-process update, bit for bit (``tests/test_ppo_worker.py``). The worker is forked at the
first update and again after :meth:`PPOAgent.load_state_dict` or :meth:`PPOAgent.to` (a forked
process keeps its own python-side learner bookkeeping, which must start from the restored
state); it blocks between updates. The agent waits for the value half by
:func:`~contlearn.envs.split_vector.wait_ready`: a brief spin, then asleep, so a busy machine
never loses a core to the waiting side. ``value_worker=auto`` (the default) chooses it where it
applies and a second core is usable (:mod:`contlearn.backends.auto`).

**When the worker lags** (a busy machine gives it less than the agent's share of a core), an
update through it can take longer than the one-process update: the agent waits for the value
half longer than running it itself would take. :class:`ValueMode` then runs the value half in
the agent's own process (the same :func:`value_updates` on the same tensors, so the same
numbers) and retries the worker every :data:`RETRY_EVERY` updates, keeping whichever mode's
updates took less wall time. A process's Python-side bookkeeping of tensors the other one
wrote is marked stale by bumping their version counters before it next updates them (Adam's
cached uniform counts, :class:`contlearn.learners.optim._UniformCounts`, re-check then).
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import time
import traceback
import weakref
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from contlearn.agents.ppo_loss import StepResult, combine
from contlearn.backends.base import StepConfig
from contlearn.backends.ppo_gradients import PPO_GRADIENTS, policy_part, value_part
from contlearn.envs.split_vector import wait_reply

#: learners whose update acts on each parameter alone (the base optimizer only)
SEPARABLE_LEARNERS = ("bp", "adam", "proper-adam")
#: updates between tries of the mode not in use (:class:`ValueMode`)
RETRY_EVERY = 16


class ValueMode:
    """Which process runs the value net's half of the next update: ``worker`` or ``local``
    (the agent's; the module docstring). Each mode's wall time per update is kept as a running
    average (halfway to each new one); the faster one runs, the other every
    :data:`RETRY_EVERY` updates. Until ``local`` has run, the worker is kept while the agent
    waits for it less long than its own (policy) half took, an estimate of what the value half
    takes here. ``worker_stale``/``local_stale``: the other process updated the value net's
    state since this one last did."""

    def __init__(self) -> None:
        self.seconds: dict[str, float | None] = {"worker": None, "local": None}
        self.lagging = False
        self.since = 0
        self.worker_stale = False
        self.local_stale = False

    def choose(self) -> str:
        """The mode of the next update."""
        worker, local = self.seconds["worker"], self.seconds["local"]
        if worker is None or local is None:
            return "local" if worker is not None and self.lagging else "worker"
        best, other = ("worker", "local") if worker <= local else ("local", "worker")
        self.since += 1
        if self.since >= RETRY_EVERY:
            self.since = 0
            return other
        return best

    def record(self, mode: str, seconds: float, waited: float = 0.0, own: float = 0.0) -> None:
        """An update of ``mode`` took ``seconds``; with the worker, the agent ``waited`` for it
        after its own half took ``own``."""
        old = self.seconds[mode]
        self.seconds[mode] = seconds if old is None else 0.5 * (old + seconds)
        if mode == "worker":
            self.lagging = waited > own
            self.local_stale = True
        else:
            self.worker_stale = True


class ValueWorkerBackend:
    """``ppo-gradients`` with the value net's half of each update in a second process."""

    name = "ppo-gradients+value-worker"
    description = (
        "PPO's minibatch gradients by hand, the value net's updates in a second "
        "process (value_worker=true)"
    )

    def refusal(self, cfg: StepConfig) -> str | None:
        """Why this backend does not compute ``cfg``'s reference step (None: it does)."""
        if not cfg.options.get("value_worker", False):  # (auto: resolved before, ppo_auto.py)
            return "value_worker=false"
        if cfg.credit != "bp":
            return f"value_worker=true needs credit=bp (the hand-written update), not {cfg.credit}"
        if not cfg.options.get("fast", True) or not PPO_GRADIENTS.supports(cfg):
            return "value_worker=true needs the hand-written update (fast=true)"
        if cfg.learner not in SEPARABLE_LEARNERS:
            return (
                f"value_worker=true needs a learner acting on each parameter alone "
                f"({', '.join(SEPARABLE_LEARNERS)}), not {cfg.learner}"
            )
        if cfg.options.get("max_grad_norm", 0.0) > 0:
            return "value_worker=true needs max_grad_norm=0 (a norm over both nets)"
        if cfg.device != "cpu":
            return f"value_worker=true runs on the CPU only, not {cfg.device}"
        return None

    def supports(self, cfg: StepConfig) -> bool:
        """Asked for (``value_worker=true``), where ``ppo-gradients`` applies, with a learner
        acting on each parameter alone (:data:`SEPARABLE_LEARNERS`; any base optimizer), no
        gradient clipping (a norm over both nets couples them), on the CPU (shared memory)."""
        return self.refusal(cfg) is None

    def loss_and_grads(
        self,
        net: Any,
        mb: Mapping[str, torch.Tensor],
        clip: float,
        vf_coef: float,
        ent_coef: float,
        pool: ThreadPoolExecutor | None = None,
    ) -> StepResult:
        """One minibatch in this process: ``ppo-gradients``'."""
        return PPO_GRADIENTS.loss_and_grads(net, mb, clip, vf_coef, ent_coef, pool)

    def update(
        self, agent: Any, data: dict[str, torch.Tensor], orders: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """The policy's minibatch steps here, the value net's in the agent's worker (or here,
        after them, where the worker lags: :class:`ValueMode`)."""
        if agent._value_mode is None:
            agent._value_mode = ValueMode()
        vm: ValueMode = agent._value_mode
        mode, started = vm.choose(), time.perf_counter()
        if mode == "worker":
            if agent._worker is None:
                agent._worker = ValueWorker(agent)
                vm.worker_stale = False  # (forked from this process's bookkeeping)
            agent._worker.start(data["obs"], data["ret"], orders, agent._stopped, vm.worker_stale)
            vm.worker_stale = False
        elif vm.local_stale:
            torch.autograd.graph.increment_version(value_state(agent))
            vm.local_stale = False
        s = agent.spec
        policy = []
        with torch.no_grad():
            for mb, first in agent.minibatches(
                {k: data[k] for k in ("obs", "action", "logp", "adv")}, orders
            ):
                stats, grads, features = policy_part(agent.net, mb, s.clip, s.ent_coef)
                agent.learn(grads, features, record=first)
                policy.append(stats)
        own = time.perf_counter() - started
        if mode == "worker":
            value_losses, grad_sums = agent._worker.result()
            done = time.perf_counter() - started
            vm.record(mode, done, waited=done - own, own=own)
        else:
            value_losses, grad_sums = value_updates(agent, data["obs"], data["ret"], orders)
            vm.record(mode, time.perf_counter() - started)
        for k, per_epoch in grad_sums.items():
            for total in per_epoch:
                agent.stats["grad_sum"][k] += total
        totals: dict[str, torch.Tensor] = {}
        for stats, value_loss in zip(policy, value_losses, strict=True):
            for k, v in combine(stats, value_loss, s.vf_coef, s.ent_coef).items():
                totals[k] = totals[k] + v if k in totals else v
        return totals


#: the backend
VALUE_WORKER = ValueWorkerBackend()


def value_keys(agent: Any) -> list[str]:
    """The value net's parameter names, in the agent's order."""
    return [k for k in agent._keys if k.startswith("value.")]


def value_state(agent: Any) -> list[torch.Tensor]:
    """The value net's parameters and learner-state tensors (what the worker writes)."""
    keys = value_keys(agent)
    return [agent._views[k] for k in keys] + _state_tensors(agent.learner_state, keys)


def value_updates(
    agent: Any, obs: torch.Tensor, ret: torch.Tensor, orders: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The value net's minibatch steps of one PPO update, in the one-process order.

    Args:
        agent: the :class:`~contlearn.agents.ppo.PPOAgent` (in the worker: its forked copy).
        obs: ``(R, N, D)`` the rollout's observations; ``ret``: ``(R, N)`` value targets.
        orders: ``(epochs, R, N)`` each epoch's minibatch order.

    Returns:
        Each minibatch's value loss ``(updates, R)`` and, per value parameter, Σ|g| of the
        first minibatch of every epoch ``(epochs, R)`` float64 (added up by the agent, in
        order).
    """
    losses: list[torch.Tensor] = []
    grad_sums: dict[str, list[torch.Tensor]] = {k: [] for k in value_keys(agent)}
    with torch.no_grad():
        for mb, first in agent.minibatches({"obs": obs, "ret": ret}, orders):
            loss, grads, features = value_part(agent.net, mb, agent.spec.vf_coef)
            sums, _ = agent.apply_update(grads, features, record=first)
            losses.append(loss)
            for k, total in (sums or {}).items():
                grad_sums[k].append(total)
    return torch.stack(losses), {k: torch.stack(v) for k, v in grad_sums.items()}


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
            agent._stopped, stale = message  # (this process's copy of the agent)
            if stale:  # (the agent updated the value net itself since this process last did)
                torch.autograd.graph.increment_version(value_state(agent))
            conn.send(("ok", value_updates(agent, inputs["obs"], inputs["ret"], inputs["orders"])))
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
        for t in value_state(agent):  # in place: the agent keeps the same tensors
            t.share_memory_()
        self.inputs = {
            "obs": torch.zeros(R, T * E, D).share_memory_(),
            "ret": torch.zeros(R, T * E).share_memory_(),
            "orders": torch.zeros(s.epochs, R, T * E, dtype=torch.long).share_memory_(),
        }
        ctx = mp.get_context("fork")  # the child uses the agent's objects as they are
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(child, agent, self.inputs), daemon=True)
        self._proc.start()  # (start drops the process's reference to its args, the agent)
        child.close()
        # an agent dropped without close() ends its worker when it is collected
        self._finalizer = weakref.finalize(agent, _end_worker, self._conn, self._proc)

    def start(
        self,
        obs: torch.Tensor,
        ret: torch.Tensor,
        orders: torch.Tensor,
        stopped: torch.Tensor | None,
        stale: bool = False,
    ) -> None:
        """Hand the worker one update's inputs; it starts at once (``stale``: the agent
        updated the value net itself since the worker last did)."""
        self.inputs["obs"].copy_(obs)
        self.inputs["ret"].copy_(ret)
        self.inputs["orders"].copy_(orders)
        self._conn.send((stopped, stale))

    def result(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Wait (a brief spin, then asleep) for the update started last; what
        :func:`value_updates` returns."""
        return wait_reply(self._conn, self._proc, "PPO value worker")

    def close(self) -> None:
        """End the worker."""
        self._finalizer()  # (once: a later call, or the agent's collection, does nothing)


def _end_worker(conn: Any, proc: Any) -> None:
    """Tell the worker to stop; end it if it does not within 5 s."""
    with contextlib.suppress(BrokenPipeError, OSError):
        conn.send(None)
    proc.join(timeout=5)
    if proc.is_alive():
        proc.terminate()
    conn.close()


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
