"""CIFAR-10/100 and downsampled ImageNet (32 × 32) as numpy arrays.

CIFAR (Krizhevsky, *Learning Multiple Layers of Features from Tiny Images*, 2009) is fetched by
``contlearn data download cifar10|cifar100``: the official "python version" archive, md5-checked,
with mirror fall-back, into ``$CONTLEARN_DATA/<name>/``. It is read straight from the archive
(nothing is extracted) and the decoded arrays are cached beside it as ``<split>.npz``.

Downsampled ImageNet 32 × 32 (Chrabaszcz, Loshchilov & Hutter, *A Downsampled Variant of
ImageNet as an Alternative to the CIFAR datasets*, 2017) is under the ImageNet terms of access:
you download ``Imagenet32_train.zip`` and ``Imagenet32_val.zip`` yourself from
https://image-net.org/download-images and unzip them into one folder; contlearn reads the
official batch files there (``train_data_batch_1`` … ``_10``, ``val_data``; pickles, or the
``.npz`` variant).

Both formats store an image as a row of 3072 bytes: the red plane, then green, then blue, each
32 × 32 row-major; so ``row.reshape(3, 32, 32)`` is the (C, H, W) image. Every loader returns
``(images, labels)``: uint8 (N, 3, 32, 32) and int64 (N,) labels counted from 0.
"""

from __future__ import annotations

import os
import tarfile
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from contlearn.data.datasets import default_cache_dir, download_verified, md5_of
from contlearn.data.pickles import load_batch, loads_batch
from contlearn.errors import DataError

Arrays = tuple[np.ndarray, np.ndarray]  # (images (N, 3, 32, 32) uint8, labels (N,) int64)


class CifarSpec(NamedTuple):
    """Where one CIFAR set lives and how its archive is laid out."""

    title: str
    archive: str  # file name on the mirrors and in the cache
    md5: str  # of the archive
    folder: str  # the folder inside the archive
    splits: dict[str, tuple[str, ...]]  # split -> batch files inside ``folder``
    label_keys: dict[str, str]  # label kind -> key in a batch dict
    num_classes: dict[str, int]  # label kind -> number of classes


CIFAR: dict[str, CifarSpec] = {
    "cifar10": CifarSpec(
        "CIFAR-10",
        "cifar-10-python.tar.gz",
        "c58f30108f718f92721af3b95e74349a",
        "cifar-10-batches-py",
        {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)},
        {"fine": "labels"},
        {"fine": 10},
    ),
    "cifar100": CifarSpec(
        "CIFAR-100",
        "cifar-100-python.tar.gz",
        "eb9058c3a382ffc7106e4002c42a8d85",
        "cifar-100-python",
        {"train": ("train",), "test": ("test",)},
        {"fine": "fine_labels", "coarse": "coarse_labels"},
        {"fine": 100, "coarse": 20},
    ),
}
#: Base URLs tried in order; each serves both archives under the names above. (The authors'
#: page is the one official source; more can be given with ``--mirror``.)
CIFAR_MIRRORS: tuple[str, ...] = ("https://www.cs.toronto.edu/~kriz/",)

IMAGENET32_FILES: dict[str, tuple[str, ...]] = {
    "train": tuple(f"train_data_batch_{i}" for i in range(1, 11)),
    "val": ("val_data",),
}
IMAGENET32_CLASSES = 1000
IMAGENET32_SOURCE = "https://image-net.org/download-images"
_CACHE_VERSION = 1


def _decode(data: Any, labels: Any, where: str, num_classes: int, offset: int = 0) -> Arrays:
    """Rows of 3072 bytes (R, G, B planes) and labels -> ((N, 3, 32, 32) uint8, (N,) int64)."""
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        raise DataError(f"{where}: 'data' is not a 2-D uint8 array; not an official file?")
    if data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{where}: rows of {data.shape[1]} bytes, expected 3072 (3 × 32 × 32)")
    try:
        y = np.asarray(labels, dtype=np.int64).reshape(-1) - offset
    except (TypeError, ValueError) as exc:
        raise DataError(f"{where}: labels are not integers ({exc})") from exc
    if len(y) != len(data):
        raise DataError(f"{where}: {len(data)} images but {len(y)} labels")
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        lo, hi = offset, num_classes - 1 + offset
        raise DataError(f"{where}: labels outside {lo}…{hi}; not an official file?")
    return np.ascontiguousarray(data).reshape(-1, 3, 32, 32), y  # (N, C, H, W)


def _field(batch: dict[str, Any], key: str, where: str) -> Any:
    if key not in batch:
        raise DataError(f"{where} has no {key!r} entry (keys: {sorted(batch)}); wrong file?")
    return batch[key]


def _cifar_spec(name: str, split: str, labels: str) -> CifarSpec:
    if name not in CIFAR:
        raise DataError(f"unknown CIFAR set {name!r}; use one of {', '.join(CIFAR)}")
    spec = CIFAR[name]
    if split not in spec.splits:
        raise DataError(f"unknown {spec.title} split {split!r}; use one of train, test")
    if labels not in spec.label_keys:
        raise DataError(f"{spec.title} has no {labels!r} labels; use {', '.join(spec.label_keys)}")
    return spec


def cifar_dir(name: str) -> Path:
    """The default folder of a CIFAR archive: ``default_cache_dir() / name``."""
    return default_cache_dir() / name


def load_cifar(
    name: str, split: str = "train", data_dir: str | Path | None = None, *, labels: str = "fine"
) -> Arrays:
    """One CIFAR split, decoded from the official archive (cached beside it after the first).

    Args:
        name: ``"cifar10"`` or ``"cifar100"``.
        split: ``"train"`` (50,000 images) or ``"test"`` (10,000).
        data_dir: the folder holding the archive (default :func:`cifar_dir`).
        labels: ``"fine"``; CIFAR-100 also has ``"coarse"`` (its 20 superclasses).

    Returns:
        ``(images, labels)``: uint8 (N, 3, 32, 32) in (C, H, W) RGB order, int64 (N,) from 0.

    Raises:
        DataError: the archive is missing, fails its md5 check, or is malformed (one line
            naming the file and the fix).
    """
    spec = _cifar_spec(name, split, labels)
    directory = Path(data_dir) if data_dir is not None else cifar_dir(name)
    archive = directory / spec.archive
    if not archive.is_file():
        raise DataError(
            f"{spec.title} archive {archive} is missing; run `contlearn data download {name}` "
            f"(or `--dir` a folder and give data_dir=<that folder>/{name})"
        )
    cache = directory / f"{split}-{labels}.npz"
    stamp = np.array([_CACHE_VERSION, archive.stat().st_size, archive.stat().st_mtime_ns])
    cached = _read_cache(cache, stamp)
    if cached is not None:
        return cached
    if md5_of(archive) != spec.md5:
        raise DataError(
            f"{spec.title} archive {archive} fails its md5 check (corrupt or truncated); "
            f"delete it and run `contlearn data download {name}`"
        )
    result = _read_cifar_archive(archive, spec, split, labels)
    _write_cache(cache, stamp, result)
    return result


def _read_cifar_archive(archive: Path, spec: CifarSpec, split: str, labels: str) -> Arrays:
    parts = []
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in spec.splits[split]:
                where = f"{archive}:{spec.folder}/{member}"
                try:
                    fh = tar.extractfile(f"{spec.folder}/{member}")
                except KeyError:
                    fh = None
                if fh is None:
                    raise DataError(f"{archive} has no file {spec.folder}/{member}; wrong archive?")
                batch = loads_batch(fh.read(), where)
                data = _field(batch, "data", where)
                y = _field(batch, spec.label_keys[labels], where)
                parts.append(_decode(data, y, where, spec.num_classes[labels]))
    except DataError:
        raise
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise DataError(f"cannot read {archive} ({exc}); delete it and download it again") from exc
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _read_cache(path: Path, stamp: np.ndarray) -> Arrays | None:
    """The cached arrays if ``path`` holds them for this very archive, else None."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            if not np.array_equal(npz["stamp"], stamp):
                return None
            return npz["images"], npz["labels"]
    except (OSError, KeyError, ValueError, EOFError):  # absent, stale format, truncated
        return None


def _write_cache(path: Path, stamp: np.ndarray, arrays: Arrays) -> None:
    """Save the decoded arrays atomically; a folder we cannot write to only costs speed."""
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".part")
    except OSError:
        return
    try:
        with os.fdopen(fd, "wb") as out:
            np.savez(out, stamp=stamp, images=arrays[0], labels=arrays[1])
        os.replace(tmp, path)
    except OSError:
        pass
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def download_cifar(
    name: str,
    directory: str | Path | None = None,
    mirrors: Sequence[str] = CIFAR_MIRRORS,
    *,
    timeout: float = 60.0,
    log: Callable[[str], object] = print,
) -> Path:
    """Download a CIFAR archive into ``directory``, md5-verified, with mirror fall-back.

    An archive already there with the right md5 is kept; a download is renamed into place only
    after its checksum matches, so a failure leaves nothing behind.

    Args:
        name: ``"cifar10"`` or ``"cifar100"``.
        directory: target folder (default :func:`cifar_dir`); give it to :func:`load_cifar`.
        mirrors: base URLs tried in order.
        timeout: seconds per HTTP request.
        log: called with one line saying where the archive came from.

    Returns:
        The folder holding the verified archive.

    Raises:
        DataError: no mirror served the archive intact.
    """
    spec = _cifar_spec(name, "train", "fine")
    target = Path(directory) if directory is not None else cifar_dir(name)
    target.mkdir(parents=True, exist_ok=True)
    download_verified(spec.archive, spec.md5, target, mirrors, timeout=timeout, log=log)
    return target


def imagenet32_dir() -> Path:
    """Where ImageNet32 is looked for by default: ``$CONTLEARN_IMAGENET32``, else
    ``default_cache_dir() / "imagenet32"``."""
    env = os.environ.get("CONTLEARN_IMAGENET32")
    return Path(env) if env else default_cache_dir() / "imagenet32"


def imagenet32_files(data_dir: str | Path | None = None, split: str = "train") -> list[Path]:
    """The batch files of one ImageNet32 split (each the pickle or its ``.npz`` variant).

    Raises:
        DataError: one line naming every missing file, the folder, and where to get them.
    """
    if split not in IMAGENET32_FILES:
        raise DataError(f"unknown ImageNet32 split {split!r}; use one of train, val")
    directory = Path(data_dir) if data_dir is not None else imagenet32_dir()
    found, missing = [], []
    for name in IMAGENET32_FILES[split]:
        path = next((p for p in (directory / name, directory / f"{name}.npz") if p.is_file()), None)
        if path is None:
            missing.append(name)
        else:
            found.append(path)
    if missing:
        zips = "Imagenet32_train.zip" if split == "train" else "Imagenet32_val.zip"
        raise DataError(
            f"ImageNet32 {split} files missing in {directory}: {', '.join(missing)}; its licence "
            f"needs your own download: get {zips} from {IMAGENET32_SOURCE} (with your ImageNet "
            "account), unzip it into that folder, and give data_dir=<folder> or set "
            "$CONTLEARN_IMAGENET32"
        )
    return found


def _read_imagenet32_batch(path: Path) -> Arrays:
    if path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as npz:
                batch = {k: npz[k] for k in npz.files if k in ("data", "labels")}
        except (OSError, ValueError, EOFError) as exc:
            raise DataError(f"cannot read {path} ({exc}); delete it and get it again") from exc
    else:
        batch = load_batch(path)
    data = _field(batch, "data", str(path))
    labels = _field(batch, "labels", str(path))
    return _decode(data, labels, str(path), IMAGENET32_CLASSES, offset=1)  # files count from 1


def load_imagenet32(
    data_dir: str | Path | None = None,
    split: str = "train",
    *,
    classes: Iterable[int] | None = None,
) -> Arrays:
    """Downsampled ImageNet 32 × 32 from your own copy of the official files.

    The whole train split is 1,281,167 images (3.9 GB as uint8); ``classes`` keeps only the
    given ones while reading batch by batch, so memory holds one batch plus what is kept.

    Args:
        data_dir: the folder holding the unzipped batch files (default :func:`imagenet32_dir`).
        split: ``"train"`` (10 batch files) or ``"val"`` (50,000 images).
        classes: 0-based class ids to keep (default all 1000), in file order.

    Returns:
        ``(images, labels)``: uint8 (N, 3, 32, 32), int64 (N,) labels 0…999 (the files' 1…1000
        minus one).

    Raises:
        DataError: files are missing (all named, with where to get them) or malformed.
    """
    paths = imagenet32_files(data_dir, split)
    keep = None if classes is None else np.unique(np.fromiter(classes, dtype=np.int64))
    if keep is not None and len(keep) and (keep[0] < 0 or keep[-1] >= IMAGENET32_CLASSES):
        raise DataError(f"ImageNet32 classes must lie in 0…{IMAGENET32_CLASSES - 1}")
    images, labels = [], []
    for path in paths:
        x, y = _read_imagenet32_batch(path)
        if keep is not None:
            mask = np.isin(y, keep)
            x, y = x[mask], y[mask]
        images.append(x)
        labels.append(y)
    return np.concatenate(images), np.concatenate(labels)


def load_imagenet32_first(
    per_class: int, data_dir: str | Path | None = None, split: str = "train"
) -> Arrays:
    """The first ``per_class`` images of every ImageNet32 class, in file order (what the
    Continual ImageNet stream splits into train and test), read batch by batch so memory holds
    one batch plus what is kept (1000 × ``per_class`` images).

    Returns:
        ``(images, labels)`` as :func:`load_imagenet32`; a class with fewer images keeps all.

    Raises:
        DataError: files are missing (all named, with where to get them) or malformed.
    """
    taken = np.zeros(IMAGENET32_CLASSES, dtype=np.int64)
    images, labels = [], []
    for path in imagenet32_files(data_dir, split):
        x, y = _read_imagenet32_batch(path)
        order = np.argsort(y, kind="stable")
        first = np.searchsorted(y[order], y[order])  # where each row's class starts in order
        rank = np.empty(len(y), dtype=np.int64)
        rank[order] = np.arange(len(y)) - first + taken[y[order]]
        keep = rank < per_class
        taken += np.bincount(y, minlength=IMAGENET32_CLASSES)
        images.append(x[keep])
        labels.append(y[keep])
    return np.concatenate(images), np.concatenate(labels)


def indices_by_class(labels: np.ndarray, num_classes: int) -> list[np.ndarray]:
    """For each class ``c`` the positions ``i`` with ``labels[i] == c``, in order."""
    order = np.argsort(labels, kind="stable")
    bounds = np.searchsorted(labels[order], np.arange(num_classes + 1))
    return [order[bounds[c] : bounds[c + 1]] for c in range(num_classes)]


def download_dataset(
    name: str, directory: Path | None = None, extra_mirrors: Sequence[str] = ()
) -> str:
    """What ``contlearn data download NAME`` does; returns the line to print.

    Args:
        name: ``mnist``, ``cifar10``, ``cifar100`` or ``imagenet32`` (which cannot be
            downloaded for you: this checks your copy, or says where to get one).
        directory: a parent folder; the data goes to ``directory / name``.
        extra_mirrors: base URLs tried before the built-in ones.
    """
    from contlearn.data.datasets import MNIST_MIRRORS, download_mnist

    target = directory / name if directory is not None else None
    if name == "mnist":
        path = download_mnist(target, mirrors=[*extra_mirrors, *MNIST_MIRRORS])
        return f"MNIST ready in {path}; use it with --set dataset=full --set data_dir={path}"
    if name in CIFAR:
        path = download_cifar(name, target, mirrors=[*extra_mirrors, *CIFAR_MIRRORS])
        streams = (
            "incremental-cifar100, permuted-cifar100" if name == "cifar100" else "permuted-cifar10"
        )
        return (
            f"{CIFAR[name].title} ready in {path}; streams ({streams}, …) read it with "
            f"--set data_dir={path}"
        )
    if name == "imagenet32":
        folder = target or imagenet32_dir()
        for split in IMAGENET32_FILES:
            imagenet32_files(folder, split)
        return f"ImageNet32 found in {folder}; load_imagenet32({folder}) reads it"
    raise DataError(f"unknown dataset {name!r}; use one of mnist, cifar10, cifar100, imagenet32")
