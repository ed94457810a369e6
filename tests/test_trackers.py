"""Experiment trackers (issue #19): ``log=tensorboard`` / ``log=wandb`` stream every row live,
``contlearn export`` writes a finished run; read back with TensorBoard's own reader and from
W&B's offline run files, and compared with the run store row for row."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import pandas as pd
import pytest

import contlearn
from contlearn.cli import main
from contlearn.errors import ConfigError
from contlearn.results import trackers

SMALL = {"examples_per_task": 60, "hidden": "6", "probe_size": 20}


def tensorboard_rows(folder: Path) -> pd.DataFrame:
    """Every scalar of the event files below ``folder``: seed, tag, step, value."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rows = []
    for seed_dir in sorted(folder.glob("seed-*")):
        acc = EventAccumulator(str(seed_dir), size_guidance={"scalars": 0})
        acc.Reload()
        for t in acc.Tags()["scalars"]:
            rows += [
                {"seed": int(seed_dir.name[5:]), "tag": t, "step": e.step, "value": e.value}
                for e in acc.Scalars(t)
            ]
    return pd.DataFrame(rows)


def _wandb_records(file: Path) -> list:
    """The protobuf records of a W&B ``.wandb`` file: a LevelDB-style log of records in
    32 KiB blocks, after a 7-byte header."""
    from wandb.proto import wandb_internal_pb2 as pb

    records = []
    data, pos, payload = file.read_bytes(), 7, b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        payload += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # (a whole record, or its last piece)
            record = pb.Record()
            record.ParseFromString(payload)
            payload = b""
            records.append(record)
    return records


def wandb_rows(folder: Path, seeds: int) -> pd.DataFrame:
    """The history rows of the W&B offline runs below ``folder``, once each of ``seeds`` runs'
    files holds its exit record (W&B's service process writes them after ``finish``)."""
    deadline = time.monotonic() + 60
    while True:
        files = sorted(folder.glob("offline-run-*/*.wandb"))
        done = [
            f
            for f in files
            if any(r.WhichOneof("record_type") == "exit" for r in _wandb_records(f))
        ]
        if len(done) >= seeds or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    rows = []
    for file in done:
        seed = int(file.stem.rsplit("-", 1)[1])
        for record in _wandb_records(file):
            if record.WhichOneof("record_type") != "history":
                continue
            item = {
                i.key or "/".join(i.nested_key): json.loads(i.value_json)
                for i in record.history.item
            }
            if "step" not in item:  # (W&B's own bookkeeping rows)
                continue
            step = item.pop("step")
            for k in [k for k in item if k != "task" and not k.startswith("_")]:
                rows.append({"seed": seed, "tag": k, "step": step, "value": item[k]})
    return pd.DataFrame(rows)


def store_rows(path: Path) -> pd.DataFrame:
    df = contlearn.load_runs(path)
    tags = [trackers.tag(m, lay) for m, lay in zip(df.metric, df.layer, strict=True)]
    return df.assign(tag=tags)[["seed", "tag", "step", "value"]]


def _same(tracked: pd.DataFrame, stored: pd.DataFrame, tol: float) -> None:
    keys = ["seed", "tag", "step"]
    a = tracked.sort_values(keys).reset_index(drop=True)
    b = stored.sort_values(keys).reset_index(drop=True)
    assert len(a) == len(b) and (a[keys] == b[keys]).all().all()
    pd.testing.assert_series_equal(a.value, b.value, atol=tol, rtol=tol, check_dtype=False)


def test_tensorboard_gets_every_row_live_one_run_per_seed(tmp_path):
    run = contlearn.run(
        "permuted-mnist",
        seeds=2,
        tasks=2,
        config={**SMALL, "log": "tensorboard"},
        out=tmp_path / "r",
    )
    tracked = tensorboard_rows(run.path / "tensorboard")
    assert {"accuracy", "loss", "effective_rank/hidden1", "dead_fraction"} <= set(tracked.tag)
    assert set(tracked.seed) == {0, 1}
    _same(tracked, store_rows(run.path), 1e-6)  # (TensorBoard keeps float32)
    # --overwrite removes the run's tracker folder with it (no mix of two runs' events)
    contlearn.run("bit-flipping", tasks=1, config=SMALL, out=run.path, overwrite=True)
    assert not (run.path / "tensorboard").exists()


def test_wandb_offline_gets_every_row_live(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = contlearn.run(
        "bit-flipping", seeds=2, tasks=2, config={**SMALL, "log": "wandb"}, out=tmp_path / "r"
    )
    tracked = wandb_rows(run.path / "wandb", 2)
    assert set(tracked.seed) == {0, 1}
    _same(tracked, store_rows(run.path), 1e-12)


def test_export_writes_a_finished_run_and_never_over_event_files(tmp_path, capsys, monkeypatch):
    run = contlearn.run("bit-flipping", seeds=2, tasks=2, config=SMALL, out=tmp_path / "r")
    assert main(["export", str(run.path), "--to", "tensorboard"]) == 0
    _same(tensorboard_rows(run.path / "tensorboard"), store_rows(run.path), 1e-6)
    capsys.readouterr()
    assert main(["export", str(run.path), "--to", "tensorboard"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds TensorBoard event files already" in err
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    assert main(["export", str(run.path), "--to", "wandb", "--out", str(tmp_path / "w")]) == 0
    _same(wandb_rows(tmp_path / "w" / "wandb", 2), store_rows(run.path), 1e-12)
    assert main(["export", str(tmp_path / "nothing"), "--to", "wandb"]) == 2


def test_bad_or_missing_trackers_are_refused_before_anything_is_written(
    tmp_path, capsys, monkeypatch
):
    out = tmp_path / "r"
    assert main(["run", "bit-flipping", "--tasks", "1", "--set", "log=mlflow", "--out", str(out)])
    assert "unknown tracker 'mlflow'" in capsys.readouterr().err and not out.exists()
    monkeypatch.setattr(trackers.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"pip install 'contlearn\[tensorboard\]'"):
        trackers.parse_trackers("tensorboard")
    assert trackers.parse_trackers("none") == []


def test_a_resumed_run_logs_each_step_once(tmp_path):
    out = tmp_path / "r"
    config = {**SMALL, "log": "tensorboard", "checkpoint_every": 50}
    contlearn.run("bit-flipping", seeds=2, tasks=2, config=config, out=out)
    contlearn.resume(out, tasks=3)
    tracked = tensorboard_rows(out / "tensorboard")
    _same(tracked, store_rows(out), 1e-6)
