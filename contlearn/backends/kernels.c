/* contlearn's compiled kernels (see contlearn/backends/kernels.py, which builds and loads them;
   it compiles snp_noise.c (shrink-and-perturb's noise), this file (the layer-level loops),
   block_step.c and block_loop.c (the whole-step kernel) as one unit, in that order). */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__SSE__)
#include <xmmintrin.h>
#endif

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

/* sum |v[i]| in 16 float lanes (vectorised), then added up in double */
static double l1(const float* v, int64_t n) {
  float lane[16] = {0};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int j = 0; j < 16; ++j) lane[j] += fabsf(v[i + j]);
  double s = 0.0;
  for (int j = 0; j < 16; ++j) s += lane[j];
  for (; i < n; ++i) s += fabsf(v[i]);
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

/* Batch 1 with a credit rule's feedback (four rows per sweep, as ROWS1): the error sent down
   is pb += Σ_k d[k] F[k, :] with F the feedback B (fa, kolen-pollack: FB_B) or sign(W) (sign
   symmetry: FB_S, the caller scales pb), read before the update. KP: kolen-pollack's update,
   u = α d h + β W, B = keep (B + u), W = keep (W + u) (the shared decay keep = 1 − λ). */
#define FB_B(x, q) (q)
#define FB_S(x, q) ((float)(((x) > 0.0f) - ((x) < 0.0f)))
#define ROWSF(NAME, FB, KP, COL, SC)                                                             \
  static void NAME(float* w, float* fb, const float* d, const float* h, float* pb, float* pc, \
                   int64_t H, int64_t k0, int64_t k1, float alpha, float scale, float beta,   \
                   float keep) {                                                               \
    int64_t k = k0;                                                                            \
    for (; k + 4 <= k1; k += 4) {                                                              \
      float *r0 = w + k * H, *r1 = r0 + H, *r2 = r1 + H, *r3 = r2 + H;                         \
      float *q0 = fb + k * H, *q1 = q0 + H, *q2 = q1 + H, *q3 = q2 + H;                        \
      const float d0 = d[k], d1 = d[k + 1], d2 = d[k + 2], d3 = d[k + 3];                      \
      const float a0 = alpha * d0, a1 = alpha * d1, a2 = alpha * d2, a3 = alpha * d3;          \
      _Pragma("GCC ivdep")                                                                     \
      for (int64_t i = 0; i < H; ++i) {                                                        \
        const float x0 = r0[i], x1 = r1[i], x2 = r2[i], x3 = r3[i], hi = h[i];                 \
        pb[i] += ((d0 * FB(x0, q0[i]) + d1 * FB(x1, q1[i])) + d2 * FB(x2, q2[i]))              \
                 + d3 * FB(x3, q3[i]);                                                         \
        float y0, y1, y2, y3;                                                                  \
        if (KP) {                                                                              \
          const float u0 = fmaf(a0, hi, beta * x0), u1 = fmaf(a1, hi, beta * x1);              \
          const float u2 = fmaf(a2, hi, beta * x2), u3 = fmaf(a3, hi, beta * x3);              \
          q0[i] = keep * (q0[i] + u0); q1[i] = keep * (q1[i] + u1);                            \
          q2[i] = keep * (q2[i] + u2); q3[i] = keep * (q3[i] + u3);                            \
          y0 = keep * (x0 + u0); y1 = keep * (x1 + u1);                                        \
          y2 = keep * (x2 + u2); y3 = keep * (x3 + u3);                                        \
        } else {                                                                               \
          y0 = fmaf(a0, hi, SC(x0)); y1 = fmaf(a1, hi, SC(x1));                                \
          y2 = fmaf(a2, hi, SC(x2)); y3 = fmaf(a3, hi, SC(x3));                                \
        }                                                                                      \
        r0[i] = y0; r1[i] = y1; r2[i] = y2; r3[i] = y3;                                        \
        if (COL) pc[i] += ((fabsf(y0) + fabsf(y1)) + fabsf(y2)) + fabsf(y3);                   \
      }                                                                                        \
    }                                                                                          \
    for (; k < k1; ++k) {                                                                      \
      float *row = w + k * H, *q = fb + k * H;                                                 \
      const float dk = d[k], ak = alpha * dk;                                                  \
      for (int64_t i = 0; i < H; ++i) {                                                        \
        const float x = row[i];                                                                \
        pb[i] += dk * FB(x, q[i]);                                                             \
        float y;                                                                               \
        if (KP) {                                                                              \
          const float u = fmaf(ak, h[i], beta * x);                                            \
          q[i] = keep * (q[i] + u);                                                            \
          y = keep * (x + u);                                                                  \
        } else {                                                                               \
          y = fmaf(ak, h[i], SC(x));                                                           \
        }                                                                                      \
        row[i] = y;                                                                            \
        if (COL) pc[i] += fabsf(y);                                                            \
      }                                                                                        \
    }                                                                                          \
  }
ROWSF(rows_fa_c, FB_B, 0, 1, SCALED)
ROWSF(rows_fa_n, FB_B, 0, 0, SCALED)
ROWSF(rows_fa_c1, FB_B, 0, 1, UNSCALED)
ROWSF(rows_fa_n1, FB_B, 0, 0, UNSCALED)
ROWSF(rows_sg_c, FB_S, 0, 1, SCALED)
ROWSF(rows_sg_n, FB_S, 0, 0, SCALED)
ROWSF(rows_sg_c1, FB_S, 0, 1, UNSCALED)
ROWSF(rows_sg_n1, FB_S, 0, 0, UNSCALED)
ROWSF(rows_kp, FB_B, 1, 0, SCALED)

/* the credit rules of cl_online_block */
enum { CR_BP = 0, CR_FA = 1, CR_KP = 2, CR_SIGN = 3, CR_DFA = 4 };

/* One layer's backward and update under rule cr (fa, kolen-pollack, sign symmetry) with its
   feedback fb (sign symmetry: the weights themselves, unread). */
static void rows_rule(int cr, float* w, float* fb, const float* d, const float* h, float* pb,
                      float* pc, int64_t H, int64_t K, float alpha, float scale, float keep,
                      int col) {
  if (cr == CR_KP) {
    rows_kp(w, fb, d, h, pb, pc, H, 0, K, alpha, scale, scale - 1.0f, keep);
    return;
  }
  const int one = scale == 1.0f, fa = cr == CR_FA;
  (fa ? (one ? (col ? rows_fa_c1 : rows_fa_n1) : (col ? rows_fa_c : rows_fa_n))
      : (one ? (col ? rows_sg_c1 : rows_sg_n1) : (col ? rows_sg_c : rows_sg_n)))(
      w, fb, d, h, pb, pc, H, 0, K, alpha, scale, scale - 1.0f, keep);
}

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

/* Adam over elements [s, e) of one tensor (cl_adam's arithmetic); with p, p += d * lr
   (mul, then add: what scaling d and adding it to p computes) instead of u = d. */
static void adam_range(const float* g, float* m, float* v, float* c, float* u, float* p,
                       float lr, int64_t s, int64_t e, float w1, float b2, float w2, float eps,
                       const float* bc1, int64_t n1, const float* sbc2, int64_t n2) {
  const float c0 = c[s];
  int same = 1;
  for (int64_t i = s; i < e; ++i) same &= c[i] == c0;
  if (same) {
    const float b1c = entry(bc1, n1, c0 + 1.0f), s2c = entry(sbc2, n2, c0 + 1.0f);
    for (int64_t i = s; i < e; ++i) {
      const float gi = g[i], mi = m[i] + w1 * (gi - m[i]), vi = v[i] * b2 + w2 * (gi * gi);
      const float d = (mi / b1c) / (sqrtf(vi) / s2c + eps);
      c[i] = c0 + 1.0f; m[i] = mi; v[i] = vi;
      if (p) p[i] = p[i] + d * lr; else u[i] = d;
    }
    return;
  }
  for (int64_t i = s; i < e; ++i) {
    const float ci = c[i] + 1.0f, gi = g[i];
    const float mi = m[i] + w1 * (gi - m[i]), vi = v[i] * b2 + w2 * (gi * gi);
    const float d = (mi / entry(bc1, n1, ci)) / (sqrtf(vi) / entry(sbc2, n2, ci) + eps);
    c[i] = ci; m[i] = mi; v[i] = vi;
    if (p) p[i] = p[i] + d * lr; else u[i] = d;
  }
}

void cl_adam(const float* g, float* m, float* v, float* c, float* u, int64_t n, float w1,
             float b2, float w2, float eps, const float* bc1, int64_t n1, const float* sbc2,
             int64_t n2, int threads) {  /* w1 = 1 - b1, w2 = 1 - b2, rounded from double */
  #pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t s = 0; s < n; s += 256)
    adam_range(g, m, v, c, u, NULL, 0.0f, s, s + 256 < n ? s + 256 : n, w1, b2, w2, eps, bc1,
               n1, sbc2, n2);
}

/* Adam applied in place to `count` tensors: tensor j (sizes[j] elements) gets cl_adam's step
   and p[j] += d * lr, in 256-element chunks as cl_adam (the same bits as cl_adam, then
   scaling by lr and adding to p). */
void cl_adam_apply(int64_t count, const int64_t* sizes, const float* const* g, float* const* m,
                   float* const* v, float* const* c, float* const* p, float lr, float w1,
                   float b2, float w2, float eps, const float* bc1, int64_t n1,
                   const float* sbc2, int64_t n2) {
  for (int64_t j = 0; j < count; ++j)
    for (int64_t s = 0; s < sizes[j]; s += 256)
      adam_range(g[j], m[j], v[j], c[j], NULL, p[j], lr, s, s + 256 < sizes[j] ? s + 256 : sizes[j],
                 w1, b2, w2, eps, bc1, n1, sbc2, n2);
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
