"""The speed options left at ``auto``: on where they apply and the cores are there.

Speed options change how fast a run goes, never its numbers (each is a backend or a process
layout tested bit for bit against the plain setting). Left at ``auto`` (the default), each is
chosen when the run is resolved, and the choice is written to the run's ``config.json`` (a
run repeated from that file makes the same one) and, as the backend, to ``meta.json``:

- ``value_worker=auto`` (PPO) is ``true`` when the value worker computes this run's step (its
  :meth:`~contlearn.backends.ppo_worker.ValueWorkerBackend.refusal` is None: credit ``bp``,
  ``fast=true``, a learner acting on each parameter alone, ``max_grad_norm=0``, the CPU), the
  process may use at least 2 cores (:func:`usable_cores`) and the run does not ask for
  ``threads=1``; otherwise ``false``.
- ``vector=auto`` (RL streams) is ``split`` when ``num_envs > 1``, at least 2 cores are usable
  and ``threads`` is not 1; otherwise ``sync``.

``threads=1`` is how a run says "one core": it turns both off; a local sweep's worker counts
only its share of the cores (``cpu_count // workers``, :func:`limit_cores`).
``true``/``false`` (``split``/``sync``/``async``) are honoured as given.
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Any

#: the values of a tri-state speed option
AUTO_CHOICES = ("auto", "true", "false")


#: this process's share of the cores (a sweep worker's ``cpu_count // workers``; None: all)
_share: int | None = None


def limit_cores(share: int | None) -> None:
    """Count at most ``share`` cores as usable in this process (None: no limit). A local
    sweep's worker processes call it with their share, so that ``workers=2`` on 2 cores does
    not give each run a second process."""
    global _share
    _share = share


def cores_allowed(affinity: int, share: int | None) -> int:
    """``affinity`` cores, at most ``share`` of them (``None``: no limit), at least 1."""
    return max(1, affinity if share is None else min(affinity, share))


def usable_cores() -> int:
    """CPU cores this process may run on: its affinity mask (the CPU count where there is
    none), within its share (:func:`limit_cores`)."""
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # (no affinity masks, e.g. macOS)
        affinity = os.cpu_count() or 1
    return cores_allowed(affinity, _share)


def second_core_free(threads: int, cores: int | None = None) -> bool:
    """Whether a speed option that keeps a second core busy may be chosen: ``cores``
    (default :func:`usable_cores`) is at least 2 and ``threads`` (the run's; 0: auto) is not
    1."""
    cores = usable_cores() if cores is None else cores
    return cores >= 2 and threads != 1


def auto_flag(value: str, applies: bool, threads: int, cores: int | None = None) -> str:
    """Resolve a tri-state option: ``value`` unless it is ``auto``, then ``true`` where it
    ``applies`` and :func:`second_core_free`, else ``false``."""
    if value != "auto":
        return value
    return "true" if applies and second_core_free(threads, cores) else "false"


def auto_vector(value: str, num_envs: int, threads: int, cores: int | None = None) -> str:
    """Resolve ``vector``: ``value`` unless it is ``auto``, then ``split`` for ``num_envs > 1``
    where :func:`second_core_free`, else ``sync``."""
    if value != "auto":
        return value
    return "split" if num_envs > 1 and second_core_free(threads, cores) else "sync"


def resolve_auto(
    agent_cls: type, agent_spec: Any, stream_spec: Any, learner: Any, run: Any
) -> tuple[Any, Any]:
    """A run's agent and stream options with those left at ``auto`` chosen (called when the
    run's config is resolved, so ``config.json`` records the choice): the agent's by its
    ``resolve_auto(spec, learner, threads=, device=)`` if it has one, a stream's ``vector``
    by :func:`auto_vector`."""
    chooser = getattr(agent_cls, "resolve_auto", None)
    if callable(chooser) and not isinstance(agent_spec, dict):
        agent_spec = chooser(agent_spec, learner, threads=run.threads, device=run.device)
    if getattr(stream_spec, "vector", None) == "auto":
        vector = auto_vector("auto", stream_spec.num_envs, run.threads)
        stream_spec = replace(stream_spec, vector=vector)
    return agent_spec, stream_spec
