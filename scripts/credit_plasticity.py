"""Do credit rules without weight transport lose plasticity? Online permuted MNIST, each rule
alone and with continual backprop.

Runs every rule × learner pair on the offline default (the MNIST test set shipped with
contlearn), each with several seeds batched as one model, then draws the decay curves, the
probe panel (dead units, effective rank, the alignment probes) and prints the summary table.
docs/credit.md ("A first result") has the figures of the default settings and their reading::

    python scripts/credit_plasticity.py                          # the documented run
    python scripts/credit_plasticity.py --tasks 10 --examples-per-task 500   # a quick look

Outputs: ``<out>/<rule>+<learner>`` (run directories), ``<out>/decay.png``,
``<out>/probes.png`` and ``<out>/alignment.png``. Re-running resumes finished or interrupted
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

    out: str = "runs/credit"
    """folder for the runs and figures"""
    rules: str = "bp,fa,dfa,kolen-pollack"
    """credit rules to compare, comma-separated (contlearn list credit)"""
    learners: str = "bp,cbp"
    """learners each rule runs with, comma-separated"""
    seeds: int = 3
    """seeds per pair, run as one batched model"""
    tasks: int = 100
    """tasks (pixel permutations) per run"""
    examples_per_task: int = 2000
    """examples shown per task, one at a time"""
    hidden: str = "100,100,100"
    """hidden widths"""
    activation: str = "relu"
    """hidden nonlinearity"""
    lr: float = 0.01
    """SGD step size"""
    replacement_rate: float = 1e-4
    """continual backprop's ρ"""
    probe_size: int = 500
    """inputs per probe batch"""


def parse_args() -> Args:
    """Command-line flags from the fields of :class:`Args`."""
    return parse_flags(Args, __doc__.splitlines()[0])


def main() -> None:
    """Run every rule × learner pair, then plot and summarise."""
    args = parse_args()
    out = Path(args.out)
    common = {
        "examples_per_task": args.examples_per_task,
        "hidden": args.hidden,
        "activation": args.activation,
        "lr": args.lr,
        "probe_size": args.probe_size,
    }
    runs = []
    for rule in args.rules.split(","):
        for learner in args.learners.split(","):
            extra = {"learner.replacement_rate": args.replacement_rate} if learner == "cbp" else {}
            run_dir = out / f"{rule}+{learner}"
            start = time.monotonic()
            contlearn.run(
                "permuted-mnist",
                learner=learner,
                seeds=args.seeds,
                tasks=args.tasks,
                config={**common, **extra, "credit": rule},
                out=run_dir,
                resume=True,
            )
            print(f"{rule}+{learner}: {time.monotonic() - start:.0f} s -> {run_dir}", flush=True)
            runs.append(run_dir)

    df = contlearn.load_runs(runs)
    bin = max(1, args.tasks // 20)  # tasks per plotted point
    plots.save_figure(plots.plot_decay(df, bin=bin), out / "decay.png")
    plots.save_figure(
        plots.plot_probes(
            df, probes=["dead_fraction", "effective_rank", "weight_magnitude"], bin=bin
        ),
        out / "probes.png",
    )
    aligned = df[df["metric"].isin(["feedback_alignment", "weight_alignment"])]
    if len(aligned):
        plots.save_figure(
            plots.plot_probes(df, probes=["feedback_alignment", "weight_alignment"], bin=bin),
            out / "alignment.png",
        )
    print(format_summary(summary_table(df)))
    print(f"figures: {out / 'decay.png'}, {out / 'probes.png'}, {out / 'alignment.png'}")


if __name__ == "__main__":
    main()
