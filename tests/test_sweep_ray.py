"""The Ray backend, for real: a local Ray instance on 127.0.0.1 with 2 CPUs, started and shut
down by this module; sweeps connect to it from another process with ``--address``."""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile

import pandas as pd
import pytest

import contlearn
from contlearn.data.datasets import PACKAGED_DIR
from contlearn.results.store import load_runs
from contlearn.sweeps.plan import plan_sweep, run_sweep
from tests.test_sweep import GRID, TINY, _files, _frame, _write

pytestmark = pytest.mark.ray
if importlib.util.find_spec("ray") is None:
    pytest.skip("ray is not installed (pip install 'contlearn[ray]')", allow_module_level=True)

# Loopback only (Ray otherwise advertises the machine's outward address) and no usage report.
# Ray reads these when it is imported, so it is imported only after they are set.
RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}


@pytest.fixture(scope="module")
def ray_address():
    """The address of a 2-CPU Ray instance on 127.0.0.1, shut down after the module."""
    tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths are limited
    with pytest.MonkeyPatch.context() as mp:
        for key, value in RAY_ENV.items():
            mp.setenv(key, value)
        ray = importlib.import_module("ray")
        constants = importlib.import_module("ray._private.ray_constants")
        if getattr(constants, "ENABLE_RAY_CLUSTER", True):
            pytest.skip("ray was imported before its loopback-only setting could apply")
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            _temp_dir=tmp,
            log_to_driver=False,
        )
        try:
            yield ray.get_runtime_context().gcs_address
        finally:
            ray.shutdown()
            shutil.rmtree(tmp, ignore_errors=True)


def _sweep_cli(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, **RAY_ENV, "CI": "true"}
    return subprocess.run(
        [sys.executable, "-m", "contlearn", "sweep", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def test_ray_sweep_equals_local_sweep(tmp_path, ray_address):
    assert ray_address.startswith("127.0.0.1:")
    spec = _write(tmp_path, GRID)
    local = run_sweep(plan_sweep(spec, tmp_path / "local"), workers=1)
    assert local.exit_code == 0
    proc = _sweep_cli(
        spec,
        "--out",
        tmp_path / "ray",
        "--backend",
        "ray",
        "--address",
        ray_address,
        "--cpus-per-run",
        "1",
    )
    assert proc.returncode == 0, proc.stderr
    assert "8 finished, 0 failed" in proc.stderr
    assert sorted(p.name for p in (tmp_path / "ray").iterdir()) == sorted(
        p.name for p in (tmp_path / "local").iterdir()
    )
    pd.testing.assert_frame_equal(_frame(tmp_path / "ray"), _frame(tmp_path / "local"))


def test_ray_sweep_reports_failures_resumes_and_skips_finished_runs(tmp_path, ray_address):
    good, missing = tmp_path / "mnist_ok", tmp_path / "mnist_fixed_later"
    shutil.copytree(PACKAGED_DIR, good)
    spec = _write(
        tmp_path,
        TINY + f"seeds = 2\nseeds_per_run = 1\ncheckpoint_every = 30\n"
        f'[grid]\ndata_dir = ["{good}", "{missing}"]\n',
    )
    root = tmp_path / "root"
    runs = plan_sweep(spec, root).runs
    ok0, ok1, bad0, bad1 = (root / r.name for r in runs)
    contlearn.run(config={**runs[1].config, "tasks": 0, "steps": 130}, out=ok1)  # interrupted

    result = run_sweep(plan_sweep(spec, root), backend="ray")  # this process's Ray instance
    assert result.exit_code == 1 and sorted(result.names("finished")) == [ok0.name, ok1.name]
    report = result.report()
    assert "2 finished, 2 failed" in report and str(missing) in report
    for bad in (bad0, bad1):
        assert f"failed {bad.name}: " in report
    whole = contlearn.run(config=runs[1].config, out=tmp_path / "whole")
    pd.testing.assert_frame_equal(
        _frame(ok1).drop(columns="run"), _frame(whole.path).drop(columns="run")
    )

    before = {p.name: _files(p) for p in (ok0, ok1)}
    shutil.copytree(PACKAGED_DIR, missing)  # the fix
    result = run_sweep(plan_sweep(spec, root), backend="ray")
    assert result.exit_code == 0 and result.skipped == [ok0.name, ok1.name]
    assert {p.name: _files(p) for p in (ok0, ok1)} == before
    assert load_runs(root).run.nunique() == 4


def test_run_time_registrations_and_file_plug_ins_reach_ray_tasks(
    tmp_path, monkeypatch, ray_address
):
    from contlearn.envs import streams
    from tests.test_plugin_streams import EXAMPLES

    monkeypatch.setattr(streams, "_entries", dict(streams._entries))  # (undone afterwards)
    (tmp_path / "drift.py").write_text(EXAMPLES.read_text())
    streams.register("drift-ray-v0", f"{tmp_path / 'drift.py'}:DriftStream")
    spec = {"stream": "drift-ray-v0", "tasks": 2, "probes": "none", "grid": {"hidden": [4, 8]}}
    result = run_sweep(plan_sweep(spec, tmp_path / "root"), backend="ray")  # (the module's Ray)
    assert result.exit_code == 0, result.report()
    assert set(load_runs(tmp_path / "root").stream) == {"drift-ray-v0"}


def test_unreachable_ray_address_is_one_line_and_writes_nothing(cli, tmp_path, monkeypatch):
    for key, value in RAY_ENV.items():  # in case this is the first test to import ray
        monkeypatch.setenv(key, value)
    code, _, err = cli(
        "sweep",
        _write(tmp_path, TINY),
        "--out",
        tmp_path / "root",
        "--backend",
        "ray",
        "--address",
        "127.0.0.1:1",
    )
    assert code == 2 and err.count("\n") == 1
    assert "cannot reach Ray at 127.0.0.1:1" in err
    assert not (tmp_path / "root").exists()
