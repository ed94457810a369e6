"""Running a sweep's runs: one run per call, a local process pool, and the progress line.

Every run is an ordinary run, ``contlearn.run(config, out=ROOT/name, resume=True)``; after it
succeeds the sweep writes ``ROOT/name/done.json`` (the digest of the config it finished), which
the run store ignores. A run that fails is reported with a one-line message and the sweep goes
on; a run that is interrupted saves a checkpoint and continues when the sweep is run again.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from contlearn.errors import ContlearnError
from contlearn.loop.progress import want_progress

if TYPE_CHECKING:
    from contlearn.registry import Registration
    from contlearn.sweeps.plan import Plan
    from contlearn.sweeps.spec import SweepRun

DONE_FILE = "done.json"


class Outcome(NamedTuple):
    """How one run ended: ``status`` is finished, failed or interrupted."""

    name: str
    status: str
    message: str = ""
    seconds: float = 0.0


@dataclass
class SweepResult:
    """What a sweep did: ``outcomes`` of the runs it ran, ``skipped`` runs already done."""

    root: Path
    outcomes: list[Outcome]
    skipped: list[str]

    def names(self, status: str) -> list[str]:
        """Names of the runs that ended with ``status``."""
        return [o.name for o in self.outcomes if o.status == status]

    @property
    def exit_code(self) -> int:
        """0 all done, 1 a run failed, 130 interrupted (and none failed)."""
        if self.names("failed"):
            return 1
        return 130 if self.names("interrupted") else 0

    def report(self) -> str:
        """A summary: counts, then one line per failed run with its message."""
        n = len(self.outcomes) + len(self.skipped)
        parts = [f"{len(self.names(s))} {s}" for s in ("finished", "failed", "interrupted")]
        lines = [
            f"sweep {self.root}: {n} runs: {len(self.skipped)} already done, " + ", ".join(parts)
        ]
        lines += [f"  failed {o.name}: {o.message}" for o in self.outcomes if o.status == "failed"]
        if self.names("interrupted"):
            lines.append(
                "  interrupted runs continue from their checkpoints when the sweep is run again"
            )
        return "\n".join(lines)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class SweepProgress:
    """``sweep: 3/8 done, 2 running, 1 failed, ETA 4m10s`` on stderr.

    Redrawn in place on a terminal; one line per finished run when forced on elsewhere; quiet by
    default when stderr is not a terminal or under CI.

    Args:
        total: runs in the sweep. done: runs already done before it started.
        enabled: show it (None: only on a terminal, not under CI).
    """

    def __init__(self, total: int, done: int, enabled: bool | None = None) -> None:
        self.total, self.done, self.skipped = total, done, done
        self.failed = self.interrupted = self.running = 0
        self.enabled = want_progress(enabled)
        self.tty = self.enabled and sys.stderr.isatty()
        self.start = time.monotonic()

    def line(self) -> str:
        """The current progress line."""
        ran = self.done - self.skipped
        left = self.total - self.done - self.failed - self.interrupted
        eta = "?"
        if ran and left:
            eta = _duration((time.monotonic() - self.start) / ran * left)
        line = f"sweep: {self.done}/{self.total} done, {self.running} running, {self.failed} failed"
        return line + (f", ETA {eta}" if left else "")

    def update(self, running: int) -> None:
        """Redraw with ``running`` runs in flight."""
        changed = running != self.running
        self.running = running
        if self.tty or (self.enabled and changed):
            self._draw()

    def finish(self, outcome: Outcome) -> Outcome:
        """Count a run that ended; returns it."""
        self.running = max(0, self.running - 1)
        if outcome.status == "finished":
            self.done += 1
        elif outcome.status == "failed":
            self.failed += 1
        else:
            self.interrupted += 1
        if self.enabled:
            self._draw()
        return outcome

    def _draw(self) -> None:
        end = "" if self.tty else "\n"
        print(("\r\033[K" if self.tty else "") + self.line(), end=end, file=sys.stderr, flush=True)

    def close(self) -> None:
        """End the line (on a terminal)."""
        if self.tty:
            print(file=sys.stderr, flush=True)


@contextlib.contextmanager
def forward_sigterm() -> Iterator[None]:
    """While active, SIGTERM (a batch system's stop) acts as Ctrl-C in the main thread."""

    def handle(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGTERM, handle)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def one_line(exc: BaseException) -> str:
    """An exception as one line; unexpected ones name their type and where they were raised."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, ContlearnError):
        return text
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" (at {Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""
    return f"{type(exc).__name__}: {text}{where}"


_STOP: Any = None  # in pool workers: an Event the parent sets to stop runs not yet started


def run_one(
    root: str,
    run: SweepRun,
    sha: str,
    threads: int = 0,
    registrations: Sequence[Registration] = (),
) -> Outcome:
    """Run (or continue) one run of a sweep and mark it done; never raises.

    Args:
        root: the sweep root. run: the run. sha: its config digest (for ``done.json``).
        threads: torch threads for this process (0: leave as is).
        registrations: the sweep's registrations made at run time, made again here (in a
            worker process, which imported only the built-in ones).
    """
    from contlearn.registry import restore
    from contlearn.results.store import write_atomic
    from contlearn.running.api import run as run_config
    from contlearn.running.runner import RunInterrupted

    if _STOP is not None and _STOP.is_set():
        return Outcome(run.name, "interrupted", "not started: the sweep was interrupted")
    start = time.monotonic()
    if threads:
        import torch

        torch.set_num_threads(threads)
    path = Path(root) / run.name
    try:
        restore(list(registrations))
        run_config(config=run.config, out=path, resume=True, progress=False)
    except (RunInterrupted, KeyboardInterrupt) as exc:
        return Outcome(run.name, "interrupted", one_line(exc), time.monotonic() - start)
    except Exception as exc:  # noqa: BLE001 - every failure is reported, the sweep goes on
        return Outcome(run.name, "failed", one_line(exc), time.monotonic() - start)
    seconds = time.monotonic() - start
    done = {
        "config_sha256": sha,
        "seconds": round(seconds, 3),
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    write_atomic(path / DONE_FILE, json.dumps(done, indent=2).encode())
    return Outcome(run.name, "finished", "", seconds)


def _init_worker(threads: int, stop: Any) -> None:
    import torch

    global _STOP
    _STOP = stop
    os.setpgid(0, 0)  # a terminal's Ctrl-C reaches the parent only; it forwards it once
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # idle workers ignore it; runs catch it
    torch.set_num_threads(threads)
    from contlearn.backends.auto import limit_cores

    limit_cores(threads)  # (speed options left at auto see this worker's share of the cores)


def _serial(plan: Plan, todo: list[SweepRun], bar: SweepProgress) -> list[Outcome]:
    outcomes: list[Outcome] = []
    for run in todo:
        if outcomes and outcomes[-1].status == "interrupted":
            outcome = Outcome(run.name, "interrupted", "not started: the sweep was interrupted")
        else:
            bar.update(running=1)
            outcome = run_one(str(plan.root), run, plan.digests[run.name])  # (this process)
        outcomes.append(bar.finish(outcome))
    return outcomes


def _outcome(future: Any, name: str) -> Outcome:
    if future.cancelled():
        return Outcome(name, "interrupted", "not started: the sweep was interrupted")
    try:
        return future.result()
    except Exception as exc:  # noqa: BLE001 - a worker died (killed, out of memory)
        return Outcome(name, "failed", one_line(exc))


def run_local(plan: Plan, todo: list[SweepRun], workers: int, bar: SweepProgress) -> list[Outcome]:
    """Run ``todo`` in a process pool of ``workers`` (in this process when 1).

    Torch gets ``cpu_count // workers`` threads per worker. Ctrl-C (or SIGTERM) stops the
    sweep: runs not started are skipped, running ones save a checkpoint and stop; all of them
    continue when the sweep is run again.
    """
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from multiprocessing import get_context

    if workers == 1:
        return _serial(plan, todo, bar)
    ctx = get_context("spawn")  # never fork a process that may hold torch's thread pools
    stop = ctx.Event()
    pool = ProcessPoolExecutor(
        workers,
        mp_context=ctx,
        initializer=_init_worker,
        initargs=(max(1, (os.cpu_count() or 1) // workers), stop),
    )
    regs = plan.registrations
    futures = {
        pool.submit(run_one, str(plan.root), r, plan.digests[r.name], 0, regs): r.name for r in todo
    }
    pending, outcomes = set(futures), []
    try:
        with forward_sigterm():
            while pending:
                bar.update(running=min(workers, len(pending)))
                done, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                outcomes += [bar.finish(_outcome(f, futures[f])) for f in done]
    except KeyboardInterrupt:
        stop.set()
        for future in pending:
            future.cancel()
        for pid in list(getattr(pool, "_processes", None) or {}):  # our own workers only
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGINT)
        outcomes += [bar.finish(_outcome(f, futures[f])) for f in wait(pending).done]
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return outcomes
