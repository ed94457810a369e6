"""The main job: loss of plasticity on permuted MNIST, backprop vs continual backprop.

Runs the offline default (the MNIST test set shipped with contlearn) for both learners, each
with several seeds batched as one model, then draws the plasticity-decay curve and a probe
panel. With the defaults it takes about half a minute on 2 cores::

    python scripts/demo.py                      # what `make demo` runs
    python scripts/demo.py --tasks 200 --seeds 5 --hidden 2000,2000,2000   # a bigger study

Outputs: ``<out>/bp`` and ``<out>/cbp`` (run directories), ``<out>/decay.png`` and
``<out>/probes.png``. Re-running resumes finished or interrupted runs instead of redoing them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import contlearn
from contlearn.results import plots
from contlearn.results.summary import format_summary, summary_table
from contlearn.scripting import parse_flags


@dataclass
class Args:
    """Arguments of the demo (each is also a command-line flag)."""

    out: str = "runs/demo"
    """folder for the runs and figures"""
    learners: str = "bp,cbp"
    """learners to compare, comma-separated"""
    seeds: int = 3
    """seeds per learner, run as one batched model"""
    tasks: int = 30
    """tasks (pixel permutations) per run"""
    examples_per_task: int = 10_000
    """examples shown per task, one at a time (the stream's default)"""
    hidden: str = "100,100,100"
    """hidden widths"""
    lr: float = 0.01
    """SGD step size"""
    replacement_rate: float = 1e-4
    """continual backprop's ρ (units replaced per eligible unit per step)"""
    probe_size: int = 500
    """inputs per probe batch"""


def parse_args() -> Args:
    """Command-line flags from the fields of :class:`Args`."""
    return parse_flags(Args, __doc__.splitlines()[0])


def main() -> None:
    """Run every learner, then plot and summarise."""
    args = parse_args()
    out = Path(args.out)
    common = {
        "examples_per_task": args.examples_per_task,
        "hidden": args.hidden,
        "lr": args.lr,
        "probe_size": args.probe_size,
    }
    for learner in args.learners.split(","):
        extra = {"learner.replacement_rate": args.replacement_rate} if learner == "cbp" else {}
        start = time.monotonic()
        contlearn.run(
            "permuted-mnist",
            learner=learner,
            seeds=args.seeds,
            tasks=args.tasks,
            config={**common, **extra},
            out=out / learner,
            resume=True,
        )
        print(f"{learner}: {time.monotonic() - start:.0f} s -> {out / learner}")

    df = contlearn.load_runs([out / name for name in args.learners.split(",")])
    bin = max(1, args.tasks // 15)  # tasks per plotted point
    plots.save_figure(plots.plot_decay(df, bin=bin), out / "decay.png")
    plots.save_figure(
        plots.plot_probes(
            df,
            probes=["effective_rank", "dead_fraction", "weight_magnitude", "plasticity"],
            bin=bin,
        ),
        out / "probes.png",
    )
    print(format_summary(summary_table(df)))
    print(f"figures: {out / 'decay.png'}, {out / 'probes.png'}")


if __name__ == "__main__":
    main()
