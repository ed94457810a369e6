"""Shrink-and-perturb's counter-based noise (contlearn/learners/philox.py, docs/design.md §4d):
Philox4x32-10 against Random123's published known-answer vectors and a scalar implementation
written from the paper, xoshiro128++ against a scalar implementation written from Blackman &
Vigna's definition, the float32 Box–Muller polynomials against libm, the chunk and lane layout
against a per-element loop, the normals' distribution and independence, and the C kernel
against the numpy definition bit for bit.

numpy's own ``np.random.Philox`` is Philox4x64-10 (64-bit words, other multipliers), so its
raw output cannot be matched against 4x32; the scalar implementation below is the second,
independent reference instead."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from contlearn.backends import noise_kernel
from contlearn.learners import philox

# Random123 kat_vectors: philox4x32 10 rounds (counter, key, expected)
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


def _scalar_philox(c: list[int], k: list[int]) -> list[int]:
    """Philox4x32-10 with Python integers, from Salmon et al. 2011."""
    mask = 0xFFFFFFFF
    c, k = list(c), list(k)
    for rnd in range(10):
        if rnd:
            k = [(k[0] + 0x9E3779B9) & mask, (k[1] + 0xBB67AE85) & mask]
        p0, p1 = 0xD2511F53 * c[0], 0xCD9E8D57 * c[2]
        c = [(p1 >> 32) ^ c[1] ^ k[0], p1 & mask, (p0 >> 32) ^ c[3] ^ k[1], p0 & mask]
    return c


@pytest.mark.parametrize("counter,key,expected", KAT)
def test_philox_known_answers(counter, key, expected):
    got = philox.philox4x32(np.array(counter), key)
    assert [int(x) for x in got] == list(expected)
    assert _scalar_philox(list(counter), list(key)) == list(expected)


def test_vectorised_philox_equals_the_scalar_one_on_random_counters_and_keys():
    rng = np.random.default_rng(0)
    counters = rng.integers(0, 2**32, size=(200, 4), dtype=np.uint64)
    keys = rng.integers(0, 2**32, size=(200, 2), dtype=np.uint64)
    got = philox.philox4x32(counters, keys)
    for c, k, g in zip(counters, keys, got, strict=True):
        assert _scalar_philox([int(x) for x in c], [int(x) for x in k]) == [int(x) for x in g]


def _scalar_xoshiro(state: list[int], n: int) -> list[int]:
    """n outputs of xoshiro128++ with Python integers (Blackman & Vigna 2021, the reference
    C code's ``next``)."""
    mask = 0xFFFFFFFF

    def rotl(x: int, k: int) -> int:
        return ((x << k) | (x >> (32 - k))) & mask

    s0, s1, s2, s3 = state
    out = []
    for _ in range(n):
        out.append((rotl((s0 + s3) & mask, 7) + s0) & mask)
        t = (s1 << 9) & mask
        s2 ^= s0
        s3 ^= s1
        s1 ^= s2
        s0 ^= s3
        s2 ^= t
        s3 = rotl(s3, 11)
    return out


def test_vectorised_xoshiro_equals_the_scalar_one():
    rng = np.random.default_rng(1)
    seeds = rng.integers(0, 2**32, size=(50, 4), dtype=np.uint64).astype(np.uint32)
    state = [seeds[:, i].copy() for i in range(4)]
    got = np.stack([philox.xoshiro128pp(state) for _ in range(70)], 1)
    for row, seed in zip(got, seeds, strict=True):
        assert [int(x) for x in row] == _scalar_xoshiro([int(x) for x in seed], 70)


def test_box_muller_pieces_equal_libm_to_float_rounding():
    w = np.concatenate(
        [np.arange(0, 2**32, 2**14 + 3, dtype=np.uint64), np.array([0, 511, 512, 2**32 - 1])]
    ).astype(np.uint32)
    u = ((w >> 9).astype(np.float64) + 0.5) * 2.0**-23
    assert u.min() > 0 and u.max() < 1
    np.testing.assert_allclose(philox._log_unit(w), np.log(u), rtol=3e-7, atol=1e-7)
    sin, cos = philox._sincos_unit(w)
    np.testing.assert_allclose(sin, np.sin(2 * np.pi * u), rtol=0, atol=3e-7)
    np.testing.assert_allclose(cos, np.cos(2 * np.pi * u), rtol=0, atol=3e-7)


def test_normals_follow_the_chunk_and_lane_layout():
    """Element by element, from the definition: chunk, lane, pair and which of the two."""
    keys = philox.replica_keys([3], 1)
    t, p, n = 2**32 + 9, 4, 2 * philox.CHUNK + 77
    got = philox.snp_normals(keys, t, p, n)[0]
    k0, k1 = (int(x) for x in keys[0])
    for e in [0, 1, 15, 16, 17, 31, 32, 1023, 1024, 1500, n - 1]:
        c, i = divmod(e, philox.CHUNK)
        lane, k = i % 16, i // 16
        words = _scalar_philox([16 * c + lane, p, t & 0xFFFFFFFF, t >> 32], [k0, k1])
        a, b = _scalar_xoshiro(words, 2 * (k // 2) + 2)[-2:]
        u = ((a >> 9) + 0.5) * 2.0**-23
        v = ((b >> 9) + 0.5) * 2.0**-23
        rho = math.sqrt(-2 * math.log(u))
        want = rho * (math.cos if k % 2 == 0 else math.sin)(2 * math.pi * v)
        assert got[e] == pytest.approx(want, rel=1e-6, abs=1e-6), e


def _ks_normal(x: np.ndarray) -> float:
    """Kolmogorov–Smirnov distance of x from N(0, 1)."""
    x = np.sort(x.astype(np.float64))
    cdf = 0.5 * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))
    n = len(x)
    return float(max((np.arange(1, n + 1) / n - cdf).max(), (cdf - np.arange(n) / n).max()))


def test_normals_distribution():
    keys = philox.replica_keys([0], 1)
    x = philox.snp_normals(keys, 3, 0, 400_000)[0].astype(np.float64)
    n = len(x)
    assert abs(x.mean()) < 4 / n**0.5
    assert abs(x.var() - 1) < 4 * (2 / n) ** 0.5
    assert abs((x**4).mean() - 3) < 0.05  # kurtosis: normal, not uniform-ish
    assert _ks_normal(x[:100_000]) < 1.63 / 100_000**0.5  # (KS at the 1 % level)
    assert np.abs(x).max() < 5.78  # (23-bit uniforms: |ε| ≤ √(2·24 ln 2) ≈ 5.77)


def test_noise_independent_across_replicas_updates_parameters_and_elements():
    keys = philox.replica_keys([0, 1], 1)
    n = 50_000
    base = philox.snp_normals(keys, 10, 2, n)
    others = [
        base[1],  # another replica
        philox.snp_normals(keys, 11, 2, n)[0],  # the next update
        philox.snp_normals(keys, 10 + 2**32, 2, n)[0],  # t's high word
        philox.snp_normals(keys, 10, 3, n)[0],  # another parameter
        np.roll(base[0], 1),  # neighbouring elements
        np.roll(base[0], 16),  # the same lane's other normal of a pair
        np.roll(base[0], 32),  # the same lane's next pair
        np.roll(base[0], 1024),  # the next chunk
    ]
    for o in others:
        assert abs(np.corrcoef(base[0], o)[0, 1]) < 4 / n**0.5
    # a prefix is a prefix: the noise of e does not depend on the parameter's size
    assert np.array_equal(philox.snp_normals(keys, 10, 2, 7), base[:, :7])


def test_keys_follow_the_seed_and_stream():
    a, b = philox.replica_keys([5, 5, 6], 1), philox.replica_keys([5], 2)
    assert np.array_equal(a[0], a[1]) and not np.array_equal(a[0], a[2])
    assert not np.array_equal(a[0], b[0])
    assert a.dtype == np.int64 and (a >= 0).all() and (a < 2**32).all()
    with pytest.raises(ValueError, match="rng stream"):
        philox.replica_keys([0], -1)


@pytest.mark.skipif(not noise_kernel.available(), reason="needs the compiled kernels")
@pytest.mark.parametrize(
    "update,param,numel",
    [(0, 0, 300_001), (2**32 + 5, 3, 1001), (7, 1, 3), (1, 0, 0), (2, 1, 1024), (9, 2, 2049)],
)
def test_the_c_kernel_draws_the_definitions_bits(update, param, numel):
    keys = philox.replica_keys([0, 1, 2], 1)
    want = philox.snp_normals(keys, update, param, numel)
    got = noise_kernel.snp_normals(torch.from_numpy(keys), update, param, numel).numpy()
    assert np.array_equal(want.view(np.int32), got.view(np.int32))


@pytest.mark.skipif(not noise_kernel.available(), reason="needs the compiled kernels")
def test_the_c_kernel_draws_the_same_bits_on_two_threads_and_in_any_order():
    """Each thread keeps its last chunk: replicas split over threads, parameters and updates
    interleaved, must still read the definition's numbers."""
    keys = philox.replica_keys([0, 1, 2, 3, 4], 1)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        for t, p, n in [(3, 0, 5000), (3, 1, 700), (4, 0, 5000), (3, 0, 1500)]:
            want = philox.snp_normals(keys, t, p, n)
            got = noise_kernel.snp_normals(torch.from_numpy(keys), t, p, n).numpy()
            assert np.array_equal(want.view(np.int32), got.view(np.int32)), (t, p, n)
    finally:
        torch.set_num_threads(threads)
