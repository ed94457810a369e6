"""Optional compiled kernels for the online step: a few C loops that each do in one pass over
the weights what torch ops do in several.

Online learning at batch size 1 is bound by memory traffic and per-call overhead, not
arithmetic. The loops (C sources next to this module, :data:`C_SOURCES`; the layer-level ones
in ``kernels.c``):

- ``cl_layer_update``: one layer's backward pass, SGD-form update and column norms in one read
  and one write of each weight (torch: a pass each, two more for ``Σ_k |W[k, i]|``)::

      below[r, b, :] = Σ_k d[r, b, k] · W[r, k, :]           (with W before the update)
      W[r, k, :]     = (1 + β) · W[r, k, :] + α · Σ_b d[r, b, k] · h[r, b, :]
      col[r, :]      = Σ_k |W[r, k, :]|                        (after the update)

- ``cl_input_layer``: the input layer's deferred update applied together with the next forward
  pass's dot products (the input layer needs no backward pass, so its weights are then read and
  written once per step instead of three times);
- ``cl_cbp_stats``: continual backprop's steps 1–5 for one layer in one call;
- ``cl_adam``: Adam's moments, per-element counts and direction in one pass per tensor;
  ``cl_adam_apply``: the same steps applied to the weights in place, every tensor of an update
  in one call (binding: :mod:`contlearn.backends.adam_apply`);
- ``cl_online_block`` and ``cl_cbp_replace`` (``block_loop.c``, its parts in ``block_step.c``):
  whole batch-1 online steps of an MLP for a block of steps, and continual backprop's steps 6–7
  after it (their binding: :mod:`contlearn.backends.block_kernel`).
- ``cl_ff_block`` (``ff_block.c``): the Forward-Forward agent's batch-1 steps for a block
  (binding: :mod:`contlearn.backends.ff_block`);
- ``cl_policy_act`` (``policy_act.c``): PPO's acting forward, the policy's mean and the action
  of one loop step (binding: :mod:`contlearn.backends.ppo_acting`);
- ``cl_snp_normals`` and ``snp_add`` (``snp_noise.c``): shrink-and-perturb's counter-based
  noise (binding: :mod:`contlearn.backends.noise_kernel`).

Every wrapper checks each tensor's dtype, device, layout and shape against the others before a
pointer reaches C (:mod:`contlearn.backends.binding`): a mismatch raises, naming the argument.

They are compiled on first use with the system C compiler (well under a second) and cached in
``<contlearn cache>/kernels``; without a compiler, on other devices or dtypes, or with
``CONTLEARN_KERNELS=0``, callers use torch ops instead (same results up to float rounding; the
tests compare both with the autograd reference). Arithmetic is explicit (``fmaf`` where fused,
no other contraction: ``-ffp-contract=off``), an update gives the same bits whichever loop
applies it, and sums run in fixed chunks and a fixed order, so results depend neither on the
number of threads nor on the number of replicas.

One OpenMP runtime: the library is linked against the GNU OpenMP runtime torch itself loaded
(found in ``/proc/self/maps``), so the process never holds two; where torch loaded another
runtime or none, the kernels are built without OpenMP (their loops then run on one thread).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Literal

import torch

from contlearn.backends import binding

#: the C sources (package files next to this module), compiled as one unit in this order:
#: shrink-and-perturb's noise (``snp_add``), the layer-level loops, the whole-step kernel's
#: parts, the whole-step kernel itself, Forward-Forward's block and PPO's acting step (each file
#: uses what the ones before it define)
C_SOURCES = (
    "snp_noise.c", "kernels.c", "block_step.c", "block_loop.c", "ff_block.c", "policy_act.c"
)
#: rows per chunk (each chunk has its own partial sums); fixed, so results are reproducible.
CHUNK = 256
#: the kernel loops over the batch per weight; larger batches go to torch's GEMMs.
MAX_BATCH = 4
_lib: ctypes.CDLL | Literal[False] | None = None  # None: not tried yet; False: unavailable
_F32, _I64, _F64 = torch.float32, torch.int64, torch.float64
_P, _I, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
_CType = type  # (ctypes' _SimpleCData types; a list display of several is inferred as object)
#: the kernels' C functions and their argument types
_N: list[_CType] = []
_SIGNATURES: dict[str, tuple[_CType | None, list[_CType]]] = {
    "cl_layer_update": (None, _N + [_P] * 6 + [_I] * 4 + [_F, _F, _I, ctypes.c_int]),
    "cl_input_layer": (None, _N + [_P] * 3 + [_I, _F, _F] + [_P] * 3 + [_I] * 4 + [ctypes.c_int]),
    "cl_adam": (None, _N + [_P] * 5 + [_I] + [_F] * 4 + [_P, _I] * 2 + [ctypes.c_int]),
    "cl_cbp_stats": (
        _I,
        _N + [_P] * 5 + [_I] + [_P] * 4 + [_I] * 2
        + [_F, _I, ctypes.c_double, _P, _I, ctypes.c_int],
    ),
    "cl_online_block": (None, _N + [_P, _I, _I]),
    "cl_cbp_replace": (None, _N + [_I] * 2 + [_P] * 10 + [_I, _P, _I, ctypes.c_int, _P]),
    "cl_ff_block": (_I, _N + [_P, _I, _I]),
    "cl_policy_act": (None, _N + [_P, _P, _I, _P]),
    "cl_adam_apply": (None, _N + [_I] + [_P] * 6 + [_F] * 5 + [_P, _I] * 2),
}

_RUNTIMES = ("libgomp", "libiomp", "libomp")


def openmp_runtimes() -> list[str]:
    """The OpenMP runtimes mapped into this process (distinct files, from ``/proc/self/maps``;
    empty where there is no such file)."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    found = set()
    for line in lines:
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and os.path.basename(parts[5]).startswith(_RUNTIMES):
            found.add(os.path.realpath(parts[5].strip()))
    return sorted(found)


def _openmp_link() -> list[str] | None:
    """How to link the kernels to torch's OpenMP runtime: ``[the runtime's path, rpath]`` for a
    GNU runtime torch loaded, ``[]`` to build without OpenMP (another runtime, or none)."""
    torch.zeros(1).add_(1)  # (torch loads its runtime with its CPU library, before this)
    loaded = openmp_runtimes()
    gnu = [p for p in loaded if os.path.basename(p).startswith("libgomp")]
    if len(loaded) == 1 and gnu:
        return [gnu[0], f"-Wl,-rpath,{os.path.dirname(gnu[0])}"]
    return []


def _flags() -> list[str]:
    flags = ["-O3", "-fPIC", "-fno-math-errno", "-ffp-contract=off", "-Wno-unknown-pragmas"]
    if platform.machine().lower() in ("x86_64", "amd64") and \
            torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        flags += ["-mavx2", "-mfma"]
    return flags


def _compile(compiler: str, src: Path, out: Path, link: list[str]) -> None:
    """Compile ``src`` to an object (with ``-fopenmp`` if ``link`` names a runtime), then link
    a shared library against that runtime only (no ``-fopenmp`` at link: it would add the
    compiler's own ``libgomp``)."""
    obj = out.with_suffix(".o")
    omp = ["-fopenmp"] if link else []
    subprocess.run([compiler, *_flags(), *omp, "-c", str(src), "-o", str(obj)], check=True,
                   capture_output=True, timeout=120)
    try:
        subprocess.run([compiler, "-shared", str(obj), *link, "-lm", "-o", str(out)],
                       check=True, capture_output=True, timeout=120)
    finally:
        obj.unlink(missing_ok=True)


def _build() -> ctypes.CDLL | None:
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        return None
    try:
        source = "".join(Path(__file__).with_name(name).read_text() for name in C_SOURCES)
    except OSError:  # a broken install: torch ops then
        return None
    link = _openmp_link() or []
    key = source + " ".join(_flags() + link) + compiler
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    from contlearn.backends.block_kernel import check_layout
    from contlearn.backends.ff_block import check_layout as check_ff_layout
    from contlearn.backends.ppo_acting import check_layout as check_act_layout
    from contlearn.data.datasets import default_cache_dir

    for folder in (default_cache_dir() / "kernels", Path(tempfile.gettempdir())):
        lib = folder / f"contlearn_kernels_{digest}.so"
        try:
            if not lib.exists():
                folder.mkdir(parents=True, exist_ok=True)
                src = folder / f".{digest}.{os.getpid()}.c"
                src.write_text(source)
                tmp = lib.with_name(f".{lib.name}.{os.getpid()}")
                try:
                    _compile(compiler, src, tmp, link)
                finally:
                    src.unlink(missing_ok=True)
                os.replace(tmp, lib)
            found = ctypes.CDLL(str(lib))
            for name, (restype, argtypes) in _SIGNATURES.items():
                fn = getattr(found, name)  # a stale or foreign file: AttributeError
                fn.restype, fn.argtypes = restype, argtypes
            if not all(ok(found) for ok in (check_layout, check_ff_layout, check_act_layout)):
                # (a struct differs from the C one: never call it)
                continue
            return found
        except (OSError, subprocess.SubprocessError, AttributeError):
            continue
    return None


def library() -> ctypes.CDLL | None:
    """The compiled kernel, building it on first use; None if unavailable or disabled."""
    global _lib
    if _lib is None:
        _lib = (os.environ.get("CONTLEARN_KERNELS", "1") != "0" and _build()) or False
    return _lib or None


def need() -> ctypes.CDLL:
    """The compiled kernel (:func:`library`), or a RuntimeError saying it is unavailable (for
    wrappers, which are called only where their ``applies`` check held)."""
    lib = library()
    if lib is None:
        raise RuntimeError("the compiled kernels are unavailable (no C compiler?)")
    return lib


def applies(w: torch.Tensor, delta: torch.Tensor, h_in: torch.Tensor) -> bool:
    """Whether :func:`layer_update_` can take these tensors (else use torch ops)."""
    return (w.device.type == "cpu" and w.dtype == torch.float32 and delta.dtype == w.dtype
            and h_in.dtype == w.dtype and delta.shape[1] <= MAX_BATCH and w.is_contiguous()
            and library() is not None)


def layer_update_(w: torch.Tensor, delta: torch.Tensor, h_in: torch.Tensor, alpha: float,
                  beta: float, need_below: bool, want_col: bool
                  ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The kernel of the module docstring for ``w (R, K, H)``, ``delta (R, B, K)``,
    ``h_in (R, B, H)`` (float32 on the CPU; ``w`` contiguous, updated in place); returns
    ``(below (R, B, H) or None, col (R, H) or None)``. Use it where :func:`applies`; other
    tensors raise (:mod:`contlearn.backends.binding`)."""
    lib = need()
    binding.check("w", w, _F32, (None, None, None))
    R, K, H = w.shape
    d, h = binding.contiguous("delta", delta), binding.contiguous("h_in", h_in)
    binding.check("delta", d, _F32, (R, None, K))
    B = d.shape[1]
    binding.check("h_in", h, _F32, (R, B, H))
    below = w.new_empty(R, B, H) if need_below else None
    col = w.new_empty(R, H) if want_col else None
    chunks = (K + CHUNK - 1) // CHUNK
    scratch = w.new_empty(R * chunks * (B * H + H))
    lib.cl_layer_update(w.data_ptr(), d.data_ptr(), h.data_ptr(),
                        below.data_ptr() if below is not None else None,
                        col.data_ptr() if col is not None else None, scratch.data_ptr(),
                        R, B, K, H, alpha, 1.0 + beta, CHUNK, torch.get_num_threads())
    return below, col


#: a deferred update of the input layer: (δ (R, B, K), layer input (R, B, H), α, β)
Pending = tuple[torch.Tensor, torch.Tensor, float, float]


def input_layer_(w: torch.Tensor, pending: Pending | None, x: torch.Tensor | None = None,
                 bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """Apply ``pending`` (``W ← (1 + β) W + α δᵀ h``) to ``w (R, K, H)`` in place and, given
    new inputs ``x (R, B, H)``, return ``bias + x Wᵀ`` ``(R, B, K)`` from the same pass over
    the weights. Use it where :func:`applies` (with ``x`` as the batch); other tensors raise."""
    lib = need()
    binding.check("w", w, _F32, (None, None, None))
    R, K, H = w.shape
    pd = ph = None
    alpha = beta = 0.0
    if pending is not None:
        pd = binding.contiguous("pending delta", pending[0])
        ph = binding.contiguous("pending input", pending[1])
        binding.check("pending delta", pd, _F32, (R, None, K))
        binding.check("pending input", ph, _F32, (R, pd.shape[1], H))
        alpha, beta = pending[2], pending[3]
    z = None
    xp = bp = zp = None  # the new inputs' pointers (None: no forward pass)
    nb = 0
    if x is not None and bias is not None:
        x, bias = binding.contiguous("x", x), binding.contiguous("bias", bias)
        binding.check("x", x, _F32, (R, None, H))
        binding.check("bias", bias, _F32, (R, K))
        z = w.new_empty(R, x.shape[1], K)
        xp, bp, zp, nb = x.data_ptr(), bias.data_ptr(), z.data_ptr(), x.shape[1]
    lib.cl_input_layer(w.data_ptr(), pd.data_ptr() if pd is not None else None,
                       ph.data_ptr() if ph is not None else None,
                       0 if pd is None else pd.shape[1], alpha, 1.0 + beta,
                       xp, bp, zp, nb, R, K, H, torch.get_num_threads())
    return z


def _table(decay: float, sqrt: bool) -> torch.Tensor:
    """``1 − decayᵗ`` (or its square root) for t = 0, 1, ... up to where it stays put in
    float32, computed with torch's own ``pow`` and ``sqrt``."""
    t = torch.arange(1 << 20, dtype=torch.float32)
    table = torch.rsub(torch.pow(decay, t), 1.0)
    if sqrt:
        table = table.sqrt()
    change = (table[1:] != table[:-1]).nonzero()
    return table[: int(change[-1]) + 2].clone() if len(change) else table[:2].clone()


_TABLES: dict[tuple[float, bool], torch.Tensor] = {}


def adam_tables(b1: float, b2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Adam's bias corrections by count: ``1 − β1ᵗ`` and ``√(1 − β2ᵗ)`` (cached)."""
    for key in ((b1, False), (b2, True)):
        if key not in _TABLES:
            _TABLES[key] = _table(*key)
    return _TABLES[(b1, False)], _TABLES[(b2, True)]


def adam_applies(*tensors: torch.Tensor) -> bool:
    """Whether :func:`adam_direction_` can take these tensors (CPU, float32, contiguous)."""
    return all(t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous()
               and t.shape == tensors[0].shape for t in tensors) and library() is not None


def adam_direction_(g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, count: torch.Tensor,
                    b1: float, b2: float, eps: float) -> torch.Tensor:
    """Adam's step on one tensor in one pass: updates ``count``, ``m``, ``v`` in place and
    returns ``(m / (1 − β1ⁿ)) / (√v / √(1 − β2ⁿ) + ε)`` (see ``cl_adam``). Call only if
    :func:`adam_applies` (other tensors raise)."""
    lib = need()
    shape = tuple(binding.check("g", g, _F32).shape)
    for name, t in (("m", m), ("v", v), ("count", count)):
        binding.check(name, t, _F32, shape)
    t1, t2 = adam_tables(b1, b2)
    u = torch.empty_like(g)
    lib.cl_adam(g.data_ptr(), m.data_ptr(), v.data_ptr(), count.data_ptr(), u.data_ptr(),
                g.numel(), 1.0 - b1, b2, 1.0 - b2, eps, t1.data_ptr(), len(t1), t2.data_ptr(),
                len(t2),
                torch.get_num_threads())
    return u


_MALLOC_TUNED = False


def retain_freed_memory() -> None:
    """Ask glibc to serve tensors up to 32 MB (its largest threshold) from the heap and to keep
    up to 1 GB of freed heap memory (``M_MMAP_THRESHOLD``, ``M_TRIM_THRESHOLD``), once per
    process.

    Each step of an unfused learner (Adam, ...) allocates and frees tensors as large as the
    weights; by default glibc maps those afresh each time and every page faults in again
    (measured: 5,000 faults and 3× the time per step for Adam at width 100, R = 32). The peak
    memory is unchanged; memory freed after the peak stays with the process. Not done with
    ``CONTLEARN_MALLOC=0`` or off glibc.
    """
    global _MALLOC_TUNED
    if _MALLOC_TUNED or os.environ.get("CONTLEARN_MALLOC", "1") == "0" or \
            platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return
    _MALLOC_TUNED = True
    try:
        libc = ctypes.CDLL("libc.so.6")
        # (M_MMAP_MAX = 0, i.e. the heap for every size, fragmented a long process's heap
        # past 24 GB when tensor sizes varied: not used)
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def cbp_stats_(age: torch.Tensor, f: torch.Tensor, u: torch.Tensor, u_hat: torch.Tensor,
               h: torch.Tensor, out: torch.Tensor, carry: torch.Tensor,
               eligible: torch.Tensor, decay: float, maturity: int, rate: float,
               table: torch.Tensor, nonnegative: bool) -> tuple[torch.Tensor, int]:
    """Continual backprop's steps 1–5 for one layer in one call (see ``cl_cbp_stats``): ages
    ``(R, H)`` int64, running means ``f``, utilities ``u``, ``u_hat`` ``(R, H)``, activations
    ``h (R, B, H)``, outgoing magnitudes ``out (R, H)``, ``carry (R,)`` float64, ``eligible
    (R,)`` int64, all updated in place. Returns (units to replace per replica, their sum).
    Tensors of other dtypes, shapes or layouts raise (:mod:`contlearn.backends.binding`)."""
    lib = need()
    h, out = binding.contiguous("h", h), binding.contiguous("out", out)
    binding.check("h", h, _F32, (None, None, None))
    R, B, H = h.shape
    for name, t, dtype in (("age", age, _I64), ("f", f, _F32), ("u", u, _F32),
                           ("u_hat", u_hat, _F32), ("out", out, _F32)):
        binding.check(name, t, dtype, (R, H))
    binding.check("carry", carry, _F64, (R,))
    binding.check("eligible", eligible, _I64, (R,))
    if binding.check("table", table, _F32, (None,)).numel() < 1:
        raise ValueError("kernel argument table: empty, expected 1 − decay^a for a = 0, 1, ...")
    k = torch.empty(R, dtype=torch.int64)
    total = lib.cl_cbp_stats(age.data_ptr(), f.data_ptr(), u.data_ptr(), u_hat.data_ptr(),
                             h.data_ptr(), B, out.data_ptr(), carry.data_ptr(),
                             eligible.data_ptr(), k.data_ptr(), R, H, 1.0 - decay, maturity,
                             rate, table.data_ptr(), len(table), int(nonnegative))
    return k, total
