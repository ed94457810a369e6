"""How fast do the streams without images run? Bit-flipping with the default network (20-5-1,
SGD, online) through contlearn's block loop, against a naive per-seed loop.

contlearn runs through ``contlearn.run`` (stream, agent, loop, run store; probes off, one torch
thread); the stream now feeds a block of examples at a time, the target network's outputs
computed for the whole block. The naive loop is what one writes without contlearn: one seed at a
time, ``nn.Sequential`` 20-5-1, ``torch.optim.SGD``, an example at a time, the same examples
(drawn from contlearn's stream beforehand, outside the timing). Rows are learner-steps per
second (seeds × steps / wall time)::

    python scripts/bench_streams.py                    # R = 32, 2 tasks of 10,000 examples
    python scripts/bench_streams.py --seeds 4 --tasks 1

Prints one JSON object (``rows``, ``speedup``).
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import contlearn
from contlearn.envs import make_stream
from contlearn.running.config import resolve
from contlearn.scripting import parse_flags


@dataclass
class Args:
    """Arguments of the benchmark (each is also a command-line flag)."""

    seeds: int = 32
    """replicas R (contlearn batches them; the naive loop runs them one after another)"""
    tasks: int = 2
    """tasks of 10,000 examples each"""
    naive_steps: int = 5000
    """steps of each naive seed timed (its rate does not depend on R)"""
    lr: float = 0.01
    """SGD step size"""


def naive_rate(args: Args) -> float:
    """Learner-steps/s of the naive per-seed loop (the first 2 seeds, ``naive_steps`` each)."""
    cfg = resolve({"stream": "bit-flipping", "seeds": 2})
    stream = make_stream(cfg.stream, cfg.stream_spec, cfg.seeds)
    batches = [stream.next() for _ in range(args.naive_steps)]  # (drawn outside the timing)
    seconds = 0.0
    for r in range(2):
        torch.manual_seed(r)
        net = nn.Sequential(nn.Linear(20, 5), nn.ReLU(), nn.Linear(5, 1))
        opt = torch.optim.SGD(net.parameters(), lr=args.lr)
        start = time.perf_counter()
        for batch in batches:
            x, y = batch.obs[r], batch.target[r]
            with torch.no_grad():
                net(x)  # (the answer scored before learning, as contlearn does)
            loss = F.mse_loss(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        seconds += time.perf_counter() - start
    return 2 * args.naive_steps / seconds


def contlearn_rate(args: Args, tmp: Path) -> float:
    """Learner-steps/s of ``contlearn.run`` (after a small warm-up run)."""
    config = {"probes": "none", "threads": 1, "lr": args.lr}
    contlearn.run("bit-flipping", seeds=2, tasks=1, config=config, out=tmp / "warm")
    start = time.perf_counter()
    contlearn.run("bit-flipping", seeds=args.seeds, tasks=args.tasks, config=config, out=tmp / "r")
    return args.seeds * args.tasks * 10_000 / (time.perf_counter() - start)


def main() -> None:
    """Both rows, side by side, and their ratio."""
    args = parse_flags(Args, __doc__)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        naive = naive_rate(args)
        ours = contlearn_rate(args, Path(tmp))
    rows = [
        {"row": "naive per-seed loop (nn.Sequential, torch.optim.SGD)", "steps_per_s": naive},
        {"row": f"contlearn, R = {args.seeds}, block loop", "steps_per_s": ours},
    ]
    for row in rows:
        row["steps_per_s"] = round(row["steps_per_s"])
    print(json.dumps({"rows": rows, "speedup": round(ours / naive, 1)}))


if __name__ == "__main__":
    main()
