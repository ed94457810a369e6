"""Counter-based normal noise: Philox4x32-10 keys, xoshiro128++ lanes and an exactly specified
float32 Box–Muller.

Shrink-and-perturb's noise (docs/design.md §4d) is a pure function of (key, update, parameter,
element): nothing is drawn from a generator's state, so the numbers do not depend on how the
steps are split into blocks, which thread runs a replica, or whether the run was resumed. The
C kernel (``cl_snp_normals``, ``snp_add`` in ``contlearn/backends/snp_noise.c``) computes the
same function; this module is the reference, in numpy (uint64 arithmetic holds Philox's 32 ×
32-bit products exactly, uint32 arrays wrap as xoshiro's words do; every floating-point step is
one IEEE float32 operation, +, −, ×, ÷ or √, so both sides round alike and agree bit for bit).

- :func:`philox4x32` — Philox4x32-10 (Salmon et al. 2011, "Parallel random numbers: as easy
  as 1, 2, 3"; Random123's ``philox4x32``): each chunk's lane states.
- :func:`xoshiro128pp` — one output of xoshiro128++ (Blackman & Vigna 2021, "Scrambled linear
  pseudorandom number generators") and the next state.
- :func:`normals_from_words` — two uint32 words → two normals (Box–Muller in float32, with the
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

#: the noise definition's version, kept in shrink-and-perturb's state (a checkpoint of another
#: definition does not resume: its noise would change mid-run)
VERSION = 2
#: lanes per chunk, Box–Muller pairs per lane, normals per chunk
LANES, PAIRS = 16, 32
CHUNK = 2 * LANES * PAIRS
_F = np.float32
#: ln 2, 2π as the nearest floats; √2's float as bits (the C kernel uses the same values)
LN2, TWO_PI, SQRT2_BITS = _F(math.log(2.0)), _F(2.0 * math.pi), 0x3FB504F3
#: 2·atanh(s) = s·Σ_j LOG_COEF[j] s^{2j}; sin φ = φ Σ_j SIN_COEF[j] φ^{2j};
#: cos φ = Σ_j COS_COEF[j] φ^{2j} (Taylor, |φ| ≤ π/4), j = 0..4, the nearest floats
LOG_COEF = tuple(_F(2.0 / (2 * j + 1)) for j in range(5))
SIN_COEF = tuple(_F((-1.0) ** j / math.factorial(2 * j + 1)) for j in range(5))
COS_COEF = tuple(_F((-1.0) ** j / math.factorial(2 * j)) for j in range(5))


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


def xoshiro128pp(state: list[np.ndarray]) -> np.ndarray:
    """One xoshiro128++ output from ``state = [s0, s1, s2, s3]`` (uint32 arrays), which it
    advances in place: ``out = rotl(s0 + s3, 7) + s0``; ``t = s1 << 9``; ``s2 ^= s0``;
    ``s3 ^= s1``; ``s1 ^= s2``; ``s0 ^= s3``; ``s2 ^= t``; ``s3 = rotl(s3, 11)`` (mod 2³²)."""
    s0, s1, s2, s3 = state
    out = _rotl(s0 + s3, 7) + s0
    t = s1 << np.uint32(9)
    s2 = s2 ^ s0
    s3 = s3 ^ s1
    s1 = s1 ^ s2
    s0 = s0 ^ s3
    s2 = s2 ^ t
    state[:] = [s0, s1, s2, _rotl(s3, 11)]
    return out


def _rotl(x: np.ndarray, k: int) -> np.ndarray:
    return (x << np.uint32(k)) | (x >> np.uint32(32 - k))


def _horner(z: np.ndarray, coef: tuple[np.float32, ...]) -> np.ndarray:
    acc = np.full_like(z, coef[-1])
    for c in coef[-2::-1]:
        acc = acc * z + c
    return acc


def _unit(w: np.ndarray) -> np.ndarray:
    """u(w) = ((w >> 9) + ½)·2⁻²³ in float32 (exact): in [2⁻²⁴, 1 − 2⁻²⁴]."""
    return ((w >> np.uint32(9)).astype(_F) + _F(0.5)) * _F(2.0**-23)


def _log_unit(w: np.ndarray) -> np.ndarray:
    """ln u(w) in float32: u = m·2^k (m in [1, 2) from the float's bits), m halved (k + 1)
    when m > √2; ln u = k·ln 2 + s·P(s²), s = (m − 1)/(m + 1), P by Horner."""
    bits = _unit(w).view(np.uint32)
    mb = (bits & np.uint32(0x007FFFFF)) | np.uint32(0x3F800000)
    big = (mb > np.uint32(SQRT2_BITS)).astype(np.uint32)
    m = (mb - (big << np.uint32(23))).view(_F)
    k = ((bits >> np.uint32(23)).astype(np.int32) - 127 + big.astype(np.int32)).astype(_F)
    s = (m - _F(1.0)) / (m + _F(1.0))
    return k * LN2 + s * _horner(s * s, LOG_COEF)


def _sincos_unit(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sin 2πv, cos 2πv) for v = u(w) in float32: q = ⌊4v + ½⌋ = ((w >> 9) + 2²⁰) >> 21,
    y = v − q/4 in [−⅛, ⅛] (exact), φ = 2π·y, Taylor polynomials in φ² by Horner, then
    rotated by q quarter turns."""
    h = w >> np.uint32(9)
    q = (h + np.uint32(1 << 20)) >> np.uint32(21)
    phi = TWO_PI * (_unit(w) - q.astype(_F) * _F(0.25))
    z = phi * phi
    s, c = _horner(z, SIN_COEF) * phi, _horner(z, COS_COEF)
    quarter = (q & np.uint32(3)).astype(np.int64)
    return np.choose(quarter, [s, c, -s, -c]), np.choose(quarter, [c, -s, -c, s])


def normals_from_words(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two uint32 words → two normals (float32): ``ρ cos 2πv, ρ sin 2πv`` with
    ``ρ = √(−2 ln u(a))``, ``v = u(b)``, every step one float32 operation."""
    rho = np.sqrt(_F(-2.0) * _log_unit(a))
    sin, cos = _sincos_unit(b)
    return rho * cos, rho * sin


def snp_normals(keys: np.ndarray, update: int, param: int, numel: int) -> np.ndarray:
    """ε[r, t, p, e] for every replica r and e = 0 … numel − 1 (docs/design.md §4d): in chunk
    c = e // 1024, with i = e % 1024, normal ``(i // 16) % 2`` of Box–Muller pair
    ``(i // 16) // 2`` of lane ``i % 16``, whose xoshiro128++ state is Philox4x32-10 at counter
    ``(16c + lane, p, t mod 2³², t // 2³²)`` under replica r's key (s3 = 1 if all four words
    are 0); pair n takes the lane's outputs 2n and 2n + 1.

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
    if numel > 1 << 38 or param >> 32 or update >> 64:
        raise ValueError("snp noise: a parameter over 2**38 elements, or p, t past 32/64 bits")
    chunks = (numel + CHUNK - 1) // CHUNK
    counter = np.zeros((chunks, LANES, 4), dtype=np.uint64)
    counter[..., 0] = np.arange(chunks * LANES, dtype=np.uint64).reshape(chunks, LANES)
    counter[..., 1] = param
    counter[..., 2] = update & 0xFFFFFFFF
    counter[..., 3] = update >> 32
    keys = np.asarray(keys).reshape(-1, 1, 1, 2)  # (R, 1, 1, 2)
    words = philox4x32(counter[None], keys).astype(np.uint32)  # (R, chunks, LANES, 4)
    state = [words[..., i] for i in range(4)]
    state[3] = state[3] | (words == 0).all(-1).astype(np.uint32)
    out = np.empty((len(keys), chunks, PAIRS, 2, LANES), dtype=_F)
    for n in range(PAIRS):
        a = xoshiro128pp(state)
        b = xoshiro128pp(state)
        out[:, :, n, 0], out[:, :, n, 1] = normals_from_words(a, b)
    return out.reshape(len(keys), -1)[:, :numel]


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
