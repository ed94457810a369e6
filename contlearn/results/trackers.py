"""Experiment trackers: every metric and probe row streamed live to TensorBoard or Weights &
Biases (``--set log=tensorboard``, ``log=wandb``, or both: ``log=tensorboard,wandb``), and
finished runs exported (``contlearn export RUN --to tensorboard|wandb``).

**One tracker run per seed**, named ``<run>/seed-<s>`` (TensorBoard: the event files of
``RUN/tensorboard/seed-<s>/``; W&B: a run of that name in group ``<run>``, in project
``$WANDB_PROJECT`` or ``contlearn``, with the run's config): seeds are the replicates a
researcher compares or averages, and both tools overlay runs and average groups themselves.

**Tags**: ``<metric>`` for a whole-network value (``accuracy``, ``loss``, ``episode_return``),
``<metric>/<layer>`` per layer (``effective_rank/hidden1``); the step is the row's step. Values
are those of the run store, row for row (NaN included: a diverged seed's probes).

**Resume**: TensorBoard writers open with ``purge_step`` at each seed's first step after the
resume, so the rows a stopped run wrote after its last checkpoint (and writes again) are not
shown twice. A W&B run keeps its id (``<run_id>-seed-<s>``) and is resumed.

Both packages are optional extras: ``pip install 'contlearn[tensorboard]'`` /
``'contlearn[wandb]'``; a run that asks for one that is not installed is refused at its start.
W&B follows its own environment (``WANDB_MODE=offline`` for no network, ``WANDB_DIR``,
``WANDB_API_KEY``).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from contlearn.errors import ConfigError

#: the trackers ``log`` may name, with the package each needs
TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb"}
#: the folder of a run's TensorBoard event files
TENSORBOARD_DIR = "tensorboard"


def parse_trackers(text: str) -> list[str]:
    """``"none"`` (or empty), or a comma-separated list of :data:`TRACKERS`.

    Raises:
        ConfigError: an unknown tracker, or one whose package is not installed.
    """
    names = [n.strip() for n in text.split(",") if n.strip() and n.strip() != "none"]
    for name in names:
        if name not in TRACKERS:
            raise ConfigError(
                f"log={text!r}: unknown tracker {name!r}; choose tensorboard, wandb or none"
            )
        if importlib.util.find_spec(TRACKERS[name]) is None:
            raise ConfigError(
                f"log={name} needs the {TRACKERS[name]} package; "
                f"pip install 'contlearn[{name}]' (or set log=none)"
            )
    return list(dict.fromkeys(names))


def tag(metric: str, layer: str) -> str:
    """The tracker's name of a row: ``metric``, or ``metric/layer`` for a layer's value."""
    return f"{metric}/{layer}" if layer else metric


class Tracker(Protocol):
    """Where rows go live, besides the run store (:class:`contlearn.results.store.MetricWriter`
    hands each appended row to its trackers)."""

    def append(
        self,
        seeds: Sequence[int],
        step: int,
        task: int,
        metric: str,
        values: Iterable[float],
        layer: str = "",
    ) -> None:
        """One row per seed: ``values[r]`` is seed ``seeds[r]``'s value."""
        ...

    def close(self) -> None:
        """Flush and close every tracker run."""
        ...


class TensorBoardTracker:
    """One ``SummaryWriter`` per seed under ``root/seed-<s>`` (opened at its first row).

    Args:
        root: the folder of the event files (``RUN/tensorboard``).
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.writers: dict[int, Any] = {}

    def _writer(self, seed: int, step: int) -> Any:
        if seed not in self.writers:
            from torch.utils.tensorboard import SummaryWriter

            self.writers[seed] = SummaryWriter(
                str(self.root / f"seed-{seed}"), purge_step=step, flush_secs=30
            )
        return self.writers[seed]

    def append(
        self,
        seeds: Sequence[int],
        step: int,
        task: int,
        metric: str,
        values: Iterable[float],
        layer: str = "",
    ) -> None:
        """Add the rows as scalars ``tag(metric, layer)`` at ``step``."""
        for seed, value in zip(seeds, values, strict=True):
            self._writer(int(seed), int(step)).add_scalar(
                tag(metric, layer), float(value), int(step)
            )

    def close(self) -> None:
        """Flush and close every seed's writer."""
        for writer in self.writers.values():
            writer.close()
        self.writers.clear()


class WandbTracker:
    """One W&B run per seed (opened at its first row), id ``<run_id>-seed-<s>``.

    Args:
        name: the contlearn run's name (the W&B group; runs are ``<name>/seed-<s>``).
        run_id: the contlearn run's id (``meta.json``), the stem of the W&B run ids.
        config: the run's config (recorded with each W&B run).
        directory: where W&B keeps its files (``$WANDB_DIR``, else the run directory).
    """

    def __init__(self, name: str, run_id: str, config: Mapping[str, Any], directory: Path) -> None:
        self.name, self.run_id, self.config = name, run_id, dict(config)
        self.directory = Path(os.environ.get("WANDB_DIR") or directory)
        self.runs: dict[int, Any] = {}

    def _run(self, seed: int) -> Any:
        if seed not in self.runs:
            import wandb

            self.directory.mkdir(parents=True, exist_ok=True)
            run = wandb.init(
                project=os.environ.get("WANDB_PROJECT", "contlearn"),
                group=self.name,
                name=f"{self.name}/seed-{seed}",
                id=f"{self.run_id}-seed-{seed}",
                resume="allow",
                config={**self.config, "seed": seed},
                dir=str(self.directory),
                reinit="create_new",
            )
            run.define_metric("step")
            run.define_metric("*", step_metric="step")  # (rows may come out of step order)
            self.runs[seed] = run
        return self.runs[seed]

    def append(
        self,
        seeds: Sequence[int],
        step: int,
        task: int,
        metric: str,
        values: Iterable[float],
        layer: str = "",
    ) -> None:
        """Log the rows as ``{tag: value, "step": step, "task": task}``."""
        for seed, value in zip(seeds, values, strict=True):
            row = {tag(metric, layer): float(value), "step": int(step), "task": int(task)}
            self._run(int(seed)).log(row)

    def close(self) -> None:
        """Finish every seed's W&B run."""
        for run in self.runs.values():
            run.finish()
        self.runs.clear()


def make_trackers(
    names: Sequence[str], path: Path, name: str, run_id: str, config: Mapping[str, Any]
) -> list[Tracker]:
    """The trackers of a run in ``path`` (``names`` from :func:`parse_trackers`)."""
    trackers: list[Tracker] = []
    for tracker in names:
        if tracker == "tensorboard":
            trackers.append(TensorBoardTracker(Path(path) / TENSORBOARD_DIR))
        else:
            trackers.append(WandbTracker(name, run_id, config, Path(path)))
    return trackers


def export_run(path: Path, to: str, out: Path | None = None) -> Path:
    """Write a finished (or stopped) run's rows to a tracker, seed by seed in step order.

    Args:
        path: the run directory.
        to: ``tensorboard`` or ``wandb``.
        out: TensorBoard: the folder of the event files (default ``RUN/tensorboard``; it must
            not hold event files already); W&B: where W&B keeps its files (default the run).

    Returns:
        The folder written.

    Raises:
        ConfigError: an unknown tracker or a missing package; an ``out`` that holds event
            files already.
    """
    from contlearn.results.store import load_runs, read_config, read_meta

    parse_trackers(to)
    if to not in TRACKERS:
        raise ConfigError(f"--to {to!r}: choose tensorboard or wandb")
    df = load_runs(path).sort_values(["seed", "step"], kind="stable")
    meta = read_meta(path)
    name = str(meta.get("name") or Path(path).name)
    tracker: Tracker
    if to == "tensorboard":
        folder = Path(out) if out is not None else Path(path) / TENSORBOARD_DIR
        if folder.exists() and any(folder.rglob("events.out.tfevents.*")):
            raise ConfigError(
                f"{folder} holds TensorBoard event files already; choose another --out "
                "(nothing was written)"
            )
        tracker = TensorBoardTracker(folder)
    else:
        folder = Path(out) if out is not None else Path(path)
        run_id = f"{meta.get('run_id', name)}-export"
        tracker = WandbTracker(name, run_id, read_config(path), folder)
    try:
        for row in df.itertuples(index=False):
            tracker.append([row.seed], row.step, row.task, row.metric, [row.value], row.layer)
    finally:
        tracker.close()
    return folder
