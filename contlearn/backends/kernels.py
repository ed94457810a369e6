"""Optional compiled kernels for the online step: a few C loops that each do in one pass over
the weights what torch ops do in several.

Online learning at batch size 1 is bound by memory traffic and per-call overhead, not
arithmetic. The loops (C source in ``kernels.c`` next to this module):

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
- ``cl_online_block``: whole batch-1 online steps of an MLP (forward, loss, backward with the
  fused update, continual backprop's steps 1–5), replica by replica, for a block of steps
  (:func:`online_block_`, used by ``OnlineAgent.learn_block``);
- ``cl_cbp_replace``: continual backprop's steps 6–7 after such a block stopped for them.

They are compiled on first use with the system C compiler (well under a second) and cached in
``<contlearn cache>/kernels``; without a compiler, on other devices or dtypes, or with
``CONTLEARN_KERNELS=0``, callers use torch ops instead (same results up to float rounding; the
tests compare both with the autograd reference). Arithmetic is explicit (``fmaf`` where fused,
no other contraction: ``-ffp-contract=off``), an update gives the same bits whichever loop
applies it, and sums run in fixed chunks and a fixed order, so results depend neither on the
number of threads nor on the number of replicas.

(Over 400 lines: the one binding to ``kernels.c``; each wrapper sits with the others so that the
argument orders can be checked against the C source in one place.)
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch

#: the C source (a package file next to this module)
_SOURCE_PATH = Path(__file__).with_name("kernels.c")
#: rows per chunk (each chunk has its own partial sums); fixed, so results are reproducible.
CHUNK = 256
#: the kernel loops over the batch per weight; larger batches go to torch's GEMMs.
MAX_BATCH = 4
_lib: ctypes.CDLL | Literal[False] | None = None  # None: not tried yet; False: unavailable


def _flags() -> list[str]:
    flags = ["-O3", "-shared", "-fPIC", "-fopenmp", "-fno-math-errno", "-ffp-contract=off"]
    if platform.machine().lower() in ("x86_64", "amd64") and \
            torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        flags += ["-mavx2", "-mfma"]
    return flags


def _c(*types: type[ctypes._SimpleCData[Any]]) -> list[type[ctypes._SimpleCData[Any]]]:
    """``list(types)``, typed as argument types (a list display of several ctypes types is
    inferred as a list of constructors returning ``object``)."""
    return list(types)


def _build() -> ctypes.CDLL | None:
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        return None
    try:
        source = _SOURCE_PATH.read_text()
    except OSError:  # a broken install: torch ops then
        return None
    flags = _flags()
    digest = hashlib.sha256((source + " ".join(flags) + compiler).encode()).hexdigest()[:16]
    from contlearn.data.datasets import default_cache_dir

    for folder in (default_cache_dir() / "kernels", Path(tempfile.gettempdir())):
        lib = folder / f"contlearn_kernels_{digest}.so"
        try:
            if not lib.exists():
                folder.mkdir(parents=True, exist_ok=True)
                src = folder / f".{digest}.{os.getpid()}.c"
                src.write_text(source)
                tmp = lib.with_name(f".{lib.name}.{os.getpid()}")
                subprocess.run([compiler, *flags, str(src), "-o", str(tmp)], check=True,
                               capture_output=True, timeout=120)
                src.unlink()
                os.replace(tmp, lib)
            found = ctypes.CDLL(str(lib))
            for name in ("cl_layer_update", "cl_input_layer", "cl_adam", "cl_cbp_stats",
                         "cl_online_block", "cl_cbp_replace"):
                getattr(found, name)  # a stale or foreign file: AttributeError
            return found
        except (OSError, subprocess.SubprocessError, AttributeError):
            continue
    return None


def library() -> ctypes.CDLL | None:
    """The compiled kernel, building it on first use; None if unavailable or disabled."""
    global _lib
    if _lib is None:
        _lib = (os.environ.get("CONTLEARN_KERNELS", "1") != "0" and _build()) or False
        if _lib:
            _lib.cl_layer_update.restype = None
            _lib.cl_layer_update.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 4 + [
                ctypes.c_float, ctypes.c_float, ctypes.c_int64, ctypes.c_int]
            _lib.cl_adam.restype = None
            _lib.cl_adam.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] + [
                ctypes.c_float] * 4 + [ctypes.c_void_p, ctypes.c_int64] * 2 + [ctypes.c_int]
            _lib.cl_cbp_stats.restype = ctypes.c_int64
            _lib.cl_cbp_stats.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] + [
                ctypes.c_void_p] * 4 + [ctypes.c_int64] * 2 + [ctypes.c_float, ctypes.c_int64,
                                                                ctypes.c_double,
                                                                ctypes.c_void_p,
                                                                ctypes.c_int64, ctypes.c_int]
            _lib.cl_online_block.restype = None
            _lib.cl_online_block.argtypes = [ctypes.c_int64] * 3 + [ctypes.c_void_p] * 8 + _c(
                ctypes.c_float, ctypes.c_float, ctypes.c_int, ctypes.c_int) + [
                ctypes.c_void_p] * 6 + _c(ctypes.c_float, ctypes.c_int64, ctypes.c_double,
                                          ctypes.c_void_p, ctypes.c_int64, ctypes.c_int,
                                          ctypes.c_void_p, ctypes.c_void_p) + [
                ctypes.c_void_p] * 4 + _c(ctypes.c_int, ctypes.c_void_p, ctypes.c_float,
                                          ctypes.c_int) + [ctypes.c_int64] * 2
            _lib.cl_cbp_replace.restype = None
            _lib.cl_cbp_replace.argtypes = [ctypes.c_int64] * 2 + [ctypes.c_void_p] * 10 + [
                ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_void_p]
            _lib.cl_input_layer.restype = None
            _lib.cl_input_layer.argtypes = [ctypes.c_void_p] * 3 + _c(
                ctypes.c_int64, ctypes.c_float, ctypes.c_float) + [ctypes.c_void_p] * 3 + [
                ctypes.c_int64] * 4 + [ctypes.c_int]
    return _lib or None


def applies(w: torch.Tensor, delta: torch.Tensor, h_in: torch.Tensor) -> bool:
    """Whether :func:`layer_update_` can take these tensors (else use torch ops)."""
    return (w.device.type == "cpu" and w.dtype == torch.float32 and delta.dtype == w.dtype
            and h_in.dtype == w.dtype and delta.shape[1] <= MAX_BATCH and w.is_contiguous()
            and library() is not None)


def layer_update_(w: torch.Tensor, delta: torch.Tensor, h_in: torch.Tensor, alpha: float,
                  beta: float, need_below: bool, want_col: bool
                  ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The kernel of the module docstring for ``w (R, K, H)``, ``delta (R, B, K)``,
    ``h_in (R, B, H)``; returns ``(below (R, B, H) or None, col (R, H) or None)``.
    Call only if :func:`applies`."""
    lib = library()
    assert lib is not None
    R, K, H = w.shape
    B = delta.shape[1]
    d, h = delta.contiguous(), h_in.contiguous()
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
    the weights. Call only if :func:`applies` (with ``x`` as the batch)."""
    lib = library()
    assert lib is not None
    R, K, H = w.shape
    pd = ph = None
    alpha = beta = 0.0
    if pending is not None:
        pd, ph = pending[0].contiguous(), pending[1].contiguous()
        alpha, beta = pending[2], pending[3]
    z = None
    xp = bp = zp = None  # the new inputs' pointers (None: no forward pass)
    nb = 0
    if x is not None and bias is not None:
        x, bias = x.contiguous(), bias.contiguous()
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


def adam_applies(*tensors: torch.Tensor) -> bool:
    """Whether :func:`adam_direction_` can take these tensors (CPU, float32, contiguous)."""
    return all(t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous()
               and t.shape == tensors[0].shape for t in tensors) and library() is not None


def adam_direction_(g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, count: torch.Tensor,
                    b1: float, b2: float, eps: float) -> torch.Tensor:
    """Adam's step on one tensor in one pass: updates ``count``, ``m``, ``v`` in place and
    returns ``(m / (1 − β1ⁿ)) / (√v / √(1 − β2ⁿ) + ε)`` (see ``cl_adam``). Call only if
    :func:`adam_applies`."""
    lib = library()
    assert lib is not None
    for key in ((b1, False), (b2, True)):
        if key not in _TABLES:
            _TABLES[key] = _table(*key)
    t1, t2 = _TABLES[(b1, False)], _TABLES[(b2, True)]
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
    (R,)`` int64, all updated in place. Returns (units to replace per replica, their sum)."""
    lib = library()
    assert lib is not None
    R, B, H = h.shape
    h, out = h.contiguous(), out.contiguous()
    k = torch.empty(R, dtype=torch.int64)
    total = lib.cl_cbp_stats(age.data_ptr(), f.data_ptr(), u.data_ptr(), u_hat.data_ptr(),
                             h.data_ptr(), B, out.data_ptr(), carry.data_ptr(),
                             eligible.data_ptr(), k.data_ptr(), R, H, 1.0 - decay, maturity,
                             rate, table.data_ptr(), len(table), int(nonnegative))
    return k, total


#: activations the whole-step kernel computes (codes of ``act_fwd`` in the C source).
BLOCK_ACTIVATIONS = {"relu": 0, "tanh": 1, "sigmoid": 2, "leaky_relu": 3}
#: the kernel's fixed-size per-layer arrays (hidden layers + output layer).
MAX_BLOCK_LAYERS = 64
#: credit rules the whole-step kernel computes (codes of ``cr`` in the C source)
BLOCK_RULES = {"bp": 0, "fa": 1, "kolen-pollack": 2, "sign-symmetry": 3, "dfa": 4}


class BlockCredit(NamedTuple):
    """A credit rule as the whole-step kernel takes it (docs/credit.md).

    Attributes:
        rule: a key of :data:`BLOCK_RULES`.
        feedback: per layer ``(R, K, H)`` (None where the rule has none): ``B_l`` for fa and
            kolen-pollack (updated in place by the latter), for dfa ``D (R, C, H)`` of the
            hidden layer below layer l.
        keep: kolen-pollack's ``1 − λ`` (every weight matrix and B shrink by it each step).
        unit: sign symmetry's ``scale=unit`` (else s = mean |W_l|).
    """

    rule: str = "bp"
    feedback: tuple[torch.Tensor | None, ...] = ()
    keep: float = 1.0
    unit: bool = False


class CBPKernelState(NamedTuple):
    """Continual backprop's per-layer state as the whole-step kernel reads and writes it: one
    tensor per hidden layer (ages ``(R, H)`` int64; running mean, utility, bias-corrected
    utility ``(R, H)`` float32; carry ``(R,)`` float64; eligible ``(R,)`` int64) and the
    options."""

    age: list[torch.Tensor]
    mean_act: list[torch.Tensor]
    utility: list[torch.Tensor]
    utility_hat: list[torch.Tensor]
    carry: list[torch.Tensor]
    eligible: list[torch.Tensor]
    decay: float
    maturity: int
    rate: float
    table: torch.Tensor
    nonnegative: bool


def _widths(weights: list[torch.Tensor]) -> torch.Tensor:
    """The MLP's widths (input, then each layer's units) from its weights ``(R, K, H)``."""
    return torch.tensor([weights[0].shape[2]] + [w.shape[1] for w in weights], dtype=torch.int64)


def _pointers(tensors: list[torch.Tensor]) -> ctypes.Array:
    return (ctypes.c_void_p * max(len(tensors), 1))(*[t.data_ptr() for t in tensors])


class Pending1(NamedTuple):
    """The input layer's update left pending while the whole-step kernel stopped replicas for
    continual backprop's replacements: ``d (R, H1)`` float32, ``step (R,)`` int64 (the step
    of the block whose input it needs, −1: none), ``skip (R, H1)`` uint8 (rows replaced since,
    which it must leave alone)."""

    d: torch.Tensor
    step: torch.Tensor
    skip: torch.Tensor

    @classmethod
    def empty(cls, R: int, H1: int) -> Pending1:
        return cls(torch.zeros(R, H1), torch.full((R,), -1, dtype=torch.int64),
                   torch.zeros(R, H1, dtype=torch.uint8))


def online_block_(weights: list[torch.Tensor], biases: list[torch.Tensor], x: torch.Tensor,
                  target: torch.Tensor, classification: bool, alpha: float, beta: float,
                  activation: str, out: torch.Tensor, loss: torch.Tensor, start: torch.Tensor,
                  events: torch.Tensor, cbp: CBPKernelState | None, pending: Pending1,
                  workers: int, grad_l1: torch.Tensor | None = None,
                  credit: BlockCredit | None = None) -> None:
    """Run whole batch-1 online steps ``start[r] … T − 1`` of every replica (``cl_online_block``).

    Args:
        weights, biases: per layer ``(R, K, H)`` and ``(R, K)``, updated in place.
        x: inputs ``(T, R, D)``.
        target: class indices ``(T, R)`` int64, or regression targets ``(T, R, C)``.
        classification: cross-entropy (else squared error summed over outputs).
        alpha, beta: the fused update ``θ ← (1 + β) θ + α g``.
        activation: a key of :data:`BLOCK_ACTIVATIONS`.
        out, loss: filled with the outputs ``(T, R, C)`` (before each step's update) and the
            losses ``(T, R)``.
        start: ``(R,)`` int64, each replica's first step; on return, where it stopped (T: done).
        events: ``(R, L − 1)`` int64, set to the units each hidden layer must replace at the
            step a replica stopped at (continual backprop's steps 6–7 are the caller's).
        cbp: continual backprop's state, or None.
        pending: the input layer's pending update: kept when a replica stops for an event
            (the next call, after :func:`cbp_replace_`, applies it), else applied before the
            call returns.
        workers: replicas run in this many contiguous groups, each on a thread of its own
            (one replica's steps always run on one thread: results do not depend on this).
        grad_l1: ``(R, L)`` float64 or None: each step adds the L1 norm of every layer's loss
            gradient (weights and bias) to it.
        credit: the credit rule (None: backprop).
    """
    lib = library()
    assert lib is not None
    credit = credit or BlockCredit()
    L = len(weights)
    feedback = (ctypes.c_void_p * L)(*[None if f is None else f.data_ptr()
                                       for f in list(credit.feedback) + [None] * L][:L])
    widths = _widths(weights)
    T, R = x.shape[:2]
    cls = target if classification else None
    reg = None if classification else target
    c = cbp
    lists = ([], [], [], [], [], []) if c is None else (
        c.age, c.mean_act, c.utility, c.utility_hat, c.carry, c.eligible)
    args = (
        R, T, L, widths.data_ptr(), _pointers(weights), _pointers(biases), x.data_ptr(),
        cls.data_ptr() if cls is not None else None, reg.data_ptr() if reg is not None else None,
        out.data_ptr(), loss.data_ptr(), alpha, 1.0 + beta, BLOCK_ACTIVATIONS[activation],
        int(c is not None), *[_pointers(t) for t in lists],
        1.0 - (c.decay if c else 0.0), c.maturity if c else 0, c.rate if c else 0.0,
        c.table.data_ptr() if c else None, len(c.table) if c else 0,
        int(c.nonnegative) if c else 0, start.data_ptr(), events.data_ptr(),
        pending.d.data_ptr(), pending.step.data_ptr(), pending.skip.data_ptr(),
        grad_l1.data_ptr() if grad_l1 is not None else None, BLOCK_RULES[credit.rule],
        feedback, credit.keep, int(credit.unit))
    todo = [r for r in range(R) if int(start[r]) < T or int(pending.step[r]) >= 0]
    groups = min(max(workers, 1), len(todo))
    if groups <= 1:
        lib.cl_online_block(*args, 0, R)
        return
    # contiguous ranges holding equal numbers of the replicas with work left; ctypes releases
    # the GIL for the call, so the ranges run in parallel
    cuts = [todo[len(todo) * g // groups] for g in range(groups)] + [R]
    pool = _pool()
    futures = [pool.submit(lib.cl_online_block, *args, cuts[g], cuts[g + 1])
               for g in range(1, groups)]
    lib.cl_online_block(*args, cuts[0], cuts[1])
    for f in futures:
        f.result()


_POOL: tuple[int, ThreadPoolExecutor] | None = None


def _pool() -> ThreadPoolExecutor:
    """Worker threads for :func:`online_block_` (made anew in a forked child: a parent's
    threads do not exist there). Idle workers block on a queue; they never spin."""
    global _POOL
    if _POOL is None or _POOL[0] != os.getpid():
        _POOL = (os.getpid(), ThreadPoolExecutor(max(1, (os.cpu_count() or 1) - 1),
                                                 thread_name_prefix="contlearn-block"))
    return _POOL[1]


def cbp_replace_(weights: list[torch.Tensor], biases: list[torch.Tensor], counts: torch.Tensor,
                 fresh: list[torch.Tensor], cbp: CBPKernelState,
                 replacements: list[torch.Tensor], fold: bool, skip: torch.Tensor) -> None:
    """Continual backprop's steps 6–7 (``cl_cbp_replace``) for ``counts (R, L − 1)`` units per
    replica and hidden layer, with ``fresh[l]`` the new incoming rows ``(N_l, fan_in)`` drawn
    in replica order; ``replacements[l] (R,)`` int64 counts up; replaced input-layer units are
    marked in ``skip`` (``Pending1.skip``)."""
    lib = library()
    assert lib is not None
    widths = _widths(weights)
    counts = counts.contiguous()
    fresh = [t.contiguous() for t in fresh]
    lib.cl_cbp_replace(len(counts), len(weights), widths.data_ptr(), _pointers(weights),
                       _pointers(biases), counts.data_ptr(), _pointers(fresh),
                       _pointers(cbp.age), _pointers(cbp.mean_act), _pointers(cbp.utility),
                       _pointers(cbp.utility_hat), _pointers(replacements), cbp.maturity,
                       cbp.table.data_ptr(), len(cbp.table), int(fold), skip.data_ptr())
