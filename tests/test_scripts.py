"""Every script in scripts/ runs on a tiny budget."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(args, cwd, timeout=300):
    proc = subprocess.run(
        [sys.executable, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def test_demo_on_a_tiny_budget(tmp_path):
    out = tmp_path / "demo"
    proc = _run(
        [
            ROOT / "scripts" / "demo.py",
            "--out",
            out,
            "--tasks",
            "3",
            "--examples-per-task",
            "200",
            "--seeds",
            "2",
            "--hidden",
            "16,16",
            "--probe-size",
            "64",
            "--replacement-rate",
            "0.01",
        ],
        ROOT,
    )
    for name in ("decay.png", "probes.png"):
        assert (out / name).stat().st_size > 10_000
    assert (out / "bp" / "config.json").is_file() and (out / "cbp" / "config.json").is_file()
    assert "cbp" in proc.stdout
    again = _run(
        [
            ROOT / "scripts" / "demo.py",
            "--out",
            out,
            "--tasks",
            "3",
            "--examples-per-task",
            "200",
            "--seeds",
            "2",
            "--hidden",
            "16,16",
            "--probe-size",
            "64",
            "--replacement-rate",
            "0.01",
        ],
        ROOT,
    )
    assert "bp:" in again.stdout  # re-running resumes the finished runs instead of failing


def test_credit_plasticity_on_a_tiny_budget(tmp_path):
    out = tmp_path / "credit"
    args = [ROOT / "scripts" / "credit_plasticity.py", "--out", out, "--tasks", "2"]
    args += ["--examples-per-task", "100", "--seeds", "2", "--hidden", "8,8"]
    args += ["--probe-size", "32", "--rules", "bp,dfa", "--learners", "bp,cbp"]
    proc = _run(args, ROOT)
    for name in ("decay.png", "probes.png", "alignment.png"):
        assert (out / name).stat().st_size > 10_000
    for pair in ("bp+bp", "bp+cbp", "dfa+bp", "dfa+cbp"):
        assert (out / pair / "config.json").is_file()
    assert "dfa+cbp" in proc.stdout  # the summary's learner label


def test_my_agent_script(tmp_path):
    proc = _run([ROOT / "scripts" / "my_agent.py"], tmp_path)
    assert "run written to" in proc.stdout
    assert list((tmp_path / "runs").iterdir())


@pytest.mark.mujoco
def test_bench_rl_on_a_tiny_budget():
    proc = _run(
        [
            ROOT / "scripts" / "bench_rl.py",
            "--steps",
            "2048",
            "--raw-steps",
            "100",
            "--rounds",
            "1",
        ],
        ROOT,
    )
    assert "paper-auto: num_envs=1" in proc.stdout and "paper-plain: num_envs=1" in proc.stdout
    assert "median paper-auto:" in proc.stdout and "of raw" in proc.stdout


def test_bench_online_helpers_on_a_tiny_budget(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    from bench_timing import Timed
    from naive_online import NaiveLearner

    from contlearn.running.config import resolve

    cfg = resolve(
        {"stream": "permuted-mnist", "learner": "cbp", "hidden": "16,16", "probes": "none"}
    )
    naive = NaiveLearner(cfg, seed=0)
    timed = Timed(naive.run, 1, 1, warmup=20)
    timed.repeat(0.05)
    assert naive.t > 30 and timed.median > 0


@pytest.mark.slow
def test_bench_online_adam_rows_on_a_tiny_budget(tmp_path):
    """``--only``: the Adam rows at both widths and the Adam roofline, their targets, JSON."""
    out = tmp_path / "bench.json"
    args = [ROOT / "scripts" / "bench_online.py", "--quick", "--only", "bp-adam"]
    proc = _run([*args, "--repeats", "1", "--seconds", "0.05", "--json", out], ROOT)
    assert "adam roofline (width 2000, bp-adam, R=1) [block]" in proc.stdout
    result = json.loads(out.read_text())
    assert [(r["width"], r["R"]) for r in result["rows"]] == [(100, 1), (100, 32), (2000, 1)]
    assert set(result["targets"]) == {
        "bp-adam_w100_R32_vs_naive >= 20",
        "bp-adam_w2000_R1_roofline_fraction >= 0.6",
    }


def test_ff_plasticity_on_a_tiny_budget(tmp_path):
    out = tmp_path / "ff"
    args = [ROOT / "scripts" / "ff_plasticity.py", "--out", out, "--tasks", "2"]
    args += ["--examples-per-task", "60", "--seeds", "2", "--hidden", "8,8", "--probe-size", "32"]
    _run(args, ROOT)
    for name in ("decay.png", "probes.png", "goodness.png"):
        assert (out / name).stat().st_size > 10_000
    for pair in ("ff+bp", "ff+cbp", "online+bp", "online+cbp"):
        assert (out / pair / "config.json").is_file()


def test_bench_ff_on_a_tiny_budget():
    proc = _run(
        [
            ROOT / "scripts" / "bench_ff.py",
            *["--steps", "5", "--seeds", "2", "--repeats", "1", "--seconds", "0.05"],
        ],
        ROOT,
    )
    assert '"speedup"' in proc.stdout


def test_bench_streams_and_bench_plugin_on_a_tiny_budget():
    import json

    proc = _run(
        [
            ROOT / "scripts" / "bench_streams.py",
            "--seeds",
            "2",
            "--tasks",
            "1",
            "--naive-steps",
            "20",
        ],
        ROOT,
    )
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(out["rows"]) == 2 and out["speedup"] > 0
    proc = _run(
        [
            ROOT / "scripts" / "bench_plugin.py",
            "--examples",
            "20",
            "--tasks",
            "1",
            "--seeds",
            "1",
            "--repeats",
            "1",
        ],
        ROOT,
    )
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [r["threads"] for r in out["rows"]] == ["default", 1, 2]


def test_bench_cuda_rows_on_the_cpu_and_the_gpu_check_parses(tmp_path):
    import json

    out = tmp_path / "cuda.json"
    args = ["--device", "cpu", "--seconds", "0.05", "--repeats", "1", "--json", out]
    _run([ROOT / "scripts" / "bench_cuda.py", *args], ROOT / "scripts")
    rows = json.loads(out.read_text())["rows"]
    assert [(r["width"], r["R"]) for r in rows] == [(100, 32), (100, 256), (2000, 1), (2000, 8)]
    assert all(r["learner_steps_per_s"] > 0 and r["device"] == "cpu" for r in rows)
    for script in ("gpu_check.sh", "gpu_wheels.sh"):
        subprocess.run(["bash", "-n", ROOT / "scripts" / script], check=True)


def test_bench_conv_on_a_tiny_budget():
    args = ["--steps", "1", "--seeds", "1,2", "--batch", "2", "--side", "24", "--resnet-steps", "1"]
    proc = _run([ROOT / "scripts" / "bench_conv.py", *args], ROOT)
    assert '"convnet R=2"' in proc.stdout and '"resnet18 R=2"' in proc.stdout
