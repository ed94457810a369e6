"""The command line: runs, listings, plug-in agents, and one-line errors with exit code 2."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from contlearn.data.datasets import PACKAGED_DIR
from contlearn.results.store import load_runs
from tests.conftest import snapshot

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--set", "examples_per_task=100", "--set", "hidden=8"]


def _one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("contlearn: error: "), err
    for frag in fragments:
        assert frag in err, err


def test_run_prints_the_run_dir_and_writes_metrics(cli, tmp_path):
    code, out, err = cli(
        "run",
        "permuted-mnist",
        "--seeds",
        "3",
        "--tasks",
        "5",
        "--set",
        "examples_per_task=500",
        "--out",
        tmp_path / "r",
    )
    assert code == 0, err
    assert out.strip() == str(tmp_path / "r")
    df = load_runs(tmp_path / "r")
    assert len(df[df.metric == "accuracy"]) == 15


def test_list_shows_every_kind_with_options(cli):
    code, out, _ = cli("list")
    assert code == 0
    for text in (
        "permuted-mnist",
        "label-shuffled-mnist",
        "bit-flipping",
        "examples_per_task",
        "learners:",
        "bp",
        "proper-adam",
        "agents:",
        "online",
        "hidden = 100,100,100",
    ):
        assert text in out
    code, out, _ = cli("list", "learners")
    assert code == 0 and "streams:" not in out and "bp" in out


def test_config_file_and_set_precedence(cli, tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        'stream = "bit-flipping"\ntasks = 2\nexamples_per_task = 50\nlr = 0.5\n'
        '[learner]\nname = "bp"\n'
    )
    code, _, err = cli("run", "--config", cfg, "--set", "lr=0.02", "--out", tmp_path / "r")
    assert code == 0, err
    import json

    config = json.loads((tmp_path / "r" / "config.json").read_text())
    assert config["lr"] == 0.02 and config["tasks"] == 2 and config["hidden"] == "5"


BAD = [
    (["run", "nope"], "unknown stream 'nope'"),
    (["run", "permuted-mnist", "--learner", "magic"], "unknown learner 'magic'"),
    (["run", "permuted-mnist", "--set", "hiden=5"], "did you mean 'hidden'"),
    (["run", "permuted-mnist", "--set", "lr"], "KEY=VALUE"),
    (["run", "permuted-mnist", "--set", "lr=-0.1"], "lr"),
    (["run", "permuted-mnist", "--set", "lr=fast"], "not a number"),
    (["run", "permuted-mnist", "--set", "lr=nan"], "finite"),
    (["run", "permuted-mnist", "--set", "examples_per_task=-3"], "examples_per_task"),
    (
        ["run", "permuted-mnist", "--set", "examples_per_task=10", "--set", "batch_size=3"],
        "multiple of batch_size",
    ),
    (["run", "permuted-mnist", "--set", "hidden=100,-5"], "hidden"),
    (["run", "permuted-mnist", "--set", "hidden=abc"], "hidden"),
    (["run", "permuted-mnist", "--set", "activation=cosine"], "activation"),
    (["run", "permuted-mnist", "--set", "dataset=imagenet"], "dataset"),
    (["run", "permuted-mnist", "--seeds", "0"], "seeds"),
    (["run", "permuted-mnist", "--seeds", "two"], "seeds"),
    (["run", "permuted-mnist", "--tasks", "-1"], "tasks"),
    (["run", "permuted-mnist", "--set", "boundaries_visible=maybe"], "boolean"),
    (["run", "permuted-mnist", "--set", "learner.rate=1"], "learner.rate"),
    (["run"], "no stream given"),
    (["run", "permuted-mnist", "--config", "/nonexistent.toml"], "cannot read config"),
    (["run", "permuted-mnist", "--agent", "no_such_module:Agent"], "cannot import"),
    (["run", "permuted-mnist", "--agent", "scripts/my_agent.py:Nope"], "no class 'Nope'"),
    (["run", "permuted-mnist", "--agent", "justaname"], "unknown agent"),
    (
        ["run", "permuted-mnist", "--agent", "scripts/my_agent.py:LinearAgent", "--learner", "bp"],
        "takes no learner",
    ),
    (
        ["run", "permuted-mnist", "--set", "dataset=full", "--set", "data_dir=/nonexistent"],
        "contlearn data download mnist",
    ),
    (["plot", "/nonexistent/run"], "does not exist"),
]


@pytest.mark.parametrize(("args", "fragment"), BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(
    cli, tmp_path, monkeypatch, args, fragment
):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "out"
    extra = ["--out", out] if args[:1] == ["run"] else []
    code, _, err = cli(*args, *extra)
    _one_line_error(code, err, fragment)
    assert not out.exists()


def test_malformed_and_unknown_config_files(cli, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("stream = [unclosed\n")
    _one_line_error(*cli("run", "--config", bad, "--out", tmp_path / "o")[::2], "malformed")
    unknown = tmp_path / "unknown.toml"
    unknown.write_text('stream = "bit-flipping"\nwidth = 3\n')
    _one_line_error(*cli("run", "--config", unknown, "--out", tmp_path / "o")[::2], "'width'")
    assert not (tmp_path / "o").exists()


def test_existing_run_is_refused_and_untouched_unless_overwrite(cli, tmp_path):
    run_dir = tmp_path / "r"
    assert cli("run", "bit-flipping", "--tasks", "1", *FAST, "--out", run_dir)[0] == 0
    before = snapshot(run_dir)
    code, _, err = cli("run", "bit-flipping", "--tasks", "2", *FAST, "--out", run_dir)
    _one_line_error(code, err, "already holds a run", "--overwrite")
    assert snapshot(run_dir) == before
    code, _, err = cli(
        "run", "bit-flipping", "--tasks", "2", *FAST, "--out", run_dir, "--overwrite"
    )
    assert code == 0, err
    assert load_runs(run_dir).task.max() == 1


def test_non_run_folder_is_never_overwritten(cli, tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("precious")
    for flags in ([], ["--overwrite"]):
        code, _, err = cli("run", "bit-flipping", *FAST, "--out", folder, *flags)
        _one_line_error(code, err, "not empty")
    assert (folder / "notes.txt").read_text() == "precious"


def test_corrupt_data_file_is_one_line_error(cli, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for f in PACKAGED_DIR.glob("*.gz"):
        shutil.copy(f, data / f.name)
    (data / "t10k-labels-idx1-ubyte.gz").write_bytes(b"garbage")
    code, _, err = cli(
        "run", "permuted-mnist", "--set", f"data_dir={data}", "--out", tmp_path / "o"
    )
    _one_line_error(code, err, "md5")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("ref", ["scripts/my_agent.py:LinearAgent", "scripts.my_agent:LinearAgent"])
def test_plugin_agent_through_the_cli(cli, tmp_path, monkeypatch, ref):
    monkeypatch.chdir(ROOT)
    code, _, err = cli(
        "run",
        "permuted-mnist",
        "--agent",
        ref,
        "--seeds",
        "2",
        "--tasks",
        "2",
        "--set",
        "examples_per_task=300",
        "--set",
        "lr=0.1",
        "--out",
        tmp_path / "r",
    )
    assert code == 0, err
    df = load_runs(tmp_path / "r")
    acc = df[df.metric == "accuracy"]
    assert len(acc) == 4 and set(df.learner) == {"LinearAgent"}
    assert acc.value.mean() > 0.5


def test_plugin_agent_through_the_python_api(tmp_path):
    sys.path.insert(0, str(ROOT))
    try:
        from scripts.my_agent import LinearAgent
    finally:
        sys.path.remove(str(ROOT))
    import contlearn

    res = contlearn.run(
        "label-shuffled-mnist",
        agent=LinearAgent,
        seeds=2,
        tasks=2,
        config={"examples_per_task": 300, "lr": 0.1},
        out=tmp_path / "r",
    )
    df = res.metrics()
    assert len(df[df.metric == "accuracy"]) == 4
    assert res.config["agent"].endswith(":LinearAgent") and res.config["lr"] == 0.1


def test_python_dash_m_entry_point(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "contlearn",
            "run",
            "bit-flipping",
            "--tasks",
            "1",
            *FAST,
            "--out",
            str(tmp_path / "r"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    proc = subprocess.run(
        [sys.executable, "-m", "contlearn", "run", "bogus"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
