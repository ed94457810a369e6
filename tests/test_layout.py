"""The layout rule CI enforces: no Python file over 600 lines (STYLE.md: split by concern)."""

from __future__ import annotations

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
