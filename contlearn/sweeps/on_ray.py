"""The Ray backend of sweeps: one Ray task per run, results on shared storage.

Each task calls the same :func:`contlearn.sweeps.local.run_one` as the local pool, so a run on a
cluster writes the same run directory (config, metrics, checkpoints, ``done.json``) under the
sweep root, which must be a path every node sees (a shared file system). Results stream back
as tasks finish (``ray.wait``); a task whose worker dies is retried by Ray and resumes from its
last checkpoint. Ray is an optional dependency: ``pip install 'contlearn[ray]'``.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from contlearn.errors import ContlearnError
from contlearn.sweeps.local import Outcome, SweepProgress, forward_sigterm, one_line, run_one

if TYPE_CHECKING:
    from contlearn.sweeps.plan import Plan
    from contlearn.sweeps.spec import SweepRun


def import_ray() -> Any:
    """The ``ray`` module.

    Raises:
        ContlearnError: Ray is not installed.
    """
    try:
        import ray
    except ImportError:
        raise ContlearnError("the ray backend needs Ray: pip install 'contlearn[ray]'") from None
    return ray


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail fast when ``HOST:PORT`` accepts no connection (``ray.init`` would wait minutes)."""
    import socket

    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or "://" in address:
        return  # "auto", ray:// client addresses: left to Ray
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise ContlearnError(
            f"cannot reach Ray at {address} ({exc.strerror or exc}); start it "
            "with `ray start --head` there, or check --address"
        ) from None


@contextlib.contextmanager
def ray_session(address: str | None) -> Iterator[Any]:
    """Ray connected to the cluster at ``address`` (None: ``RAY_ADDRESS``, else a new local
    instance); shut down afterwards if this call started it.

    Raises:
        ContlearnError: Ray is not installed, or the cluster cannot be reached.
    """
    ray = import_ray()
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        _check_reachable(address)
    if ray.is_initialized():  # a caller's own connection (e.g. a notebook's ray.init())
        yield ray
        return
    kwargs: dict[str, Any] = {"logging_level": logging.WARNING}
    if address is None:
        kwargs["include_dashboard"] = False
    try:
        ray.init(address=address, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = address or "a local Ray instance"
        raise ContlearnError(
            f"cannot connect to Ray at {where} ({one_line(exc)}); check "
            "--address and that `ray start` is running there"
        ) from None
    try:
        yield ray
    finally:
        ray.shutdown()


def _slots(ray: Any, cpus_per_run: float) -> int:
    cpus = ray.cluster_resources().get("CPU", 1)
    return max(1, int(cpus // cpus_per_run))


def _collect(ray: Any, refs: dict[Any, str], bar: SweepProgress, slots: int) -> list[Outcome]:
    outcomes = []
    while refs:
        bar.update(running=min(slots, len(refs)))
        ready, _ = ray.wait(list(refs), num_returns=1, timeout=0.5)
        for ref in ready:
            name = refs.pop(ref)
            try:
                outcome = ray.get(ref)
            except Exception as exc:  # noqa: BLE001 - a task that could not run (node lost)
                outcome = Outcome(name, "failed", one_line(exc))
            outcomes.append(bar.finish(outcome))
    return outcomes


def run_ray(
    ray: Any, plan: Plan, todo: list[SweepRun], cpus_per_run: float, bar: SweepProgress
) -> list[Outcome]:
    """Submit one Ray task per run of ``todo`` and wait for them all.

    Args:
        ray: the connected ``ray`` module (see :func:`ray_session`).
        plan: the sweep's plan (root, digests).
        todo: the runs to run.
        cpus_per_run: CPUs each task reserves; torch uses as many threads.
        bar: the progress line.

    Returns:
        The outcome of every run; Ctrl-C cancels the tasks left (they are ``interrupted``).
    """
    threads = max(1, int(cpus_per_run))
    task = ray.remote(num_cpus=cpus_per_run)(run_one)
    regs = plan.registrations  # (each task makes the sweep's run-time registrations again)
    refs = {
        task.remote(str(plan.root), r, plan.digests[r.name], threads, regs): r.name for r in todo
    }
    try:
        with forward_sigterm():
            return _collect(ray, refs, bar, _slots(ray, cpus_per_run))
    except KeyboardInterrupt:
        for ref in refs:
            ray.cancel(ref)
        return [
            bar.finish(Outcome(name, "interrupted", "cancelled: the sweep was interrupted"))
            for name in refs.values()
        ]
