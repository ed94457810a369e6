"""When and where probes run: the schedule, in line or on a thread of their own.

:func:`scheduled_results` runs the probes due at a probe point in line; :func:`submit_probes`
runs them on a copy of the network on the probe thread (lowered CPU priority) while the agent
learns on, with the same numbers. The engine (:class:`contlearn.loop.engine.SupervisedLoop`) picks
one and turns the results into records.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from contlearn.agents.protocol import (
    Agent,
    SupportsProbeSnapshot,
    SupportsProbeThreads,
    SupportsUpdateStats,
)
from contlearn.envs.protocol import DeferredProbeStream, SupervisedStreamProtocol
from contlearn.probes.measures import AFTER_STEP, run_probes


@dataclass(frozen=True)
class ProbeSchedule:
    """Which probes run when, on how many inputs.

    Attributes:
        names: probe names (empty: no probes).
        every: 0 to probe at the start of every task, on the new task's inputs before any
            update on them (Dohare et al.); N > 0 to probe every N steps instead.
        size: probe batch size P per replica.
        threads: torch's intra-op threads while probing; 0: the agent's ``probe_threads()``
            (0 there, or no such method: the loop's setting).
    """

    names: tuple[str, ...] = ()
    every: int = 0
    size: int = 2000
    threads: int = 0

    def due(self, step: int, new_task: bool) -> bool:
        """Whether to probe before the update of a batch after ``step`` completed steps."""
        if not self.names:
            return False
        return new_task if self.every == 0 else step % self.every == 0


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[int]:
    """torch's intra-op threads set to ``n`` (0: left as they are) inside the block, and put
    back after it; yields the number in force."""
    old = torch.get_num_threads()
    n = n or old
    if n != old:
        torch.set_num_threads(n)
    try:
        yield n
    finally:
        if n != old:
            torch.set_num_threads(old)


def update_stats(agent: object) -> dict[str, dict[str, torch.Tensor]]:
    """The agent's ``update_stats()`` (its training statistics since the last call, which it
    then starts afresh), or nothing for agents without one."""
    return agent.update_stats() if isinstance(agent, SupportsUpdateStats) else {}


def probe_threads(agent: object) -> int:
    """The agent's ``probe_threads()``, or 0 (the loop's setting) for agents without one."""
    return agent.probe_threads() if isinstance(agent, SupportsProbeThreads) else 0


def scheduled_results(
    schedule: ProbeSchedule,
    stream: SupervisedStreamProtocol,
    agent: Agent,
    memory: dict[str, torch.Tensor] | None = None,
) -> dict[str, dict[str, torch.Tensor]]:
    """The scheduled probes that precede the probe step's update, run now on a fresh probe
    batch of the current task and the agent's ``update_stats()`` since the last probe:
    ``{metric: {layer: (R,)}}`` (``memory``: what probes keep across probe points)."""
    stats = update_stats(agent)
    if all(name in AFTER_STEP for name in schedule.names):
        return {}
    obs, target = stream.probe_batch(schedule.size)
    with torch_threads(schedule.threads or probe_threads(agent)):
        return run_probes(schedule.names, agent, obs, target, stats, memory)


def submit_probes(
    schedule: ProbeSchedule, stream: SupervisedStreamProtocol, agent: SupportsProbeSnapshot
) -> Future[dict[str, dict[str, torch.Tensor]]] | None:
    """:func:`scheduled_results`' work on a thread of its own, over a copy of the network
    (``agent.probe_snapshot()``), so that learning can go on meanwhile: the statistics and the
    probe batch are taken now, in order; the results (``{metric: {layer: (R,)}}``) are the
    numbers :func:`scheduled_results` would give. None (nothing taken) if the agent declines
    to copy its network (``probe_snapshot()`` is None): probe in line then."""
    snapshot = agent.probe_snapshot()
    if snapshot is None:
        return None
    stats = update_stats(agent)
    if isinstance(stream, DeferredProbeStream):
        batch = stream.probe_batch_later(schedule.size)
    else:
        drawn = stream.probe_batch(schedule.size)
        batch = lambda: drawn  # noqa: E731

    def work() -> dict[str, dict[str, torch.Tensor]]:
        return run_probes(schedule.names, snapshot, *batch(), stats)

    return _probe_pool().submit(work)


_PROBE_POOL: tuple[int, ThreadPoolExecutor] | None = None
#: how much the probe thread's CPU priority is lowered (a nice increment): it takes the
#: cycles learning leaves idle first, yet is not starved on a busy machine
PROBE_NICE = 10


def _probe_pool() -> ThreadPoolExecutor:
    """The thread concurrent probes run on (made anew in a forked child)."""
    global _PROBE_POOL
    if _PROBE_POOL is None or _PROBE_POOL[0] != os.getpid():
        _PROBE_POOL = (
            os.getpid(),
            ThreadPoolExecutor(
                1, thread_name_prefix="contlearn-probe", initializer=_lower_priority
            ),
        )
    return _PROBE_POOL[1]


def _lower_priority() -> None:
    """Lower the calling thread's CPU priority by :data:`PROBE_NICE` where the OS allows it
    (Linux: per thread; elsewhere a no-op rather than the whole process)."""
    if PROBE_NICE and sys.platform.startswith("linux"):
        try:
            tid = threading.get_native_id()
            os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + PROBE_NICE)
        except OSError:
            pass
