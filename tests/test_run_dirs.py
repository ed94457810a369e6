"""Run directories (issue #17): --overwrite never takes a live writer's run nor files that are
not the run's, a run's identity does not depend on its path, and resume refuses what would
silently lose or invent data."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pandas as pd
import pytest

import contlearn
from contlearn.errors import ConfigError, RunDirError
from contlearn.results.store import load_runs
from contlearn.results.summary import summary_table
from contlearn.running.checkpoint import checkpoint_files
from tests.conftest import snapshot

BASE = {"examples_per_task": 50, "hidden": "4", "probe_size": 8, "checkpoint_every": 40}


def read_meta(path):
    return json.loads((path / "meta.json").read_text())


def _run(out, steps=100, **config):
    return contlearn.run("bit-flipping", seeds=2, steps=steps, config={**BASE, **config}, out=out)


def test_overwrite_refuses_a_run_a_live_process_writes(tmp_path):
    out = tmp_path / "r"
    _run(out)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / ".lock").write_text(str(holder.pid))
        before = snapshot(out)
        with pytest.raises(RunDirError, match="being written by process"):
            contlearn.run(
                "bit-flipping", steps=60, config=BASE, out=out, overwrite=True
            )  # the live writer's run, lock and all, stays
        assert snapshot(out) == before
    finally:
        holder.kill()
        holder.wait()


def test_overwrite_removes_the_run_and_nothing_else(tmp_path):
    out = tmp_path / "r"
    _run(out)
    (out / "notes.txt").write_text("mine")
    (out / "metrics" / "README").write_text("mine too")
    contlearn.run("bit-flipping", steps=60, config=BASE, out=out, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "metrics" / "README").read_text() == "mine too"
    df = load_runs(out)
    assert df.step.max() == 60 and set(df.seed) == {0}  # only the new run's rows


def test_overwrite_and_resume_together_are_refused(tmp_path, cli):
    out = tmp_path / "r"
    _run(out)
    before = snapshot(out)
    with pytest.raises(ConfigError, match="not both"):
        contlearn.run("bit-flipping", steps=10, out=out, overwrite=True, resume=True)
    code, _, err = cli("run", "bit-flipping", "--out", out, "--overwrite", "--resume")
    assert code == 2 and err.count("\n") == 1 and "not both" in err
    assert snapshot(out) == before


def test_a_moved_run_resumes_as_one_run(tmp_path):
    a, b = tmp_path / "A", tmp_path / "B"
    _run(a, steps=100)
    shutil.move(a, b)
    contlearn.resume(b, steps=200)
    df = load_runs(b, config=True)
    assert set(df.run) == {"B"}
    assert not df.duplicated(["seed", "step", "metric", "layer"]).any()
    assert summary_table(df, by="learner").seeds.tolist() == [2]  # not 4
    stored = set(pd.read_parquet(b / "metrics").run)  # the parts themselves agree, too
    assert stored == {"A"}
    assert read_meta(b)["name"] == "A" and len(read_meta(b)["run_id"]) == 32


def test_runs_of_one_name_under_different_roots_stay_distinct(tmp_path):
    _run(tmp_path / "x" / "run", steps=50)
    _run(tmp_path / "y" / "run", steps=50, lr=0.02)
    df = load_runs([tmp_path / "x" / "run", tmp_path / "y" / "run"], config=True)
    assert set(df.run) == {"x/run", "y/run"}
    assert df.groupby("run").lr.nunique().tolist() == [1, 1] and df.lr.nunique() == 2


def test_an_old_run_without_identity_fields_loads_and_resumes(tmp_path):
    out = tmp_path / "old"
    _run(out, steps=100)
    meta = read_meta(out)
    del meta["run_id"], meta["name"]
    (out / "meta.json").write_text(json.dumps(meta))
    contlearn.resume(out, steps=200)
    df = load_runs(out)
    assert set(df.run) == {"old"} and set(pd.read_parquet(out / "metrics").run) == {"old"}
    assert df.step.max() == 200


def test_resume_to_a_shorter_length_is_refused_and_config_kept(tmp_path, cli):
    out = tmp_path / "r"
    contlearn.run("bit-flipping", tasks=4, config=BASE, out=out)
    before = snapshot(out)
    code, _, err = cli("resume", out, "--tasks", "2")
    assert code == 2 and err.count("\n") == 1 and "already run" in err, err
    assert snapshot(out) == before


def test_resume_after_metric_parts_were_deleted_is_refused(tmp_path, cli):
    out = tmp_path / "r"
    _run(out, steps=100, flush_rows=1)
    (out / "metrics" / "part-00000.parquet").unlink()
    before = snapshot(out)
    code, _, err = cli("resume", out, "--steps", "200")
    assert code == 2 and err.count("\n") == 1 and "missing" in err, err
    assert snapshot(out) == before


def test_resume_when_every_checkpoint_is_bad_is_refused(tmp_path, cli):
    out = tmp_path / "r"
    _run(out, steps=100)
    for f in checkpoint_files(out):
        f.write_bytes(b"garbage")
    before = snapshot(out)
    code, _, err = cli("resume", out, "--steps", "200")
    assert code == 2 and "none of the" in err.splitlines()[-1], err
    assert all(line.startswith("contlearn: ") for line in err.splitlines())
    assert snapshot(out) == before


def test_a_checkpoint_of_another_run_placed_as_newest_is_passed_over(tmp_path, cli):
    mine, other = tmp_path / "mine", tmp_path / "other"
    _run(mine, steps=80)
    contlearn.run("bit-flipping", steps=120, config={**BASE, "hidden": "7,7"}, out=other)
    newest = checkpoint_files(other)[-1]
    target = mine / "checkpoints" / f"ckpt-{'9' * 12}-999999.pt"
    shutil.copy(newest, target)
    shutil.copy(newest.with_suffix(".sha256"), target.with_suffix(".sha256"))
    code, _, err = cli("resume", mine, "--steps", "120")
    assert code == 0, err
    assert "belongs to another run" in err
    ref = tmp_path / "ref"
    _run(ref, steps=120)
    cols = ["seed", "step", "metric", "layer"]
    got = load_runs(mine).drop(columns="run").sort_values(cols).reset_index(drop=True)
    want = load_runs(ref).drop(columns="run").sort_values(cols).reset_index(drop=True)
    pd.testing.assert_frame_equal(got, want)


def test_config_json_that_is_not_a_mapping_is_one_line(tmp_path, cli):
    out = tmp_path / "r"
    _run(out, steps=50)
    (out / "config.json").write_text("[1, 2]")
    for args in (("resume", out), ("summary", out), ("plot", out)):
        code, _, err = cli(*args)
        assert code == 2 and err.count("\n") == 1 and "not a mapping" in err, (args, err)
