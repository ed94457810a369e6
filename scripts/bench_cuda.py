"""Benchmark: the online agent on a CUDA device, beside the same configurations on the CPU.

Learner-steps per second (replicas × steps / wall time, the median of timed repeats after a
warm-up) of online permuted MNIST at batch size 1, through contlearn's real loop (stream,
``OnlineAgent``, ``SupervisedLoop``, run store; probes off), as scripts/bench_online.py measures
the CPU. Rows: learners bp, cbp (SGD) and bp-adam at width 100 with R = 32 and 256 and at width
2000 with R = 1 and 8, each on the device; the bp rows also on the CPU of the same machine
(threads as ``contlearn.run`` picks them), so the table says what the device changes. Each
timed chunk ends with ``torch.cuda.synchronize()``. Run by scripts/gpu_check.sh::

    python scripts/bench_cuda.py --json cuda.json            # about a minute and a half
    python scripts/bench_cuda.py --device cpu --seconds 0.5  # the same rows on the CPU only

Prints a table; ``--json`` writes every figure (docs/performance.md, "GPU").
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from bench_loops import contlearn_loop, run_config  # scripts/ is on sys.path
from bench_timing import Timed, machine

from contlearn.scripting import parse_flags

#: (learner row of bench_loops.LEARNERS, width, replicas)
ROWS = [
    (name, width, R)
    for width, Rs in ((100, (32, 256)), (2000, (1, 8)))
    for R in Rs
    for name in ("bp", "cbp", "bp-adam")
]
#: rows also timed on the CPU, for the comparison
ON_CPU_TOO = ("bp",)


@dataclass
class Args:
    """Arguments of the benchmark (each is also a command-line flag)."""

    device: str = "cuda"
    """the device (``cpu`` times only the CPU rows' configurations on the CPU)"""
    repeats: int = 3
    """timed repeats per row (the median is reported)"""
    seconds: float = 1.0
    """wall time of one timed repeat"""
    json: str = ""
    """write every figure to this JSON file"""


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_row(name: str, width: int, R: int, device: str, args: Args, tmp: Path) -> dict:
    """One row: contlearn's learner-steps per second for a configuration on ``device``."""
    loop, threads = contlearn_loop(run_config(name, width, R, device=device), tmp)

    def run(steps: int) -> None:
        loop.run(loop.stream.step + steps)
        _sync(device)

    timed = Timed(run, R, threads, 50 if width <= 100 else 5)
    for _ in range(args.repeats):
        timed.repeat(args.seconds)
    backend = getattr(loop.agent, "backend", "")
    print(
        f"{name:>8} {width:>5} {R:>4} {device:>6} {backend:>9} | {timed.median / R:10.1f} "
        f"{timed.median:12.0f}",
        flush=True,
    )
    return {
        "learner": name, "width": width, "R": R, "device": device, "backend": backend,
        "threads": threads, "steps_per_s": timed.median / R,
        "learner_steps_per_s": timed.median, "repeats": timed.rates,
    }  # fmt: skip


def main() -> None:
    """Every row, a table, and the JSON file."""
    args = parse_flags(Args, __doc__.splitlines()[0])
    info = machine()
    if torch.device(args.device).type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("bench_cuda: torch sees no CUDA device; use --device cpu")
        info["cuda_device"] = torch.cuda.get_device_name(args.device)
    result: dict = {"machine": info, "rows": []}
    print(f"{'learner':>8} {'width':>5} {'R':>4} {'device':>6} {'backend':>9} | "
          f"{'steps/s':>10} {'learner-st/s':>12}")  # fmt: skip
    with tempfile.TemporaryDirectory() as folder:
        for name, width, R in ROWS:
            devices = [args.device] + (
                ["cpu"] if name in ON_CPU_TOO and args.device != "cpu" else []
            )
            if args.device == "cpu" and name not in ON_CPU_TOO:
                continue
            for device in devices:
                result["rows"].append(time_row(name, width, R, device, args, Path(folder)))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
