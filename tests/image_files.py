"""Generated CIFAR archives and ImageNet32 batch files in the official formats (for the image
stream tests; nothing is downloaded). Pixels are random but for the first three bytes of
every image (the red plane's first pixels): its class (``c % 256``, ``c // 256``) and its rank
within its class in file order, so tests can read which image a stream showed (:func:`tag`)."""

from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import numpy as np

import contlearn.data.images as im


def labelled_rows(labels: np.ndarray, seed: int) -> np.ndarray:
    """Random (N, 3072) uint8 rows whose bytes 0 … 2 are the class and the rank."""
    rows = np.random.default_rng(seed).integers(0, 256, (len(labels), 3072), dtype=np.uint8)
    rank = np.zeros(len(labels), dtype=np.int64)
    seen: dict[int, int] = {}
    for i, c in enumerate(labels):
        rank[i] = seen.get(int(c), 0)
        seen[int(c)] = rank[i] + 1
    rows[:, 0] = labels % 256
    rows[:, 1] = labels // 256
    rows[:, 2] = rank % 256
    return rows


def tag(image_u8: np.ndarray) -> tuple[int, int]:
    """(class, rank) of a generated image ``(3, 32, 32)`` uint8 (or its flat row)."""
    flat = np.asarray(image_u8).reshape(-1)
    return int(flat[0]) + 256 * int(flat[1]), int(flat[2])


def shuffled_labels(classes: int, per_class: int, seed: int) -> np.ndarray:
    """Every class ``per_class`` times, in a random (file) order."""
    labels = np.repeat(np.arange(classes), per_class)
    return labels[np.random.default_rng(seed).permutation(len(labels))]


def write_cifar(folder: Path, name: str, train_per_class: int, test_per_class: int) -> Path:
    """The official "python version" archive of ``name`` into ``folder``; returns its path."""
    spec = im.CIFAR[name]
    classes = spec.num_classes["fine"]
    key = spec.label_keys["fine"]
    train_files = spec.splits["train"]
    splits = {"train": train_per_class, "test": test_per_class}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / spec.archive
    with tarfile.open(path, "w:gz") as tar:
        for s, (split, per_class) in enumerate(splits.items()):
            labels = shuffled_labels(classes, per_class, s)
            rows = labelled_rows(labels, 10 + s)
            members = train_files if split == "train" else spec.splits["test"]
            parts = np.array_split(np.arange(len(labels)), len(members))
            for part, idx in zip(members, parts, strict=True):
                batch = {key: [int(v) for v in labels[idx]], "data": rows[idx]}
                if name == "cifar100":
                    batch["coarse_labels"] = [int(v) // 5 for v in labels[idx]]
                raw = pickle.dumps(batch, protocol=2)
                info = tarfile.TarInfo(f"{spec.folder}/{part}")
                info.size = len(raw)
                tar.addfile(info, io.BytesIO(raw))
    return path


def write_imagenet32(folder: Path, per_class: int) -> Path:
    """``train_data_batch_1`` … ``_10`` and ``val_data`` (the ``.npz`` variant, labels from 1)
    with ``per_class`` train images of each of the 1000 classes."""
    folder.mkdir(parents=True, exist_ok=True)
    labels = shuffled_labels(im.IMAGENET32_CLASSES, per_class, 7)
    rows = labelled_rows(labels, 8)
    files = im.IMAGENET32_FILES["train"]
    for name, idx in zip(files, np.array_split(np.arange(len(labels)), len(files)), strict=True):
        np.savez(folder / f"{name}.npz", data=rows[idx], labels=labels[idx] + 1)
    val = np.arange(im.IMAGENET32_CLASSES)
    np.savez(folder / "val_data.npz", data=labelled_rows(val, 9), labels=val + 1)
    return folder
