"""The README's code runs as written: every Python block, and its "Your own agent" agents
end to end (issue #16's "Done when": a torch MLP with its own optimizer, replica and one-seed,
on permuted MNIST, bit-flipping and slippery-ant, with probes, CBP attached to its own module,
resume from another directory, and check_agent naming a broken agent's fault)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from contlearn.agents import AgentContractError, check_agent
from contlearn.cli import main
from contlearn.results.store import load_runs

ROOT = Path(__file__).resolve().parents[1]
BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
#: the README's agent classes (the blocks that define them), in order
AGENT_BLOCKS = [b for b in BLOCKS if re.search(r"^class \w+", b, re.M)]


def test_every_python_block_of_the_readme_runs(tmp_path):
    script = tmp_path / "readme_blocks.py"
    script.write_text("\n\n".join(BLOCKS))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "runs" / "pm").is_dir() and (tmp_path / "runs" / "replicas").is_dir()


@pytest.fixture()
def readme_agents(tmp_path, monkeypatch):
    """The README's agents in a file of their own, as the README says to put them; the
    classes only (the blocks' example calls stay out)."""
    code = []
    for block in AGENT_BLOCKS:
        lines = block.splitlines()
        calls = [i for i, line in enumerate(lines) if line.startswith(("contlearn.", "result"))]
        code.append("\n".join(lines[: calls[0]] if calls else lines))  # (cut the example call)
    path = tmp_path / "my_agents.py"
    path.write_text("\n\n".join(code) + "\n")
    monkeypatch.chdir(tmp_path)
    return path


def _df(path):
    return load_runs(path)


def test_the_readme_agent_learns_with_cbp_on_its_own_module_and_is_probed(readme_agents):
    out = readme_agents.parent / "runs" / "mine"
    args = ["run", "permuted-mnist", "--agent", f"{readme_agents.name}:MLPAgent"]
    args += ["--learner", "cbp", "--seeds", "2", "--tasks", "2", "--out", str(out)]
    args += ["--set", "examples_per_task=300", "--set", "hidden=20", "--set", "probe_size=50"]
    args += ["--set", "learner.replacement_rate=0.01", "--set", "learner.maturity=20"]
    assert main(args) == 0
    df = _df(out)
    assert set(df.seed) == {0, 1}
    assert df[df.metric == "accuracy"].value.mean() > 0.2  # (it learns: chance is 0.1)
    assert {"effective_rank", "dead_fraction", "weight_magnitude"} <= set(df.metric)
    replaced = df[df.metric == "replacements"]
    assert len(replaced) and replaced.value.max() > 0  # CBP on its own nn.Module
    # the same class on bit-flipping, through the Python API
    import contlearn

    run = contlearn.run(
        "bit-flipping",
        agent=f"{readme_agents}:MLPAgent",
        learner="l2",
        tasks=2,
        config={"examples_per_task": 200, "hidden": 20},
        out="runs/bits",
    )
    assert "squared_error" in set(_df(run.path).metric)


def test_a_readme_agent_run_resumes_from_another_directory(readme_agents, tmp_path):
    out = readme_agents.parent / "runs" / "rep"
    assert (
        main(
            [
                "run",
                "permuted-mnist",
                "--agent",
                f"{readme_agents.name}:ReplicaLinear",  # (a path relative to this directory)
                "--seeds",
                "2",
                "--tasks",
                "2",
                "--set",
                "examples_per_task=200",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.chdir(elsewhere)
    assert main(["resume", str(out), "--tasks", "3"]) == 0
    df = _df(out)
    assert set(df[df.metric == "accuracy"].task) == {0, 1, 2}


@pytest.mark.mujoco
def test_the_readme_rl_agent_runs_on_slippery_ant(readme_agents):
    out = readme_agents.parent / "runs" / "ant"
    args = ["run", "slippery-ant", "--agent", f"{readme_agents.name}:ActorCritic"]
    args += ["--steps", "300", "--set", "max_episode_steps=100", "--out", str(out)]
    assert main(args) == 0
    df = _df(out)
    assert len(df[df.metric == "episode_return"]) == 3
    assert len(df[df.metric == "loss"]) == 3  # per episode, not per step


def test_check_agent_names_the_fault_of_a_broken_readme_agent(readme_agents):
    assert check_agent(f"{readme_agents}:MLPAgent", "bit-flipping", steps=5).capabilities
    broken = readme_agents.parent / "broken.py"
    broken.write_text(
        readme_agents.read_text()
        + textwrap.dedent(
            """

            class Broken(MLPAgent):
                def observe(self, obs, action, target):
                    super().observe(obs, action, target)
                    return {"loss": "low"}
            """
        )
    )
    with pytest.raises(AgentContractError, match="returned loss=str 'low'.*one number per metric"):
        check_agent(f"{broken}:Broken", "bit-flipping", steps=5)
