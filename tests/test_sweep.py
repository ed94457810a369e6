"""Sweeps: expansion, names, validation before anything runs, and local runs that resume."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pandas as pd
import pytest

import contlearn
from contlearn.data.datasets import PACKAGED_DIR
from contlearn.results.store import load_runs
from contlearn.sweeps.plan import plan_sweep, run_sweep
from contlearn.sweeps.spec import expand, parse_spec, run_name

TINY = """
stream = "permuted-mnist"
tasks = 2
examples_per_task = 100
hidden = [8]
probes = "none"
"""
GRID = (
    TINY
    + """
seeds = 2
seeds_per_run = 1
[grid]
learner = ["bp", "cbp"]
lr = [0.01, 0.003]
"""
)


def _write(tmp_path: Path, text: str, name: str = "spec.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _frame(root: Path) -> pd.DataFrame:
    df = load_runs(root)
    return df.sort_values(["run", "seed", "step", "metric", "layer"]).reset_index(drop=True)


def _files(root: Path) -> dict[str, tuple[bytes, int]]:
    return {
        str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_grid_is_a_product_in_order_with_seed_groups_fastest():
    spec = parse_spec(
        {
            "stream": "bit-flipping",
            "seeds": 2,
            "seeds_per_run": 1,
            "grid": {"learner": ["bp", "cbp"], "lr": [0.01, 0.003]},
        }
    )
    runs = expand(spec)
    assert [r.name for r in runs[:5]] == [
        "learner=bp__lr=0.01__seeds=0",
        "learner=bp__lr=0.01__seeds=1",
        "learner=bp__lr=0.003__seeds=0",
        "learner=bp__lr=0.003__seeds=1",
        "learner=cbp__lr=0.01__seeds=0",
    ]
    assert len(runs) == 8
    assert runs[3].config == {
        "stream": "bit-flipping",
        "learner": "bp",
        "lr": 0.003,
        "seed": 1,
        "seeds": 1,
    }
    assert runs[3].point == {"learner": "bp", "lr": 0.003}


def test_zip_groups_move_together_and_multiply_with_the_grid():
    spec = parse_spec(
        {
            "stream": "bit-flipping",
            "grid": {"lr": [0.1, 0.2]},
            "zip": [{"hidden": ["5", "7"], "batch_size": [1, 4]}, {"activation": ["relu", "tanh"]}],
        }
    )
    points = [r.point for r in expand(spec)]
    assert len(points) == 8
    assert points[0] == {"lr": 0.1, "hidden": "5", "batch_size": 1, "activation": "relu"}
    assert points[3] == {"lr": 0.1, "hidden": "7", "batch_size": 4, "activation": "tanh"}
    assert {(p["hidden"], p["batch_size"]) for p in points} == {("5", 1), ("7", 4)}


@pytest.mark.parametrize(
    "seed, seeds, per_run, groups",
    [
        (0, 10, 5, ["seeds=0-4", "seeds=5-9"]),
        (0, 10, 4, ["seeds=0-3", "seeds=4-7", "seeds=8-9"]),
        (7, 2, 1, ["seeds=7", "seeds=8"]),
        (3, 3, None, ["seeds=3-5"]),  # default: all seeds batched in one run
    ],
)
def test_seed_groups(seed, seeds, per_run, groups):
    data = {"stream": "bit-flipping", "seed": seed, "seeds": seeds}
    if per_run:
        data["seeds_per_run"] = per_run
    runs = expand(parse_spec(data))
    assert [r.name for r in runs] == groups
    firsts = [r.config["seed"] for r in runs]
    assert sum(r.config["seeds"] for r in runs) == seeds and firsts[0] == seed


def test_names_are_deterministic_readable_and_sanitised():
    assert run_name({"learner": "cbp", "lr": 0.003}, 0, 5) == "learner=cbp__lr=0.003__seeds=0-4"
    assert run_name(
        {"learner.replacement_rate": 1e-5, "hidden": [100, 100], "boundaries_visible": True}, 2, 1
    ) == ("learner.replacement_rate=1e-05__hidden=100,100__boundaries_visible=true__seeds=2")
    odd = run_name({"data_dir": "/data/my mnist/../x", "agent": "m.py:My Agent"}, 0, 1)
    assert odd == "data_dir=-data-my-mnist-..-x__agent=m.py-My-Agent__seeds=0"
    long = run_name({"data_dir": "x" * 300}, 0, 1)
    assert len(long) <= 160 and long == run_name({"data_dir": "x" * 300}, 0, 1)
    assert long != run_name({"data_dir": "x" * 299}, 0, 1)


def test_variants_are_a_union_named_by_what_differs():
    spec = parse_spec(
        {
            "stream": "bit-flipping",
            "grid": {"lr": [0.1, 0.2]},
            "variant": [
                {"learner": "bp"},
                {
                    "learner": {"name": "cbp"},
                    "grid": {"learner.replacement_rate": [1e-3, 1e-4]},
                    "hidden": "5",
                },
            ],
        }
    )
    names = [r.name for r in expand(spec)]
    assert names == [
        "learner=bp__lr=0.1__seeds=0",
        "learner=bp__lr=0.2__seeds=0",
        "learner=cbp__hidden=5__lr=0.1__learner.replacement_rate=0.001__seeds=0",
        "learner=cbp__hidden=5__lr=0.1__learner.replacement_rate=0.0001__seeds=0",
        "learner=cbp__hidden=5__lr=0.2__learner.replacement_rate=0.001__seeds=0",
        "learner=cbp__hidden=5__lr=0.2__learner.replacement_rate=0.0001__seeds=0",
    ]


BAD_SPECS = {
    "unknown key in one point": (
        TINY + '[grid]\nlearner = ["cbp", "bp"]\n"learner.maturity" = [10]\n',
        "learner=bp__learner.maturity=10__seeds=0: unknown config key 'learner.maturity'",
    ),
    "bad value": (TINY + "[grid]\nlr = [0.1, -1]\n", "lr=-1__seeds=0"),
    "unequal zip": (
        TINY + "[[zip]]\nlr = [0.1, 0.2]\nbatch_size = [1]\n",
        "zip[0] lists differ in length (lr: 2, batch_size: 1)",
    ),
    "scalar axis": (TINY + "[grid]\nlr = 0.1\n", "grid.lr must be a non-empty list"),
    "seeds as an axis": (TINY + "[grid]\nseed = [0, 1]\n", "seeds are set by the top-level"),
    "key in two axes": (TINY + "[grid]\nlr = [0.1]\n[[zip]]\nlr = [0.2]\n", "'lr' is given twice"),
    "duplicate value": (TINY + "[grid]\nlr = [0.1, 0.1]\n", "are both named 'lr=0.1__seeds=0'"),
    "bad seeds_per_run": (TINY + "seeds_per_run = 0\n", "seeds_per_run=0 must be an integer"),
    "malformed toml": (TINY + "[grid\n", "is malformed"),
}


@pytest.mark.parametrize("case", list(BAD_SPECS))
def test_bad_specs_are_one_line_exit_2_before_anything_runs(cli, tmp_path, case):
    text, expected = BAD_SPECS[case]
    code, out, err = cli("sweep", _write(tmp_path, text), "--out", tmp_path / "root")
    assert code == 2 and out == ""
    assert err.startswith("contlearn: error: ") and err.count("\n") == 1
    assert expected in err
    assert not (tmp_path / "root").exists()


def test_set_overrides_base_keys_but_not_axes(cli, tmp_path):
    spec = _write(tmp_path, GRID)
    code, out, _ = cli("sweep", spec, "--out", tmp_path / "r", "--dry-run", "--set", "seeds=3")
    assert code == 0 and "learner=cbp__lr=0.003__seeds=2" in out and "12 new" in out
    code, _, err = cli("sweep", spec, "--out", tmp_path / "r", "--set", "lr=0.5")
    assert code == 2 and "--set lr overrides a sweep axis" in err


def test_ray_backend_without_ray_names_the_extra(cli, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    code, _, err = cli("sweep", _write(tmp_path, TINY), "--out", tmp_path / "r", "--backend", "ray")
    assert code == 2 and "pip install 'contlearn[ray]'" in err
    assert not (tmp_path / "r").exists()


@pytest.fixture
def mnist_dirs(tmp_path):
    """A folder holding the MNIST test files, and a path that does not exist (yet)."""
    good = tmp_path / "mnist_ok"
    shutil.copytree(PACKAGED_DIR, good)
    return good, tmp_path / "mnist_fixed_later"


def test_failures_are_reported_and_a_rerun_resumes_without_touching_finished_runs(
    cli, tmp_path, mnist_dirs
):
    good, missing = mnist_dirs
    spec = _write(
        tmp_path,
        TINY + f"seeds = 2\nseeds_per_run = 1\ncheckpoint_every = 30\n"
        f'[grid]\ndata_dir = ["{good}", "{missing}"]\n',
    )
    root = tmp_path / "root"
    runs = plan_sweep(spec, root).runs
    ok0, ok1, bad0, bad1 = (root / r.name for r in runs)
    # an interrupted run: stopped at step 130 of 200
    contlearn.run(config={**runs[1].config, "tasks": 0, "steps": 130}, out=ok1)
    code, out, _ = cli("sweep", spec, "--out", root, "--dry-run")
    assert [line.split()[0] for line in out.splitlines()[:4]] == ["new", "partial", "new", "new"]

    code, out, err = cli("sweep", spec, "--out", root, "--workers", "2")
    assert code == 1 and out.strip() == str(root)
    assert "2 finished, 2 failed" in err
    assert f"failed {bad0.name}: " in err and str(missing) in err
    assert (ok0 / "done.json").is_file() and (ok1 / "done.json").is_file()
    assert not bad0.exists() and not bad1.exists()  # a run that cannot start writes nothing
    whole = contlearn.run(config=runs[1].config, out=tmp_path / "whole")
    pd.testing.assert_frame_equal(
        _frame(ok1).drop(columns="run"), _frame(whole.path).drop(columns="run")
    )
    sweep_file = json.loads((root / "sweep.json").read_text())
    assert [r["name"] for r in sweep_file["runs"]] == [r.name for r in runs]
    assert sweep_file["spec"]["axes"] == [{"data_dir": [str(good), str(missing)]}]

    before = {p.name: _files(p) for p in (ok0, ok1)}
    shutil.copytree(PACKAGED_DIR, missing)  # the fix
    code, _, err = cli("sweep", spec, "--out", root, "--workers", "1")
    assert code == 0 and "2 already done, 2 finished, 0 failed" in err
    assert {p.name: _files(p) for p in (ok0, ok1)} == before
    df = load_runs(root, config=True)
    assert df.run.nunique() == 4 and set(df.data_dir) == {str(good), str(missing)}


def test_a_changed_spec_is_refused_on_a_root_with_its_old_runs(cli, tmp_path):
    root = tmp_path / "root"
    assert cli("sweep", _write(tmp_path, TINY), "--out", root, "--workers", "1")[0] == 0
    code, _, err = cli("sweep", _write(tmp_path, TINY + "lr = 0.5\n"), "--out", root)
    assert code == 2 and "holds a run with lr=0.01, not 0.5" in err
    longer = _write(tmp_path, TINY.replace("tasks = 2", "tasks = 3"))
    code, out, _ = cli("sweep", longer, "--out", root, "--dry-run")
    assert code == 0 and out.startswith("partial  seeds=0")  # a longer run continues
    assert cli("sweep", longer, "--out", root)[0] == 0
    assert load_runs(root).task.max() == 2


def test_a_paper_style_grid_runs_locally_and_plots_as_one_figure(cli, tmp_path):
    root = tmp_path / "root"
    result = run_sweep(plan_sweep(_write(tmp_path, GRID), root), workers=1)
    assert result.exit_code == 0 and len(result.names("finished")) == 8
    df = load_runs(root, config=True)
    assert df.run.nunique() == 8 and set(df.learner) == {"bp", "cbp"}
    assert sorted(df.lr.unique()) == [0.003, 0.01] and sorted(df.seed.unique()) == [0, 1]
    code, out, _ = cli("plot", root, "--by", "learner", "--out", tmp_path / "decay.png")
    assert code == 0 and (tmp_path / "decay.png").stat().st_size > 10_000
    if importlib.util.find_spec("contlearn.results.summary") is not None:
        code, out, _ = cli("summary", root, "--by", "learner")
        assert code == 0 and "bp" in out and "cbp" in out


COMPARISON = Path(__file__).resolve().parents[1] / "docs" / "comparison"


@pytest.mark.parametrize("spec", sorted(COMPARISON.glob("*.toml")), ids=lambda p: p.stem)
def test_the_comparison_specs_hold_every_learner_and_resolve(spec, capsys, tmp_path):
    """docs/comparison/*.toml (issue #18's comparison table) name every registered learner,
    and every run of them resolves (a dry run validates each config)."""
    from contlearn.cli import main
    from contlearn.learners import learners

    text = spec.read_text()
    assert all(f'learner = "{name}"' in text for name in learners.names())
    assert main(["sweep", str(spec), "--out", str(tmp_path / "cmp"), "--dry-run"]) == 0
    variants = text.count("[[variant]]")  # (every learner, some at a second step size)
    assert variants >= len(learners.names())
    assert f"{variants} runs" in capsys.readouterr().out


def _drop_key(run: Path, key: str) -> None:
    """Make ``run`` look written before option ``key`` existed."""
    config = json.loads((run / "config.json").read_text())
    assert key in config
    del config[key]
    (run / "config.json").write_text(json.dumps(config))


def test_runs_written_before_an_option_existed_count_as_its_default(tmp_path):
    spec = _write(tmp_path, TINY + "seeds = 1\n[grid]\nlearner = ['bp', 'cbp']\n")
    root = tmp_path / "root"
    run_sweep(plan_sweep(spec, root), backend="local", workers=1)
    first, second = (root / r.name for r in plan_sweep(spec, root).runs)
    _drop_key(first, "network")  # (as if the run had finished before the option existed)
    (second / "done.json").unlink()
    plan = plan_sweep(spec, root)
    assert [plan.status[r.name] for r in plan.runs] == ["done", "partial"]
    # a run started before the option existed resumes, with the option at its default
    config = {"stream": "permuted-mnist", "examples_per_task": 100, "hidden": "8", "probes": "none"}
    whole = contlearn.run(config={**config, "tasks": 2}, out=tmp_path / "whole")
    contlearn.run(config={**config, "tasks": 1}, out=tmp_path / "part")
    _drop_key(tmp_path / "part", "network")
    contlearn.run(config={**config, "tasks": 2}, out=tmp_path / "part", resume=True)
    a, b = (load_runs(p).drop(columns=["run"]) for p in (whole.path, tmp_path / "part"))
    pd.testing.assert_frame_equal(a.reset_index(drop=True), b.reset_index(drop=True))
