"""MNIST files: the shipped copy, checksum checks, and downloads from a local HTTP server."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest

from contlearn.data.datasets import (
    MNIST_FILES,
    PACKAGED_DIR,
    download_mnist,
    load_mnist,
    load_mnist_split,
    md5_of,
)
from contlearn.errors import DataError
from tests.conftest import serve_directory

TEST_FILES = {k: v for k, v in MNIST_FILES.items() if k.startswith("t10k")}


def test_shipped_test_set_loads_and_matches_md5():
    for name, md5 in TEST_FILES.items():
        assert md5_of(PACKAGED_DIR / name) == md5
    images, labels = load_mnist("test")
    assert images.shape == (10_000, 784) and images.dtype == np.uint8
    assert labels.shape == (10_000,) and set(np.unique(labels)) == set(range(10))
    assert images.flags.writeable


def test_missing_files_name_the_fix(tmp_path):
    with pytest.raises(DataError, match="contlearn data download mnist"):
        load_mnist("full", tmp_path)


def test_corrupt_file_is_refused(tmp_path):
    for name in TEST_FILES:
        shutil.copy(PACKAGED_DIR / name, tmp_path / name)
    data = bytearray((tmp_path / "t10k-labels-idx1-ubyte.gz").read_bytes())
    data[100] ^= 0xFF
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(bytes(data))
    with pytest.raises(DataError, match="md5"):
        load_mnist_split("test", tmp_path)


def test_truncated_file_is_refused(tmp_path):
    for name in TEST_FILES:
        shutil.copy(PACKAGED_DIR / name, tmp_path / name)
    raw = (tmp_path / "t10k-images-idx3-ubyte.gz").read_bytes()
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError):
        load_mnist_split("test", tmp_path)


@pytest.fixture
def server(tmp_path):
    """A local HTTP server on 127.0.0.1 with three mirrors: missing, corrupt and good."""
    root = tmp_path / "www"
    (root / "empty").mkdir(parents=True)
    (root / "bad").mkdir()
    (root / "good").mkdir()
    for name in TEST_FILES:
        shutil.copy(PACKAGED_DIR / name, root / "good" / name)
        (root / "bad" / name).write_bytes(gzip.compress(b"not mnist"))

    with serve_directory(root) as url:
        yield url


def test_download_falls_back_across_mirrors_and_verifies(server, tmp_path):
    target = tmp_path / "cache"
    lines = []
    mirrors = [f"{server}/empty/", f"{server}/bad/", f"{server}/good/"]
    out = download_mnist(target, mirrors=mirrors, timeout=5, log=lines.append, files=TEST_FILES)
    assert out == target
    for name, md5 in TEST_FILES.items():
        assert md5_of(target / name) == md5
    assert all("good" in line for line in lines)
    assert not list(target.glob("*.part"))
    images, _ = load_mnist("test", target)
    assert images.shape == (10_000, 784)
    # a second call keeps the verified files
    lines.clear()
    download_mnist(target, mirrors=mirrors, timeout=5, log=lines.append, files=TEST_FILES)
    assert all("present" in line for line in lines)


def test_download_with_no_good_mirror_fails_cleanly(server, tmp_path):
    target = tmp_path / "cache"
    with pytest.raises(DataError, match="could not download"):
        download_mnist(
            target,
            mirrors=[f"{server}/empty/", f"{server}/bad/"],
            timeout=5,
            log=lambda _: None,
            files=TEST_FILES,
        )
    assert not any(Path(target).iterdir())  # no partial file left under any name


def test_cli_download_uses_the_given_mirror(server, tmp_path, cli, monkeypatch):
    import contlearn.data.datasets as ds

    monkeypatch.setattr(ds, "MNIST_FILES", TEST_FILES)
    monkeypatch.setattr(ds, "MNIST_MIRRORS", ())
    code, out, err = cli(
        "data", "download", "mnist", "--dir", tmp_path, "--mirror", f"{server}/good/"
    )
    assert code == 0, err
    assert (tmp_path / "mnist" / "t10k-images-idx3-ubyte.gz").is_file()
    code, _, err = cli(
        "data", "download", "mnist", "--dir", tmp_path / "x", "--mirror", f"{server}/empty/"
    )
    assert code == 2 and err.count("\n") == 1 and "could not download" in err
