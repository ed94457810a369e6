"""CIFAR and ImageNet32 files: tiny archives in the official formats, served from 127.0.0.1."""

from __future__ import annotations

import io
import os
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest

import contlearn.data.images as im
from contlearn.data.datasets import md5_of
from contlearn.data.pickles import load_batch
from contlearn.errors import DataError
from tests.conftest import serve_directory


def _rows(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 3072), dtype=np.uint8)


def _cifar_batches(name: str) -> dict[str, dict]:
    """Batch dicts as in the official archive (labels as Python lists), 3 images each."""
    if name == "cifar10":
        files = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
        return {
            f: {"batch_label": f, "labels": [(i + k) % 10 for k in range(3)], "data": _rows(3, i)}
            for i, f in enumerate(files)
        }
    return {
        f: {
            "fine_labels": [99, 0, 42 + i],
            "coarse_labels": [19, 0, 7],
            "data": _rows(3, 10 + i),
            "filenames": ["a.png", "b.png", "c.png"],
        }
        for i, f in enumerate(["train", "test"])
    }


def _py2_pickle(data: np.ndarray, labels: list[int], label_key: bytes = b"labels") -> bytes:
    """A batch dict as Python 2's cPickle (protocol 2) wrote the official files: numpy.core
    names and the pixels as a Python 2 str (which the loader must read as latin1)."""

    def text(raw: bytes) -> bytes:  # SHORT_BINSTRING / BINSTRING
        if len(raw) < 256:
            return b"U" + bytes([len(raw)]) + raw
        return b"T" + struct.pack("<i", len(raw)) + raw

    def uint(v: int) -> bytes:  # BININT1 / BININT2
        return b"K" + bytes([v]) if v < 256 else b"M" + struct.pack("<H", v)

    # _reconstruct(ndarray, (0,), "b"), then BUILD (1, (N, 3072), dtype("u1"), False, raw)
    array = (
        b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + text(b"b")
        + b"\x87R(K\x01" + uint(data.shape[0]) + uint(data.shape[1]) + b"\x86"
        + b"cnumpy\ndtype\n" + text(b"u1") + b"K\x00K\x01\x87R(K\x03" + text(b"|")
        + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89" + text(data.tobytes()) + b"tb"
    )  # fmt: skip
    items = b"".join(uint(v) for v in labels)
    return b"\x80\x02}(" + text(b"data") + array + text(label_key) + b"](" + items + b"eu."


def _write_archive(path: Path, name: str, batches: dict[str, dict], protocol: int = 2) -> Path:
    folder = im.CIFAR[name].folder
    with tarfile.open(path, "w:gz") as tar:
        for member, batch in batches.items():
            raw = pickle.dumps(batch, protocol=protocol)
            info = tarfile.TarInfo(f"{folder}/{member}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return path


@pytest.fixture
def cifar(tmp_path, monkeypatch):
    """Both generated archives in tmp/www/good, with the specs' md5s set to theirs."""
    good = tmp_path / "www" / "good"
    good.mkdir(parents=True)
    batches = {}
    for name, spec in list(im.CIFAR.items()):
        batches[name] = _cifar_batches(name)
        archive = _write_archive(good / spec.archive, name, batches[name])
        monkeypatch.setitem(im.CIFAR, name, spec._replace(md5=md5_of(archive)))
    return good, batches


def test_cifar10_decodes_pixels_and_labels(cifar, tmp_path):
    good, batches = cifar
    x, y = im.load_cifar("cifar10", "train", good)
    assert x.shape == (15, 3, 32, 32) and x.dtype == np.uint8 and y.dtype == np.int64
    first = batches["cifar10"]["data_batch_1"]
    row = first["data"][0]
    assert np.array_equal(x[0, 0], row[:1024].reshape(32, 32))  # red plane, row-major
    assert np.array_equal(x[0, 1, 2, 5], row[1024 + 2 * 32 + 5])  # green, row 2, column 5
    assert np.array_equal(x[0, 2], row[2048:].reshape(32, 32))  # blue
    expected = np.concatenate(
        [batches["cifar10"][f"data_batch_{i}"]["labels"] for i in range(1, 6)]
    )
    assert np.array_equal(y, expected)
    xt, yt = im.load_cifar("cifar10", "test", good)
    assert xt.shape == (3, 3, 32, 32) and list(yt) == batches["cifar10"]["test_batch"]["labels"]
    assert x.flags.writeable


def test_known_planes_decode_to_their_channels(tmp_path, monkeypatch):
    r, g, b = (np.full(1024, v, np.uint8) for v in (200, 100, 7))
    r[33] = 1  # row 1, column 1 of red
    batch = {"data": np.concatenate([r, g, b])[None], "labels": [3]}
    spec = im.CIFAR["cifar10"]
    archive = _write_archive(tmp_path / spec.archive, "cifar10", {"test_batch": batch})
    monkeypatch.setitem(im.CIFAR, "cifar10", spec._replace(md5=md5_of(archive)))
    x, y = im.load_cifar("cifar10", "test", tmp_path)
    assert x[0, 0, 1, 1] == 1 and x[0, 0, 0, 0] == 200
    assert (x[0, 1] == 100).all() and (x[0, 2] == 7).all() and list(y) == [3]


def test_cifar100_fine_and_coarse_labels(cifar):
    good, batches = cifar
    _, fine = im.load_cifar("cifar100", "train", good)
    _, coarse = im.load_cifar("cifar100", "train", good, labels="coarse")
    assert list(fine) == [99, 0, 42] and list(coarse) == [19, 0, 7]
    with pytest.raises(DataError, match="no 'coarse' labels"):
        im.load_cifar("cifar10", "train", good, labels="coarse")


def test_cifar_cache_is_used_and_follows_the_archive(cifar, monkeypatch):
    good, _ = cifar
    first = im.load_cifar("cifar100", "test", good)
    assert (good / "test-fine.npz").is_file() and not list(good.glob("*.part"))
    monkeypatch.setattr(im, "_read_cifar_archive", lambda *a: pytest.fail("archive re-read"))
    second = im.load_cifar("cifar100", "test", good)
    assert all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))
    archive = good / im.CIFAR["cifar100"].archive
    os.utime(archive, ns=(1, 1))  # a different archive: the cache no longer applies
    with pytest.raises(pytest.fail.Exception, match="archive re-read"):
        im.load_cifar("cifar100", "test", good)


def test_missing_and_corrupt_archives_name_the_fix(cifar, tmp_path):
    with pytest.raises(DataError, match="contlearn data download cifar10"):
        im.load_cifar("cifar10", "train", tmp_path / "nothing")
    good, _ = cifar
    archive = good / im.CIFAR["cifar10"].archive
    archive.write_bytes(archive.read_bytes()[:-10])
    with pytest.raises(DataError, match="md5"):
        im.load_cifar("cifar10", "train", good)
    with pytest.raises(DataError, match="unknown CIFAR-10 split"):
        im.load_cifar("cifar10", "val", good)


def test_malformed_archive_with_matching_md5_is_refused(tmp_path, monkeypatch):
    spec = im.CIFAR["cifar10"]
    batch = {"data": np.zeros((2, 100), np.uint8), "labels": [0, 1]}
    archive = _write_archive(tmp_path / spec.archive, "cifar10", {"test_batch": batch})
    monkeypatch.setitem(im.CIFAR, "cifar10", spec._replace(md5=md5_of(archive)))
    with pytest.raises(DataError, match="expected 3072"):
        im.load_cifar("cifar10", "test", tmp_path)
    with pytest.raises(DataError, match="no file cifar-10-batches-py/data_batch_1"):
        im.load_cifar("cifar10", "train", tmp_path)
    raw = archive.read_bytes()
    archive.write_bytes(raw[: len(raw) // 2])  # a truncated gzip that passes the md5 check
    monkeypatch.setitem(im.CIFAR, "cifar10", spec._replace(md5=md5_of(archive)))
    with pytest.raises(DataError, match="cannot read .*delete it and download it again"):
        im.load_cifar("cifar10", "test", tmp_path)
    assert not list(tmp_path.glob("*.npz"))


def test_python2_pickles_as_in_the_official_files(tmp_path, monkeypatch):
    spec = im.CIFAR["cifar100"]
    data = _rows(2, 5)
    raw = _py2_pickle(data, [98, 3], b"fine_labels")
    with tarfile.open(tmp_path / spec.archive, "w:gz") as tar:
        info = tarfile.TarInfo(f"{spec.folder}/test")
        info.size = len(raw)
        tar.addfile(info, io.BytesIO(raw))
    monkeypatch.setitem(im.CIFAR, "cifar100", spec._replace(md5=md5_of(tmp_path / spec.archive)))
    x, y = im.load_cifar("cifar100", "test", tmp_path)
    assert np.array_equal(x.reshape(2, -1), data) and list(y) == [98, 3]
    (tmp_path / "val_data").write_bytes(_py2_pickle(data, [1000, 1]))
    x, y = im.load_imagenet32(tmp_path, "val")
    assert np.array_equal(x.reshape(2, -1), data) and list(y) == [999, 0]


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_restricted_unpickler_refuses_other_classes(tmp_path, monkeypatch):
    path = tmp_path / "val_data"
    path.write_bytes(pickle.dumps({"data": _Evil(), "labels": [1]}, protocol=2))
    called = []
    monkeypatch.setattr(os, "system", lambda cmd: called.append(cmd))
    with pytest.raises(DataError, match=r"refusing to unpickle .*val_data.*(posix|os)\.system"):
        load_batch(path)
    assert not called
    path.write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="not a readable pickle"):
        load_batch(path)
    path.write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(DataError, match="not a dict"):
        load_batch(path)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_unpickler_reads_numpy_arrays_of_each_protocol(tmp_path, protocol):
    batch = {"data": _rows(2, 0), "labels": [1, 2], "mean": np.zeros(3072), "n": np.int64(7)}
    (tmp_path / "b").write_bytes(pickle.dumps(batch, protocol=protocol))
    out = load_batch(tmp_path / "b")
    assert np.array_equal(out["data"], batch["data"]) and out["n"] == 7


# --- downloads from a local server ---


@pytest.fixture
def server(cifar, tmp_path):
    """127.0.0.1 with three mirrors: empty (404), bad (wrong bytes) and good."""
    root = tmp_path / "www"
    (root / "empty").mkdir()
    (root / "bad").mkdir()
    for spec in im.CIFAR.values():
        (root / "bad" / spec.archive).write_bytes(b"not an archive")

    with serve_directory(root) as url:
        yield url


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_download_falls_back_across_mirrors_and_verifies(server, tmp_path, name):
    target = tmp_path / "cache" / name
    lines: list[str] = []
    mirrors = [f"{server}/empty/", f"{server}/bad/", f"{server}/good/"]
    assert im.download_cifar(name, target, mirrors, timeout=5, log=lines.append) == target
    assert lines == [f"{im.CIFAR[name].archive}: downloaded from {server}/good/"]
    assert [p.name for p in target.iterdir()] == [im.CIFAR[name].archive]
    x, _ = im.load_cifar(name, "test", target)
    assert x.shape == (3, 3, 32, 32)
    lines.clear()
    im.download_cifar(name, target, mirrors, timeout=5, log=lines.append)
    assert "present" in lines[0]


def test_download_with_no_good_mirror_leaves_nothing(server, tmp_path):
    target = tmp_path / "cache"
    with pytest.raises(DataError, match="could not download cifar-10-python.tar.gz"):
        im.download_cifar(
            "cifar10", target, [f"{server}/empty/", f"{server}/bad/"], timeout=5, log=print
        )
    assert not any(target.iterdir())


def test_cli_downloads_cifar_and_reports_errors_in_one_line(server, tmp_path, cli, monkeypatch):
    monkeypatch.setattr(im, "CIFAR_MIRRORS", ())
    code, out, err = cli(
        "data", "download", "cifar100", "--dir", tmp_path, "--mirror", f"{server}/good/"
    )
    assert code == 0, err
    assert (tmp_path / "cifar100" / "cifar-100-python.tar.gz").is_file()
    assert f"data_dir={tmp_path / 'cifar100'}" in out and "CIFAR-100 ready" in out
    code, _, err = cli(
        "data", "download", "cifar10", "--dir", tmp_path / "x", "--mirror", f"{server}/bad/"
    )
    assert code == 2 and err.count("\n") == 1 and "md5" in err
    assert not any((tmp_path / "x" / "cifar10").iterdir())


# --- ImageNet32 ---


def _imagenet_dir(path: Path, npz: bool = False) -> dict[str, dict]:
    """All 11 batch files as the paper's scripts write them: labels 1…1000, with a mean."""
    path.mkdir(parents=True, exist_ok=True)
    batches = {}
    for i, name in enumerate([*im.IMAGENET32_FILES["train"], *im.IMAGENET32_FILES["val"]]):
        data = _rows(4, 100 + i)
        batch = {"data": data, "labels": [1, 1000, 5 + i, 5], "mean": data.mean(axis=0)}
        batches[name] = batch
        if npz:
            np.savez(path / f"{name}.npz", **batch)
        else:
            (path / name).write_bytes(pickle.dumps(batch, protocol=2))
    return batches


@pytest.mark.parametrize("npz", [False, True])
def test_imagenet32_reads_batches_with_labels_from_zero(tmp_path, npz):
    batches = _imagenet_dir(tmp_path, npz)
    x, y = im.load_imagenet32(tmp_path, "train")
    assert x.shape == (40, 3, 32, 32) and y.dtype == np.int64
    assert list(y[:4]) == [0, 999, 4, 4]
    row = batches["train_data_batch_1"]["data"][1]
    assert np.array_equal(x[1], row.reshape(3, 32, 32))
    xv, yv = im.load_imagenet32(tmp_path, "val")
    assert xv.shape == (4, 3, 32, 32) and list(yv) == [0, 999, 14, 4]


def test_imagenet32_keeps_only_the_classes_asked_for(tmp_path):
    _imagenet_dir(tmp_path)
    x, y = im.load_imagenet32(tmp_path, "train", classes=[4, 999])
    assert sorted(set(y)) == [4, 999] and len(y) == 10 + 10 + 1  # two 4s and one 999 a batch
    per_class = im.indices_by_class(y, 1000)
    assert len(per_class[4]) == 11 and len(per_class[999]) == 10 and len(per_class[0]) == 0
    assert (y[per_class[999]] == 999).all()
    with pytest.raises(DataError, match="0…999"):
        im.load_imagenet32(tmp_path, "train", classes=[1000])


def test_imagenet32_missing_files_are_all_named(tmp_path, monkeypatch):
    _imagenet_dir(tmp_path)
    (tmp_path / "train_data_batch_3").unlink()
    (tmp_path / "train_data_batch_10").unlink()
    with pytest.raises(DataError) as info:
        im.load_imagenet32(tmp_path, "train")
    msg = str(info.value)
    assert "train_data_batch_3, train_data_batch_10" in msg and str(tmp_path) in msg
    assert "image-net.org" in msg and "Imagenet32_train.zip" in msg and "\n" not in msg
    monkeypatch.setenv("CONTLEARN_IMAGENET32", str(tmp_path / "none"))
    with pytest.raises(DataError, match="val files missing in .*none: val_data"):
        im.load_imagenet32(split="val")


def test_cli_imagenet32_says_where_to_get_it(tmp_path, cli):
    code, out, err = cli("data", "download", "imagenet32", "--dir", tmp_path)
    assert code == 2 and err.count("\n") == 1 and "your own download" in err
    assert not any(tmp_path.iterdir())  # nothing written
    _imagenet_dir(tmp_path / "imagenet32")
    code, out, err = cli("data", "download", "imagenet32", "--dir", tmp_path)
    assert code == 0 and "ImageNet32 found" in out
