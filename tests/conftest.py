"""Shared fixtures: small, fast configs and an in-process CLI runner."""

from __future__ import annotations

import contextlib
import http.server
import os
import threading
from pathlib import Path

import pytest
import torch

from contlearn.cli import main

# Small thread counts keep the suite fast and deterministic on 2 cores.
torch.set_num_threads(1)
os.environ.setdefault("CI", "true")  # no progress bars in tests


@pytest.fixture
def cli(capsys):
    """Run ``contlearn ARGS`` in-process; returns (exit code, stdout, stderr)."""

    def run(*args: str) -> tuple[int, str, str]:
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return code, out, err

    return run


def snapshot(path: Path) -> dict[str, bytes]:
    """Every file below ``path`` with its bytes (to check nothing was touched)."""
    return {
        str(p.relative_to(path)): p.read_bytes()
        for p in sorted(Path(path).rglob("*"))
        if p.is_file()
    }


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep test output clean
        pass


@contextlib.contextmanager
def serve_directory(root: Path):
    """A local HTTP server on 127.0.0.1 serving ``root``; yields its base URL (the download
    tests' mirrors: nothing is fetched from outside)."""

    def handler(*args, **kwargs):
        return _QuietHandler(*args, directory=str(root), **kwargs)

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture(scope="session")
def image_files(tmp_path_factory) -> Path:
    """Generated CIFAR-10/100 archives and ImageNet32 files in the official formats (once per
    session; :mod:`tests.image_files`): ``<root>/cifar10``, ``cifar100``, ``imagenet32``."""
    from tests.image_files import write_cifar, write_imagenet32

    root = tmp_path_factory.mktemp("image-data")
    write_cifar(root / "cifar10", "cifar10", 12, 4)
    write_cifar(root / "cifar100", "cifar100", 8, 3)
    write_imagenet32(root / "imagenet32", 8)
    return root


@pytest.fixture
def image_data(image_files, monkeypatch) -> Path:
    """:func:`image_files` as the default data folders ($CONTLEARN_DATA, $CONTLEARN_IMAGENET32),
    with the CIFAR md5s set to the generated archives'."""
    import contlearn.data.images as im
    from contlearn.data.datasets import md5_of

    for name, spec in list(im.CIFAR.items()):
        archive = image_files / name / spec.archive
        monkeypatch.setitem(im.CIFAR, name, spec._replace(md5=md5_of(archive)))
    monkeypatch.setenv("CONTLEARN_DATA", str(image_files))
    monkeypatch.setenv("CONTLEARN_IMAGENET32", str(image_files / "imagenet32"))
    return image_files
