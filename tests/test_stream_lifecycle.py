"""Stream lifecycle: a run builds its streams once and closes them, however it ends, so the
worker processes of ``vector=split`` RL streams never outlive a run or reach a sweep's next run.
"""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

import pytest
import torch

import contlearn
from contlearn.envs import make_stream
from contlearn.envs.protocol import RLStreamProtocol, Stream, SupervisedStreamProtocol
from contlearn.errors import RunDirError
from contlearn.running import api, runner
from contlearn.running.config import resolve
from contlearn.sweeps.plan import sweep

pytestmark = pytest.mark.mujoco

# two env copies (one here, one in the split worker), a PPO update every 16 steps
SPLIT = {
    "stream": "slippery-ant",
    "seeds": 1,
    "num_envs": 2,
    "vector": "split",
    "steps": 40,
    "rollout": 16,
    "minibatch_size": 8,
    "epochs": 1,
    "hidden": "8,8",
    "max_episode_steps": 20,
    "change_every": 30,
    "change_immediately": True,
}


def live_children() -> set[int]:
    """The pids of this process's children that have not exited (from /proc; zombies, which
    have exited, are left out)."""
    multiprocessing.active_children()  # (reaps the multiprocessing children that have ended)
    me, out = os.getpid(), set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # (gone meanwhile)
            continue
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if int(ppid) == me and state != "Z":
            out.add(int(entry.name))
    return out


@pytest.fixture
def no_new_children():
    """Assert that the test leaves no child process behind that was not there before it."""
    before = live_children()
    yield
    assert live_children() - before == set()
    assert multiprocessing.active_children() == []


def test_a_split_run_leaves_no_child_process(tmp_path, no_new_children) -> None:
    built = []
    real = runner.make_streams

    def counting(cfg):
        built.append(1)
        return real(cfg)

    mp = pytest.MonkeyPatch()
    mp.setattr(runner, "make_streams", counting)
    try:
        result = contlearn.run(config=SPLIT, out=tmp_path / "run")
    finally:
        mp.undo()
    assert built == [1]  # built once: validated, then run
    assert "episode_return" in set(result.metrics()["metric"])


class FailingAgent:
    """A plug-in agent over all replicas that fails at its 10th step."""

    supports_replicas = True

    def __init__(self, info, seeds) -> None:
        self.shape = (len(seeds), info.num_outputs)
        self.steps = 0

    def act(self, obs: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*obs.shape[:2], self.shape[1])

    def observe(self, obs, action, feedback) -> dict[str, torch.Tensor]:
        self.steps += 1
        if self.steps == 10:
            raise RuntimeError("agent failed mid-run")
        return {}


def test_a_run_that_fails_mid_run_leaves_no_child_process(tmp_path, no_new_children) -> None:
    config = {
        k: v for k, v in SPLIT.items() if k not in ("rollout", "minibatch_size", "epochs", "hidden")
    }
    with pytest.raises(RuntimeError, match="mid-run"):
        contlearn.run(agent=FailingAgent, config=config, out=tmp_path / "run")


def test_a_run_refused_after_its_streams_are_built_leaves_no_child_process(
    tmp_path, no_new_children
) -> None:
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "somebody_else.txt").write_text("not a run")
    with pytest.raises(RunDirError):
        contlearn.run(config=SPLIT, out=taken)


def test_a_sweep_of_split_runs_leaves_no_child_process(
    tmp_path, no_new_children, monkeypatch
) -> None:
    """Runs one after another in this process: no run starts with the last one's workers
    alive, and none is left at the end."""
    at_start: list[set[int]] = []
    real = api.run
    before = live_children()

    def watched(*args, **kwargs):
        at_start.append(live_children() - before)
        return real(*args, **kwargs)

    monkeypatch.setattr(api, "run", watched)
    spec = {
        **{k: v for k, v in SPLIT.items() if k != "stream"},
        "stream": "slippery-ant",
        "grid": {"lr": [1e-4, 3e-4, 1e-3]},
    }
    result = sweep(spec, tmp_path / "root", workers=1, progress=False)
    assert [o.status for o in result.outcomes] == ["finished"] * 3
    assert at_start == [set(), set(), set()]


@pytest.mark.parametrize(
    "name, config",
    [
        ("permuted-mnist", {"examples_per_task": 100}),
        ("bit-flipping", {}),
        ("slippery-ant", {k: SPLIT[k] for k in ("num_envs", "vector", "max_episode_steps")}),
    ],
)
def test_every_stream_closes_twice_and_is_a_context_manager(name, config, no_new_children) -> None:
    cfg = resolve({"stream": name, "seeds": 2, **config})
    with make_stream(cfg.stream, cfg.stream_spec, cfg.seeds) as stream:
        assert isinstance(stream, Stream)
        kind = RLStreamProtocol if name == "slippery-ant" else SupervisedStreamProtocol
        assert isinstance(stream, kind)
    stream.close()  # again: nothing happens
