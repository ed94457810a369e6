"""contlearn's online loops as scripts/bench_online.py (and scripts/bench_cuda.py) time them:
each benchmark row's ``contlearn.run`` config, and the supervised loop built from it through
the real code path (stream, agent, run store), as ``contlearn.run`` builds it.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from contlearn.envs import make_stream
from contlearn.loop.engine import ProbeSchedule, SupervisedLoop
from contlearn.loop.records import record_writer
from contlearn.results.store import MetricWriter
from contlearn.running.config import resolve

#: learner rows: name -> (contlearn learner, base optimizer)
LEARNERS = {
    "bp": ("bp", "sgd"),
    "l2": ("l2", "sgd"),
    "snp": ("snp", "sgd"),
    "cbp": ("cbp", "sgd"),
    "bp-adam": ("bp", "adam"),
    "l2-adam": ("l2", "adam"),
    "snp-adam": ("snp", "adam"),
    "cbp-adam": ("cbp", "adam"),
    "l2-init": ("l2-init", "sgd"),
    "redo": ("redo", "sgd"),
    "redo-adam": ("redo", "adam"),
}


def run_config(name: str, width: int, R: int, **extra) -> dict:
    """The ``contlearn.run`` config of a benchmark row."""
    learner, optimizer = LEARNERS[name]
    return {
        "stream": "permuted-mnist",
        "learner": learner,
        "optimizer": optimizer,
        "hidden": ",".join([str(width)] * 3),
        "seeds": R,
        "probes": "none",
        **extra,
    }


def threads_for(agent) -> int:
    """The intra-op threads ``contlearn.run`` uses with ``threads = 0`` (auto)."""
    return getattr(agent, "preferred_threads", lambda: 0)() or (os.cpu_count() or 1)


def store_emit(path: Path, cfg, seeds: list[int]) -> tuple[Callable, MetricWriter]:
    """The run store's writer and the engine callback ``contlearn.run`` gives it."""
    writer = MetricWriter(path, path.name, cfg.stream, cfg.learner.name)
    return record_writer(writer, seeds), writer


def contlearn_loop(
    config: dict, tmp: Path, store: bool = True, probes: ProbeSchedule | None = None
) -> tuple[SupervisedLoop, int]:
    """A supervised loop as ``contlearn.run`` builds it, and its thread count."""
    cfg = resolve(config)
    stream = make_stream(cfg.stream, cfg.stream_spec, cfg.seeds)
    agent = cfg.agent_cls(stream.info, cfg.seeds, cfg.agent_spec, cfg.learner)
    emit = (
        store_emit(Path(tempfile.mkdtemp(dir=tmp)), cfg, cfg.seeds)[0]
        if store
        else (lambda record: None)
    )
    return SupervisedLoop(stream, agent, emit, probes=probes), threads_for(agent)


def loop_runner(loop: SupervisedLoop) -> Callable[[int], None]:
    return lambda n: loop.run(loop.stream.step + n)
