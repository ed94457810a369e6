"""Checkpoints: atomic, checksummed, loaded with ``torch.load(weights_only=True)`` only.

A checkpoint is ``checkpoints/ckpt-<step>.pt`` plus ``ckpt-<step>.sha256`` (the data file's
SHA-256). Both are written to temporary names, fsynced and renamed, data first, so a checkpoint
whose checksum file exists is complete. The newest ``keep`` checkpoints are kept. Loading tries
the newest first; a truncated, checksum-mismatched or unloadable one (including a file that
tries to execute code when unpickled: ``weights_only`` refuses it) is reported and the previous
one is used.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from contlearn.errors import RunDirError
from contlearn.results.store import write_atomic

CKPT_DIR = "checkpoints"
FORMAT = 1
_NAME = re.compile(r"^ckpt-(\d{12})-(\d{6})\.pt$")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checkpoint_files(run_dir: Path) -> list[Path]:
    """The run's checkpoint data files, oldest first."""
    folder = Path(run_dir) / CKPT_DIR
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if _NAME.match(p.name))


def save_checkpoint(run_dir: Path, state: dict[str, Any], step: int, keep: int = 2) -> Path:
    """Write ``state`` (tensors and plain Python values only) as a new checkpoint.

    Args:
        run_dir: the run directory.
        state: what defines the run's future.
        step: the global step (part of the file name).
        keep: how many of the newest checkpoints to keep.

    Returns:
        The checkpoint's data file.
    """
    import io

    folder = Path(run_dir) / CKPT_DIR
    folder.mkdir(exist_ok=True)
    existing = checkpoint_files(run_dir)
    last = _NAME.match(existing[-1].name) if existing else None  # every file there matches
    serial = int(last.group(2)) + 1 if last else 0
    path = folder / f"ckpt-{step:012d}-{serial:06d}.pt"
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, **state}, buffer)
    data = buffer.getvalue()
    write_atomic(path, data)
    write_atomic(path.with_suffix(".sha256"), hashlib.sha256(data).hexdigest().encode())
    _fsync_dir(folder)
    for old in checkpoint_files(run_dir)[:-keep]:
        old.unlink(missing_ok=True)
        old.with_suffix(".sha256").unlink(missing_ok=True)
    return path


def read_checkpoint(path: Path) -> dict[str, Any]:
    """Verify and load one checkpoint.

    Raises:
        ValueError: missing checksum, checksum mismatch, or not loadable with
            ``weights_only=True`` (the message says which).
    """
    path = Path(path)
    digest_file = path.with_suffix(".sha256")
    if not digest_file.is_file():
        raise ValueError(f"{path.name} has no checksum file (incomplete write)")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != digest_file.read_text().strip():
        raise ValueError(f"{path.name} fails its checksum (truncated or corrupt)")
    import io

    try:
        state = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means "refuse this file"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{path.name} cannot be loaded safely ({first})") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path.name} is not a contlearn checkpoint of format {FORMAT}")
    return state


def load_latest(
    run_dir: Path, warn: Callable[[str], None], run_id: str | None = None
) -> dict[str, Any] | None:
    """The newest checkpoint that verifies, loads and belongs to this run; damaged or foreign
    newer ones are reported.

    Args:
        run_dir: the run directory.
        warn: called with a line for each checkpoint passed over.
        run_id: the run's id (``meta.json``); a checkpoint recording another id was written by
            another run and is passed over (one without an id, from an older version, is
            taken).

    Returns:
        The checkpoint's state, or None if the run has no checkpoint at all.

    Raises:
        RunDirError: the run has checkpoints but none of them is usable (resuming would
            silently start the run over and drop its metrics).
    """
    files = checkpoint_files(run_dir)
    for path in reversed(files):
        try:
            state = read_checkpoint(path)
        except ValueError as exc:
            warn(f"checkpoint {exc}; trying the previous one")
            continue
        found = state.get("run_id")
        if run_id is not None and found is not None and found != run_id:
            warn(f"checkpoint {path.name} belongs to another run ({found}); trying the previous")
            continue
        return state
    if files:
        raise RunDirError(
            f"none of the {len(files)} checkpoints in {Path(run_dir) / CKPT_DIR} is usable; "
            "restore one from a backup, or start the run anew with --overwrite"
        )
    return None
