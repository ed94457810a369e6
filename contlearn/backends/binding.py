"""The checked call layer between the kernel wrappers and the C loops of ``kernels.c``.

A C loop trusts its pointers: a tensor of the wrong dtype, shape or layout, or one whose data
does not live in CPU memory (``meta``, CUDA), makes it read or write memory it does not own.
So every wrapper in :mod:`contlearn.backends.kernels` and
:mod:`contlearn.backends.block_kernel` passes each tensor through :func:`tensor` (or
:func:`tensors` for a per-layer list) with the dtype the C code expects and the shape implied
by the other arguments, before any pointer reaches C. A mismatch raises at once, naming the
argument and what to do:

- ``TypeError``: not a tensor, or the wrong dtype;
- ``ValueError``: not on the CPU, not contiguous, the wrong shape, an index out of range.

The checks read shapes and strides only (one pass over the data only for class indices, whose
range decides which memory the loss reads); they cost microseconds per call, next to
milliseconds of work per block.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

import torch

#: a shape to check; ``None`` in a position accepts any size there
Shape = Sequence[int | None]


def _shape(shape: Shape) -> str:
    return "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"


def check(name: str, t: object, dtype: torch.dtype, shape: Shape | None = None) -> torch.Tensor:
    """``t`` if it is a contiguous CPU tensor of ``dtype`` and ``shape``, else the error of
    the module docstring, naming ``name``."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"kernel argument {name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise TypeError(
            f"kernel argument {name}: dtype {str(t.dtype).removeprefix('torch.')}, expected "
            f"{str(dtype).removeprefix('torch.')} (convert it with .to({dtype}))"
        )
    if t.device.type != "cpu":
        raise ValueError(
            f"kernel argument {name}: on device {t.device}, the compiled kernels take CPU "
            "tensors (move it with .cpu(), or run the torch path)"
        )
    if shape is not None and (
        t.dim() != len(shape)
        or any(s is not None and s != n for s, n in zip(shape, t.shape, strict=True))
    ):
        raise ValueError(
            f"kernel argument {name}: shape {tuple(t.shape)}, expected {_shape(shape)} "
            "from the other arguments"
        )
    if not t.is_contiguous():
        raise ValueError(
            f"kernel argument {name}: not contiguous (strides {t.stride()}); pass "
            ".contiguous() (a tensor the kernel writes must itself be contiguous)"
        )
    return t


def contiguous(name: str, t: object) -> torch.Tensor:
    """``t`` as a contiguous tensor (a copy if it is not), for an input the kernel only reads;
    a TypeError naming ``name`` if it is not a tensor."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"kernel argument {name}: expected a torch.Tensor, got {type(t).__name__}")
    return t.contiguous()


def tensor(name: str, t: object, dtype: torch.dtype, shape: Shape | None = None) -> int:
    """The data pointer of ``t`` after :func:`check`."""
    return check(name, t, dtype, shape).data_ptr()


def optional(name: str, t: object, dtype: torch.dtype, shape: Shape | None = None) -> int | None:
    """:func:`tensor`, or None (a NULL pointer) for ``t is None``."""
    return None if t is None else tensor(name, t, dtype, shape)


def tensors(
    name: str,
    ts: Sequence[torch.Tensor | None],
    dtype: torch.dtype,
    shapes: Sequence[Shape | None],
) -> ctypes.Array:
    """An array of the data pointers of ``ts`` (one per shape; None: NULL), each checked."""
    if len(ts) != len(shapes):
        raise ValueError(f"kernel argument {name}: {len(ts)} tensors, expected {len(shapes)}")
    ptrs = [
        optional(f"{name}[{i}]", t, dtype, s)
        for i, (t, s) in enumerate(zip(ts, shapes, strict=True))
    ]
    return (ctypes.c_void_p * max(len(ptrs), 1))(*ptrs)


def indices(name: str, t: torch.Tensor, bound: int) -> None:
    """Every entry of the int64 tensor ``t`` lies in ``[0, bound)`` (class labels, which the
    loss uses to index the outputs)."""
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= bound):
        raise ValueError(
            f"kernel argument {name}: values in [{int(t.min())}, {int(t.max())}], expected "
            f"class indices in [0, {bound})"
        )


def choice(name: str, value: str, known: dict[str, int]) -> int:
    """The code of ``value`` among ``known`` (the C source's enum), else a ValueError."""
    if value not in known:
        raise ValueError(f"kernel argument {name}: {value!r}, expected one of {sorted(known)}")
    return known[value]
