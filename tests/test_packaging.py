"""What ``pip install .`` installs: every module and data file of the three packages.

The tests run on the editable install, which finds modules by path; a wheel holds only what
pyproject names, so a folder or data file left out there would pass every other test and be
missing for anyone installing the package.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: source folder -> its place in the installed package
INSTALLED = {"contlearn": "contlearn", "envs": "contlearn/envs", "agents": "contlearn/agents"}


def test_the_wheel_holds_every_module_and_data_file(tmp_path: Path) -> None:
    # A copy without build/: setuptools would take stale modules from an earlier build/lib.
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    for folder in INSTALLED:
        shutil.copytree(
            ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__")
        )
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), str(source)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    (wheel,) = tmp_path.glob("contlearn-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    want = set()
    for folder, place in INSTALLED.items():
        for path in (ROOT / folder).rglob("*"):
            if path.suffix in (".py", ".c", ".gz") or path.name == "py.typed":
                want.add(f"{place}/{path.relative_to(ROOT / folder).as_posix()}")
    assert want, "no source files found"
    assert sorted(want - names) == [], "missing from the wheel: add them to pyproject.toml"
