"""Runs on the image streams: the CLI on generated data, determinism, exact resume mid-epoch,
missing data sets, and agents with and without ``outputs`` (the held-out score's need)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

import contlearn
from contlearn.results.curves import default_metric
from contlearn.results.store import load_runs
from contlearn.running.config import resolve
from tests.conftest import snapshot
from tests.test_image_streams import INCREMENTAL, PAIRS, _stream

TINY_RUN = {"hidden": "8", "probe_size": 16}


def _frame(path) -> pd.DataFrame:
    df = load_runs(path).drop(columns=["run"])
    return df.sort_values(["seed", "step", "metric", "layer"]).reset_index(drop=True)


@pytest.mark.parametrize(
    "name, options",
    [
        ("continual-mnist-pairs", PAIRS),
        ("continual-imagenet", {**PAIRS, "train_per_class": 4}),
        ("incremental-cifar100", INCREMENTAL),
    ],
)
def test_cli_runs_two_seeds_two_tasks_with_held_out_scores(
    name, options, image_data, cli, tmp_path
):
    data = {"continual-imagenet": "imagenet32", "incremental-cifar100": "cifar100"}
    sets = [f"{k}={v}" for k, v in {**options, **TINY_RUN}.items()]
    if name in data:
        sets.append(f"data_dir={image_data / data[name]}")
    args = [x for kv in sets for x in ("--set", kv)]
    code, out, err = cli("run", name, "--seeds", 2, "--tasks", 2, "--out", tmp_path / "r", *args)
    assert code == 0, err
    df = load_runs(tmp_path / "r")
    held = df[df["metric"] == "test_accuracy"]
    assert sorted(held["task"].unique()) == [0, 1] and sorted(held["seed"].unique()) == [0, 1]
    assert held["step"].max() == _stream(name, [0], **options).steps_until(
        2
    )  # --tasks counts whole increments
    assert held["value"].between(0, 1).all()
    assert default_metric(df) == "test_accuracy"  # what summary and plot score these runs by
    code, out, err = cli("summary", tmp_path / "r")
    assert code == 0 and "score: test_accuracy" in out


@pytest.mark.parametrize(
    "name, missing",
    [
        ("incremental-cifar100", "contlearn data download cifar100"),
        ("permuted-cifar10", "contlearn data download cifar10"),
        ("continual-imagenet", "Imagenet32_train.zip from https://image-net.org"),
    ],
)
def test_a_missing_dataset_is_one_line_exit_2_nothing_written(
    name, missing, cli, tmp_path, monkeypatch
):
    monkeypatch.setenv("CONTLEARN_DATA", str(tmp_path / "empty"))
    monkeypatch.setenv("CONTLEARN_IMAGENET32", str(tmp_path / "empty" / "imagenet32"))
    before = snapshot(tmp_path)
    code, out, err = cli("run", name, "--seeds", 2, "--tasks", 2, "--out", tmp_path / "r")
    assert code == 2 and missing in err and len(err.strip().splitlines()) == 1
    assert "Traceback" not in err and snapshot(tmp_path) == before
    assert not (tmp_path / "r").exists()


def test_runs_are_deterministic_and_resume_mid_epoch_exactly(image_data, tmp_path):
    config = {**INCREMENTAL, **TINY_RUN, "checkpoint_every": 5}
    full = contlearn.run(
        "incremental-cifar100", seeds=2, tasks=3, config=config, out=tmp_path / "a"
    )
    again = contlearn.run(
        "incremental-cifar100", seeds=2, tasks=3, config=config, out=tmp_path / "b"
    )
    pd.testing.assert_frame_equal(_frame(full.path), _frame(again.path))
    part = tmp_path / "part"
    contlearn.run("incremental-cifar100", seeds=2, steps=13, config=config, out=part)  # mid-epoch
    contlearn.resume(part, tasks=3)
    pd.testing.assert_frame_equal(_frame(part), _frame(full.path))
    assert json.loads(Path(part / "config.json").read_text())["stream"] == "incremental-cifar100"


@pytest.mark.parametrize("predict", ["goodness", "head"])
def test_forward_forward_outputs_are_its_answers_without_learning(predict):
    from contlearn.running.runner import make_agent, open_streams

    cfg = resolve(
        {"stream": "continual-mnist-pairs", "agent": "ff", "hidden": "8,8", "seeds": 2, **PAIRS}
        | {"predict": predict}
    )
    with open_streams(cfg) as streams:
        agent = make_agent(cfg, streams[0])
        batch = streams[0].next()
        out = agent.outputs(batch.obs)
        assert torch.equal(out, agent.outputs(batch.obs))
        assert torch.equal(out, agent.act(batch.obs))


def test_cli_refuses_a_plug_in_agent_without_outputs_before_writing(cli, tmp_path):
    agent = Path(__file__).resolve().parents[1] / "scripts" / "my_agent.py"
    sets = [x for k, v in PAIRS.items() for x in ("--set", f"{k}={v}")]
    base = ["run", "continual-mnist-pairs", "--agent", f"{agent}:LinearAgent", *sets]
    code, out, err = cli(*base, "--tasks", 1, "--out", tmp_path / "r")
    assert code == 2 and "outputs(obs)" in err and "held_out=false" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "r").exists()
    code, out, err = cli(*base, "--tasks", 1, "--set", "held_out=false", "--out", tmp_path / "r")
    assert code == 0, err
    assert "test_accuracy" not in set(load_runs(tmp_path / "r")["metric"])


@pytest.mark.parametrize(
    "name, option, data",
    [
        ("incremental-cifar100", "train_per_class=8", "cifar100"),  # + 50 validation > 8
        ("incremental-cifar100", "test_per_class=4", "cifar100"),
        ("continual-imagenet", "train_per_class=8", "imagenet32"),
    ],
)
def test_splits_larger_than_a_class_are_refused_before_the_run(
    name, option, data, image_data, cli, tmp_path
):
    args = ["--set", option, "--set", "batch_size=2", "--set", f"data_dir={image_data / data}"]
    args += ["--out", tmp_path / "r"]
    code, out, err = cli("run", name, "--tasks", 1, *args)
    assert code == 2 and "fewer than the" in err and "lower" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "r").exists()
