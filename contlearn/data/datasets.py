"""MNIST on disk: the shipped offline test set, the download cache, and checksum checks.

The MNIST test set (10,000 images, the original gzip files) ships inside the package, so every
stream works offline. ``contlearn data download mnist`` fetches the full 70,000-image set into a
cache directory, verifying each file's md5 and falling back across mirrors.

MNIST is by Yann LeCun, Corinna Cortes and Christopher J.C. Burges (CC BY-SA 3.0).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from contlearn.errors import DataError

#: File name -> md5 of the original gzip files.
MNIST_FILES: dict[str, str] = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
SPLITS: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
#: Mirrors tried in order; each holds the four files under the names above.
MNIST_MIRRORS: tuple[str, ...] = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)
PACKAGED_DIR = Path(__file__).parent / "mnist"


def default_cache_dir() -> Path:
    """Where downloaded data lives: ``$CONTLEARN_DATA`` or ``~/.cache/contlearn``."""
    env = os.environ.get("CONTLEARN_DATA")
    return Path(env) if env else Path.home() / ".cache" / "contlearn"


def md5_of(path: Path) -> str:
    """The md5 hex digest of a file, read in chunks."""
    digest = hashlib.md5()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise DataError(
            f"MNIST file {path} is missing; run `contlearn data download mnist` "
            "or use dataset=test (shipped)"
        )
    expected = MNIST_FILES[path.name]
    if md5_of(path) != expected:
        raise DataError(
            f"MNIST file {path} fails its md5 check (corrupt or truncated); delete it and run "
            "`contlearn data download mnist`"
        )


def _read_idx(path: Path, expected_dims: int) -> np.ndarray:
    try:
        with gzip.open(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read {path}: {exc}; delete it and download it again") from exc
    if len(raw) < 4 + 4 * expected_dims or raw[:2] != b"\x00\x00" or raw[2] != 0x08:
        raise DataError(f"{path} is not an idx ubyte file; delete it and download it again")
    ndim = raw[3]
    if ndim != expected_dims:
        raise DataError(f"{path} has {ndim} dims, expected {expected_dims}; wrong file?")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise DataError(f"{path} is truncated; delete it and download it again")
    return data.reshape(shape).copy()  # writable, detached from the file's bytes


def load_mnist_split(split: str, directory: Path) -> tuple[np.ndarray, np.ndarray]:
    """One MNIST split as (images (N, 784) uint8, labels (N,) int64), md5-checked.

    Args:
        split: ``"train"`` or ``"test"``.
        directory: the folder holding the original gzip files.

    Raises:
        DataError: a file is missing, corrupt or malformed (the message says how to fix it).
    """
    image_name, label_name = SPLITS[split]
    paths = [Path(directory) / image_name, Path(directory) / label_name]
    for path in paths:
        _check_file(path)
    images = _read_idx(paths[0], 3)
    labels = _read_idx(paths[1], 1)
    if len(images) != len(labels):
        raise DataError(f"MNIST {split} images and labels differ in length in {directory}")
    return images.reshape(len(images), -1), labels.astype(np.int64)


def load_mnist(dataset: str = "test", data_dir: str | Path | None = None):
    """MNIST images and labels for a stream.

    Args:
        dataset: ``"test"`` (the 10k test set shipped in the package; offline default),
            ``"train"`` (60k) or ``"full"`` (train + test, 70k) from the download cache.
        data_dir: the cache directory for ``train``/``full`` (default :func:`default_cache_dir`
            / ``mnist``). For ``test``, a directory given here is used instead of the shipped copy.

    Returns:
        ``(images, labels)``: uint8 array (N, 784) and int64 array (N,).
    """
    if dataset == "test" and data_dir is None:
        return load_mnist_split("test", PACKAGED_DIR)
    directory = Path(data_dir) if data_dir is not None else default_cache_dir() / "mnist"
    if dataset in ("train", "test"):
        return load_mnist_split(dataset, directory)
    if dataset == "full":
        train = load_mnist_split("train", directory)
        test = load_mnist_split("test", directory)
        return np.concatenate([train[0], test[0]]), np.concatenate([train[1], test[1]])
    raise DataError(f"unknown MNIST dataset {dataset!r}; use one of test, train, full")


def _fetch(url: str, dest: Path, md5: str, timeout: float) -> None:
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=dest.name, suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
            shutil.copyfileobj(resp, out)
        if md5_of(Path(tmp)) != md5:
            raise DataError(f"{url} served a file that fails its md5 check")
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def download_mnist(
    directory: str | Path | None = None,
    mirrors: Sequence[str] = MNIST_MIRRORS,
    timeout: float = 30.0,
    log=print,
    files: Mapping[str, str] | None = None,
) -> Path:
    """Download the four MNIST files into ``directory``, md5-verified, with mirror fallback.

    Files already present with the right md5 are kept. Each file is written to a temporary
    name and renamed only after its checksum matches, so a failed download never leaves a
    partial file under the real name.

    Args:
        directory: target folder (default ``default_cache_dir() / "mnist"``).
        mirrors: base URLs tried in order for each file.
        timeout: seconds per HTTP request.
        log: called with one line per file.
        files: file name -> md5 to fetch (default: the four MNIST files).

    Returns:
        The directory holding the verified files.

    Raises:
        DataError: a file could not be fetched intact from any mirror.
    """
    target = Path(directory) if directory is not None else default_cache_dir() / "mnist"
    target.mkdir(parents=True, exist_ok=True)
    for name, md5 in (MNIST_FILES if files is None else files).items():
        download_verified(name, md5, target, mirrors, timeout=timeout, log=log)
    return target


def download_verified(
    name: str,
    md5: str,
    target: Path,
    mirrors: Sequence[str],
    *,
    timeout: float = 30.0,
    log=print,
) -> Path:
    """Fetch ``name`` into the folder ``target``, md5-verified, trying each mirror in turn.

    A file already there with the right md5 is kept. The download goes to a temporary name and
    is renamed only after its checksum matches, so a failure never leaves a partial file under
    the real name (nor replaces a file already there).

    Args:
        name: the file name, both on the mirror (``base + name``) and in ``target``.
        md5: its expected md5 hex digest.
        target: an existing folder.
        mirrors: base URLs tried in order.
        timeout: seconds per HTTP request.
        log: called with one line saying where the file came from.

    Returns:
        The verified file's path.

    Raises:
        DataError: no mirror served the file intact (the message lists each mirror's failure).
    """
    dest = target / name
    if dest.is_file() and md5_of(dest) == md5:
        log(f"{name}: present, md5 ok")
        return dest
    errors = []
    for base in mirrors:
        url = base.rstrip("/") + "/" + name
        try:
            _fetch(url, dest, md5, timeout)
        except (OSError, ValueError, urllib.error.URLError, DataError) as exc:
            errors.append(f"{url}: {exc}")
            continue
        log(f"{name}: downloaded from {base}")
        return dest
    raise DataError(
        f"could not download {name} from any mirror ({'; '.join(errors) or 'none given'}); "
        "check the network or copy the file into " + str(target)
    )
