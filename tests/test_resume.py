"""Checkpoints and exact resume: interrupted runs end exactly where uninterrupted ones do."""

from __future__ import annotations

import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

import contlearn
from contlearn.errors import RunDirError
from contlearn.results.store import RunLock, load_runs
from contlearn.running.checkpoint import checkpoint_files, read_checkpoint

ROOT = Path(__file__).resolve().parents[1]
BASE = {"examples_per_task": 150, "hidden": "10,10", "probe_size": 32, "checkpoint_every": 40}
LEARNERS = {
    "bp": {},
    "proper-adam": {},
    "l2": {},
    "l2-init": {},
    "snp": {"learner.sigma": 1e-3},
    "snp-init": {"learner.period": 7},
    "cbp": {"learner.replacement_rate": 0.05, "learner.maturity": 5, "optimizer": "adam"},
    "redo": {"learner.period": 30, "learner.window": 10, "learner.threshold": 0.5},
    "head-reset": {"boundaries_visible": True},
}


def _frame(path) -> pd.DataFrame:
    df = load_runs(path).drop(columns=["run"])
    return df.sort_values(["seed", "step", "metric", "layer"]).reset_index(drop=True)


def _uninterrupted(tmp_path, stream, learner, extra):
    return contlearn.run(
        stream, learner=learner, seeds=2, tasks=4, config={**BASE, **extra}, out=tmp_path / "full"
    )


@pytest.mark.parametrize("learner", list(LEARNERS))
def test_resume_equals_uninterrupted_for_every_learner(tmp_path, learner):
    extra = LEARNERS[learner]
    full = _uninterrupted(tmp_path, "permuted-mnist", learner, extra)
    part = tmp_path / "part"
    stop = random.Random(learner).choice([97, 150, 213, 299, 301])  # mid-task and boundaries
    contlearn.run(
        "permuted-mnist", learner=learner, seeds=2, steps=stop, config={**BASE, **extra}, out=part
    )
    contlearn.resume(part, tasks=4)
    pd.testing.assert_frame_equal(_frame(part), _frame(full.path))


@pytest.mark.parametrize("stream", ["label-shuffled-mnist", "bit-flipping"])
def test_resume_several_times_on_other_streams(tmp_path, stream):
    extra = {"learner.replacement_rate": 0.05, "learner.maturity": 5}
    full = _uninterrupted(tmp_path, stream, "cbp", extra)
    part = tmp_path / "part"
    contlearn.run(stream, learner="cbp", seeds=2, steps=60, config={**BASE, **extra}, out=part)
    for steps in (61, 200, 450):
        contlearn.resume(part, steps=steps)
    contlearn.resume(part, tasks=4)
    pd.testing.assert_frame_equal(_frame(part), _frame(full.path))


def test_run_with_resume_flag_continues_or_starts(tmp_path, cli):
    args = [
        "run",
        "bit-flipping",
        "--seeds",
        "2",
        "--set",
        "examples_per_task=100",
        "--set",
        "checkpoint_every=30",
        "--out",
        tmp_path / "r",
        "--resume",
    ]
    assert cli(*args, "--steps", "130")[0] == 0  # starts: there was no run
    assert cli(*args, "--tasks", "3")[0] == 0  # continues to 3 tasks
    full = contlearn.run(
        "bit-flipping",
        seeds=2,
        tasks=3,
        config={"examples_per_task": 100, "checkpoint_every": 30},
        out=tmp_path / "full",
    )
    pd.testing.assert_frame_equal(_frame(tmp_path / "r"), _frame(full.path))
    code, _, err = cli(
        "run",
        "bit-flipping",
        "--set",
        "lr=0.5",
        "--set",
        "examples_per_task=100",
        "--out",
        tmp_path / "r",
        "--resume",
    )
    assert code == 2 and "lr=" in err and err.count("\n") == 1


def test_damaged_newest_checkpoint_falls_back_to_the_previous(tmp_path, capsys):
    extra = {"learner.replacement_rate": 0.05, "learner.maturity": 5}
    full = _uninterrupted(tmp_path, "bit-flipping", "cbp", extra)
    part = tmp_path / "part"
    contlearn.run(
        "bit-flipping", learner="cbp", seeds=2, steps=230, config={**BASE, **extra}, out=part
    )
    newest = checkpoint_files(part)[-1]
    newest.write_bytes(newest.read_bytes()[:100])  # truncated
    contlearn.resume(part, tasks=4)
    assert "fails its checksum" in capsys.readouterr().err
    pd.testing.assert_frame_equal(_frame(part), _frame(full.path))


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_checkpoint_that_executes_code_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    part = tmp_path / "part"
    contlearn.run("bit-flipping", seeds=1, steps=100, config=BASE, out=part)
    newest = checkpoint_files(part)[-1]
    import hashlib

    data = pickle.dumps({"format": 1, "x": _Exploit()})
    newest.write_bytes(data)
    newest.with_suffix(".sha256").write_text(hashlib.sha256(data).hexdigest())
    with pytest.raises(ValueError, match="cannot be loaded safely"):
        read_checkpoint(newest)
    contlearn.resume(part, steps=150)
    assert "cannot be loaded safely" in capsys.readouterr().err
    assert not (tmp_path / "pwned").exists()


def test_no_checkpoint_restarts_cleanly(tmp_path):
    part = tmp_path / "part"
    contlearn.run("bit-flipping", seeds=2, steps=100, config=BASE, out=part)
    for f in (part / "checkpoints").iterdir():
        f.unlink()
    contlearn.resume(part, tasks=4)
    full = contlearn.run("bit-flipping", seeds=2, tasks=4, config=BASE, out=tmp_path / "full")
    pd.testing.assert_frame_equal(_frame(part), _frame(full.path))


def test_only_the_newest_checkpoints_are_kept(tmp_path):
    res = contlearn.run(
        "bit-flipping", steps=400, config={**BASE, "checkpoint_keep": 2}, out=tmp_path / "r"
    )
    files = checkpoint_files(res.path)
    assert len(files) == 2 and all(f.with_suffix(".sha256").is_file() for f in files)
    assert read_checkpoint(files[-1])["step"] == 400


def test_one_writer_per_run_and_stale_locks_are_cleared(tmp_path):
    part = tmp_path / "part"
    contlearn.run("bit-flipping", steps=50, config=BASE, out=part)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (part / ".lock").write_text(str(holder.pid))
        with pytest.raises(RunDirError, match="being written by process"):
            contlearn.resume(part, steps=100)
    finally:
        holder.kill()
        holder.wait()
    contlearn.resume(part, steps=100)  # the lock's process is gone: stale, cleared
    assert not (part / ".lock").exists()
    with RunLock(part), pytest.raises(RunDirError):
        RunLock(part).__enter__()


def _cli(*args, **kw):
    return subprocess.Popen(
        [sys.executable, "-m", "contlearn", *map(str, args)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


RUN = [
    "run",
    "permuted-mnist",
    "--learner",
    "cbp",
    "--seeds",
    "2",
    "--tasks",
    "60",
    "--set",
    "examples_per_task=400",
    "--set",
    "hidden=32,32",
    "--set",
    "checkpoint_every=100",
    "--set",
    "learner.replacement_rate=0.01",
    "--set",
    "learner.maturity=20",
    "--set",
    "flush_rows=7",
    "--set",
    "probe_size=64",
]


def _wait_for_checkpoint(path: Path, proc, timeout=60.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None:
        if checkpoint_files(path):
            return
        time.sleep(0.05)


def test_sigint_checkpoints_and_resume_matches(tmp_path):
    out = tmp_path / "r"
    proc = _cli(*RUN, "--out", out)
    _wait_for_checkpoint(out, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "contlearn resume" in err
    done = subprocess.run(
        [sys.executable, "-m", "contlearn", "resume", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    ref = subprocess.run(
        [sys.executable, "-m", "contlearn", *RUN, "--out", str(tmp_path / "f")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ref.returncode == 0, ref.stderr
    pd.testing.assert_frame_equal(_frame(out), _frame(tmp_path / "f"))


def test_kill_9_at_random_points_loses_nothing_and_duplicates_nothing(tmp_path):
    out = tmp_path / "r"
    rng = random.Random(0)
    kills = 0
    proc = _cli(*RUN, "--out", out)
    while kills < 10:
        time.sleep(rng.uniform(0.3, 2.5))
        if proc.poll() is not None:
            break
        proc.kill()
        proc.wait()
        kills += 1
        if (out / "config.json").is_file():  # what was written is always readable
            rows = load_runs(out)
            assert not rows.duplicated(["seed", "step", "metric", "layer"]).any()
        proc = _cli(*RUN, "--out", out, "--resume")
    proc.communicate(timeout=300)
    if proc.returncode != 0:  # the last kill may have landed after the run finished
        final = subprocess.run(
            [sys.executable, "-m", "contlearn", *RUN, "--out", str(out), "--resume"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert final.returncode == 0, final.stderr
    assert kills >= 5
    ref = subprocess.run(
        [sys.executable, "-m", "contlearn", *RUN, "--out", str(tmp_path / "f")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ref.returncode == 0, ref.stderr
    pd.testing.assert_frame_equal(_frame(out), _frame(tmp_path / "f"))


def test_run_killed_before_writing_its_config_can_be_started_again(tmp_path, cli):
    out = tmp_path / "r"
    out.mkdir()
    (out / ".lock").write_text("999999999")  # a dead process's lock, nothing else
    (out / ".config.json.tmp").write_text("{")
    code, _, err = cli(
        "run",
        "bit-flipping",
        "--steps",
        "20",
        "--set",
        "examples_per_task=10",
        "--out",
        out,
        "--resume",
    )
    assert code == 0, err
    assert (out / "config.json").is_file() and not (out / ".lock").exists()
