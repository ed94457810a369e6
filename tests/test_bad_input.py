"""Bad input, systematically: fuzzed config values and files, and a disk that fills up."""

from __future__ import annotations

import resource
import string
import subprocess
import sys
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from contlearn.cli import main
from contlearn.results.store import load_runs

ROOT = Path(__file__).resolve().parents[1]
KEYS = [
    "examples_per_task",
    "batch_size",
    "num_bits",
    "slow_bits",
    "beta",
    "hidden",
    "lr",
    "activation",
    "optimizer",
    "momentum",
    "seeds",
    "seed",
    "tasks",
    "steps",
    "probes",
    "probe_size",
    "learner.replacement_rate",
    "flush_rows",
    "boundaries_visible",
    "init",
    "on_divergence",
    "nonsense",
    "learner",
]
VALUES = st.one_of(
    st.integers(-5, 300).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(str),
    st.sampled_from(
        [
            "",
            "true",
            "nope",
            "1e-3",
            "1,2",
            "-1",
            "0",
            "relu",
            "adam",
            "2,x",
            "default",
            "none",
            "cbp",
            "1e400",
            "1_000",
            " 7 ",
        ]
    ),
    st.text(string.printable, max_size=8),
)


def _run(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, err


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(st.tuples(st.sampled_from(KEYS), VALUES), max_size=3))
def test_fuzzed_settings_run_or_fail_in_one_line(tmp_path_factory, capsys, pairs):
    out = tmp_path_factory.mktemp("fuzz") / "run"
    sets = [x for k, v in pairs for x in ("--set", f"{k}={v}")]
    # base keeps valid runs tiny; fuzzed keys come later and win
    code, err = _run(
        capsys,
        "run",
        "bit-flipping",
        "--steps",
        "3",
        "--set",
        "probes=none",
        "--set",
        "examples_per_task=2",
        "--set",
        "hidden=3",
        *sets,
        "--out",
        out,
    )
    if code == 0:
        assert (out / "config.json").is_file()
    else:
        assert code == 2, err
        assert err.count("\n") == 1 and err.startswith("contlearn: error: "), err


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.text(max_size=60))
def test_fuzzed_config_files_never_traceback(tmp_path_factory, capsys, text):
    folder = tmp_path_factory.mktemp("cfg")
    cfg = folder / "c.toml"
    cfg.write_text(
        'stream = "bit-flipping"\nsteps = 2\nexamples_per_task = 2\nprobes = "none"\n' + text,
        encoding="utf-8",
    )
    code, err = _run(capsys, "run", "--config", cfg, "--out", folder / "run")
    assert code in (0, 2), err
    if code == 2:
        assert err.count("\n") == 1, err


def _limit_file_size():
    resource.setrlimit(resource.RLIMIT_FSIZE, (150_000, 150_000))


def test_disk_full_is_a_clear_error_and_earlier_data_survives(tmp_path):
    out = tmp_path / "r"
    # checkpoints of a 64-64 net exceed the file-size limit; metric parts do not
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "contlearn",
            "run",
            "permuted-mnist",
            "--tasks",
            "3",
            "--set",
            "examples_per_task=100",
            "--set",
            "hidden=64,64",
            "--set",
            "probes=none",
            "--set",
            "checkpoint_every=150",
            "--set",
            "flush_rows=2",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=_limit_file_size,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "cannot write" in proc.stderr
    assert "resume" in proc.stderr
    df = load_runs(out)  # what was written before is intact and readable
    assert (df.metric == "accuracy").sum() >= 1
    assert not list(out.rglob("*.tmp"))
