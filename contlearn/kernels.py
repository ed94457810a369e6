"""Optional compiled kernels for the online step: a few C loops that each do in one pass over
the weights what torch ops do in several.

Online learning at batch size 1 is bound by memory traffic and per-call overhead, not
arithmetic. The loops (C source below, ``_SOURCE``):

- ``cl_layer_update``: one layer's backward pass, SGD-form update and column norms in one read
  and one write of each weight (torch: a pass each, two more for ``Σ_k |W[k, i]|``)::

      below[r, b, :] = Σ_k d[r, b, k] · W[r, k, :]           (with W before the update)
      W[r, k, :]     = (1 + β) · W[r, k, :] + α · Σ_b d[r, b, k] · h[r, b, :]
      col[r, :]      = Σ_k |W[r, k, :]|                        (after the update)

- ``cl_input_layer``: the input layer's deferred update applied together with the next forward
  pass's dot products (the input layer needs no backward pass, so its weights are then read and
  written once per step instead of three times);
- ``cl_cbp_stats``: continual backprop's steps 1–5 for one layer in one call;
- ``cl_adam``: Adam's moments, per-element counts and direction in one pass per tensor.

They are compiled on first use with the system C compiler (well under a second) and cached in
``<contlearn cache>/kernels``; without a compiler, on other devices or dtypes, or with
``CONTLEARN_KERNELS=0``, callers use torch ops instead (same results up to float rounding; the
tests compare both with the autograd reference). Arithmetic is explicit (``fmaf`` where fused,
no other contraction: ``-ffp-contract=off``), an update gives the same bits whichever loop
applies it, and sums run in fixed chunks and a fixed order, so results depend neither on the
number of threads nor on the number of replicas.
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
from typing import NamedTuple

import torch

_SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Row k of a weight matrix: w = scale * w + alpha * Σ_b d[b, k] h[b, :] (the same arithmetic
   wherever an update is applied, so deferring it does not change a bit). */
static void update_row(float* row, const float* d, const float* h, int64_t B, int64_t K,
                       int64_t H, int64_t k, float alpha, float scale) {
  if (B == 1) {
    const float ad = alpha * d[k];
    if (scale == 1.0f)  /* the same numbers, one multiplication fewer */
      for (int64_t i = 0; i < H; ++i) row[i] = fmaf(ad, h[i], row[i]);
    else
      for (int64_t i = 0; i < H; ++i) row[i] = fmaf(ad, h[i], scale * row[i]);
    return;
  }
  for (int64_t i = 0; i < H; ++i) {
    float acc = 0.0f;
    for (int64_t b = 0; b < B; ++b) acc += d[b * K + k] * h[b * H + i];
    row[i] = fmaf(alpha, acc, scale * row[i]);
  }
}

/* Σ_i a[i] b[i] in sixteen fixed lanes (vectorisable, and the same order every time). */
static float dot(const float* a, const float* b, int64_t n) {
  float lane[16] = {0};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int j = 0; j < 16; ++j) lane[j] += a[i + j] * b[i + j];
  float s = 0.0f;
  for (int j = 0; j < 16; ++j) s += lane[j];
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

/* The input layer: apply a deferred update (pB > 0: pending d (R, pB, K), h (R, pB, H)), then
   z[r, b, k] = bias[r, k] + W[r, k, :] · x[r, b, :] for new inputs (B > 0), reading and writing
   each weight once. */
void cl_input_layer(float* w, const float* pd, const float* ph, int64_t pB, float alpha,
                    float scale, const float* x, const float* bias, float* z, int64_t B,
                    int64_t R, int64_t K, int64_t H, int threads) {
  #pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t job = 0; job < R * K; ++job) {
    const int64_t r = job / K, k = job % K;
    float* row = w + job * H;
    if (pB) update_row(row, pd + r * pB * K, ph + r * pB * H, pB, K, H, k, alpha, scale);
    for (int64_t b = 0; b < B; ++b)
      z[(r * B + b) * K + k] = bias[r * K + k] + dot(row, x + (r * B + b) * H, H);
  }
}

/* Batch 1, rows k0..k1 of one replica, four rows per sweep (so the partial sums pb = δ W and
   pc = Σ|W| are loaded and stored once per four weights); one function per pair of flags. */
#define ROWS1(NAME, BELOW, COL, SC)                                                              \
  static void NAME(float* w, const float* d, const float* h, float* pb, float* pc,            \
                   int64_t H, int64_t k0, int64_t k1, float alpha, float scale) {             \
    int64_t k = k0;                                                                            \
    for (; k + 4 <= k1; k += 4) {                                                              \
      float *r0 = w + k * H, *r1 = r0 + H, *r2 = r1 + H, *r3 = r2 + H;                         \
      const float d0 = d[k], d1 = d[k + 1], d2 = d[k + 2], d3 = d[k + 3];                      \
      const float a0 = alpha * d0, a1 = alpha * d1, a2 = alpha * d2, a3 = alpha * d3;          \
      _Pragma("GCC ivdep")                                                                     \
      for (int64_t i = 0; i < H; ++i) {                                                        \
        const float x0 = r0[i], x1 = r1[i], x2 = r2[i], x3 = r3[i], hi = h[i];                 \
        if (BELOW) pb[i] += ((d0 * x0 + d1 * x1) + d2 * x2) + d3 * x3;                         \
        const float y0 = fmaf(a0, hi, SC(x0)), y1 = fmaf(a1, hi, SC(x1));              \
        const float y2 = fmaf(a2, hi, SC(x2)), y3 = fmaf(a3, hi, SC(x3));              \
        r0[i] = y0; r1[i] = y1; r2[i] = y2; r3[i] = y3;                                        \
        if (COL) pc[i] += ((fabsf(y0) + fabsf(y1)) + fabsf(y2)) + fabsf(y3);                   \
      }                                                                                        \
    }                                                                                          \
    for (; k < k1; ++k) {                                                                      \
      float* row = w + k * H;                                                                  \
      const float dk = d[k], ak = alpha * dk;                                                  \
      for (int64_t i = 0; i < H; ++i) {                                                        \
        const float x = row[i], y = fmaf(ak, h[i], SC(x));                                 \
        if (BELOW) pb[i] += dk * x;                                                            \
        row[i] = y;                                                                            \
        if (COL) pc[i] += fabsf(y);                                                            \
      }                                                                                        \
    }                                                                                          \
  }
#define SCALED(x) (scale * (x))
#define UNSCALED(x) (x)
ROWS1(rows_bc, 1, 1, SCALED)
ROWS1(rows_b, 1, 0, SCALED)
ROWS1(rows_c, 0, 1, SCALED)
ROWS1(rows_n, 0, 0, SCALED)
/* scale = 1 (no weight decay): the same numbers, one multiplication fewer per weight */
ROWS1(rows_bc1, 1, 1, UNSCALED)
ROWS1(rows_b1, 1, 0, UNSCALED)
ROWS1(rows_c1, 0, 1, UNSCALED)
ROWS1(rows_n1, 0, 0, UNSCALED)

static void rows1(float* w, const float* d, const float* h, float* pb, float* pc, int64_t H,
                  int64_t k0, int64_t k1, float alpha, float scale, int below, int col) {
  if (scale == 1.0f)
    (below ? (col ? rows_bc1 : rows_b1) : (col ? rows_c1 : rows_n1))(
        w, d, h, pb, pc, H, k0, k1, alpha, scale);
  else
    (below ? (col ? rows_bc : rows_b) : (col ? rows_c : rows_n))(
        w, d, h, pb, pc, H, k0, k1, alpha, scale);
}

/* Rows k0..k1 of one replica, any batch B. */
static void rows(float* w, const float* d, const float* h, float* pb, float* pc, int64_t B,
                 int64_t K, int64_t H, int64_t k0, int64_t k1, float alpha, float scale,
                 int want_below, int want_col) {
  if (B == 1) {
    rows1(w, d, h, pb, pc, H, k0, k1, alpha, scale, want_below, want_col);
    return;
  }
  for (int64_t k = k0; k < k1; ++k) {
    float* row = w + k * H;
    for (int64_t i = 0; i < H; ++i) {
      float x = row[i], acc = 0.0f;
      for (int64_t b = 0; b < B; ++b) {
        if (want_below) pb[b * H + i] += d[b * K + k] * x;
        acc += d[b * K + k] * h[b * H + i];
      }
      x = fmaf(alpha, acc, scale * x);
      row[i] = x;
      if (want_col) pc[i] += fabsf(x);
    }
  }
}

/* Adam's direction for n elements (torch.optim's order): c += 1; m += (1 - b1)(g - m);
   v = b2 v + (1 - b2) g g; u = (m / bc1) / (sqrt(v) / sbc2 + eps), with bc1 = 1 - b1^c and
   sbc2 = sqrt(1 - b2^c) read from tables indexed by the (integral) count, whose last entries
   hold on for larger counts. Blocks of 256 whose counts are all equal (no reset touched them)
   use one table entry for the block, which vectorises. */
static float entry(const float* table, int64_t size, float count) {
  const int64_t t = (int64_t)count;
  return table[t < size ? t : size - 1];
}

void cl_adam(const float* g, float* m, float* v, float* c, float* u, int64_t n, float w1,
             float b2, float w2, float eps, const float* bc1, int64_t n1, const float* sbc2,
             int64_t n2, int threads) {  /* w1 = 1 - b1, w2 = 1 - b2, rounded from double */
  #pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t s = 0; s < n; s += 256) {
    const int64_t e = s + 256 < n ? s + 256 : n;
    const float c0 = c[s];
    int same = 1;
    for (int64_t i = s; i < e; ++i) same &= c[i] == c0;
    if (same) {
      const float b1c = entry(bc1, n1, c0 + 1.0f), s2c = entry(sbc2, n2, c0 + 1.0f);
      for (int64_t i = s; i < e; ++i) {
        const float gi = g[i], mi = m[i] + w1 * (gi - m[i]), vi = v[i] * b2 + w2 * (gi * gi);
        c[i] = c0 + 1.0f; m[i] = mi; v[i] = vi;
        u[i] = (mi / b1c) / (sqrtf(vi) / s2c + eps);
      }
      continue;
    }
    for (int64_t i = s; i < e; ++i) {
      const float ci = c[i] + 1.0f, gi = g[i];
      const float mi = m[i] + w1 * (gi - m[i]), vi = v[i] * b2 + w2 * (gi * gi);
      c[i] = ci; m[i] = mi; v[i] = vi;
      u[i] = (mi / entry(bc1, n1, ci)) / (sqrtf(vi) / entry(sbc2, n2, ci) + eps);
    }
  }
}

/* Continual backprop's steps 1-5 for one hidden layer, R replicas of H units, batch B:
   a += 1; f = lerp(f, mean_b h, w); y = mean_b |h| * out; u = lerp(u, y, w); uh = u / corr(a)
   (corr from a table of 1 - decay^a over a = 0, 1, ..., its last entry holding on); eligible =
   #{a > maturity}; carry += rate * eligible; k = floor(carry); carry -= k. Returns sum of k.
   lerp as torch's: x + w (y - x) for w < 0.5, y - (y - x)(1 - w) otherwise. */
static float lerp(float x, float y, float w) {
  return w < 0.5f ? x + w * (y - x) : y - (y - x) * (1.0f - w);
}

/* One replica's steps 1-5 (of cl_cbp_stats below) for H units: age, f, u, uh and out point at
   the replica's H values, h at its B x H activations. Returns k. */
static int64_t cbp_replica(int64_t* age, float* f, float* u, float* uh, const float* h,
                           int64_t B, const float* out, double* carry, int64_t* eligible,
                           int64_t H, float w, int64_t maturity, double rate,
                           const float* table, int64_t size, int nonneg) {
  int64_t n = 0;
  for (int64_t i = 0; i < H; ++i) {
    const int64_t a = ++age[i];
    float mean = 0.0f, mag = 0.0f;
    if (B == 1) {
      mean = h[i];
      mag = nonneg ? mean : fabsf(mean);
    } else {
      for (int64_t b = 0; b < B; ++b) {
        const float x = h[b * H + i];
        mean += x;
        mag += fabsf(x);
      }
      mean /= (float)B;
      mag /= (float)B;
    }
    f[i] = lerp(f[i], mean, w);
    u[i] = lerp(u[i], mag * out[i], w);
    uh[i] = u[i] / table[a < size ? a : size - 1];
    n += a > maturity;
  }
  *eligible = n;
  const double grown = (double)n * rate;
  *carry += grown;
  const double k = floor(*carry);
  *carry -= k;
  return (int64_t)k;
}

int64_t cl_cbp_stats(int64_t* age, float* f, float* u, float* uh, const float* h, int64_t B,
                     const float* out, double* carry, int64_t* eligible, int64_t* k_out,
                     int64_t R, int64_t H, float w, int64_t maturity, double rate,
                     const float* table, int64_t size, int nonneg) {
  int64_t total = 0;
  for (int64_t r = 0; r < R; ++r) {
    k_out[r] = cbp_replica(age + r * H, f + r * H, u + r * H, uh + r * H, h + r * B * H, B,
                           out + r * H, carry + r, eligible + r, H, w, maturity, rate, table,
                           size, nonneg);
    total += k_out[r];
  }
  return total;
}

void cl_layer_update(float* w, const float* d, const float* h, float* below, float* col,
                     float* scratch, int64_t R, int64_t B, int64_t K, int64_t H, float alpha,
                     float scale, int64_t chunk, int threads) {
  const int64_t nc = (K + chunk - 1) / chunk, part = B * H + H;
  const int want_below = below != 0, want_col = col != 0;
  #pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t job = 0; job < R * nc; ++job) {
    const int64_t r = job / nc, c = job % nc, k0 = c * chunk;
    const int64_t k1 = k0 + chunk < K ? k0 + chunk : K;
    float* pb = scratch + job * part;
    memset(pb, 0, (size_t)part * sizeof(float));
    rows(w + r * K * H, d + r * B * K, h + r * B * H, pb, pb + B * H, B, K, H, k0, k1, alpha,
         scale, want_below, want_col);
  }
  for (int64_t r = 0; r < R; ++r) {
    for (int64_t c = 0; c < nc; ++c) {
      const float* pb = scratch + (r * nc + c) * part;
      if (want_below) {
        float* out = below + r * B * H;
        for (int64_t i = 0; i < B * H; ++i) out[i] = c ? out[i] + pb[i] : pb[i];
      }
      if (want_col) {
        float* out = col + r * H;
        for (int64_t i = 0; i < H; ++i) out[i] = c ? out[i] + pb[B * H + i] : pb[B * H + i];
      }
    }
  }
}

/* Whole online steps (batch 1) of an MLP, replica by replica, for T steps: forward pass, loss
   and its gradient, backward pass with the fused update w = scale * w + alpha * g of every
   layer (the input layer's applied with the next step's forward pass, as cl_input_layer does),
   and, if cbp, continual backprop's steps 1-5 (cbp_replica) on the post-update weights. A
   replica stops early after a step at which some layer must replace units (events[r, l] = k);
   start[r] is where it stands when the call returns (T: done). Each replica's T steps run
   while its weights sit in this core's cache. This call runs replicas r0 .. r1 - 1; callers
   run disjoint ranges on several threads (no OpenMP here: its idle threads spin-wait, which
   on a machine with few cores takes the CPU the other threads need). */
static float act_fwd(int act, float z) {
  switch (act) {
    case 0: return z > 0.0f ? z : 0.0f;
    case 1: return tanhf(z);
    case 2: return 1.0f / (1.0f + expf(-z));
    default: return z > 0.0f ? z : 0.01f * z;
  }
}

static float act_bwd(int act, float g, float h) {
  switch (act) {
    case 0: return h > 0.0f ? g : 0.0f;
    case 1: return g * (1.0f - h * h);
    case 2: return g * ((1.0f - h) * h);
    default: return h > 0.0f ? g : 0.01f * g;
  }
}

void cl_online_block(int64_t R, int64_t T, int64_t L, const int64_t* width, void** wp,
                     void** bp, const float* x, const int64_t* ycls, const float* yreg,
                     float* out, float* loss, float alpha, float scale, int act, int cbp,
                     void** agep, void** fp, void** up, void** uhp, void** carryp,
                     void** eligp, float decay_w, int64_t maturity, double rate,
                     const float* table, int64_t tsize, int nonneg, int64_t* start,
                     int64_t* events, float* pend_d, int64_t* pend_t, char* skip,
                     int64_t r0, int64_t r1) {
  const int64_t D = width[0], C = width[L], H1 = width[1];
  int64_t maxw = 0, hsum = 0;
  for (int64_t l = 0; l <= L; ++l) maxw = width[l] > maxw ? width[l] : maxw;
  for (int64_t l = 1; l < L; ++l) hsum += width[l];
  for (int64_t r = r0; r < r1; ++r) {
    int64_t t = start[r], pt = pend_t[r];
    int pend = pt >= 0, stopped = 0;
    if (t >= T && !pend) continue;
    /* the input layer's update of step pt, still to apply (kept over an event stop, so the
       next step's forward pass applies it; rows skip[k] were replaced in between) */
    float* d0 = pend_d + r * H1;
    char* sk = skip + r * H1;
    const float* xprev = pend ? x + (pt * R + r) * D : 0;
    /* hidden activations, then z, d, d2, below, input-layer d, then one col per layer >= 1 */
    float* buf = (float*)malloc(sizeof(float) * (size_t)(2 * hsum + C + 4 * maxw + 64));
    float* hs = buf;
    float* z = hs + hsum;
    float* d = z + C;
    float* d2 = d + maxw;
    float* below = d2 + maxw;
    float* cols = below + maxw;  /* hsum: layer l >= 1's column norms at offset of h[l - 1] */
    float* h[64];
    float* W[65];
    float* Bv[65];
    int64_t off = 0;
    for (int64_t l = 0; l < L; ++l) {
      W[l] = (float*)wp[l] + r * width[l + 1] * width[l];
      Bv[l] = (float*)bp[l] + r * width[l + 1];
      if (l < L - 1) { h[l] = hs + off; off += width[l + 1]; }
    }
    while (t < T) {
      const float* xt = x + (t * R + r) * D;
      for (int64_t l = 0; l < L; ++l) {
        const int64_t K = width[l + 1], H = width[l];
        const float* in = l == 0 ? xt : h[l - 1];
        float* o = l == L - 1 ? z : h[l];
        for (int64_t k = 0; k < K; ++k) {
          float* row = W[l] + k * H;
          if (l == 0 && pend && !sk[k]) update_row(row, d0, xprev, 1, K, H, k, alpha, scale);
          const float v = Bv[l][k] + dot(row, in, H);
          o[k] = l == L - 1 ? v : act_fwd(act, v);
        }
      }
      if (pend) memset(sk, 0, (size_t)H1);
      pend = 0;
      float* zo = out + (t * R + r) * C;
      float lv = 0.0f;
      if (ycls) {
        float m = z[0];
        for (int64_t c = 1; c < C; ++c) m = z[c] > m ? z[c] : m;
        float s = 0.0f;
        for (int64_t c = 0; c < C; ++c) s += expf(z[c] - m);
        const float lse = m + logf(s);
        const int64_t y = ycls[t * R + r];
        lv = lse - z[y];
        for (int64_t c = 0; c < C; ++c) d[c] = expf(z[c] - lse) - (c == y ? 1.0f : 0.0f);
      } else {
        const float* yt = yreg + (t * R + r) * C;
        for (int64_t c = 0; c < C; ++c) {
          const float diff = z[c] - yt[c];
          lv += diff * diff;
          d[c] = 2.0f * diff;
        }
      }
      memcpy(zo, z, sizeof(float) * (size_t)C);
      loss[t * R + r] = lv;
      for (int64_t l = L - 1; l >= 0; --l) {
        const int64_t K = width[l + 1], H = width[l];
        if (l == 0) {
          memcpy(d0, d, sizeof(float) * (size_t)K);
          xprev = xt;
          pt = t;
          pend = 1;
        } else {
          float* col = cols + (h[l - 1] - hs);
          memset(below, 0, sizeof(float) * (size_t)H);
          if (cbp) memset(col, 0, sizeof(float) * (size_t)H);
          rows1(W[l], d, h[l - 1], below, col, H, 0, K, alpha, scale, 1, cbp);
        }
        for (int64_t k = 0; k < K; ++k) Bv[l][k] = fmaf(alpha, d[k], scale * Bv[l][k]);
        if (l > 0) {
          const float* hl = h[l - 1];
          for (int64_t i = 0; i < H; ++i) d2[i] = act_bwd(act, below[i], hl[i]);
          float* tmp = d; d = d2; d2 = tmp;
        }
      }
      ++t;
      if (cbp) {
        int64_t any = 0;
        for (int64_t l = 0; l < L - 1; ++l) {
          const int64_t H = width[l + 1];
          const int64_t k = cbp_replica(
              (int64_t*)agep[l] + r * H, (float*)fp[l] + r * H, (float*)up[l] + r * H,
              (float*)uhp[l] + r * H, h[l], 1, cols + (h[l] - hs), (double*)carryp[l] + r,
              (int64_t*)eligp[l] + r, H, decay_w, maturity, rate, table, tsize, nonneg);
          events[r * (L - 1) + l] = k;
          any += k;
        }
        if (any) { stopped = 1; break; }
      }
    }
    if (pend && !stopped) {
      for (int64_t k = 0; k < H1; ++k)
        if (!sk[k]) update_row(W[0] + k * D, d0, xprev, 1, H1, D, k, alpha, scale);
      memset(sk, 0, (size_t)H1);
      pend = 0;
    }
    pend_t[r] = pend ? pt : -1;
    start[r] = t;
    free(buf);
  }
}

/* Continual backprop's steps 6-7 after cl_online_block stopped replicas (counts (R, L - 1)):
   per hidden layer l from the input side, per replica, the counts[r, l] eligible units (age >
   maturity) with the lowest bias-corrected utility (ties: lowest index) get the next fresh
   incoming rows (fresh[l]: in replica, then unit order) and a zero bias; their mean
   contribution W_{l+1}[:, i] * f_hat_i is added to the next layer's bias (if fold) and their
   outgoing weights, ages and statistics are zeroed. Replaced input-layer units are marked in
   skip (R, width[1]): their pending update must not touch the fresh rows. */
void cl_cbp_replace(int64_t R, int64_t L, const int64_t* width, void** wp, void** bp,
                    const int64_t* counts, void** freshp, void** agep, void** fp, void** up,
                    void** uhp, void** replp, int64_t maturity, const float* table,
                    int64_t tsize, int fold, char* skip) {
  for (int64_t l = 0; l < L - 1; ++l) {
    const int64_t D = width[l], H = width[l + 1], K = width[l + 2];
    const float* fresh = (const float*)freshp[l];
    for (int64_t r = 0; r < R; ++r) {
      const int64_t k = counts[r * (L - 1) + l];
      if (!k) continue;
      int64_t* age = (int64_t*)agep[l] + r * H;
      float *f = (float*)fp[l] + r * H, *u = (float*)up[l] + r * H, *uh = (float*)uhp[l] + r * H;
      float *W = (float*)wp[l] + r * H * D, *b = (float*)bp[l] + r * H;
      float *Wn = (float*)wp[l + 1] + r * K * H, *bn = (float*)bp[l + 1] + r * K;
      char* taken = (char*)calloc((size_t)H, 1);
      for (int64_t j = 0; j < k; ++j) {
        int64_t best = -1;
        for (int64_t i = 0; i < H; ++i)
          if (age[i] > maturity && !taken[i] && (best < 0 || uh[i] < uh[best])) best = i;
        if (best >= 0) taken[best] = 1;
      }
      for (int64_t i = 0; i < H; ++i) {
        if (!taken[i]) continue;
        const float fhat = f[i] / table[age[i] < tsize ? age[i] : tsize - 1];
        memcpy(W + i * D, fresh, sizeof(float) * (size_t)D);
        fresh += D;
        b[i] = 0.0f;
        if (fold)
          for (int64_t c = 0; c < K; ++c) bn[c] = bn[c] + Wn[c * H + i] * fhat;
        for (int64_t c = 0; c < K; ++c) Wn[c * H + i] = 0.0f;
        age[i] = 0; f[i] = 0.0f; u[i] = 0.0f; uh[i] = 0.0f;
        if (l == 0) skip[r * H + i] = 1;
      }
      ((int64_t*)replp[l])[r] += k;
      free(taken);
    }
  }
}
"""
#: rows per chunk (each chunk has its own partial sums); fixed, so results are reproducible.
CHUNK = 256
#: the kernel loops over the batch per weight; larger batches go to torch's GEMMs.
MAX_BATCH = 4
_lib: ctypes.CDLL | None | bool = None  # None: not tried yet; False: unavailable


def _flags() -> list[str]:
    flags = ["-O3", "-shared", "-fPIC", "-fopenmp", "-fno-math-errno", "-ffp-contract=off"]
    if platform.machine().lower() in ("x86_64", "amd64") and \
            torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        flags += ["-mavx2", "-mfma"]
    return flags


def _build() -> ctypes.CDLL | None:
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        return None
    flags = _flags()
    digest = hashlib.sha256((_SOURCE + " ".join(flags) + compiler).encode()).hexdigest()[:16]
    from contlearn.datasets import default_cache_dir

    for folder in (default_cache_dir() / "kernels", Path(tempfile.gettempdir())):
        lib = folder / f"contlearn_kernels_{digest}.so"
        try:
            if not lib.exists():
                folder.mkdir(parents=True, exist_ok=True)
                src = folder / f".{digest}.{os.getpid()}.c"
                src.write_text(_SOURCE)
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
            _lib.cl_online_block.argtypes = [ctypes.c_int64] * 3 + [ctypes.c_void_p] * 8 + [
                ctypes.c_float, ctypes.c_float, ctypes.c_int, ctypes.c_int] + [
                ctypes.c_void_p] * 6 + [ctypes.c_float, ctypes.c_int64, ctypes.c_double,
                                        ctypes.c_void_p, ctypes.c_int64, ctypes.c_int,
                                        ctypes.c_void_p, ctypes.c_void_p] + [
                ctypes.c_void_p] * 3 + [ctypes.c_int64] * 2
            _lib.cl_cbp_replace.restype = None
            _lib.cl_cbp_replace.argtypes = [ctypes.c_int64] * 2 + [ctypes.c_void_p] * 10 + [
                ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_void_p]
            _lib.cl_input_layer.restype = None
            _lib.cl_input_layer.argtypes = [ctypes.c_void_p] * 3 + [
                ctypes.c_int64, ctypes.c_float, ctypes.c_float] + [ctypes.c_void_p] * 3 + [
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
    if x is not None and bias is not None:
        x, bias = x.contiguous(), bias.contiguous()
        z = w.new_empty(R, x.shape[1], K)
    lib.cl_input_layer(w.data_ptr(), pd.data_ptr() if pd is not None else None,
                       ph.data_ptr() if ph is not None else None,
                       0 if pd is None else pd.shape[1], alpha, 1.0 + beta,
                       x.data_ptr() if z is not None else None,
                       bias.data_ptr() if z is not None else None,
                       z.data_ptr() if z is not None else None,
                       0 if z is None else x.shape[1], R, K, H, torch.get_num_threads())
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
                  workers: int) -> None:
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
    """
    lib = library()
    assert lib is not None
    L = len(weights)
    widths = torch.tensor([weights[0].shape[2]] + [w.shape[1] for w in weights],
                          dtype=torch.int64)
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
        pending.d.data_ptr(), pending.step.data_ptr(), pending.skip.data_ptr())
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
    widths = torch.tensor([weights[0].shape[2]] + [w.shape[1] for w in weights],
                          dtype=torch.int64)
    counts = counts.contiguous()
    fresh = [t.contiguous() for t in fresh]
    lib.cl_cbp_replace(len(counts), len(weights), widths.data_ptr(), _pointers(weights),
                       _pointers(biases), counts.data_ptr(), _pointers(fresh),
                       _pointers(cbp.age), _pointers(cbp.mean_act), _pointers(cbp.utility),
                       _pointers(cbp.utility_hat), _pointers(replacements), cbp.maturity,
                       cbp.table.data_ptr(), len(cbp.table), int(fold), skip.data_ptr())
