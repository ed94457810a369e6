"""Issue #20's Done-when with the paper's networks: ``contlearn run continual-imagenet`` with
``network=convnet`` and ``incremental-cifar100`` with ``network=resnet18`` on generated data in
the official formats (tests/image_files.py), two seeds, two tasks, held-out scores, probes on
the conv layers."""

from __future__ import annotations

import pytest

from contlearn.results.store import load_runs
from tests.test_image_streams import INCREMENTAL, PAIRS


@pytest.mark.parametrize(
    "name, data, options",
    [
        (
            "continual-imagenet",
            "imagenet32",
            {**PAIRS, "train_per_class": 4, "network": "convnet", "init": "torch_default"},
        ),
        pytest.param(  # (~30 s: ResNet-18 on 32 × 32 images on a CPU)
            "incremental-cifar100",
            "cifar100",
            {**INCREMENTAL, "network": "resnet18"},
            marks=pytest.mark.slow,
        ),
    ],
)
def test_the_paper_networks_run_the_image_streams_from_the_cli(
    name, data, options, image_data, cli, tmp_path
):
    values = {**options, "probe_size": 8, "data_dir": image_data / data}
    sets = [x for k, v in values.items() for x in ("--set", f"{k}={v}")]
    args = ["--seeds", 2, "--tasks", 2, "--learner", "cbp", "--out", tmp_path / "r", *sets]
    code, out, err = cli("run", name, *args)
    assert code == 0, err
    df = load_runs(tmp_path / "r")
    held = df[df["metric"] == "test_accuracy"]
    assert sorted(held["task"].unique()) == [0, 1] and sorted(held["seed"].unique()) == [0, 1]
    assert held["value"].between(0, 1).all()
    first = "conv1" if options["network"] == "convnet" else "layer1.0.conv1"
    assert first in set(df[df["metric"] == "effective_rank"]["layer"])
