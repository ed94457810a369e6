"""Does Forward-Forward's local learning keep its plasticity? Online permuted MNIST, FF against
backprop at equal widths, each alone and with continual backprop.

Runs every agent × learner pair on the offline default (the MNIST test set shipped with
contlearn), each with several seeds batched as one model, then draws the decay curves and the
probe panel (dead units, effective rank, goodness gap) and prints the summary table.
docs/forward_forward.md ("A first result") has the figures of the documented run and their
reading::

    python scripts/ff_plasticity.py                                  # the documented run
    python scripts/ff_plasticity.py --tasks 5 --examples-per-task 300   # a quick look

Outputs: ``<out>/<agent>+<learner>`` (run directories), ``<out>/decay.png``,
``<out>/probes.png`` and ``<out>/goodness.png``. Re-running resumes finished or interrupted
runs instead of redoing them.
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
    """Arguments of the study (each is also a command-line flag)."""

    out: str = "runs/ff"
    """folder for the runs and figures"""
    agents: str = "ff,online"
    """agents to compare, comma-separated (online: backprop)"""
    learners: str = "bp,cbp"
    """learners each agent runs with, comma-separated"""
    seeds: int = 3
    """seeds per pair, run as one batched model"""
    tasks: int = 50
    """tasks (pixel permutations) per run"""
    examples_per_task: int = 5000
    """examples shown per task, one at a time"""
    hidden: str = "100,100,100"
    """hidden widths (the same for both agents)"""
    lr: float = 0.01
    """SGD step size of backprop (Dohare et al.'s permuted-MNIST setting)"""
    ff_lr: float = 1e-3
    """Adam step size of Forward-Forward (the agent's default; SGD at 0.003-0.03 kills its
    units with the sum goodness, see docs/forward_forward.md)"""
    ff_goodness: str = "mean"
    """Forward-Forward's goodness (mean: online FF learns at this budget, sum barely does; see
    docs/forward_forward.md)"""
    replacement_rate: float = 1e-4
    """continual backprop's ρ"""
    probe_size: int = 500
    """inputs per probe batch"""


def parse_args() -> Args:
    """Command-line flags from the fields of :class:`Args`."""
    return parse_flags(Args, __doc__.splitlines()[0])


def main() -> None:
    """Run every agent × learner pair, then plot and summarise."""
    args = parse_args()
    out = Path(args.out)
    common = {
        "examples_per_task": args.examples_per_task,
        "hidden": args.hidden,
        "probe_size": args.probe_size,
    }
    runs = []
    for agent in args.agents.split(","):
        for learner in args.learners.split(","):
            extra = {"learner.replacement_rate": args.replacement_rate} if learner == "cbp" else {}
            opt = (
                {"optimizer": "adam", "lr": args.ff_lr, "goodness": args.ff_goodness}
                if agent == "ff"
                else {"optimizer": "sgd", "lr": args.lr}
            )
            run_dir = out / f"{agent}+{learner}"
            start = time.monotonic()
            contlearn.run(
                "permuted-mnist",
                agent=agent,
                learner=learner,
                seeds=args.seeds,
                tasks=args.tasks,
                config={**common, **extra, **opt},
                out=run_dir,
                resume=True,
            )
            print(f"{agent}+{learner}: {time.monotonic() - start:.0f} s -> {run_dir}", flush=True)
            runs.append(run_dir)

    df = contlearn.load_runs(runs, config=True)
    by = ["agent", "learner"]
    bin = max(1, args.tasks // 25)  # tasks per plotted point
    plots.save_figure(plots.plot_decay(df, by=by, bin=bin), out / "decay.png")
    probes = ["dead_fraction", "effective_rank", "weight_magnitude"]
    plots.save_figure(plots.plot_probes(df, probes=probes, by=by, bin=bin), out / "probes.png")
    ff = df[df["agent"] == "ff"]
    if len(ff[ff["metric"] == "goodness_gap"]):
        plots.save_figure(
            plots.plot_probes(ff, probes=["goodness_gap"], by=by, bin=bin), out / "goodness.png"
        )
    print(format_summary(summary_table(df)))
    print(f"figures: {out / 'decay.png'}, {out / 'probes.png'}, {out / 'goodness.png'}")


if __name__ == "__main__":
    main()
