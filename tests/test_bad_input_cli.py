"""Issue #17's bad inputs, one regression test each, and a fuzz pass over every entry point:
each is one line on stderr and exit code 2, and no run directory changes."""

from __future__ import annotations

import builtins
import contextlib
import errno
import hashlib
import io
import os
import resource
import signal
import string
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from contlearn.cli import main

TINY = ["--steps", "3", "--set", "probes=none", "--set", "examples_per_task=2", "--set", "hidden=3"]


def tree_hash(path: Path) -> str:
    """One hash of every file name and byte below ``path``."""
    h = hashlib.sha256()
    for p in sorted(Path(path).rglob("*")):
        h.update(str(p.relative_to(path)).encode())
        if p.is_file() and not p.is_symlink():
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A run, a file, a dangling symlink, a read-only folder and bad agent files."""
    root = tmp_path_factory.mktemp("world")
    assert main(["run", "bit-flipping", *TINY, "--out", str(root / "run")]) == 0
    (root / "file").write_text("x")
    (root / "dangling").symlink_to(root / "nowhere")
    (root / "ro").mkdir()
    (root / "ro").chmod(0o555)
    (root / "syntax.py").write_text("class A:\n    def act(self\n")
    (root / "raises.py").write_text(
        "class A:\n    def __init__(self, info, seed):\n        raise ValueError('boom')\n"
        "    def act(self, obs): ...\n    def observe(self, obs, action, feedback): ...\n"
    )
    (root / "list.json").write_text("[1, 2]")
    yield root
    (root / "ro").chmod(0o755)


def _check(capsys, world, args, code=2):
    before = tree_hash(world / "run")
    got = main([str(a) for a in args])
    _, err = capsys.readouterr()
    assert got == code, err
    assert err.count("\n") == 1 and err.startswith("contlearn: error: "), err
    assert tree_hash(world / "run") == before
    return err


CASES = {
    "seed over 64 bits": (["run", "bit-flipping", *TINY, "--seed", "1" + "0" * 20], "2**62"),
    "out under a file": (["run", "bit-flipping", *TINY, "--out", "{w}/file/sub"], "cannot create"),
    "out read-only": (["run", "bit-flipping", *TINY, "--out", "{w}/ro/run"], "cannot create"),
    "out dangling symlink": (["run", "bit-flipping", *TINY, "--out", "{w}/dangling"], "symlink"),
    "out too long": (["run", "bit-flipping", *TINY, "--out", "{w}/" + "n" * 300], "too long"),
    "config not a mapping": (["run", "--config", "{w}/list.json"], "table of keys"),
    "device meta": (["run", "bit-flipping", *TINY, "--set", "device=meta"], "device=meta"),
    "device mps": (["run", "bit-flipping", *TINY, "--set", "device=mps"], "device=mps"),
    "mirror not a url": (["data", "download", "mnist", "--mirror", "notaurl"], "not a URL"),
    "agent syntax error": (
        ["run", "bit-flipping", *TINY, "--agent", "{w}/syntax.py:A"],
        "SyntaxError",
    ),
    "agent raises": (["run", "bit-flipping", *TINY[:6], "--agent", "{w}/raises.py:A"], "boom"),
    "ppo on supervised": (["run", "bit-flipping", *TINY, "--agent", "ppo"], "rl streams"),
    "plot out under a file": (["plot", "{w}/run", "--out", "{w}/file/p.png"], "cannot save"),
    "threads": (["run", "bit-flipping", *TINY, "--set", "threads=100000"], "1024"),
    "seeds 1e9": (["run", "bit-flipping", *TINY, "--set", "seeds=1e9"], "memory"),
    "examples 1e30": (["run", "bit-flipping", "--set", "examples_per_task=1e30"], "2**62"),
    "tasks=abc under --tasks": (
        ["run", "bit-flipping", "--tasks", "1", "--set", "tasks=abc", "--set", "probes=none"],
        "tasks='abc'",
    ),
    "overwrite and resume": (
        ["run", "bit-flipping", *TINY, "--out", "{w}/run", "--overwrite", "--resume"],
        "not both",
    ),
    "plot by bogus": (["plot", "{w}/run", "--by", "bogus"], "--by bogus"),
    "summary by bogus": (["summary", "{w}/run", "--by", "bogus"], "--by bogus"),
    "hidden empty width": (["run", "bit-flipping", *TINY, "--set", "hidden=100,,100"], "empty"),
    "existing run": (["run", "bit-flipping", *TINY, "--out", "{w}/run"], "already holds"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_bad_input_is_one_line_and_exit_2(capsys, world, case, tmp_path, monkeypatch):
    if case == "out read-only" and os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    monkeypatch.chdir(tmp_path)  # (runs without --out go to ./runs)
    args, needle = CASES[case]
    err = _check(capsys, world, [a.replace("{w}", str(world)) for a in args])
    assert needle in err
    assert not (tmp_path / "runs").exists()


# --- the fuzz pass: every entry point, paths, numbers at and past their limits ---

PATHS = st.sampled_from(
    [
        "{w}/file",
        "{w}/file/sub",
        "{w}/dangling",
        "{w}/ro/x",
        "{w}/" + "é" * 200,
        "{w}/" + "n" * 300,
        "{w}/list.json",
        "{w}/nowhere/at/all",
        "{w}/run/metrics",
        "",
        "-",
    ]
)
NUMBERS = st.one_of(
    st.sampled_from(
        ["0", "-1", "1e9", "1e30", "1e400", "nan", "inf", "2e19", "4611686018427387905"]
    ),
    st.integers(-(2**70), 2**70).map(str),
    st.text(string.printable, max_size=6),
)
# (no run-length or seed-count keys: a valid one would start a long run; their refusals are
# the cases above and tests/test_bad_input.py)
KEYS = [
    "seed",
    "threads",
    "probe_size",
    "examples_per_task",
    "batch_size",
    "hidden",
    "lr",
    "flush_rows",
    "checkpoint_keep",
    "device",
    "probes",
    "on_divergence",
    "learner.replacement_rate",
    "credit",
    "num_bits",
    "log",
]
BAD_LENGTHS = st.sampled_from(["-1", "abc", "1e400", "nan", "2e19", "1.5", ""])


def _commands(w: str):
    pth = PATHS.map(lambda p: p.replace("{w}", w))
    sets = st.lists(st.tuples(st.sampled_from(KEYS), NUMBERS), min_size=1, max_size=2).map(
        lambda kv: [x for k, v in kv for x in ("--set", f"{k}={v}")]
    )
    return st.one_of(
        st.tuples(sets, pth).map(lambda t: ["run", "bit-flipping", *TINY, *t[0], "--out", t[1]]),
        st.tuples(st.sampled_from(["--tasks", "--steps"]), NUMBERS, pth).map(
            lambda t: ["resume", t[2] or f"{w}/nowhere", t[0], t[1]]
        ),
        st.tuples(st.sampled_from(["--tasks", "--steps"]), BAD_LENGTHS).map(
            lambda t: ["resume", f"{w}/run", t[0], t[1]]
        ),
        st.tuples(pth, pth).map(lambda t: ["plot", t[0] or f"{w}/run", "--out", t[1] or "x"]),
        st.tuples(pth, st.sampled_from(["learner", "bogus", "lr", ""])).map(
            lambda t: ["summary", t[0] or f"{w}/run", "--by", t[1]]
        ),
        st.tuples(pth, NUMBERS).map(lambda t: ["sweep", t[0] or "x.toml", "--out", t[1]]),
        pth.map(lambda p: ["data", "download", "mnist", "--dir", p, "--mirror", "ftp:x"]),
        pth.map(lambda p: ["run", "--config", p]),
        st.tuples(pth, st.sampled_from(["tensorboard", "wandb", "mlflow", ""])).map(
            lambda t: ["export", t[0] or f"{w}/nowhere", "--to", t[1]]
        ),
        NUMBERS.map(lambda n: ["run", "bit-flipping", "--seeds", n, "--out", f"{w}/run"]),
    )


#: environment faults a command may meet (each drawn as often as no fault at all)
FAULTS = ["none", "disk full", "permission denied", "interrupted"]


def _denied(path: object) -> OSError:
    return PermissionError(errno.EACCES, "Permission denied", str(path))


@contextlib.contextmanager
def environment_fault(kind: str, delay: float) -> Iterator[None]:
    """The fault ``kind`` while the block runs.

    - ``disk full``: a file-size limit of 4 kB (RLIMIT_FSIZE): every write past it fails, as
      on a full disk;
    - ``permission denied``: every folder made and file opened for writing is refused (root
      ignores file modes, so the calls themselves refuse, as the OS does for another user);
    - ``interrupted``: a real SIGINT (Ctrl-C) after ``delay`` seconds, start-up included.
    """
    if kind == "disk full":
        old = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, old[1]))
        try:
            yield
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, old)
    elif kind == "permission denied":
        real = os.mkdir, os.open, io.open, builtins.open

        def mkdir(path, *args, **kwargs):
            raise _denied(path)

        def low_open(path, flags, *args, **kwargs):
            if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
                raise _denied(path)
            return real[1](path, flags, *args, **kwargs)

        def open_(file, mode="r", *args, **kwargs):
            if any(m in mode for m in "wax+"):
                raise _denied(file)
            return real[2](file, mode, *args, **kwargs)

        os.mkdir, os.open, io.open, builtins.open = mkdir, low_open, open_, open_
        try:
            yield
        finally:
            os.mkdir, os.open, io.open, builtins.open = real
    elif kind == "interrupted":

        def ctrl_c(signum, frame):
            while frame is not None and frame.f_code is not main.__code__:
                frame = frame.f_back
            if frame is not None:  # (in the command: Ctrl-C; one that lands after it: dropped)
                raise KeyboardInterrupt

        previous = signal.signal(signal.SIGINT, ctrl_c)
        timer = threading.Timer(delay, os.kill, (os.getpid(), signal.SIGINT))
        timer.start()
        try:
            yield
        finally:
            timer.cancel()
            timer.join()
            signal.signal(signal.SIGINT, previous)
    else:
        yield


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_fuzzed_commands_never_traceback_nor_touch_a_run(capsys, world, data, tmp_path_factory):
    args = data.draw(_commands(str(world)))
    fault = data.draw(st.sampled_from(FAULTS))
    delay = data.draw(st.floats(0.0, 0.3))
    before, cwd = tree_hash(world / "run"), os.getcwd()
    os.chdir(tmp_path_factory.mktemp("cwd"))  # (runs without --out go to ./runs)
    try:
        with environment_fault(fault, delay):
            code = main(args)
    finally:
        os.chdir(cwd)
    _, err = capsys.readouterr()
    assert tree_hash(world / "run") == before, (args, fault)
    if code == 130:  # (Ctrl-C: one line saying so)
        assert fault == "interrupted" and err.count("\n") == 1, (args, err)
        assert err.startswith("contlearn: "), (args, err)
    elif code != 0:
        assert code == 2, (args, fault, err)
        assert err.count("\n") == 1 and err.startswith("contlearn: error: "), (args, fault, err)
