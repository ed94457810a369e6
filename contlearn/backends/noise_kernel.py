"""Shrink-and-perturb's counter-based normals in C (``cl_snp_normals`` in ``snp_noise.c``): the
function :func:`contlearn.learners.philox.snp_normals` defines, bit for bit, computed at the
speed of the kernels (the numpy reference takes ~0.2 µs a number). The fused backends' noise
uses it where the kernels are built; the reference path never does."""

from __future__ import annotations

import ctypes

import torch

from contlearn.backends import binding
from contlearn.backends.kernels import library, need

_P, _I = ctypes.c_void_p, ctypes.c_int64


def available() -> bool:
    """Whether the compiled kernels (and so :func:`snp_normals`) are available."""
    return library() is not None


def snp_normals(keys: torch.Tensor, update: int, param: int, numel: int) -> torch.Tensor:
    """ε[r, t, p, e] for every replica r (keys ``(R, 2)`` int64) and e < ``numel``:
    ``(R, numel)`` float32, equal to :func:`contlearn.learners.philox.snp_normals`.

    Raises:
        RuntimeError: the kernels are unavailable (check :func:`available` first).
        ValueError: a negative or out-of-range update or parameter index.
    """
    lib = need()
    keys = binding.contiguous("keys", keys)
    R = int(keys.shape[0]) if keys.dim() == 2 else -1
    binding.check("keys", keys, torch.int64, (R, 2))  # (words taken mod 2**32, as in numpy)
    if update < 0 or update >> 63 or param < 0 or param >> 32 or numel < 0:
        raise ValueError(f"snp noise: update {update}, param {param} or numel {numel} out of range")
    out = torch.empty(R, numel)
    fn = lib.cl_snp_normals
    if fn.argtypes is None:
        fn.restype = None
        fn.argtypes = [_P, _I, _I, _I, _I, _P, ctypes.c_int]
    fn(keys.data_ptr(), R, update, param, numel, out.data_ptr(), torch.get_num_threads())
    return out
