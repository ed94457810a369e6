"""How fast does a plug-in agent run with the default thread setting? Side by side with
``threads=1`` and ``threads=2`` (issue #16: the default must not be slower than one thread).

The agent is a one-seed torch MLP with its own ``torch.optim.SGD`` (the shape of the README's
``MLPAgent``, without a learner), run online (batch size 1) on permuted MNIST through
``contlearn.run``, one run per setting, each timed from start to end (start-up included),
after one small untimed run that loads the data::

    python scripts/bench_plugin.py                   # 2 seeds x 2 tasks of 2,000 examples
    python scripts/bench_plugin.py --examples 500    # a quick look

Prints one JSON object (``rows``: the median seconds and steps/s per setting over
``--repeats`` interleaved rounds; ``default_vs_one``: threads=1's time over the default's).
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import contlearn
from contlearn.scripting import parse_flags


@dataclass
class Args:
    """Arguments of the benchmark (each is also a command-line flag)."""

    examples: int = 2000
    """examples per task"""
    tasks: int = 2
    """tasks per run"""
    seeds: int = 2
    """seeds (run one after another: the agent has no replicas)"""
    hidden: int = 100
    """hidden width (two layers)"""
    repeats: int = 3
    """runs per setting, interleaved (the median is reported)"""


class TorchMLP:
    """One seed: ``nn.Sequential`` MLP, ``torch.optim.SGD``, cross-entropy, online."""

    def __init__(self, info, seed: int, hidden: int = 100, lr: float = 0.01) -> None:
        torch.manual_seed(seed)
        inputs = math.prod(info.input_shape)
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(inputs, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, info.num_outputs),
        )
        self.opt = torch.optim.SGD(self.net.parameters(), lr=lr)

    def act(self, obs: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, C)``."""
        with torch.no_grad():
            return self.net(obs)

    def observe(self, obs: torch.Tensor, action: torch.Tensor, target: torch.Tensor) -> dict:
        """One SGD step on the answer's example."""
        loss = F.cross_entropy(self.net(obs), target)
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        return {"loss": loss.item()}


def timed(args: Args, threads: int | None, root: Path) -> dict:
    """One run with ``threads`` (None: the default, not set); its wall time."""
    config: dict = {"examples_per_task": args.examples, "hidden": args.hidden, "probes": "none"}
    if threads is not None:
        config["threads"] = threads
    start = time.perf_counter()
    contlearn.run(
        "permuted-mnist",
        agent=f"{Path(__file__).resolve()}:TorchMLP",  # (by file, as a user's plug-in)
        seeds=args.seeds,
        tasks=args.tasks,
        config=config,
        out=root / f"threads-{threads}",
        progress=False,
    )
    seconds = time.perf_counter() - start
    steps = args.seeds * args.tasks * args.examples
    return {
        "threads": "default" if threads is None else threads,
        "seconds": round(seconds, 2),
        "steps_per_s": round(steps / seconds, 1),
    }


def main() -> None:
    """Run each setting once, side by side, and print the rows."""
    args = parse_flags(Args, __doc__)
    with tempfile.TemporaryDirectory() as tmp:
        timed(Args(examples=50, tasks=1, seeds=1), 1, Path(tmp) / "warm-up")  # (data, imports)
        settings = (None, 1, 2)
        runs = [[timed(args, t, Path(tmp) / f"{i}") for t in settings] for i in range(args.repeats)]
    rows = [
        sorted((r[j] for r in runs), key=lambda row: row["seconds"])[len(runs) // 2]
        for j in range(len(settings))
    ]
    print(
        json.dumps(
            {
                "rows": rows,
                "cores": torch.get_num_threads(),
                "default_vs_one": round(rows[1]["seconds"] / rows[0]["seconds"], 2),
            }
        )
    )


if __name__ == "__main__":
    main()
