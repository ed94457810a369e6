"""A progress bar that stays quiet when nobody is watching (no TTY, or under CI)."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import Any


def want_progress(requested: bool | None = None) -> bool:
    """Show a bar? ``requested`` wins; by default only on a TTY and not under CI."""
    if requested is not None:
        return requested
    return sys.stderr.isatty() and not os.environ.get("CI")


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
            from tqdm import tqdm

            self.bar = tqdm(
                total=total,
                initial=initial,
                unit="step",
                dynamic_ncols=True,
                desc=desc or None,
                file=sys.stderr,
            )
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
