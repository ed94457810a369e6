"""Small comforts of the command line (issue #19): --version, a --help that does not import
torch, dir(contlearn), and a probe panel that does not overwrite the decay plot."""

from __future__ import annotations

import subprocess
import sys

import contlearn


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "contlearn", *args], capture_output=True, text=True
    )


def test_version_and_help_without_torch() -> None:
    proc = _cli("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"contlearn {contlearn.__version__}"
    code = (
        "import sys; from contlearn.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print('torch' in sys.modules)"
    )
    probe = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert probe.stdout.strip().splitlines()[-1] == "False", probe.stdout


def test_dir_lists_the_lazy_names() -> None:
    names = dir(contlearn)
    assert {"run", "resume", "load_runs", "RunResult", "ContlearnError", "__version__"} <= set(
        names
    )
    assert "Any" not in names


def test_probe_panel_and_decay_plot_have_their_own_default_files(tmp_path) -> None:
    out = tmp_path / "run"
    contlearn.run(
        "permuted-mnist",
        seeds=1,
        tasks=2,
        config={"examples_per_task": 40, "hidden": "8", "probe_size": 32},
        out=out,
        progress=False,
    )
    assert _cli("plot", str(out)).returncode == 0
    assert _cli("plot", str(out), "--probes").returncode == 0
    assert (out / "plot.png").stat().st_size > 10_000
    assert (out / "probes.png").stat().st_size > 10_000
