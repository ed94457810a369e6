"""Reading the pickled batches CIFAR and ImageNet32 are distributed in, without running code.

``pickle.load`` calls whatever a file names, so a doctored batch file could run anything. The
official files only build dicts, lists, strings, ints and numpy arrays: :func:`load_batch`
resolves exactly the few numpy names those need (and the ones Python 3 pickles of the same
content use) and refuses every other name with a one-line :class:`~contlearn.errors.DataError`.
"""

from __future__ import annotations

import codecs
import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from contlearn.errors import DataError

_RECONSTRUCT = np.empty(0).__reduce__()[0]  # numpy's ndarray rebuilder, whatever its module
_FROMBUFFER = np.empty(0).__reduce_ex__(5)[0]  # (protocol 5 pickles of arrays)
_SCALAR = np.int64(0).__reduce__()[0]  # a numpy scalar: dtype + raw bytes


def _latin1(text: str, encoding: str = "latin1") -> bytes:
    # Python 3 pickles bytes at protocol < 3 as _codecs.encode(str, "latin1"); nothing else
    if encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"refusing _codecs.encode with encoding {encoding!r}")
    return codecs.encode(text, "latin1")


#: (module, name) -> object: all a pickled batch may refer to. Python 2 (the official files)
#: wrote ``numpy.core``; numpy 2 writes ``numpy._core``.
ALLOWED: dict[tuple[str, str], Any] = {
    **{(f"numpy.{core}.multiarray", "_reconstruct"): _RECONSTRUCT for core in ("core", "_core")},
    **{(f"numpy.{core}.multiarray", "scalar"): _SCALAR for core in ("core", "_core")},
    **{(f"numpy.{core}.numeric", "_frombuffer"): _FROMBUFFER for core in ("core", "_core")},
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1,
}


class _Refused(pickle.UnpicklingError):
    """The pickle names something outside :data:`ALLOWED`."""


class _BatchUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return ALLOWED[(module, name)]
        except KeyError:
            raise _Refused(
                f"it refers to {module}.{name}, which a data batch never needs"
            ) from None


def load_batch(path: Path) -> dict[str, Any]:
    """One pickled batch file as a dict with ``str`` keys, refusing anything but data.

    Args:
        path: a CIFAR or ImageNet32 batch (Python 2 or 3 pickle of a dict).

    Raises:
        DataError: the file cannot be read, is not a pickle of a dict, or names anything
            beyond dicts, lists, strings, numbers and numpy arrays (it could run code).
    """
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from exc
    return loads_batch(raw, str(path))


def loads_batch(raw: bytes, where: str) -> dict[str, Any]:
    """:func:`load_batch` for bytes already read (``where`` names them in errors)."""
    try:
        # latin1: Python 2 str -> str (numpy rebuilds its arrays' bytes from those)
        obj = _BatchUnpickler(io.BytesIO(raw), encoding="latin1").load()
    except _Refused as exc:
        raise DataError(f"refusing to unpickle {where}: {exc}; not an official data file?") from exc
    except Exception as exc:  # noqa: BLE001 - any malformed pickle: one line naming the file
        raise DataError(
            f"{where} is not a readable pickle ({type(exc).__name__}: {exc}); "
            "delete it and get it again"
        ) from exc
    if not isinstance(obj, dict):
        raise DataError(f"{where} holds a {type(obj).__name__}, not a dict of data")
    return {(k.decode("latin1") if isinstance(k, bytes) else str(k)): v for k, v in obj.items()}
