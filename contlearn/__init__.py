"""contlearn: a continual-learning simulation environment for studying loss of plasticity.

The top-level names are imported lazily so that ``import contlearn.envs`` stays cheap.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["ContlearnError", "RunResult", "load_runs", "plot", "resume", "run"]


def __getattr__(name: str) -> Any:
    if name in ("run", "resume", "RunResult"):
        from contlearn.running import api

        return getattr(api, name)
    if name == "load_runs":
        from contlearn.results.store import load_runs

        return load_runs
    if name == "plot":
        from contlearn.results.figures import plot_runs

        return plot_runs
    if name == "ContlearnError":
        from contlearn.errors import ContlearnError

        return ContlearnError
    raise AttributeError(f"module 'contlearn' has no attribute {name!r}")


def __dir__() -> list[str]:
    """The module's names and the lazily imported ones (``dir(contlearn)``, tab completion)."""
    return sorted({*__all__, *(n for n in globals() if n.startswith("__"))})
