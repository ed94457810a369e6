"""The tutorial notebook (docs/tutorial.ipynb) executes: its code cells run in order, as a
kernel would run them, in a fresh folder; the last expression of each cell is evaluated (and a
figure rendered as a notebook would show it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "docs" / "tutorial.ipynb"

RUNNER = """
import ast, json, sys
cells = json.load(open(sys.argv[1]))["cells"]
scope = {"__name__": "__main__"}
for n, cell in enumerate(c for c in cells if c["cell_type"] == "code"):
    tree = ast.parse("".join(cell["source"]))
    last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
    exec(compile(tree, f"<cell {n}>", "exec"), scope)
    if last is not None:
        value = eval(compile(ast.Expression(last.value), f"<cell {n}>", "eval"), scope)
        shown = getattr(value, "_repr_png_", None)
        if shown is not None:
            assert shown().startswith(b"\\x89PNG"), n
        print(f"cell {n}: {type(value).__name__}")
"""


def test_the_tutorial_notebook_executes(tmp_path) -> None:
    nb = json.loads(NOTEBOOK.read_text())
    assert nb["nbformat"] == 4 and any(c["cell_type"] == "code" for c in nb["cells"])
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", RUNNER, str(NOTEBOOK)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Figure" in done.stdout  # (the plots were drawn)
    assert (tmp_path / "runs" / "tutorial-mine" / "cbp" / "config.json").is_file()
