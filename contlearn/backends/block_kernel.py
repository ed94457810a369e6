"""The whole-step kernel's binding: ``cl_online_block`` (whole batch-1 online steps of an MLP
for a block of steps, replica by replica) and ``cl_cbp_replace`` (continual backprop's steps
6–7 after the block stopped for them), C source in ``block_loop.c`` and ``block_step.c``.

``cl_online_block`` takes one argument struct (:class:`BlockArgs`, the C ``BlockArgs`` field
by field; its size is checked against the compiled library's when it loads), filled by
:func:`online_block_` only after every tensor passed the checks of
:mod:`contlearn.backends.binding` against the shapes the weights imply: a wrong dtype, shape,
layout or device raises, naming the argument, instead of corrupting memory.

Updates: the fused affine form ``θ ← (1 + β) θ + α g`` (SGD's family) or Adam
(:class:`BlockAdam`: ``θ ← θ + lr·adam(a g + b θ) + β θ``, the moments and per-element counts
of the learner's own state updated in the same pass; backprop only).

(Over 400 lines: the argument struct, the checks of every field and the two calls side by side,
so that each field can be read against the C struct it fills.)
"""

from __future__ import annotations

import ctypes
import os
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import torch

from contlearn.backends import binding
from contlearn.backends.kernels import adam_tables, need

#: activations the whole-step kernel computes (codes of ``act_fwd`` in the C source).
BLOCK_ACTIVATIONS = {"relu": 0, "tanh": 1, "sigmoid": 2, "leaky_relu": 3}
#: the kernel's fixed-size per-layer arrays (hidden layers + output layer).
MAX_BLOCK_LAYERS = 64
#: credit rules the whole-step kernel computes (codes of ``cr`` in the C source)
BLOCK_RULES = {"bp": 0, "fa": 1, "kolen-pollack": 2, "sign-symmetry": 3, "dfa": 4}

_F32, _I64, _F64 = torch.float32, torch.int64, torch.float64
_P = ctypes.c_void_p


class _AdamOpt(ctypes.Structure):
    _fields_ = [
        *[(n, ctypes.c_float) for n in ("pre_a", "pre_b", "w1", "b2", "w2", "eps", "lr", "post_b")],
        ("bc1", _P),
        ("n1", ctypes.c_int64),
        ("sbc2", _P),
        ("n2", ctypes.c_int64),
    ]


class BlockArgs(ctypes.Structure):
    """``cl_online_block``'s arguments (the C ``BlockArgs``, same fields in the same order)."""

    _fields_ = [
        *[(n, ctypes.c_int64) for n in ("R", "T", "L")],
        *[(n, _P) for n in ("width", "wp", "bp", "x", "ycls", "yreg", "out", "loss")],
        ("alpha", ctypes.c_float),
        ("scale", ctypes.c_float),
        ("act", ctypes.c_int32),
        ("cbp", ctypes.c_int32),
        *[(n, _P) for n in ("agep", "fp", "up", "uhp", "carryp", "eligp")],
        ("decay_w", ctypes.c_float),
        ("maturity", ctypes.c_int64),
        ("rate", ctypes.c_double),
        ("table", _P),
        ("tsize", ctypes.c_int64),
        ("nonneg", ctypes.c_int32),
        *[(n, _P) for n in ("start", "events", "pend_d", "pend_t", "skip", "gsum")],
        ("cr", ctypes.c_int32),
        ("fbp", _P),
        ("keep", ctypes.c_float),
        ("sunit", ctypes.c_int32),
        ("adam", ctypes.c_int32),
        *[(n, _P) for n in ("amw", "avw", "anw", "amb", "avb", "anb", "ucount")],
        ("ao", _AdamOpt),
        ("snp", ctypes.c_int32),
        ("snp_sigma", ctypes.c_float),
        ("snp_key", _P),
        ("snp_count", ctypes.c_int64),
        ("snp_pidx", _P),
        ("gamma", ctypes.c_float),
        *[(n, _P) for n in ("ancw", "ancb", "redo_sum")],
        ("redo_score", ctypes.c_int32),
    ]


def check_layout(lib: ctypes.CDLL) -> bool:
    """Whether the compiled library's ``BlockArgs`` has :class:`BlockArgs`'s size."""
    lib.cl_block_args_size.restype = ctypes.c_int64
    lib.cl_block_args_size.argtypes = []
    return int(lib.cl_block_args_size()) == ctypes.sizeof(BlockArgs)


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


class BlockAdam(NamedTuple):
    """Adam as the whole-step kernel applies it (``cl_online_block`` with ``adam``):
    ``g' = pre_a g + pre_b θ``; the moments and per-element counts of
    :class:`contlearn.learners.optim.ScaleByAdamState` updated as ``cl_adam`` does; then
    ``θ ← θ + lr·d + post_b θ`` with ``d`` Adam's direction.

    Attributes:
        mu_w, nu_w, count_w: per layer the weights' first and second moments and counts
            ``(R, K, H)`` float32, updated in place.
        mu_b, nu_b, count_b: the same for the biases ``(R, K)``.
        pre_a, pre_b, b1, b2, eps, lr, post_b: the options above.
    """

    mu_w: list[torch.Tensor]
    nu_w: list[torch.Tensor]
    count_w: list[torch.Tensor]
    mu_b: list[torch.Tensor]
    nu_b: list[torch.Tensor]
    count_b: list[torch.Tensor]
    pre_a: float
    pre_b: float
    b1: float
    b2: float
    eps: float
    lr: float
    post_b: float


class BlockNoise(NamedTuple):
    """Shrink-and-perturb's noise as the whole-step kernel adds it: after each update of a
    weight or bias, ``θ ← θ + σ ε[r, first + t, p, e]`` (block step t; the definition:
    :mod:`contlearn.learners.philox`, docs/design.md §4d).

    Attributes:
        sigma: σ.
        keys: ``(R, 2)`` int64, each replica's Philox key (two words in [0, 2³²)).
        first: the learner's update count before the block's first step.
        param_index: per layer the parameter order's indices of its weight and bias.
    """

    sigma: float
    keys: torch.Tensor
    first: int
    param_index: list[tuple[int, int]]


class BlockAnchor(NamedTuple):
    """L2-Init's anchors as the whole-step kernel reads them: the update becomes
    ``θ ← (1 + β) θ + α g + γ θ₀`` (:class:`contlearn.learners.block_forms.AnchorPlan`).

    Attributes:
        weights, biases: per layer θ₀ ``(R, K, H)`` and ``(R, K)`` float32 (read only).
        gamma: γ.
    """

    weights: list[torch.Tensor]
    biases: list[torch.Tensor]
    gamma: float


class BlockReDo(NamedTuple):
    """ReDo's window sums as the whole-step kernel adds to them, each step, per hidden layer
    ``(R, H)`` float32 (in place): ``|h|`` (``score="activation"``) or the mean ``|g|`` of each
    unit's incoming weights (``"gradient"``, ReGraMa)."""

    sums: list[torch.Tensor]
    score: str = "activation"


#: ReDo's scores the whole-step kernel accumulates (codes of ``redo_score`` in the C source)
REDO_SCORES = {"activation": 0, "gradient": 1}


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
        return cls(
            torch.zeros(R, H1),
            torch.full((R,), -1, dtype=torch.int64),
            torch.zeros(R, H1, dtype=torch.uint8),
        )


def _widths(weights: list[torch.Tensor]) -> list[int]:
    """The MLP's widths (input, then each layer's units) from its weights ``(R, K, H)``,
    each checked to take the previous one's output."""
    if not weights:
        raise ValueError("kernel argument weights: no layers")
    binding.check("weights[0]", weights[0], _F32, (None, None, None))
    widths = [int(weights[0].shape[2])]
    for w in weights:
        widths.append(int(w.shape[1]) if w.dim() == 3 else -1)
    return widths


def _shapes(R: int, widths: list[int]) -> tuple[list[tuple[int, ...]], list[tuple[int, ...]]]:
    L = len(widths) - 1
    return (
        [(R, widths[i + 1], widths[i]) for i in range(L)],
        [(R, widths[i + 1]) for i in range(L)],
    )


def _fill_cbp(a: BlockArgs, cbp: CBPKernelState | None, R: int, widths: list[int]) -> list:
    L = len(widths) - 1
    if cbp is None:
        return []
    hidden = [(R, widths[i + 1]) for i in range(L - 1)]
    keep = [
        binding.tensors("cbp.age", cbp.age, _I64, hidden),
        binding.tensors("cbp.mean_act", cbp.mean_act, _F32, hidden),
        binding.tensors("cbp.utility", cbp.utility, _F32, hidden),
        binding.tensors("cbp.utility_hat", cbp.utility_hat, _F32, hidden),
        binding.tensors("cbp.carry", cbp.carry, _F64, [(R,)] * (L - 1)),
        binding.tensors("cbp.eligible", cbp.eligible, _I64, [(R,)] * (L - 1)),
    ]
    a.agep, a.fp, a.up, a.uhp, a.carryp, a.eligp = (ctypes.addressof(k) for k in keep)
    if cbp.table.numel() < 1:
        raise ValueError("kernel argument cbp.table: empty, expected 1 − decay^a for a = 0, 1, ...")
    a.cbp, a.decay_w, a.maturity, a.rate = 1, 1.0 - cbp.decay, cbp.maturity, cbp.rate
    a.table = binding.tensor("cbp.table", cbp.table, _F32, (None,))
    a.tsize, a.nonneg = cbp.table.numel(), int(cbp.nonnegative)
    return keep


def _fill_credit(a: BlockArgs, credit: BlockCredit, R: int, widths: list[int]) -> list:
    L, C = len(widths) - 1, widths[-1]
    a.cr = binding.choice("credit.rule", credit.rule, BLOCK_RULES)
    a.keep, a.sunit = credit.keep, int(credit.unit)
    feedback = (list(credit.feedback) + [None] * L)[:L]
    if credit.rule in ("fa", "kolen-pollack", "dfa"):
        shapes: list[binding.Shape] = [
            (R, C if credit.rule == "dfa" else widths[i + 1], widths[i]) for i in range(L)
        ]
        for i in range(1, L):
            if feedback[i] is None:
                raise ValueError(
                    f"kernel argument credit.feedback[{i}]: None, {credit.rule} needs it"
                )
        feedback[0] = None
    else:  # bp, sign symmetry: no feedback read
        shapes, feedback = [()] * L, [None] * L
    ptrs = binding.tensors("credit.feedback", feedback, _F32, shapes)
    a.fbp = ctypes.addressof(ptrs)
    return [ptrs]


def _fill_adam(a: BlockArgs, adam: BlockAdam | None, R: int, widths: list[int], rule: str) -> list:
    if adam is None:
        return []
    if rule != "bp":
        raise ValueError(f"kernel argument adam: the kernel applies Adam under bp only, not {rule}")
    ws, bs = _shapes(R, widths)
    keep = [
        binding.tensors("adam.mu_w", adam.mu_w, _F32, ws),
        binding.tensors("adam.nu_w", adam.nu_w, _F32, ws),
        binding.tensors("adam.count_w", adam.count_w, _F32, ws),
        binding.tensors("adam.mu_b", adam.mu_b, _F32, bs),
        binding.tensors("adam.nu_b", adam.nu_b, _F32, bs),
        binding.tensors("adam.count_b", adam.count_b, _F32, bs),
    ]
    a.amw, a.avw, a.anw, a.amb, a.avb, a.anb = (ctypes.addressof(k) for k in keep)
    ucount = _uniform_counts(adam)
    a.ucount = ucount.data_ptr()
    t1, t2 = adam_tables(adam.b1, adam.b2)
    a.adam = 1
    a.ao = _AdamOpt(
        adam.pre_a, adam.pre_b, 1.0 - adam.b1, adam.b2, 1.0 - adam.b2, adam.eps, adam.lr,
        adam.post_b, t1.data_ptr(), len(t1), t2.data_ptr(), len(t2),
    )  # fmt: skip
    return [*keep, t1, t2, ucount]


def _fill_noise(a: BlockArgs, noise: BlockNoise | None, R: int, L: int) -> list:
    if noise is None:
        return []
    if len(noise.param_index) != L:
        raise ValueError(
            f"kernel argument noise.param_index: {len(noise.param_index)} layers, expected {L}"
        )
    keys = binding.tensor("noise.keys", noise.keys, _I64, (R, 2))
    if noise.keys.numel() and (int(noise.keys.min()) < 0 or int(noise.keys.max()) >> 32):
        raise ValueError("kernel argument noise.keys: expected words in [0, 2**32)")
    if noise.first < 0 or any(i < 0 or i >> 32 for pair in noise.param_index for i in pair):
        raise ValueError("kernel argument noise: a negative update count or index out of range")
    index = torch.tensor(noise.param_index, dtype=torch.int64).reshape(L, 2)
    a.snp, a.snp_sigma, a.snp_key = 1, noise.sigma, keys
    a.snp_count, a.snp_pidx = noise.first, index.data_ptr()
    return [noise.keys, index]


def _fill_anchor(
    a: BlockArgs, anchor: BlockAnchor | None, R: int, widths: list[int], rule: str, other: bool
) -> list:
    if anchor is None:
        return []
    if rule != "bp" or other:
        raise ValueError(
            "kernel argument anchor: the kernel applies L2-Init under bp with the fused update "
            f"only (rule {rule}, with Adam or continual backprop: {other})"
        )
    ws, bs = _shapes(R, widths)
    keep = [
        binding.tensors("anchor.weights", anchor.weights, _F32, ws),
        binding.tensors("anchor.biases", anchor.biases, _F32, bs),
    ]
    a.ancw, a.ancb = (ctypes.addressof(k) for k in keep)
    a.gamma = anchor.gamma
    return keep


def _fill_redo(a: BlockArgs, redo: BlockReDo | None, R: int, widths: list[int]) -> list:
    if redo is None:
        return []
    L = len(widths) - 1
    hidden = [(R, widths[i + 1]) for i in range(L - 1)]
    keep = [binding.tensors("redo.sums", redo.sums, _F32, hidden)]
    a.redo_sum = ctypes.addressof(keep[0])
    a.redo_score = binding.choice("redo.score", redo.score, REDO_SCORES)
    return keep


def _uniform_counts(adam: BlockAdam) -> torch.Tensor:
    """``(R, L, 2)``: per replica and layer the one count of all the weights' (biases')
    elements, or −1 where they differ. Where they agree the kernel keeps the count itself
    instead of reading and writing every element's (:func:`_store_counts` writes it back)."""
    out = []
    for t in (*adam.count_w, *adam.count_b):
        lo, hi = t.reshape(t.shape[0], -1).aminmax(dim=1)
        out.append(torch.where(lo == hi, lo, -1.0))
    L = len(adam.count_w)
    return torch.stack(out, 1).reshape(-1, 2, L).transpose(1, 2).contiguous()


def _store_counts(adam: BlockAdam, ucount: torch.Tensor) -> None:
    """Write the counts the kernel kept (``ucount ≥ 0``) into every element of theirs."""
    kept = ucount >= 0  # (R, L, 2)
    if not bool(kept.any()):
        return
    for j, ts in enumerate((adam.count_w, adam.count_b)):
        for i, t in enumerate(ts):
            rows = kept[:, i, j].nonzero().flatten()  # (N,): only these replicas' counts
            if len(rows):
                t[rows] = ucount[rows, i, j].view(-1, *[1] * (t.dim() - 1)).to(t.dtype)


def online_block_(
    weights: list[torch.Tensor],
    biases: list[torch.Tensor],
    x: torch.Tensor,
    target: torch.Tensor,
    classification: bool,
    alpha: float,
    beta: float,
    activation: str,
    out: torch.Tensor,
    loss: torch.Tensor,
    start: torch.Tensor,
    events: torch.Tensor,
    cbp: CBPKernelState | None,
    pending: Pending1,
    workers: int,
    grad_l1: torch.Tensor | None = None,
    credit: BlockCredit | None = None,
    adam: BlockAdam | None = None,
    noise: BlockNoise | None = None,
    anchor: BlockAnchor | None = None,
    redo: BlockReDo | None = None,
) -> None:
    """Run whole batch-1 online steps ``start[r] … T − 1`` of every replica (``cl_online_block``).

    Args:
        weights, biases: per layer ``(R, K, H)`` and ``(R, K)`` float32, updated in place.
        x: inputs ``(T, R, D)`` float32.
        target: class indices ``(T, R)`` int64, or regression targets ``(T, R, C)`` float32.
        classification: cross-entropy (else squared error summed over outputs).
        alpha, beta: the fused update ``θ ← (1 + β) θ + α g`` (unused with ``adam``).
        activation: a key of :data:`BLOCK_ACTIVATIONS`.
        out, loss: filled with the outputs ``(T, R, C)`` (before each step's update) and the
            losses ``(T, R)``.
        start: ``(R,)`` int64, each replica's first step; on return, where it stopped (T: done).
        events: ``(R, max(L − 1, 1))`` int64, set to the units each hidden layer must replace
            at the step a replica stopped at (continual backprop's steps 6–7 are the caller's).
        cbp: continual backprop's state, or None.
        pending: the input layer's pending update: kept when a replica stops for an event
            (the next call, after :func:`cbp_replace_`, applies it), else applied before the
            call returns.
        workers: replicas run in this many contiguous groups, each on a thread of its own
            (one replica's steps always run on one thread: results do not depend on this).
        grad_l1: ``(R, L)`` float64 or None: each step adds the L1 norm of every layer's loss
            gradient (weights and bias) to it.
        credit: the credit rule (None: backprop).
        adam: Adam's state and options (:class:`BlockAdam`), or None: the fused update.
        noise: shrink-and-perturb's noise (:class:`BlockNoise`), or None.
        anchor: L2-Init's anchors (:class:`BlockAnchor`; backprop's fused update only), or None.
        redo: ReDo's window sums to add this block's steps to (:class:`BlockReDo`), or None.

    Raises:
        TypeError, ValueError: a tensor of the wrong dtype, shape, layout or device, or an
            index out of range (:mod:`contlearn.backends.binding`); nothing was run.
    """
    lib = need()
    credit = credit or BlockCredit()
    widths = _widths(weights)
    L, D, C = len(weights), widths[0], widths[-1]
    if L > MAX_BLOCK_LAYERS:
        raise ValueError(f"kernel argument weights: {L} layers, at most {MAX_BLOCK_LAYERS}")
    binding.check("x", x, _F32, (None, None, D))
    T, R = int(x.shape[0]), int(x.shape[1])
    ws, bs = _shapes(R, widths)
    a = BlockArgs(R=R, T=T, L=L, alpha=alpha, scale=1.0 + beta)
    keep: list = [torch.tensor(widths, dtype=torch.int64)]
    keep += [binding.tensors("weights", weights, _F32, ws)]
    keep += [binding.tensors("biases", biases, _F32, bs)]
    a.width, a.wp, a.bp = keep[0].data_ptr(), *(ctypes.addressof(k) for k in keep[1:])
    a.x = x.data_ptr()
    if classification:
        a.ycls = binding.tensor("target", target, _I64, (T, R))
        binding.indices("target", target, C)
    else:
        a.yreg = binding.tensor("target", target, _F32, (T, R, C))
    a.out = binding.tensor("out", out, _F32, (T, R, C))
    a.loss = binding.tensor("loss", loss, _F32, (T, R))
    a.act = binding.choice("activation", activation, BLOCK_ACTIVATIONS)
    keep += _fill_cbp(a, cbp, R, widths)
    a.start = binding.tensor("start", start, _I64, (R,))
    binding.indices("start", start, T + 1)
    a.events = binding.tensor("events", events, _I64, (R, max(L - 1, 1)))
    H1 = widths[1]
    a.pend_d = binding.tensor("pending.d", pending.d, _F32, (R, H1))
    a.pend_t = binding.tensor("pending.step", pending.step, _I64, (R,))
    if pending.step.numel() and (int(pending.step.min()) < -1 or int(pending.step.max()) >= T):
        raise ValueError(f"kernel argument pending.step: expected steps in [-1, {T})")
    a.skip = binding.tensor("pending.skip", pending.skip, torch.uint8, (R, H1))
    a.gsum = binding.optional("grad_l1", grad_l1, _F64, (R, L))
    keep += _fill_credit(a, credit, R, widths)
    keep += _fill_anchor(a, anchor, R, widths, credit.rule, adam is not None or cbp is not None)
    keep += _fill_redo(a, redo, R, widths)
    keep += _fill_adam(a, adam, R, widths, credit.rule)
    ucount: torch.Tensor | None = keep[-1] if adam is not None else None
    keep += _fill_noise(a, noise, R, L)
    try:
        _run(lib, a, R, T, start, pending, workers)
    finally:
        if adam is not None and ucount is not None:  # (the counts the kernel kept, first)
            _store_counts(adam, ucount)


def _run(
    lib: ctypes.CDLL, a: BlockArgs, R: int, T: int, start: torch.Tensor, pending: Pending1,
    workers: int,
) -> None:  # fmt: skip
    todo = [r for r in range(R) if int(start[r]) < T or int(pending.step[r]) >= 0]
    groups = min(max(workers, 1), len(todo))
    ref = ctypes.byref(a)
    if groups <= 1:
        lib.cl_online_block(ref, 0, R)
        return
    # contiguous ranges holding equal numbers of the replicas with work left; ctypes releases
    # the GIL for the call, so the ranges run in parallel
    cuts = [todo[len(todo) * g // groups] for g in range(groups)] + [R]
    pool = _pool()
    futures = [
        pool.submit(lib.cl_online_block, ref, cuts[g], cuts[g + 1]) for g in range(1, groups)
    ]
    lib.cl_online_block(ref, cuts[0], cuts[1])
    for f in futures:
        f.result()


_POOL: tuple[int, ThreadPoolExecutor] | None = None


def _pool() -> ThreadPoolExecutor:
    """Worker threads for :func:`online_block_` (made anew in a forked child: a parent's
    threads do not exist there). Idle workers block on a queue; they never spin."""
    global _POOL
    if _POOL is None or _POOL[0] != os.getpid():
        _POOL = (
            os.getpid(),
            ThreadPoolExecutor(
                max(1, (os.cpu_count() or 1) - 1), thread_name_prefix="contlearn-block"
            ),
        )
    return _POOL[1]


def cbp_replace_(
    weights: list[torch.Tensor],
    biases: list[torch.Tensor],
    counts: torch.Tensor,
    fresh: list[torch.Tensor],
    cbp: CBPKernelState,
    replacements: list[torch.Tensor],
    fold: bool,
    skip: torch.Tensor,
) -> None:
    """Continual backprop's steps 6–7 (``cl_cbp_replace``) for ``counts (R, L − 1)`` units per
    replica and hidden layer, with ``fresh[l]`` the new incoming rows ``(N_l, fan_in)`` drawn
    in replica order (at least ``Σ_r counts[r, l]`` of them); ``replacements[l] (R,)`` int64
    counts up; replaced input-layer units are marked in ``skip`` (``Pending1.skip``).

    Raises:
        TypeError, ValueError: as :func:`online_block_`.
    """
    lib = need()
    widths = _widths(weights)
    L = len(weights)
    R = int(weights[0].shape[0])
    ws, bs = _shapes(R, widths)
    counts = binding.contiguous("counts", counts)
    binding.check("counts", counts, _I64, (R, L - 1))
    if counts.numel() and int(counts.min()) < 0:
        raise ValueError("kernel argument counts: negative counts of units to replace")
    wanted = counts.sum(0).tolist() if counts.numel() else [0] * (L - 1)
    fresh = [binding.contiguous(f"fresh[{i}]", t) for i, t in enumerate(fresh)]
    for i, (t, n) in enumerate(zip(fresh, wanted, strict=True)):
        if n and (t.dim() != 2 or t.shape[0] < n or t.shape[1] != widths[i]):
            raise ValueError(
                f"kernel argument fresh[{i}]: shape {tuple(t.shape)}, expected at least "
                f"({n}, {widths[i]}) fresh rows"
            )
    hidden = [(R, widths[i + 1]) for i in range(L - 1)]
    table = binding.check("cbp.table", cbp.table, _F32, (None,))
    if table.numel() < 1:
        raise ValueError("kernel argument cbp.table: empty")
    args = (
        binding.tensors("weights", weights, _F32, ws),
        binding.tensors("biases", biases, _F32, bs),
        counts.data_ptr(),
        binding.tensors("fresh", fresh, _F32, [None] * (L - 1)),
        binding.tensors("cbp.age", cbp.age, _I64, hidden),
        binding.tensors("cbp.mean_act", cbp.mean_act, _F32, hidden),
        binding.tensors("cbp.utility", cbp.utility, _F32, hidden),
        binding.tensors("cbp.utility_hat", cbp.utility_hat, _F32, hidden),
        binding.tensors("replacements", replacements, _I64, [(R,)] * (L - 1)),
    )
    skip_ptr = binding.tensor("skip", skip, torch.uint8, (R, widths[1]))
    width = torch.tensor(widths, dtype=torch.int64)
    lib.cl_cbp_replace(
        R, L, width.data_ptr(), *args[:2], args[2], *args[3:], cbp.maturity,
        table.data_ptr(), len(table), int(fold), skip_ptr,
    )  # fmt: skip
