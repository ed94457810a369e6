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


def test_ctrl_c_during_start_up_is_one_line_and_exit_130(tmp_path) -> None:
    """SIGINT at several moments of a run's start (imports, config, building the stream and
    agent, the first steps): one line on stderr, no traceback, exit 130 (or 0 if the tiny run
    was already done), and never a half-made run that `resume` cannot continue. (Python's own
    start, before contlearn's code runs, is not covered: docs/reliability.md.)"""
    import signal
    import time

    for i, delay in enumerate((0.15, 0.4, 0.8, 1.5, 2.5)):
        out = tmp_path / f"run{i}"
        proc = subprocess.Popen(
            [sys.executable, "-m", "contlearn", "run", "permuted-mnist", "--seeds", "1"]
            + ["--tasks", "1", "--set", "examples_per_task=50", "--set", "hidden=8"]
            + ["--out", str(out)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
        # (-SIGINT: the signal came while the interpreter was already exiting, the run done)
        assert proc.returncode in (0, 130, -signal.SIGINT), (delay, proc.returncode, err)
        assert "Traceback" not in err, (delay, err)
        if proc.returncode == 130:
            assert len(err.strip().splitlines()) == 1, (delay, err)
        if (out / "config.json").exists():  # whatever was written can be continued
            again = _cli("resume", str(out))
            assert again.returncode == 0, (delay, again.stderr)


def test_a_ctrl_c_inside_a_commands_imports_waits_for_them(tmp_path, monkeypatch, capsys) -> None:
    """The deterministic form of the case above: a module that receives SIGINT while it is
    being imported still finishes importing, and the command then stops with exit 130."""
    import signal

    from contlearn import cli

    (tmp_path / "cl_fake_heavy.py").write_text(
        "import os, signal\nos.kill(os.getpid(), signal.SIGINT)\nFINISHED = True\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cli._IMPORTS, "list", ("cl_fake_heavy",))
    before = signal.getsignal(signal.SIGINT)  # (SIG_IGN when the suite runs in the background)
    assert cli.main(["list", "streams"]) == 130
    import cl_fake_heavy

    assert cl_fake_heavy.FINISHED
    assert capsys.readouterr().err.strip() == "contlearn: interrupted"
    assert signal.getsignal(signal.SIGINT) is before


class _Shell:
    """What IPython's get_ipython() returns in a Jupyter kernel (its config names the app)."""

    config = {"IPKernelApp": {"connection_file": "kernel.json"}}


def test_a_notebook_gets_a_progress_bar_by_default(monkeypatch) -> None:
    import types

    from contlearn.loop import progress

    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    assert not progress.in_notebook() and not progress.want_progress()
    fake = types.ModuleType("IPython")
    fake.get_ipython = lambda: _Shell()  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "IPython", fake)
    assert progress.in_notebook() and progress.want_progress()
    monkeypatch.setenv("CI", "true")
    assert not progress.want_progress()  # (never under CI)
    try:
        import ipywidgets  # noqa: F401

        expected = "tqdm.notebook"
    except ImportError:
        expected = "tqdm.std"  # (no widget library: the text bar)
    assert progress._bar_class().__module__ == expected
    fake.get_ipython = lambda: None  # type: ignore[attr-defined]  # (IPython, no kernel)
    assert not progress.in_notebook()


def test_figures_show_inline_in_a_notebook_and_contlearn_plot_draws_runs(tmp_path) -> None:
    out = tmp_path / "run"
    contlearn.run(
        "bit-flipping",
        seeds=2,
        tasks=2,
        config={"examples_per_task": 50, "hidden": "5", "probe_size": 10},
        out=out,
    )
    fig = contlearn.plot(out)
    png = fig._repr_png_()  # (what IPython displays as a cell's value)
    assert png.startswith(b"\x89PNG")
    assert "mean of 2 seeds" in fig.axes[0].get_title()
    probes = contlearn.plot(out, probes=True, out=tmp_path / "p.svg")
    assert (tmp_path / "p.svg").is_file() and len(probes.axes) > 1
