"""The Forward-Forward agent's block backend (``ff-block``): whole batch-1 online steps in one
compiled loop per replica (``cl_ff_block``, C source in ``ff_block.c``).

Step by step, the agent's fused path (``ff-fused``) runs a handful of small batched torch
operations per layer and reads the first layer's weights of all R replicas (R × H × D floats,
more than the core's cache) twice per step and writes them once. A block runs each replica's T
steps in a row while its weights stay in the core's cache, the same arithmetic as the fused path
(label pass, goodness prediction, local losses, the learner's affine update; see the C source's
comment), in one call. It is chosen for what it computes exactly, float rounding aside
(:func:`unsupported` names the first reason it does not apply, None where it does):

- the hand-written step (``fast=true``) and ``predict=goodness`` (no head), peer
  normalisation off, an activation of :data:`ACTIVATIONS`, every embedding, norm and goodness;
- a learner chain with a declared affine form and no post-update edit but shrink-and-perturb's
  noise (SGD, L2, decoupled decay, ``snp``: its counter-based noise drawn in the kernel after
  each layer's update, docs/design.md §4d), or an affine chain with one L2-Init term
  (``l2-init``: ``θ ← (1 + β) θ + α g + γ θ₀``, :mod:`contlearn.learners.block_forms`), or Adam
  between affine maps (``adam``, ``proper-adam``, the base optimizer ``adam``
  under ``bp``, L2 over Adam: :mod:`contlearn.learners.adam_form`; its moments updated in the
  same pass, its counts, equal over each tensor, advanced by T after the block); not CBP,
  ReDo, S&P over Adam, L2-Init over Adam (those keep the per-step path);
- batch size 1, the compiled kernels available (the agent runs on the CPU only).

Like the MLP's block loop it is used when the stream feeds blocks (every stream does); the agent's
``act``/``observe`` keep the per-step path. ``tests/test_ff_block.py`` checks blocks against the
per-step path, the negatives against per-step draws, and splits of a block against the whole.
"""

from __future__ import annotations

import ctypes

import torch

from contlearn.backends import binding
from contlearn.backends.block_kernel import (
    BLOCK_ACTIVATIONS,
    BlockAdam,
    BlockAnchor,
    BlockNoise,
    _AdamOpt,
    _pool,
    _uniform_counts,
)
from contlearn.backends.kernels import adam_tables, library, need
from contlearn.learners.adam_form import AdamPlan
from contlearn.learners.base import AnchorState, find_states
from contlearn.learners.block_forms import AnchorPlan
from contlearn.learners.optim import ScaleByAdamState

#: activations the kernel computes (``act_fwd``'s codes, as the MLP's block loop)
ACTIVATIONS = BLOCK_ACTIVATIONS
_P = ctypes.c_void_p


class FFBlockArgs(ctypes.Structure):
    """``cl_ff_block``'s arguments (the C ``FFBlockArgs``, same fields in the same order)."""

    _fields_ = [
        *[(n, ctypes.c_int64) for n in ("R", "T", "L", "D", "C")],
        *[(n, _P) for n in ("width", "wp", "bp", "x", "y", "neg", "theta", "scores", "loss")],
        ("gsum", _P),
        ("alpha", ctypes.c_float),
        ("scale", ctypes.c_float),
        *[(n, ctypes.c_int32) for n in ("act", "append", "length", "mean", "first", "adam")],
        *[(n, _P) for n in ("amw", "avw", "amb", "avb", "ucount")],
        ("ao", _AdamOpt),
        ("gamma", ctypes.c_float),
        *[(n, _P) for n in ("ancw", "ancb")],
        ("snp", ctypes.c_int32),
        ("snp_sigma", ctypes.c_float),
        ("snp_key", _P),
        ("snp_count", ctypes.c_int64),
    ]


def check_layout(lib: ctypes.CDLL) -> bool:
    """Whether the compiled library's ``FFBlockArgs`` has :class:`FFBlockArgs`'s size."""
    lib.cl_ff_block_args_size.restype = ctypes.c_int64
    lib.cl_ff_block_args_size.argtypes = []
    return int(lib.cl_ff_block_args_size()) == ctypes.sizeof(FFBlockArgs)


def unsupported(
    *,
    fast: bool,
    predict: str,
    peer: float,
    activation: str,
    plan: object,
    adam: object,
    anchor: object,
    batch: int,
) -> str | None:
    """Why the block loop does not compute this configuration exactly (None: it does); the
    module docstring's list, in one place. ``plan``: the learner's affine form
    (:func:`~contlearn.learners.fused.fused_plan`), ``adam``: its Adam form
    (:func:`~contlearn.learners.adam_form.adam_plan`), ``anchor``: its L2-Init form
    (:func:`~contlearn.learners.block_forms.anchor_plan`), each None where it has none."""
    post = getattr(plan, "post", None)
    noise_only = getattr(plan, "noise", None) is not None  # (the post is S&P's noise alone)
    problems = [
        (not fast, "the autograd reference runs (fast=false)"),
        (predict != "goodness", "predict=head (the kernel has no readout head)"),
        (peer != 0.0, "peer normalisation"),
        (activation not in ACTIVATIONS, f"activation {activation}"),
        (
            plan is None and adam is None and anchor is None,
            "a learner with no affine, Adam or L2-Init form",
        ),
        (post is not None and not noise_only, "a learner with a post-update edit"),
        (getattr(adam, "replacer", None) is not None, "continual backprop over Adam"),
        (batch != 1, f"batch size {batch} (the kernel steps on one example)"),
        (library() is None, "no compiled kernels"),
    ]
    return next((why for bad, why in problems if bad), None)


def block_adam(state: object, plan: AdamPlan | None, names: list[str]) -> BlockAdam | None:
    """The learner's Adam state (its one :class:`ScaleByAdamState` in ``state``, which the
    kernel updates in place) for layers ``names`` and ``plan``'s options; None without a plan."""
    if plan is None:
        return None
    found = find_states(state, ScaleByAdamState)
    if len(found) != 1:  # (adam_plan promised one Adam: a bug, never a silent other path)
        raise RuntimeError(f"the FF block expected one Adam state, the learner has {len(found)}")
    s, ws, bs = found[0], [f"{n}.weight" for n in names], [f"{n}.bias" for n in names]
    o = plan.adam
    return BlockAdam(
        [s.mu[k] for k in ws], [s.nu[k] for k in ws], [s.count[k] for k in ws],
        [s.mu[k] for k in bs], [s.nu[k] for k in bs], [s.count[k] for k in bs],
        plan.pre_a, plan.pre_b, o.b1, o.b2, o.eps, plan.lr, plan.post_b,
    )  # fmt: skip


def block_anchor(state: object, plan: AnchorPlan | None, names: list[str]) -> BlockAnchor | None:
    """L2-Init's anchors (the learner's one :class:`AnchorState` in ``state``) for layers
    ``names`` and ``plan``'s γ; None without a plan."""
    if plan is None:
        return None
    found = find_states(state, AnchorState)
    if len(found) != 1:  # (anchor_plan promised one L2-Init: a bug, never a silent other path)
        raise RuntimeError(f"the FF block expected one L2-Init state, the learner has {len(found)}")
    anchor = found[0].anchor
    return BlockAnchor(
        [anchor[f"{n}.weight"] for n in names], [anchor[f"{n}.bias"] for n in names],
        plan.anchor_scale,
    )  # fmt: skip


def block_noise(
    state: object, plan: object, order: list[str], names: list[str]
) -> BlockNoise | None:
    """Shrink-and-perturb's noise (the plan's :class:`~contlearn.learners.fused.NoiseForm`)
    for layers ``names``, their weights' and biases' indices in the parameter order ``order``;
    None without noise (or σ = 0)."""
    form = getattr(plan, "noise", None)
    if form is None or not form.sigma:
        return None
    s, index = form.state(state), {k: i for i, k in enumerate(order)}
    pairs = [(index[f"{n}.weight"], index[f"{n}.bias"]) for n in names]
    return BlockNoise(form.sigma, s.key, int(s.count), pairs)


def ff_block_(
    weights: list[torch.Tensor],
    biases: list[torch.Tensor],
    x: torch.Tensor,
    labels: torch.Tensor,
    negatives: torch.Tensor,
    thresholds: tuple[float, ...],
    *,
    classes: int,
    alpha: float,
    scale: float,
    activation: str,
    append: bool,
    length: bool,
    mean: bool,
    first: int,
    gsum: torch.Tensor | None = None,
    adam: BlockAdam | None = None,
    anchor: BlockAnchor | None = None,
    noise: BlockNoise | None = None,
    workers: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """T online steps of every replica, in place on ``weights`` and ``biases``.

    Args:
        weights: per hidden layer ``(R, H_l, I_l)``, ``I_1`` the embedded input's length.
        biases: per hidden layer ``(R, H_l)``.
        x: ``(T, R, D)`` inputs without a label.
        labels: ``(T, R)`` int64 true labels.
        negatives: ``(T, R)`` int64 wrong labels.
        thresholds: θ_l per layer.
        classes: C.
        alpha: the affine update's gradient scale α.
        scale: its parameter scale ``1 + β``.
        activation: a key of :data:`ACTIVATIONS`.
        append: the one-hot is appended (else it replaces the first C inputs).
        length: length normalisation (else RMS).
        mean: mean-of-squares goodness (else the sum).
        first: the 0-based first layer whose goodness the prediction sums.
        gsum: ``(R, L)`` float64 to add each step's gradient L1 norms to, or None.
        adam: Adam's state and options (the update is Adam's, ``alpha`` and ``scale`` unused),
            or None; every count tensor's elements must be equal (each replica's).
        anchor: L2-Init's anchors and γ (``θ ← scale θ + α g + γ θ₀``), or None.
        noise: shrink-and-perturb's σ, keys and update count before the block (the layers'
            weight and bias are parameters 2l and 2l + 1), or None; its count is not advanced
            here.
        workers: threads, each running a contiguous range of replicas.

    Returns:
        ``(scores (T, R, C), loss (T, R))``: the prediction's goodness per label before each
        step's update, and each step's FF loss summed over layers.

    Raises:
        TypeError, ValueError: an argument of the wrong dtype, shape, device or layout, or a
            label out of range (:mod:`contlearn.backends.binding`), before any pointer
            reaches C.
    """
    lib = need()
    f32, i64 = torch.float32, torch.int64
    L = len(weights)
    if L == 0 or len(biases) != L or len(thresholds) != L:
        raise ValueError(
            f"kernel arguments: {L} weights, {len(biases)} biases, {len(thresholds)} "
            "thresholds; pass one of each per hidden layer"
        )
    x = binding.check("x", x, f32, (None, None, None))
    T, R, D = x.shape
    din = D + classes if append else D
    if classes < 1 or (not append and classes > D):
        raise ValueError(f"kernel argument classes={classes} does not fit inputs of {D} values")
    if not 0 <= first < L:
        raise ValueError(f"kernel argument first={first}: a layer index in 0..{L - 1}")
    width = [din]
    for i, (w, b) in enumerate(zip(weights, biases, strict=True)):
        binding.check(f"weights[{i}]", w, f32, (R, None, width[-1]))
        width.append(w.shape[1])
        binding.check(f"biases[{i}]", b, f32, (R, width[-1]))
    for name, lab in (("labels", labels), ("negatives", negatives)):
        binding.check(name, lab, i64, (T, R))
        binding.indices(name, lab, classes)
    if gsum is not None:
        binding.check("gsum", gsum, torch.float64, (R, L))
    widths = torch.tensor(width, dtype=i64)
    theta = torch.tensor(thresholds, dtype=f32)
    scores = torch.empty(T, R, classes)
    loss = torch.empty(T, R)
    wp = (_P * L)(*[w.data_ptr() for w in weights])
    bp = (_P * L)(*[b.data_ptr() for b in biases])
    a = FFBlockArgs(
        R, T, L, D, classes, widths.data_ptr(), ctypes.cast(wp, _P), ctypes.cast(bp, _P),
        x.data_ptr(), labels.data_ptr(), negatives.data_ptr(), theta.data_ptr(),
        scores.data_ptr(), loss.data_ptr(), binding.optional("gsum", gsum, torch.float64),
        alpha, scale, binding.choice("activation", activation, ACTIVATIONS), int(append),
        int(length), int(mean), first,
    )  # fmt: skip
    ws = [(R, width[i + 1], width[i]) for i in range(L)]  # (each layer's weight and bias shapes)
    bs = [(R, width[i + 1]) for i in range(L)]
    keep = _fill_adam(a, adam, ws, bs) + _fill_extras(a, anchor, noise, ws, bs)
    ref = ctypes.byref(a)
    groups = min(max(workers, 1), R)
    if groups <= 1 or T == 0:
        status = [lib.cl_ff_block(ref, 0, R)]
    else:  # contiguous replica ranges; ctypes releases the GIL for each call
        cuts = [R * g // groups for g in range(groups + 1)]
        futures = [
            _pool().submit(lib.cl_ff_block, ref, cuts[g], cuts[g + 1]) for g in range(1, groups)
        ]
        status = [lib.cl_ff_block(ref, cuts[0], cuts[1])] + [f.result() for f in futures]
    if any(status):
        raise MemoryError("cl_ff_block could not allocate its scratch memory")
    if adam is not None and T:
        for count in (*adam.count_w, *adam.count_b):
            count.add_(T)
    del keep
    return scores, loss


def _fill_extras(
    a: FFBlockArgs,
    anchor: BlockAnchor | None,
    noise: BlockNoise | None,
    ws: list[tuple[int, int, int]],
    bs: list[tuple[int, int]],
) -> list:
    """L2-Init's and shrink-and-perturb's fields of ``a`` after the checks (``ws``, ``bs``: each
    layer's weight and bias shapes)."""
    keep: list = []
    L, R = len(ws), ws[0][0]
    if anchor is not None:
        arrays = [
            binding.tensors("anchor.weights", anchor.weights, torch.float32, ws),
            binding.tensors("anchor.biases", anchor.biases, torch.float32, bs),
        ]
        a.ancw, a.ancb = (ctypes.cast(p, _P) for p in arrays)
        a.gamma = anchor.gamma
        keep += arrays
    if noise is not None:
        if [tuple(i) for i in noise.param_index] != [(2 * i, 2 * i + 1) for i in range(L)]:
            raise ValueError(
                f"kernel argument noise.param_index={noise.param_index}: the FF kernel draws "
                "layer l's weight and bias as parameters 2l and 2l + 1"
            )
        if noise.first < 0:
            raise ValueError(f"kernel argument noise.first={noise.first}: an update count >= 0")
        a.snp, a.snp_sigma = 1, noise.sigma
        a.snp_key = binding.tensor("noise.keys", noise.keys, torch.int64, (R, 2))
        a.snp_count = noise.first
        keep.append(noise.keys)
    return keep


def _fill_adam(
    a: FFBlockArgs,
    adam: BlockAdam | None,
    ws: list[tuple[int, int, int]],
    bs: list[tuple[int, int]],
) -> list:
    """Adam's fields of ``a`` after the checks (what must stay alive during the call)."""
    if adam is None:
        return []
    f32 = torch.float32
    arrays = [
        binding.tensors("adam.mu_w", adam.mu_w, f32, ws),
        binding.tensors("adam.nu_w", adam.nu_w, f32, ws),
        binding.tensors("adam.mu_b", adam.mu_b, f32, bs),
        binding.tensors("adam.nu_b", adam.nu_b, f32, bs),
    ]
    binding.tensors("adam.count_w", adam.count_w, f32, ws)
    binding.tensors("adam.count_b", adam.count_b, f32, bs)
    ucount = _uniform_counts(adam)
    if bool((ucount < 0).any()):
        raise ValueError(
            "kernel argument adam: a count tensor whose elements differ (a reset cleared some); "
            "the FF block takes Adam with one count per tensor"
        )
    a.adam = 1
    a.amw, a.avw, a.amb, a.avb = (ctypes.cast(p, _P) for p in arrays)
    a.ucount = ucount.data_ptr()
    t1, t2 = adam_tables(adam.b1, adam.b2)
    a.ao = _AdamOpt(
        adam.pre_a, adam.pre_b, 1.0 - adam.b1, adam.b2, 1.0 - adam.b2, adam.eps, adam.lr,
        adam.post_b, t1.data_ptr(), len(t1), t2.data_ptr(), len(t2),
    )  # fmt: skip
    return [*arrays, ucount, t1, t2]
