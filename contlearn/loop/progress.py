"""A progress bar that stays quiet when nobody is watching (no TTY and no notebook, or under CI).

In a Jupyter notebook the bar is tqdm's notebook widget where ``ipywidgets`` is installed
(else the text bar), shown by default like on a terminal.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from collections.abc import Callable
from typing import Any


def in_notebook() -> bool:
    """Whether this process is a Jupyter kernel (IPython already imported, with a kernel
    shell; nothing is imported to find out)."""
    ipython = sys.modules.get("IPython")
    if ipython is None:
        return False
    try:
        shell = ipython.get_ipython()
    except Exception:  # noqa: BLE001 - any failure: not a notebook
        return False
    return shell is not None and "IPKernelApp" in getattr(shell, "config", {})


def want_progress(requested: bool | None = None) -> bool:
    """Show a bar? ``requested`` wins; by default only on a TTY or in a notebook, and not
    under CI."""
    if requested is not None:
        return requested
    return (sys.stderr.isatty() or in_notebook()) and not os.environ.get("CI")


def _bar_class() -> Any:
    """tqdm's notebook widget in a notebook with ``ipywidgets``, else the text bar."""
    if in_notebook() and importlib.util.find_spec("ipywidgets") is not None:
        from tqdm.notebook import tqdm as widget  # (the widget needs ipywidgets)

        return widget
    from tqdm import tqdm

    return tqdm


class Progress:
    """Steps/s, task index and the running score, refreshed at most a few times a second.

    Args:
        total: steps in the run.
        metric: name of the running score shown (``accuracy`` …).
        enabled: draw anything at all.
        initial: steps already done (when resuming).
    """

    def __init__(
        self, total: int, metric: str, enabled: bool, initial: int = 0, desc: str = ""
    ) -> None:
        self.metric = metric
        self.bar: Any = None
        self._next = 0.0
        if enabled:
            bar = _bar_class()
            options: dict[str, Any] = {"file": sys.stderr, "dynamic_ncols": True}
            if bar.__module__ == "tqdm.notebook":
                options = {}  # (a widget: no stream, no columns)
            self.bar = bar(total=total, initial=initial, unit="step", desc=desc or None, **options)
        self._shown = initial

    def update(self, step: int, task: int, running: Callable[[], float] | None = None) -> None:
        """Report that ``step`` steps are done (cheap when called every step; ``running`` is
        only called when the bar is redrawn)."""
        if self.bar is None:
            return
        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + 0.25
        self.bar.update(step - self._shown)
        self._shown = step
        post: dict[str, object] = {"task": task}
        if running is not None:
            post[self.metric] = f"{running():.4f}"
        self.bar.set_postfix(post, refresh=False)

    def close(self, step: int) -> None:
        """Finish the bar at ``step``."""
        if self.bar is not None:
            self.bar.update(step - self._shown)
            self.bar.close()
