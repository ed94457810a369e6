"""The layout rules CI enforces: no Python file over 600 lines, none over 400 without a reason
(STYLE.md: split by concern)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIMIT = 600


def test_no_python_file_over_600_lines():
    files = [
        p
        for d in ("contlearn", "envs", "agents", "scripts", "tests")
        for p in (ROOT / d).rglob("*.py")
    ]
    assert files
    long = {
        str(p.relative_to(ROOT)): n for p in files if (n := len(p.read_text().splitlines())) > LIMIT
    }
    assert not long, f"split these by concern (STYLE.md): {long}"


def test_files_over_400_lines_give_their_reason():
    files = [
        p for d in ("contlearn", "envs", "agents", "scripts") for p in (ROOT / d).rglob("*.py")
    ]
    unexplained = [
        str(p.relative_to(ROOT))
        for p in files
        if len((text := p.read_text()).splitlines()) > 400
        and "Over 400 lines:" not in (ast.get_docstring(ast.parse(text)) or "")
    ]
    assert not unexplained, (
        f"say why in the module docstring ('Over 400 lines: ...'): {unexplained}"
    )
