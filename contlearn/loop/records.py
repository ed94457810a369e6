"""The loops' records, their per-task sums, and the one conversion of records into store rows.

The loops emit :class:`Record` values (values, not hooks); :func:`write_record` turns one into
rows of the run store (one per replica, ``seed`` column), and :func:`record_writer` makes the
``emit`` callback that does so. The runner, the benchmark and the scripts all write records
through these two.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple, Protocol

import numpy as np
import torch


class Record(NamedTuple):
    """One event of a run.

    Attributes:
        kind: supervised loops emit ``task_start``, ``task_end``, ``probe`` and ``diverged``;
            RL loops ``episode``, ``update``, ``probe`` and ``diverged`` (see
            :mod:`contlearn.loop.engine` and :mod:`contlearn.loop.rl`).
        step: global steps completed when the record was made.
        task: task index.
        values: metric name -> per-replica values ``(R,)``.
        layer: layer name for per-layer metrics, ``""`` for whole-network ones.
        replica: if set, the values ``(1,)`` are this replica's alone (RL episodes end at
            different steps in different replicas); None: one value per replica.
    """

    kind: str
    step: int
    task: int
    values: dict[str, torch.Tensor]
    layer: str = ""
    replica: int | None = None


class RowSink(Protocol):
    """Where rows go: :class:`contlearn.results.store.MetricWriter`."""

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


def write_record(writer: RowSink, record: Record, seeds: Sequence[int]) -> None:
    """Append ``record`` to ``writer``: one row per replica and metric (seed ``seeds[r]``),
    or only replica ``record.replica``'s row when the record is that replica's alone."""
    rows = seeds if record.replica is None else [seeds[record.replica]]
    for name, values in record.values.items():
        writer.append(rows, record.step, record.task, name, values.tolist(), record.layer)


def record_writer(writer: RowSink, seeds: Sequence[int]) -> Callable[[Record], None]:
    """The ``emit`` callback a loop over replicas ``seeds`` gets: :func:`write_record`."""
    seeds = list(seeds)

    def emit(record: Record) -> None:
        write_record(writer, record, seeds)

    return emit


def results_records(
    step: int,
    task: int,
    results: dict[str, dict[str, torch.Tensor]],
    diverged: torch.Tensor | None = None,
) -> list[Record]:
    """``probe`` records of probe results ``{metric: {layer: (R,)}}``; the values of the
    replicas marked in ``diverged`` ``(R,)`` bool are NaN (:func:`mark_diverged`)."""
    return [
        Record("probe", step, task, {metric: mark_diverged(values, diverged)}, layer)
        for metric, by_layer in results.items()
        for layer, values in by_layer.items()
    ]


def mark_diverged(values: torch.Tensor, diverged: torch.Tensor | None) -> torch.Tensor:
    """Probe values ``(R,)`` with NaN for every diverged replica: what a probe measures on a
    network whose loss went non-finite means nothing (docs/reliability.md, Divergence)."""
    if diverged is None or not bool(diverged.any()) or values.shape != diverged.shape:
        return values
    return torch.where(diverged, torch.nan, values.to(torch.float64))


class TaskTotals:
    """Per-replica sums over the current task (kept as tensors: no sync per step)."""

    def __init__(self, num_replicas: int) -> None:
        self.R = num_replicas
        self.reset()

    def reset(self) -> None:
        """Start a new task's sums."""
        self.score = torch.zeros(self.R, dtype=torch.float64)
        self.examples = 0
        self.steps = 0
        self.metrics: dict[str, torch.Tensor] = {}

    def add_block(self, score: torch.Tensor, metrics: dict[str, torch.Tensor]) -> None:
        """:meth:`add` for T steps at once (``score (T, R, B)``, metrics ``(T, R)``), adding
        them one step after the other, so the sums have the same bits however a run's steps
        were split into blocks."""
        T = score.shape[0]
        self.score = _accumulate(self.score, score.sum(2, dtype=torch.float64))
        self.examples += T * score.shape[2]
        self.steps += T
        for name, value in metrics.items():
            v = value.detach().to(torch.float64).reshape(T, self.R)
            zero = torch.zeros(self.R, dtype=torch.float64)
            self.metrics[name] = _accumulate(self.metrics.get(name, zero), v)

    def add(self, score: torch.Tensor, metrics: dict[str, torch.Tensor]) -> None:
        """Add one step's scores ``(R, B)`` and metrics ``(R,)``."""
        self.score += score.sum(1, dtype=torch.float64)  # (R,)
        self.examples += score.shape[1]
        self.steps += 1
        for name, value in metrics.items():
            v = value.detach().to(torch.float64).reshape(self.R)
            if name in self.metrics:
                self.metrics[name] += v
            else:
                self.metrics[name] = v.clone()

    def running(self) -> float:
        """The current task's score so far, averaged over replicas."""
        return float(self.score.mean()) / max(self.examples, 1)

    def means(self, score_name: str) -> dict[str, torch.Tensor]:
        """The task's mean score (as ``score_name``) and mean per-step metrics, ``(R,)``."""
        out = {score_name: self.score / max(self.examples, 1)}
        out.update({k: v / max(self.steps, 1) for k, v in self.metrics.items()})
        return out


def _accumulate(total: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``total + values[0] + values[1] + …`` in that order (``(R,)`` and ``(T, R)``, float64):
    numpy's ``add.accumulate`` adds row after row, as T separate additions would."""
    rows = np.concatenate([total.numpy()[None], values.numpy()])
    return torch.from_numpy(np.add.accumulate(rows, axis=0)[-1].copy())
