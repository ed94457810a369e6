"""The ``contlearn`` command line (also ``python -m contlearn``).

Every user error (unknown name, bad value, unusable run directory, missing data) is printed as
one line ``contlearn: error: ...`` and exits with code 2; nothing already written is touched.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from contlearn.errors import ContlearnError, RunInterrupted

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit 2 (argparse prints usage too)
        self.exit(EXIT_USAGE, f"contlearn: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = _Parser(
        prog="contlearn",
        description="Continual-learning streams and plasticity learners: run, plot, summarise.",
    )
    from contlearn import __version__

    parser.add_argument("--version", action="version", version=f"contlearn {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="run a stream with an agent and learner")
    run.add_argument(
        "stream",
        nargs="?",
        help="stream id (see `contlearn list streams`), or module:Class / file.py:Class",
    )
    run.add_argument("--learner", help="learner name (default bp)")
    run.add_argument("--agent", help="agent name or module:Class / file.py:Class")
    run.add_argument("--seeds", type=str, help="number of seeds, run as one batched model")
    run.add_argument("--seed", type=str, help="first seed (default 0)")
    length = run.add_mutually_exclusive_group()
    length.add_argument("--tasks", type=str, help="tasks to run")
    length.add_argument("--steps", type=str, help="steps to run")
    run.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set any option, e.g. --set hidden=2000,2000,2000 --set learner.replacement_rate=1e-5",
    )
    run.add_argument("--config", help="TOML config file (the same keys as --set)")
    run.add_argument("--out", help="run directory (default runs/<stream>__<learner>__<time>)")
    run.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    run.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its last checkpoint (or start it)",
    )
    bar = run.add_mutually_exclusive_group()
    bar.add_argument(
        "--progress",
        dest="progress",
        action="store_true",
        default=None,
        help="always show the progress bar",
    )
    bar.add_argument(
        "--no-progress", dest="progress", action="store_false", help="never show the progress bar"
    )

    res = sub.add_parser("resume", help="continue a run from its last checkpoint")
    res.add_argument("run_dir", help="the run directory")
    res_len = res.add_mutually_exclusive_group()
    res_len.add_argument("--tasks", type=str, help="new total number of tasks")
    res_len.add_argument("--steps", type=str, help="new total number of steps")
    res_bar = res.add_mutually_exclusive_group()
    res_bar.add_argument("--progress", dest="progress", action="store_true", default=None)
    res_bar.add_argument("--no-progress", dest="progress", action="store_false")

    plot = sub.add_parser("plot", help="plot per-task scores of runs")
    plot.add_argument("runs", nargs="+", help="run directories or folders of runs")
    plot.add_argument("--metric", help="metric to plot (default: the stream's score)")
    plot.add_argument("--by", default="learner", help="group lines by this column/config key")
    plot.add_argument("--layer", help="layer for per-layer metrics (default: aggregate)")
    plot.add_argument(
        "--bin",
        type=int,
        default=None,
        help="tasks per plotted point (default 1); with --x step: steps per point (default: "
        "about 50 points over the runs, so each holds every seed's episodes)",
    )
    plot.add_argument(
        "--x",
        choices=("task", "step"),
        help="x axis (default: step for RL returns, task otherwise)",
    )
    plot.add_argument("--probes", action="store_true", help="draw the probe panel instead")
    plot.add_argument(
        "--stat",
        default="mean",
        choices=("mean", "iqm"),
        help="curve over seeds: mean, or interquartile mean (IQM; band needs >= 3 seeds)",
    )
    plot.add_argument(
        "--out",
        help="output file; .png, .svg or .pdf (default RUN/plot.png, with --probes RUN/probes.png)",
    )

    summary = sub.add_parser("summary", help="print first/peak/final scores per group")
    summary.add_argument("runs", nargs="+", help="run directories or folders of runs")
    summary.add_argument("--by", default="learner", help="group by this column/config key")
    summary.add_argument(
        "--stat",
        default="mean",
        choices=("mean", "iqm"),
        help="over seeds: mean, or interquartile mean with stratified bootstrap intervals",
    )

    exp = sub.add_parser("export", help="write a run's metrics to TensorBoard or W&B")
    exp.add_argument("run_dir", help="the run directory")
    exp.add_argument("--to", required=True, choices=("tensorboard", "wandb"), help="tracker")
    exp.add_argument(
        "--out",
        help="TensorBoard: folder of the event files (default RUN/tensorboard); "
        "W&B: where W&B keeps its files (default the run directory)",
    )

    lst = sub.add_parser("list", help="list streams, learners and agents with their options")
    lst.add_argument("what", nargs="?", choices=("streams", "learners", "credit", "agents"))

    data = sub.add_parser("data", help="manage datasets")
    data_sub = data.add_subparsers(dest="data_command", required=True, parser_class=_Parser)
    dl = data_sub.add_parser("download", help="download a dataset into the cache")
    dl.add_argument("dataset", choices=("mnist", "cifar10", "cifar100", "imagenet32"))
    dl.add_argument("--dir", help="parent folder: DIR/<dataset> (default $CONTLEARN_DATA)")
    dl.add_argument("--mirror", action="append", help="base URL to try first (repeatable)")

    swp = sub.add_parser("sweep", help="run a sweep spec: configs × seed groups, locally or on Ray")
    swp.add_argument("spec", help="sweep spec (TOML): base keys, [grid], [[zip]], [[variant]]")
    swp.add_argument("--out", required=True, help="sweep root: one run directory per run")
    swp.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a base key of the spec, e.g. --set tasks=10",
    )
    swp.add_argument("--dry-run", action="store_true", help="list the runs (done/partial/new)")
    swp.add_argument("--backend", choices=("local", "ray"), default="local")
    swp.add_argument("--workers", type=int, help="local processes (default: CPU count)")
    swp.add_argument("--address", help="Ray cluster HOST:PORT (default: RAY_ADDRESS or local)")
    swp.add_argument("--cpus-per-run", type=float, default=1.0, help="CPUs per run on Ray")
    swp_bar = swp.add_mutually_exclusive_group()
    swp_bar.add_argument("--progress", dest="progress", action="store_true", default=None)
    swp_bar.add_argument("--no-progress", dest="progress", action="store_false")
    return parser


def cmd_run(args: argparse.Namespace) -> int:
    """``contlearn run``."""
    from contlearn.running.api import run
    from contlearn.running.config import parse_set

    config = parse_set(args.set)
    result = run(
        args.stream,
        learner=args.learner,
        agent=args.agent,
        seeds=args.seeds,
        seed=args.seed,
        tasks=args.tasks,
        steps=args.steps,
        config=config,
        config_file=args.config,
        out=args.out,
        overwrite=args.overwrite,
        resume=args.resume,
        progress=args.progress,
    )
    print(result.path)
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    """``contlearn resume``."""
    from contlearn.running.api import resume
    from contlearn.running.config import RunSpec
    from contlearn.spec import parse_value, spec_fields

    fields = {f.name: f for f in spec_fields(RunSpec)}
    length = {
        k: parse_value(fields[k], getattr(args, k), k)
        for k in ("tasks", "steps")
        if getattr(args, k) is not None
    }
    print(resume(args.run_dir, progress=args.progress, **length).path)
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    """``contlearn plot``."""
    from contlearn.results.figures import plot_runs

    default = "probes.png" if args.probes else "plot.png"  # (one does not overwrite the other)
    out = Path(args.out) if args.out else Path(args.runs[0]) / default
    plot_runs(
        args.runs,
        probes=args.probes,
        metric=args.metric,
        by=args.by,
        x=args.x,
        bin=args.bin,
        layer=args.layer,
        stat=args.stat,
        out=out,
    )
    print(out)
    return 0


def cmd_summary(args: argparse.Namespace) -> int:
    """``contlearn summary``."""
    from contlearn.results.figures import load_runs_by
    from contlearn.results.summary import format_summary, summary_table

    df = load_runs_by(args.runs, args.by)
    print(format_summary(summary_table(df, by=args.by, stat=args.stat)))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    """``contlearn list``."""
    from contlearn.listing import describe

    print(describe(args.what))
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    """``contlearn data download mnist|cifar10|cifar100`` (``imagenet32``: checks your copy)."""
    from contlearn.data.images import download_dataset

    bad = [m for m in args.mirror or [] if not m.startswith(("http://", "https://", "file:"))]
    if bad:
        raise ContlearnError(
            f"--mirror {bad[0]!r} is not a URL; give one starting with https://, http:// or file:"
        )
    print(download_dataset(args.dataset, args.dir and Path(args.dir), args.mirror or ()))
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    """``contlearn sweep``: exit 1 if a run failed, 130 if interrupted."""
    from contlearn.running.config import parse_set
    from contlearn.sweeps.plan import plan_sweep, run_sweep

    plan = plan_sweep(args.spec, args.out, parse_set(args.set))
    if args.dry_run:
        print(plan.describe())
        return 0
    result = run_sweep(
        plan,
        backend=args.backend,
        workers=args.workers,
        address=args.address,
        cpus_per_run=args.cpus_per_run,
        progress=args.progress,
    )
    print(result.report(), file=sys.stderr)
    print(result.root)
    return result.exit_code


#: the heavy modules each command needs, imported first with Ctrl-C held back (an interrupt
#: inside an import can leave a half-initialised numpy or torch behind, which then fails with
#: a traceback far from the cause)
_IMPORTS = {
    "run": ("contlearn.running.api",),
    "resume": ("contlearn.running.api",),
    "sweep": ("contlearn.running.api", "contlearn.sweeps.plan"),
    "plot": ("contlearn.results.store", "contlearn.results.plots"),
    "summary": ("contlearn.results.store", "contlearn.results.summary"),
    "list": ("contlearn.listing",),
    "data": ("contlearn.data.datasets", "contlearn.data.images"),
    "export": ("contlearn.results.store", "contlearn.results.trackers"),
}


def _import_uninterrupted(command: str) -> bool:
    """Import ``command``'s modules with SIGINT deferred; True if a Ctrl-C came meanwhile."""
    import importlib

    pending: list[int] = []
    try:
        previous = signal.signal(signal.SIGINT, lambda signum, frame: pending.append(signum))
    except ValueError:  # not the main thread (embedded use): import as is
        previous = None
    try:
        for module in _IMPORTS.get(command, ()):
            importlib.import_module(module)
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    return bool(pending)


def cmd_export(args: argparse.Namespace) -> int:
    """``contlearn export``: prints the folder written."""
    from contlearn.results.store import read_config
    from contlearn.results.trackers import export_run

    path = Path(args.run_dir)
    read_config(path)  # (not a run: one line naming it)
    print(export_run(path, args.to, Path(args.out) if args.out else None))
    return 0


COMMANDS = {
    "export": cmd_export,
    "run": cmd_run,
    "resume": cmd_resume,
    "plot": cmd_plot,
    "summary": cmd_summary,
    "list": cmd_list,
    "data": cmd_data,
    "sweep": cmd_sweep,
}


def _error(message: str) -> int:
    print(f"contlearn: error: {' '.join(message.split())}", file=sys.stderr)
    return EXIT_USAGE


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code (2 for user errors, 130 on Ctrl-C).

    A user error is one line on stderr and exit code 2; so is an operating-system error
    (a path that cannot be read or written, no permission, a full disk) that no check named
    first: the line names the file and the reason. Ctrl-C at any moment, start-up included,
    is one line and exit code 130.
    """
    try:
        if hasattr(signal, "SIGXFSZ"):  # a file-size limit raises OSError instead of killing us
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as exc:  # (--help, --version, a usage error: printed already)
            return exc.code if isinstance(exc.code, int) else EXIT_USAGE
        if _import_uninterrupted(args.command):
            raise KeyboardInterrupt
        try:
            return COMMANDS[args.command](args)
        except RunInterrupted as exc:
            print(f"contlearn: {exc}", file=sys.stderr)
            return exc.code
    except ContlearnError as exc:
        return _error(str(exc))
    except OSError as exc:  # (after ContlearnError: StoreError and DataError are OSErrors)
        where = f" {exc.filename}" if exc.filename else ""
        return _error(
            f"cannot use{where} ({exc.strerror or exc}); check the path, its permissions and "
            "the free disk space"
        )
    except KeyboardInterrupt:
        print("contlearn: interrupted", file=sys.stderr)
        return 130


def entry() -> NoReturn:
    """The ``contlearn`` program: :func:`main`, then exit, ignoring a Ctrl-C that lands while
    the interpreter shuts down (it would print Python's traceback after the last line)."""
    code = main()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.exit(code)
