"""Plug-in streams (``file.py:Class`` / ``module:Class`` / a class), ``check_stream`` over
every registered stream, runs that resume from any directory, and plug-ins in sweep workers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

import contlearn
from contlearn.cli import main
from contlearn.envs import StreamCheckError, check_stream, streams
from contlearn.errors import ConfigError
from contlearn.registry import check_portable
from contlearn.running.plugins import class_ref
from contlearn.sweeps.plan import plan_sweep, run_sweep
from tests import plugin_stream_examples as examples

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = Path(examples.__file__)
AGENT = ROOT / "scripts" / "my_agent.py"
TINY = {"hidden": "4", "probes": "none"}


def _params() -> list:
    return [
        pytest.param(n, marks=[pytest.mark.mujoco] if streams.get(n).kind == "rl" else [], id=n)
        for n in streams.names()
    ]


@pytest.mark.parametrize("name", _params())
def test_every_registered_stream_keeps_its_protocol(name, image_data):
    check_stream(name)  # (the registry's every stream: a new one is checked without a word)


def test_a_plug_in_stream_passes_by_class_by_module_and_by_file():
    check_stream(examples.DriftStream)
    check_stream("tests.plugin_stream_examples:DriftStream", seeds=(3, 4, 5), steps=7)
    check_stream(f"{EXAMPLES}:DriftStream", settings={"batch_size": 3})


def test_a_broken_stream_has_every_violation_named_in_one_error():
    with pytest.raises(StreamCheckError) as caught:
        check_stream(examples.BrokenStream)
    problems = caught.value.problems
    text = str(caught.value)
    assert text.startswith(f"stream BrokenStream fails {len(problems)} check(s): (1) ")
    expected = [
        "probe_batch() moves the stream",
        "replica 1 (seed 1) alone gives other data",
        "after load_state_dict(state_dict()) the stream gives other data",
        "a second close() raised RuntimeError: already closed",
    ]
    for words in expected:
        assert sum(words in p for p in problems) == 1, (words, problems)
    assert len(problems) == len(expected), problems
    assert "\n" not in text


@pytest.mark.parametrize(
    "cls, words",
    [
        (examples.NotAStream, ["its Spec is not a dataclass", "its kind is 'video'"]),
        (examples.NoScore, ["lacks the regression stream method(s) score(), probe_batch()"]),
    ],
)
def test_a_class_that_is_no_stream_is_refused_naming_what_it_lacks(cls, words):
    with pytest.raises(StreamCheckError) as caught:
        check_stream(cls)
    for w in words:
        assert w in str(caught.value)
    with pytest.raises(ConfigError) as at_start:
        contlearn.run(cls, steps=2, config=TINY, out="/nonexistent/never")
    assert str(at_start.value).startswith(f"stream {cls.__name__} is not a stream: (1) ")


def test_a_stream_without_info_is_refused_at_start_and_writes_nothing(tmp_path):
    with pytest.raises(ConfigError, match=r"lacks the attribute\(s\) info once built"):
        contlearn.run(examples.NoInfo, steps=2, config=TINY, out=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_check_stream_needs_two_distinct_seeds_and_two_steps():
    with pytest.raises(ConfigError, match="two or more distinct seeds"):
        check_stream("bit-flipping", seeds=(1, 1))
    with pytest.raises(ConfigError, match="steps >= 2"):
        check_stream("bit-flipping", steps=1)


def test_check_stream_takes_a_spec_and_names_a_bad_setting():
    check_stream(examples.DriftStream, spec=examples.DriftSpec(examples_per_task=4, batch_size=4))
    with pytest.raises(ConfigError, match="unknown option 'nope' for DriftSpec"):
        check_stream(examples.DriftStream, settings={"nope": 1})


def test_cli_runs_a_file_stream_and_resumes_it_from_another_directory(tmp_path, monkeypatch):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "drift.py").write_text(EXAMPLES.read_text())
    monkeypatch.chdir(tmp_path / "mine")
    out = tmp_path / "run"
    args = ["run", "drift.py:DriftStream", "--tasks", "2", "--out", str(out), "--no-progress"]
    assert main([*args, "--set", "hidden=4", "--agent", "scripts_agent.py:LinearAgent"]) == 2
    (tmp_path / "mine" / "scripts_agent.py").write_text(AGENT.read_text())
    assert main([*args, "--set", "hidden=4"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["stream"] == f"{tmp_path / 'mine' / 'drift.py'}:DriftStream"
    monkeypatch.chdir("/")
    assert main(["resume", str(out), "--tasks", "3", "--no-progress"]) == 0
    df = contlearn.load_runs(out)
    assert sorted(df[df.metric == "squared_error"].task.unique()) == [0, 1, 2]
    assert set(df.stream) == {"DriftStream"}


def test_a_stream_class_is_recorded_by_module_and_resumes(tmp_path):
    result = contlearn.run(examples.DriftStream, steps=3, config=TINY, out=tmp_path / "run")
    assert result.config["stream"] == "tests.plugin_stream_examples:DriftStream"
    contlearn.resume(tmp_path / "run", steps=6)
    assert contlearn.load_runs(tmp_path / "run").step.max() == 6


@pytest.mark.parametrize(
    "args, words",
    [
        (["nowhere.py:Drift"], "stream file nowhere.py does not exist"),
        ([f"{EXAMPLES}:Nope"], "has no class 'Nope'"),
        (["tests.plugin_stream_examples:NotAStream"], "its Spec is not a dataclass"),
        (["no_such_module_xyz:Stream"], "cannot import module 'no_such_module_xyz'"),
        (["tests.plugin_stream_examples:DriftSpec"], "its kind is None"),
    ],
)
def test_bad_plug_in_streams_are_one_line_exit_2_and_write_nothing(cli, tmp_path, args, words):
    code, _, err = cli("run", *args, "--steps", "2", "--out", tmp_path / "run")
    assert code == 2 and err.count("\n") == 1 and words in err, err
    assert not (tmp_path / "run").exists()


def test_old_runs_with_a_relative_agent_path_resume_from_their_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "run"
    config = {"examples_per_task": 20, "probes": "none"}
    agent = "scripts/my_agent.py:LinearAgent"
    contlearn.run("bit-flipping", agent=agent, tasks=2, config=config, out=out)
    stored = json.loads((out / "config.json").read_text())
    assert stored["agent"] == f"{AGENT}:LinearAgent"
    (out / "config.json").write_text(json.dumps({**stored, "agent": agent}))  # as older runs
    contlearn.run("bit-flipping", agent=agent, tasks=2, config=config, out=out, resume=True)
    assert main(["resume", str(out), "--tasks", "3", "--no-progress"]) == 0
    assert contlearn.load_runs(out).task.max() == 2


def test_a_class_of_a_notebook_is_refused_at_start_naming_the_fix(monkeypatch, tmp_path):
    notebook = types.ModuleType("__main__")  # (a notebook's __main__ has no file)
    cls = type("NotebookAgent", (), {"act": lambda s, o: o, "observe": lambda s, *a: {}})
    cls.__module__ = "__main__"
    notebook.NotebookAgent = cls
    monkeypatch.setitem(sys.modules, "__main__", notebook)
    with pytest.raises(ConfigError) as caught:
        contlearn.run("bit-flipping", agent=cls, steps=2, out=tmp_path / "run")
    assert str(caught.value) == (
        "agent class NotebookAgent is defined in __main__, where a resume or a sweep worker "
        "cannot find it again; define it in a module or file and pass module:Class / "
        "file.py:Class"
    )
    assert not (tmp_path / "run").exists()

    def local():
        class Inner:
            pass

        return Inner

    with pytest.raises(ConfigError, match="stream class Inner is defined in a function"):
        class_ref(local(), "stream")


def test_a_class_of_the_script_being_run_is_stored_by_its_file(tmp_path):
    script = tmp_path / "experiment.py"
    script.write_text(
        AGENT.read_text()
        .replace('"permuted-mnist"', '"bit-flipping"')
        .replace("tasks=3,", f"tasks=2, out={str(tmp_path / 'run')!r},")
        .replace("seeds=2,", "seeds=1,")
    )
    env = {**os.environ, "CI": "true"}
    subprocess.run([sys.executable, str(script)], check=True, env=env, capture_output=True)
    stored = json.loads((tmp_path / "run" / "config.json").read_text())
    assert stored["agent"] == f"{script}:LinearAgent"
    assert main(["resume", str(tmp_path / "run"), "--tasks", "3", "--no-progress"]) == 0


@pytest.fixture
def own_registries(monkeypatch):
    """The registries' entries as they were after the test (its registrations are undone)."""
    from contlearn.agents import agents

    for registry in (streams, agents):
        monkeypatch.setattr(registry, "_entries", dict(registry._entries))
    return streams, agents


def test_run_time_registrations_and_plug_ins_reach_spawned_sweep_workers(
    own_registries, tmp_path, monkeypatch
):
    stream_registry, agent_registry = own_registries
    monkeypatch.chdir(tmp_path)
    (tmp_path / "drift.py").write_text(EXAMPLES.read_text())
    (tmp_path / "lin.py").write_text(AGENT.read_text())
    stream_registry.register("drift-v0", "drift.py:DriftStream", "a test stream")
    agent_registry.register("lin", "lin.py:LinearAgent")  # (relative: kept absolute)
    assert stream_registry.entry("drift-v0").entry_point == f"{tmp_path / 'drift.py'}:DriftStream"
    spec = {
        "stream": "drift-v0",
        "tasks": 2,
        "probes": "none",
        "grid": {"agent": ["lin", "lin.py:LinearAgent"]},
    }
    plan = plan_sweep(spec, tmp_path / "root")
    assert [r.kind for r in plan.registrations] == ["stream", "agent"]
    assert plan.runs[1].config["agent"] == f"{tmp_path / 'lin.py'}:LinearAgent"
    result = run_sweep(plan, workers=2, progress=False)
    assert result.exit_code == 0, result.report()
    df = contlearn.load_runs(tmp_path / "root", config=["agent"])
    assert df.run.nunique() == 2 and set(df.stream) == {"drift-v0"}


def test_a_registered_class_that_is_no_stream_is_refused_by_name(own_registries, tmp_path):
    stream_registry, _ = own_registries
    stream_registry.register("no-score", "tests.plugin_stream_examples:NoScore")
    with pytest.raises(ConfigError, match=r"^stream no-score is not a stream: \(1\) it lacks"):
        contlearn.run("no-score", steps=2, out=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_registration_in_main_is_refused_at_sweep_start_and_writes_nothing(
    own_registries, tmp_path, monkeypatch
):
    stream_registry, _ = own_registries
    stream_registry.register("nb-stream", "__main__:NotebookStream")  # (a notebook's class)
    monkeypatch.setattr(sys.modules["__main__"], "NotebookStream", examples.DriftStream, False)
    unused = plan_sweep({"stream": "bit-flipping", "tasks": 1}, tmp_path / "other")
    check_portable(unused.registrations, unused.names_used())  # (no worker looks it up)
    spec = {"stream": "nb-stream", "tasks": 1, "hidden": "4", "grid": {"lr": [0.1, 0.2]}}
    plan = plan_sweep(spec, tmp_path / "root")
    with pytest.raises(ConfigError) as caught:
        run_sweep(plan, workers=2, progress=False)
    assert str(caught.value) == (
        "stream 'nb-stream' is registered to __main__:NotebookStream, which a sweep worker "
        "cannot import; define it in a module or file and register 'module:Class' or "
        "'file.py:Class'"
    )
    assert not (tmp_path / "root").exists()
    assert run_sweep(plan, workers=1, progress=False).exit_code == 0  # (in this process: fine)
