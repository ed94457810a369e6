"""Counter-based normal noise: Philox4x32-10 and an exactly specified Box–Muller.

Shrink-and-perturb's noise (docs/design.md §4d) is a pure function of (key, update, parameter,
element): nothing is drawn from a generator's state, so the numbers do not depend on how the
steps are split into blocks, which thread runs a replica, or whether the run was resumed. The
C kernel (``cl_snp_normals``, ``snp_add`` in ``contlearn/backends/snp_noise.c``) computes the
same function; this module is the reference, in numpy (uint64 arithmetic holds the 32 × 32-bit
products exactly; every floating-point step is one IEEE double operation, +, −, ×, ÷ or √, so
both sides round alike and agree bit for bit).

- :func:`philox4x32` — Philox4x32-10 (Salmon et al. 2011, "Parallel random numbers: as easy
  as 1, 2, 3"; Random123's ``philox4x32``).
- :func:`normals_from_words` — four uint32 words → four normals (Box–Muller, with the
  logarithm and the sine/cosine written out as fixed polynomials).
- :func:`snp_normals` — ε[t, p, e] for one key: element ``e`` of parameter ``p`` at update
  ``t``.
- :func:`replica_keys` — each replica's 64-bit key from its seed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from contlearn.seeding import child_seed

_M0, _M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
_W0, _W1 = 0x9E3779B9, 0xBB67AE85
_MASK = np.uint64(0xFFFFFFFF)
_32 = np.uint64(32)

#: ln 2, 2π and √2 as the nearest doubles (the C kernel uses the same literals).
LN2 = 0.6931471805599453
TWO_PI = 6.283185307179586
SQRT2 = 1.4142135623730951
#: odd-power coefficients of 2·atanh(s) = ln((1 + s)/(1 − s)): 2/(2j + 1), j = 0..7
LOG_COEF = tuple(2.0 / (2 * j + 1) for j in range(8))
#: sin φ = φ Σ_j SIN_COEF[j] φ^{2j}, cos φ = Σ_j COS_COEF[j] φ^{2j} (Taylor, |φ| ≤ π/4)
SIN_COEF = tuple((-1.0) ** j / math.factorial(2 * j + 1) for j in range(8))
COS_COEF = tuple((-1.0) ** j / math.factorial(2 * j) for j in range(9))


def philox4x32(counter: np.ndarray, key: np.ndarray | tuple[int, int]) -> np.ndarray:
    """Philox4x32-10 of ``counter`` under ``key``.

    Per round (ten, the key bumped by the Weyl constants before each round but the first):
    ``(hi0, lo0) = M0·c0``, ``(hi1, lo1) = M1·c2`` (64-bit products split into 32-bit halves),
    ``c ← (hi1 ⊕ c1 ⊕ k0, lo1, hi0 ⊕ c3 ⊕ k1, lo0)``; ``M0 = 0xD2511F53``,
    ``M1 = 0xCD9E8D57``, ``k0 += 0x9E3779B9``, ``k1 += 0xBB67AE85`` (mod 2³²).

    Args:
        counter: ``(..., 4)`` integers in [0, 2³²) (any integer dtype).
        key: ``(..., 2)`` integers in [0, 2³²), broadcast against the counter's leading dims
            (a pair ``(k0, k1)`` for one key).

    Returns:
        ``(..., 4)`` uint64 holding the four uint32 output words.
    """
    c = np.asarray(counter).astype(np.uint64) & _MASK
    c0, c1, c2, c3 = (c[..., i] for i in range(4))
    k = np.asarray(key).astype(np.uint64) & _MASK
    k0, k1 = k[..., 0], k[..., 1]
    for rnd in range(10):
        if rnd:
            k0, k1 = (k0 + np.uint64(_W0)) & _MASK, (k1 + np.uint64(_W1)) & _MASK
        p0, p1 = _M0 * c0, _M1 * c2  # exact 64-bit products
        hi0, lo0, hi1, lo1 = p0 >> _32, p0 & _MASK, p1 >> _32, p1 & _MASK
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return np.stack(np.broadcast_arrays(c0, c1, c2, c3), axis=-1)


def _log_unit(w: np.ndarray) -> np.ndarray:
    """ln u for u = (w + ½)·2⁻³² (w uint32 as uint64): v = 2w + 1 = m·2^k (m in [1, 2), via
    the double's bits), m halved (k + 1) when m > √2; ln u = (k − 33)·ln 2 + 2·atanh(s),
    s = (m − 1)/(m + 1), the series to s¹⁵ by Horner in s²."""
    v = (w * np.uint64(2) + np.uint64(1)).astype(np.float64)  # exact: v < 2**33
    bits = v.view(np.uint64)
    k = (bits >> np.uint64(52)).astype(np.int64) - 1023
    m = ((bits & np.uint64(0x000F_FFFF_FFFF_FFFF)) | np.uint64(0x3FF0_0000_0000_0000)).view(
        np.float64
    )
    big = m > SQRT2
    m = np.where(big, m * 0.5, m)
    k = k + big
    s = (m - 1.0) / (m + 1.0)
    z = s * s
    acc = np.full_like(s, LOG_COEF[-1])
    for c in LOG_COEF[-2::-1]:
        acc = acc * z + c
    return (k - 33).astype(np.float64) * LN2 + s * acc


def _sincos_unit(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sin 2πu, cos 2πu) for u = (w + ½)·2⁻³²: q = ⌊4u + ½⌋, y = u − q/4 in [−⅛, ⅛] (exact),
    φ = 2π·y, Taylor polynomials in φ² by Horner, then rotated by q quarter turns."""
    u = (w.astype(np.float64) + 0.5) * 2.0**-32
    q = np.floor(u * 4.0 + 0.5)
    y = u - q * 0.25
    phi = TWO_PI * y
    z = phi * phi
    s = np.full_like(z, SIN_COEF[-1])
    for c in SIN_COEF[-2::-1]:
        s = s * z + c
    s = s * phi
    co = np.full_like(z, COS_COEF[-1])
    for c in COS_COEF[-2::-1]:
        co = co * z + c
    quarter = q.astype(np.int64) & 3
    sin = np.choose(quarter, [s, co, -s, -co])
    cos = np.choose(quarter, [co, -s, -co, s])
    return sin, cos


def normals_from_words(words: np.ndarray) -> np.ndarray:
    """Four uint32 words ``(w0, w1, w2, w3)`` → four normals (float32): with
    ``ρ_a = √(−2 ln u(w_a))``, ``(ρ0 cos 2πu(w1), ρ0 sin 2πu(w1), ρ2 cos 2πu(w3),
    ρ2 sin 2πu(w3))``, computed in double and rounded to float32 once.

    Args:
        words: ``(..., 4)`` uint64 (uint32 values), e.g. :func:`philox4x32`'s output.
    """
    w = np.asarray(words, dtype=np.uint64)
    out = np.empty(w.shape, dtype=np.float64)
    for a in (0, 2):
        rho = np.sqrt(-2.0 * _log_unit(w[..., a]))
        sin, cos = _sincos_unit(w[..., a + 1])
        out[..., a] = rho * cos
        out[..., a + 1] = rho * sin
    return out.astype(np.float32)


def snp_normals(keys: np.ndarray, update: int, param: int, numel: int) -> np.ndarray:
    """ε[r, t, p, e] for every replica r and e = 0 … numel − 1: normal ``e % 4`` of
    Philox4x32-10 at counter ``(e // 4, p, t mod 2³², t // 2³²)`` under replica r's key.

    Args:
        keys: ``(R, 2)``, the replicas' keys (:func:`replica_keys`).
        update: t, the number of updates before this one (0 for the first).
        param: p, the parameter's index in the parameter order.
        numel: the parameter's number of elements (of one replica).

    Returns:
        ``(R, numel)`` float32.
    """
    if update < 0 or param < 0 or numel < 0:
        raise ValueError(f"update, param and numel must be >= 0, got {update}, {param}, {numel}")
    if numel > 4 << 32 or param >> 32 or update >> 64:
        raise ValueError("snp noise: a parameter over 2**34 elements, or p, t past 32/64 bits")
    blocks = (numel + 3) // 4
    counter = np.zeros((blocks, 4), dtype=np.uint64)
    counter[:, 0] = np.arange(blocks, dtype=np.uint64)
    counter[:, 1] = param
    counter[:, 2] = update & 0xFFFFFFFF
    counter[:, 3] = update >> 32
    keys = np.asarray(keys).reshape(-1, 1, 2)  # (R, 1, 2)
    words = philox4x32(counter[None], keys)  # (R, blocks, 4)
    return normals_from_words(words).reshape(len(keys), -1)[:, :numel]


def replica_keys(seeds: Sequence[int], stream: int) -> np.ndarray:
    """Each replica's Philox key: the first two uint32 words of ``generate_state`` of stream
    ``stream`` of its seed's ``learner`` randomness (stream 0: ``child_seed(s, "learner")``;
    stream k > 0: its k-th child of ``spawn(k + 1)``, as :mod:`contlearn.learners.rng`).

    Returns:
        ``(R, 2)`` int64 (values in [0, 2³²)).
    """
    if stream < 0:
        raise ValueError(f"rng stream must be >= 0, got {stream}")
    out = []
    for s in seeds:
        seq = child_seed(int(s), "learner")
        if stream:
            seq = seq.spawn(stream + 1)[stream]
        out.append(seq.generate_state(2, np.uint32).astype(np.int64))
    return np.stack(out) if out else np.zeros((0, 2), dtype=np.int64)
