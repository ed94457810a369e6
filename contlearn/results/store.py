"""The run store: one directory per run, readable with pandas without contlearn.

Layout (docs/design.md §6)::

    runs/<name>/config.json        fully resolved config (the same keys as ``--set``)
    runs/<name>/meta.json          package versions, git commit, start time, seeds, device
    runs/<name>/metrics/part-00000.parquet, part-00001.parquet, ...   appended in chunks
    runs/<name>/checkpoints/

Every metrics part holds the columns ``run, stream, learner, seed, step, task, metric, layer,
value`` (``layer`` empty for whole-network metrics). Parts are written to a temporary name,
fsynced and renamed, so a crash loses at most the rows not yet flushed and never leaves a
half-written part under a real name.

(Over 400 lines: the whole on-disk format, writer and reader together, so that what is
written and what is read cannot drift apart.)
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from contlearn.errors import DataError, RunDirError, StoreError

COLUMNS = ("run", "stream", "learner", "seed", "step", "task", "metric", "layer", "value")
SCHEMA = pa.schema(
    [
        ("run", pa.string()),
        ("stream", pa.string()),
        ("learner", pa.string()),
        ("seed", pa.int64()),
        ("step", pa.int64()),
        ("task", pa.int64()),
        ("metric", pa.string()),
        ("layer", pa.string()),
        ("value", pa.float64()),
    ]
)
CONFIG_FILE = "config.json"
META_FILE = "meta.json"
METRICS_DIR = "metrics"


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file, fsync and rename.

    Either the whole new file is in place or the old one (if any) is untouched.

    Raises:
        StoreError: the write failed (disk full, file-size limit); the temporary file is removed.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise StoreError(
            f"cannot write {path} ({exc.strerror or exc}); free disk space or raise the "
            "file-size limit, then `contlearn resume` the run"
        ) from exc


def is_run_dir(path: Path) -> bool:
    """Whether ``path`` holds a contlearn run (has a ``config.json``)."""
    return (Path(path) / CONFIG_FILE).is_file()


def _leftover(entry: Path) -> bool:
    """A lock or temporary file left by a run killed before it wrote its config."""
    return entry.name == ".lock" or (entry.name.startswith(".") and entry.name.endswith(".tmp"))


def check_run_dir(path: Path, *, overwrite: bool = False) -> None:
    """Whether ``path`` can take a new run, without touching anything.

    Raises:
        RunDirError: ``path`` is a file or a dangling symlink, holds a run (and ``overwrite``
            is not set), or is a non-empty folder that holds no run.
    """
    path = Path(path)
    if path.is_symlink() and not path.exists():
        raise RunDirError(
            f"{path} is a symlink to {os.readlink(path)}, which does not exist; create its "
            "target or choose another --out"
        )
    if path.exists() and not path.is_dir():
        raise RunDirError(f"{path} is a file, not a run directory; choose another --out")
    if is_run_dir(path):
        if not overwrite:
            raise RunDirError(
                f"{path} already holds a run; pass --resume to continue it, --overwrite to "
                "replace it, or choose another --out"
            )
    elif path.is_dir() and _entries(path, lambda p: not _leftover(p)):
        raise RunDirError(f"{path} is not empty and holds no run; choose an empty or new --out")


def _entries(path: Path, keep: Any) -> list[Path]:
    try:
        return [p for p in path.iterdir() if keep(p)]
    except OSError as exc:
        raise RunDirError(f"cannot list {path} ({exc.strerror}); check its permissions") from None


def make_run_dir(path: Path) -> None:
    """Create the run directory (and its parents).

    Raises:
        RunDirError: it cannot be created (a file on the way, read-only filesystem, no
            permission, name too long); nothing is left half made.
    """
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunDirError(
            f"cannot create run directory {path} ({exc.strerror or exc}); choose another --out"
        ) from None


#: a run's folders and the files it writes there; ``--overwrite`` removes these and nothing else
RUN_FOLDERS = {METRICS_DIR: ("part-*.parquet", ".part-*.tmp"), "checkpoints": ("ckpt-*", ".ckpt-*")}
#: what the ``step`` column counts (``meta.json``): on RL streams, environment steps of a seed
#: over all its copies (runs without it counted loop steps, which :func:`load_runs` converts)
STEP_UNIT = "env"
#: the folders a run's live trackers write (``log=tensorboard``, ``log=wandb``): the run's own,
#: removed whole with it
TRACKER_FOLDERS = ("tensorboard", "wandb")


def clear_run(path: Path) -> None:
    """Remove the run in ``path`` (``--overwrite``): its config, meta, metric parts,
    checkpoints and trackers' folders, and only those; other files in the folder are left
    where they are. The
    caller holds the run's lock (:class:`RunLock`), so no live writer loses its run."""
    path = Path(path)
    try:
        for name in (CONFIG_FILE, META_FILE):  # config first: a half-cleared run is no run
            (path / name).unlink(missing_ok=True)
        for folder, patterns in RUN_FOLDERS.items():
            sub = path / folder
            if not sub.is_dir():
                continue
            for pattern in patterns:
                for file in sub.glob(pattern):
                    file.unlink(missing_ok=True)
            if not any(sub.iterdir()):
                sub.rmdir()
        for tmp in path.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)
        for folder in TRACKER_FOLDERS:
            if (path / folder).is_dir() and not (path / folder).is_symlink():
                shutil.rmtree(path / folder)
    except OSError as exc:
        raise RunDirError(
            f"cannot remove the run in {path} ({exc.strerror}); check its permissions"
        ) from None


def prepare_run_dir(path: Path, *, overwrite: bool = False) -> None:
    """Make sure ``path`` can take a new run (:func:`check_run_dir`, :func:`make_run_dir`).

    An existing run is refused unless ``overwrite`` (its files are removed, :func:`clear_run`,
    unless a live process writes it). A non-empty folder that is not a run is never touched.

    Raises:
        RunDirError: the folder holds a run (and neither flag is set), other files, or is
            being written by another process; or it cannot be created.
    """
    check_run_dir(path, overwrite=overwrite)
    make_run_dir(path)
    if overwrite and is_run_dir(path):
        with RunLock(path):
            clear_run(path)


def package_versions() -> dict[str, str]:
    """Versions of the packages a run's numbers depend on."""
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in ("contlearn", "torch", "numpy", "pandas", "pyarrow", "gymnasium", "mujoco"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def git_commit() -> str | None:
    """The commit of the contlearn checkout, if it is one (None otherwise)."""
    try:
        proc = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() or None if proc.returncode == 0 else None


def write_config(
    path: Path, config: Mapping[str, Any], seeds: Sequence[int], device: str = "cpu"
) -> None:
    """Write ``config.json`` and ``meta.json`` of a new run."""
    path = Path(path)
    write_atomic(path / CONFIG_FILE, json.dumps(dict(config), indent=2).encode())
    meta = {
        "run_id": uuid.uuid4().hex,
        "name": path.name,
        "versions": package_versions(),
        "git_commit": git_commit(),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seeds": list(seeds),
        "device": device,
        "host": platform.node(),
        "step_unit": STEP_UNIT,
    }
    write_atomic(path / META_FILE, json.dumps(meta, indent=2).encode())


def record_backend(path: Path, backend: str) -> None:
    """Set ``meta.json``'s ``backend``: the name of the path that runs the agent's steps
    (:mod:`contlearn.backends`; a resumed run records the one it continues with)."""
    file = Path(path) / META_FILE
    try:
        meta = json.loads(file.read_text())
    except (OSError, ValueError):
        meta = {}
    if not isinstance(meta, dict) or meta.get("backend") == backend:
        return
    meta["backend"] = backend
    write_atomic(file, json.dumps(meta, indent=2).encode())


def read_meta(path: Path) -> dict[str, Any]:
    """The ``meta.json`` of a run; empty if it is missing or unreadable (it only describes)."""
    try:
        meta = json.loads((Path(path) / META_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def run_name(path: Path) -> str:
    """The ``run`` column a run writes: the name its directory had when the run began
    (``meta.json``'s ``name``; for runs older than that field, the name in its first metric
    part), so a moved run keeps writing one name. Readers do not rely on it:
    :func:`load_runs` labels rows by the directory it loads them from."""
    name = read_meta(path).get("name")
    if isinstance(name, str) and name:
        return name
    parts = sorted((Path(path) / METRICS_DIR).glob("part-*.parquet"))
    try:
        column = pq.read_table(parts[0], columns=["run"]).column("run") if parts else None
    except (OSError, pa.ArrowException):
        column = None
    return str(column[0]) if column is not None and len(column) else Path(path).name


def read_config(path: Path) -> dict[str, Any]:
    """The ``config.json`` of a run.

    Raises:
        DataError: missing or not valid JSON.
    """
    file = Path(path) / CONFIG_FILE
    try:
        config = json.loads(file.read_text())
    except FileNotFoundError:
        raise DataError(f"{path} is not a run directory (no {CONFIG_FILE})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{file} is not valid JSON ({exc}); restore it or start a new run") from exc
    except OSError as exc:
        raise DataError(f"cannot read {file} ({exc.strerror}); check its permissions") from None
    if not isinstance(config, dict):
        raise DataError(
            f"{file} holds a {type(config).__name__}, not a mapping of config keys; restore it "
            "or start a new run"
        )
    return config


class MetricWriter:
    """Buffers metric rows and appends them to the run as parquet parts.

    Rows are flushed when ``flush_rows`` are buffered, when ``flush_seconds`` have passed since
    the last flush (checked on each append), and on :meth:`close`.

    Args:
        path: the run directory.
        run, stream, learner: constant columns of every row.
        flush_rows: rows per part at most.
        flush_seconds: longest time rows stay only in memory.
        trackers: experiment trackers each row is also handed to, as it is appended
            (:mod:`contlearn.results.trackers`; the caller closes them).
    """

    def __init__(
        self,
        path: Path,
        run: str,
        stream: str,
        learner: str,
        flush_rows: int = 50_000,
        flush_seconds: float = 60.0,
        trackers: Sequence[Any] = (),
    ) -> None:
        self.dir = Path(path) / METRICS_DIR
        self.dir.mkdir(parents=True, exist_ok=True)
        self.constants = {"run": run, "stream": stream, "learner": learner}
        self.flush_rows = flush_rows
        self.flush_seconds = flush_seconds
        self._cols: dict[str, list] = {
            c: [] for c in ("seed", "step", "task", "metric", "layer", "value")
        }
        self._last_flush = time.monotonic()
        self._next_part = self._first_free_part()
        self.trackers = list(trackers)

    def _first_free_part(self) -> int:
        parts = sorted(self.dir.glob("part-*.parquet"))
        return int(parts[-1].stem.split("-")[1]) + 1 if parts else 0

    def append(
        self,
        seeds: Sequence[int],
        step: int,
        task: int,
        metric: str,
        values: Iterable[float],
        layer: str = "",
    ) -> None:
        """Add one row per replica: ``values[r]`` is replica r's (seed ``seeds[r]``) value."""
        cols = self._cols
        if self.trackers:
            values = list(values)
            for tracker in self.trackers:
                tracker.append(seeds, step, task, metric, values, layer)
        for seed, value in zip(seeds, values, strict=True):
            cols["seed"].append(int(seed))
            cols["step"].append(int(step))
            cols["task"].append(int(task))
            cols["metric"].append(metric)
            cols["layer"].append(layer)
            cols["value"].append(float(value))
        if (
            len(cols["seed"]) >= self.flush_rows
            or time.monotonic() - self._last_flush >= self.flush_seconds
        ):
            self.flush()

    @property
    def pending(self) -> int:
        """Rows buffered and not yet on disk."""
        return len(self._cols["seed"])

    def flush(self) -> None:
        """Write buffered rows as the next parquet part (atomically)."""
        self._last_flush = time.monotonic()
        n = self.pending
        if not n:
            return
        arrays = {k: [v] * n for k, v in self.constants.items()}
        arrays.update(self._cols)
        table = pa.table({c: arrays[c] for c in COLUMNS}, schema=SCHEMA)
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        write_atomic(self.dir / f"part-{self._next_part:05d}.parquet", sink.getvalue().to_pybytes())
        self._next_part += 1
        for col in self._cols.values():
            col.clear()

    def close(self) -> None:
        """Flush what is left."""
        self.flush()

    @property
    def parts_written(self) -> int:
        """How many parts are on disk (the index the next part gets)."""
        return self._next_part

    def truncate(self, parts: int) -> None:
        """Drop buffered rows and every part with index ≥ ``parts`` (rows written after the
        checkpoint a resumed run continues from; the resumed run writes them again)."""
        for col in self._cols.values():
            col.clear()
        for part in self.dir.glob("part-*.parquet"):
            if int(part.stem.split("-")[1]) >= parts:
                part.unlink()
        for tmp in self.dir.glob(".part-*.parquet.tmp"):
            tmp.unlink()
        self._next_part = parts


class RunLock:
    """One writer per run: an exclusive ``.lock`` file holding the writer's pid.

    A lock left by a process that no longer exists (killed, crashed) is stale and is cleared.

    Raises:
        RunDirError: another live process holds the run.
    """

    def __init__(self, path: Path) -> None:
        self.file = Path(path) / ".lock"

    def __enter__(self) -> RunLock:
        for _ in range(2):
            try:
                fd = os.open(self.file, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except OSError as exc:
                if not isinstance(exc, FileExistsError):
                    raise RunDirError(
                        f"cannot write {self.file} ({exc.strerror}); the run directory must be "
                        "writable: check its permissions or choose another --out"
                    ) from None
                if self._holder_alive():
                    raise RunDirError(
                        f"{self.file.parent} is being written by process {self._pid()}; "
                        "wait for it to finish or stop it"
                    ) from None
                self.file.unlink(missing_ok=True)  # stale: its process is gone
                continue
            with os.fdopen(fd, "w") as fh:
                fh.write(str(os.getpid()))
            return self
        raise RunDirError(f"cannot lock {self.file.parent}; remove {self.file} if no run is active")

    def _pid(self) -> int:
        try:
            return int(self.file.read_text().strip() or -1)
        except (OSError, ValueError):
            return -1

    def _holder_alive(self) -> bool:
        pid = self._pid()
        if pid <= 0:
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def __exit__(self, *exc: object) -> None:
        if self._pid() == os.getpid():
            self.file.unlink(missing_ok=True)


def find_runs(paths: str | Path | Sequence[str | Path]) -> list[Path]:
    """Run directories named by ``paths``: each a run directory or a folder holding runs.

    Raises:
        DataError: a path does not exist or holds no run.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    found: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise DataError(f"{p} does not exist; give a run directory or a folder of runs")
        if is_run_dir(p):
            found.append(p)
            continue
        runs = sorted(c.parent for c in p.rglob(CONFIG_FILE))
        if not runs:
            raise DataError(f"{p} holds no contlearn run (no {CONFIG_FILE} below it)")
        found.extend(runs)
    return found


def read_metrics(run_dir: Path) -> pa.Table:
    """All metric parts of one run as one Arrow table (empty if none yet).

    Raises:
        DataError: a part is unreadable; the message names it.
    """
    tables = []
    for part in sorted((Path(run_dir) / METRICS_DIR).glob("part-*.parquet")):
        try:
            tables.append(pq.read_table(part, schema=SCHEMA))
        except (OSError, pa.ArrowException) as exc:
            raise DataError(
                f"metrics part {part} is unreadable ({exc}); move it aside to load the rest"
            ) from exc
    return pa.concat_tables(tables) if tables else SCHEMA.empty_table()


def run_labels(runs: Sequence[Path]) -> list[str]:
    """The ``run`` column :func:`load_runs` gives each run directory: its name, or, where two
    loaded runs share a name, its path from the folder they all lie in (``a/run``, ``b/run``).

    Rows are labelled by where they are loaded from, not by what their parts say, so a run
    moved or renamed (``mv A B``, then resumed) reads as one run, and two runs of one name
    under different roots stay two.
    """
    resolved = [Path(os.path.abspath(r)) for r in runs]
    names = [r.name for r in resolved]
    if len(set(names)) == len(names):
        return names
    common = Path(os.path.commonpath(resolved)) if resolved else Path()
    labels = []
    for r in resolved:
        if names.count(r.name) == 1:
            labels.append(r.name)
            continue
        rel = r.relative_to(common).as_posix() if r != common else r.name
        labels.append(rel or r.name)
    return labels


def _loop_step_copies(path: Path) -> int:
    """For an RL run made before RL steps counted environment steps (no ``step_unit`` in its
    ``meta.json``) with several env copies per seed: that number, by which its recorded steps
    are multiplied to read as environment steps; else 1."""
    if read_meta(path).get("step_unit") == STEP_UNIT:
        return 1
    try:
        copies = read_config(path).get("num_envs", 1)
    except DataError:
        return 1
    return copies if isinstance(copies, int) and copies > 1 else 1


def load_runs(paths: str | Path | Sequence[str | Path], config: bool | Sequence[str] = False):
    """Load the metrics of runs as one long pandas DataFrame.

    Args:
        paths: run directories and/or folders holding runs (searched recursively).
        config: add config keys as columns: ``True`` for every key that varies between the
            runs loaded, or a list of keys.

    Returns:
        A DataFrame with at least the columns ``run, stream, learner, seed, step, task, metric,
        layer, value``, one row per (run, seed, step, metric, layer).
    """
    import pandas as pd

    runs = find_runs(paths)
    labels = run_labels(runs)
    frames = []
    for r, label in zip(runs, labels, strict=True):
        frame = read_metrics(r).to_pandas()
        frame["run"] = label  # (the rows of one directory are one run, whatever they say)
        copies = _loop_step_copies(r)
        if copies > 1:  # (an RL run recorded in loop steps: in environment steps now)
            frame["step"] = frame["step"] * copies
        frames.append(frame)
    df = pd.concat(frames, ignore_index=True) if frames else SCHEMA.empty_table().to_pandas()
    if config:
        configs = {label: read_config(r) for r, label in zip(runs, labels, strict=True)}
        if config is True:
            keys = sorted(
                {
                    k
                    for c in configs.values()
                    for k in c
                    if len({json.dumps(cc.get(k)) for cc in configs.values()}) > 1
                }
                - set(COLUMNS)
            )
        else:
            keys = list(config)
        for key in keys:
            df[key] = df["run"].map({name: c.get(key) for name, c in configs.items()})
    return df
