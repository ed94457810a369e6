"""Timing tools of scripts/bench_online.py: timed repeats, a copy-bandwidth probe, call timers.

Nothing here knows about contlearn; the benchmark decides what is timed.
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


class Timed:
    """Something to run in timed chunks: ``run(steps)`` at ``threads`` threads, R replicas."""

    def __init__(self, run: Callable[[int], None], R: int, threads: int, warmup: int) -> None:
        self.run_steps, self.R, self.threads, self.rates = run, R, threads, []
        torch.set_num_threads(threads)
        self.run_steps(warmup)
        start = time.perf_counter()
        self.run_steps(max(1, warmup // 2))
        self.per_step = (time.perf_counter() - start) / max(1, warmup // 2)

    def repeat(self, seconds: float) -> None:
        """One timed chunk of about ``seconds``; records R × steps / wall time."""
        torch.set_num_threads(self.threads)
        steps = max(2, int(seconds / max(self.per_step, 1e-7)))
        start = time.perf_counter()
        self.run_steps(steps)
        elapsed = time.perf_counter() - start
        self.per_step = elapsed / steps
        self.rates.append(self.R * steps / elapsed)

    @property
    def median(self) -> float:
        return statistics.median(self.rates)


def copy_bandwidth(threads: int, megabytes: int = 256) -> float:
    """Bytes read + written per second by a copy of a tensor much larger than the caches."""
    torch.set_num_threads(threads)
    a = torch.ones(megabytes << 18)
    b = torch.empty_like(a)
    b.copy_(a)
    times = []
    for _ in range(5):
        start = time.perf_counter()
        b.copy_(a)
        times.append(time.perf_counter() - start)
    return 2 * a.numel() * a.element_size() / statistics.median(times)


def time_calls(fn: Callable, spy: dict) -> Callable:
    """``fn``, adding the seconds spent in each call to ``spy["t"]``."""

    def timed(*a, **k):
        start = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            spy["t"] += time.perf_counter() - start

    return timed


def machine() -> dict[str, Any]:
    """Where and when the benchmark ran (recorded in its JSON)."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "load_average": os.getloadavg(),
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def peak_rss(tasks: int, tmp: Path) -> dict:
    """Peak RSS of a demo-sized run (scripts/demo.py's defaults: cbp, 3 seeds, width 100,
    10,000 examples per task, probes at every task start on 500 inputs) in a fresh process."""
    code = (
        "import resource, sys, contlearn\n"
        f"contlearn.run('permuted-mnist', learner='cbp', seeds=3, tasks={tasks}, config="
        "{'probe_size': 500}, out=sys.argv[1], progress=False)\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
    )
    # (run first: Linux carries the parent's peak RSS over fork + exec into ru_maxrss)
    out = Path(tempfile.mkdtemp(dir=tmp)) / "run"
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", code, str(out)], capture_output=True, text=True, check=True
    )
    kb = int(proc.stdout.strip().splitlines()[-1])
    return {"tasks": tasks, "peak_rss_MB": kb / 1024, "seconds": time.perf_counter() - start}
