/* contlearn's compiled kernels (see contlearn/kernels.py, which builds and loads them; it
   compiles snp_noise.c, shrink-and-perturb's noise, and this file as one unit, in that order). */
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
   on a machine with few cores takes the CPU the other threads need). If gsum is not NULL,
   every step adds sum |dL/dW_l| + sum |dL/db_l| to gsum[r, l] (the loss gradient, before the
   update's scaling). With adam (backprop only) every update is Adam's instead (adam_span: the
   moments and counts of BlockArgs' amw ... anb; where ucount[r, l, j] >= 0 that tensor's
   counts all equal it, and the count is kept there, not per element). */
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

/* Adam over the whole-step kernel's gradients (cl_online_block with adam set): per element
   g' = pre_a g + pre_b w (the affine parts before Adam: coupled L2), then cl_adam's arithmetic
   (c += 1; m += w1 (g' - m); v = b2 v + w2 g' g'; d = (m / bc1[c]) / (sqrt(v) / sbc2[c] + eps)),
   then w += lr d + post_b w (the affine parts after: the step size, decoupled decay). */
typedef struct {
  float pre_a, pre_b, w1, b2, w2, eps, lr, post_b;
  const float* bc1;
  int64_t n1;
  const float* sbc2;
  int64_t n2;
} AdamOpt;

/* Every argument of cl_online_block (kernels.py's BlockArgs mirrors it field by field and
   checks its size against cl_block_args_size at load). */
typedef struct {
  int64_t R, T, L;
  const int64_t* width;
  void** wp;
  void** bp;
  const float* x;
  const int64_t* ycls;
  const float* yreg;
  float* out;
  float* loss;
  float alpha, scale;
  int32_t act, cbp;
  void** agep;
  void** fp;
  void** up;
  void** uhp;
  void** carryp;
  void** eligp;
  float decay_w;
  int64_t maturity;
  double rate;
  const float* table;
  int64_t tsize;
  int32_t nonneg;
  int64_t* start;
  int64_t* events;
  float* pend_d;
  int64_t* pend_t;
  char* skip;
  double* gsum;
  int32_t cr;
  void** fbp;
  float keep;
  int32_t sunit;
  int32_t adam;
  void** amw;  /* per layer: Adam's m, v, counts of the weights (R, K, H), of the biases (R, K) */
  void** avw;
  void** anw;
  void** amb;
  void** avb;
  void** anb;
  float* ucount;  /* (R, L, 2) or NULL: see cl_online_block */
  AdamOpt ao;
  /* shrink-and-perturb's noise (snp): after each update of a weight or bias, + sigma eps with
     eps[r, count + t, p, e] (snp_add); keys (R, 2); pidx (L, 2) the parameter order's index
     of layer l's weight and bias; count the learner's update count at block step 0 */
  int32_t snp;
  float snp_sigma;
  const int64_t* snp_key;
  int64_t snp_count;
  const int64_t* snp_pidx;
  /* L2-Init (backprop, fused update only): w = scale * w + alpha * g + gamma * w0 with the
     anchors w0 per layer (ancw: weights (R, K, H), ancb: biases (R, K)); ancw NULL: none */
  float gamma;
  void** ancw;
  void** ancb;
  /* ReDo: per hidden layer (R, H) float32 window sums, each step adding |h| (redo_score 0) or
     ReGraMa's mean |g| of the unit's incoming weights (1); NULL: this block is outside the
     window */
  void** redo_sum;
  int32_t redo_score;
} BlockArgs;

int64_t cl_block_args_size(void) { return (int64_t)sizeof(BlockArgs); }

/* The affine parts around Adam, as adam_span's loops specialise them (MODE): 0 the identity
   (g' = g; x += u), 1 any (g' = pre_a g + pre_b x; x += u + post_b x), 2 coupled L2 only
   (pre_a = 1, post_b = 0: g' = g + pre_b x; x += u), 3 decoupled decay only (pre_a = 1,
   pre_b = 0: g' = g; x += u + post_b x). Modes 2 and 3 drop a product by 1 and a term 0 x:
   the same floats (1 g = g; u + 0 x and g + 0 x differ from u, g at most in the sign of a zero,
   which neither the moments nor x + u carry on), two to three operations fewer per weight. */
static int adam_mode(const AdamOpt* o) {
  const int pa = o->pre_a != 1.0f, pr = o->pre_b != 0.0f, po = o->post_b != 0.0f;
  if (!pa && !pr && !po) return 0;
  if (!pa && pr && !po) return 2;
  if (!pa && !pr && po) return 3;
  return 1;
}
#define ADAM_GP(MODE, g, xi) ((MODE) == 1 ? pa * (g) + pr * (xi) : (MODE) == 2 ? (g) + pr * (xi) : (g))
#define ADAM_Y(MODE, xi, u) ((MODE) == 1 || (MODE) == 3 ? (xi) + ((u) + post * (xi)) : (xi) + (u))

/* Adam's update of n weights whose counts all equal c0 (no reset touched them): the bias
   corrections are one table entry each, applied as products with their reciprocals (lr / b1c,
   1 / s2c: one division and one square root per weight instead of three and one; the result
   differs from the per-element form by float rounding), and the loop vectorises. MODE: the
   affine parts (adam_mode); PB, PC: accumulate pb, pc; CNT: write the counts c. */
typedef void (*adam_fn)(float* restrict, float* restrict, float* restrict, float* restrict,
                        const float* restrict, float, int64_t, float* restrict, float* restrict,
                        const AdamOpt*, float, float, float);
#define ADAM_SAME(NAME, MODE, PB, PC, CNT)                                                     \
  static void NAME(float* restrict x, float* restrict m, float* restrict v, float* restrict c, \
                   const float* restrict h, float dk, int64_t n, float* restrict pb,          \
                   float* restrict pc, const AdamOpt* o, float cn, float b1c, float s2c) {    \
    const float r1 = o->lr / b1c, r2 = 1.0f / s2c;                                           \
    const float pa = o->pre_a, pr = o->pre_b, w1 = o->w1, b2 = o->b2, w2 = o->w2;            \
    const float eps = o->eps, post = o->post_b;                                                \
    (void)pa; (void)pr; (void)post; (void)pb; (void)pc; (void)c; (void)cn;                     \
    _Pragma("GCC ivdep")                                                                       \
    for (int64_t i = 0; i < n; ++i) {                                                          \
      const float xi = x[i], g = dk * h[i];                                                    \
      const float gp = ADAM_GP(MODE, g, xi);                                                   \
      const float mi = m[i] + w1 * (gp - m[i]), vi = v[i] * b2 + w2 * (gp * gp);               \
      const float u = (mi * r1) / (sqrtf(vi) * r2 + eps);                                      \
      const float y = ADAM_Y(MODE, xi, u);                                                     \
      if (CNT) c[i] = cn;                                                                      \
      m[i] = mi; v[i] = vi; x[i] = y;                                                          \
      if (PB) pb[i] += dk * xi;                                                                \
      if (PC) pc[i] += fabsf(y);                                                               \
    }                                                                                          \
  }
/* per mode: none, pb, pb and pc; CNT = 1 (adam_same*) and 0 (adam_uni*: the caller keeps the
   counts, one value for the whole tensor) */
#define ADAM_MODE(MODE)                                 \
  ADAM_SAME(adam_same##MODE, MODE, 0, 0, 1)             \
  ADAM_SAME(adam_same##MODE##_b, MODE, 1, 0, 1)         \
  ADAM_SAME(adam_same##MODE##_bc, MODE, 1, 1, 1)        \
  ADAM_SAME(adam_uni##MODE, MODE, 0, 0, 0)              \
  ADAM_SAME(adam_uni##MODE##_b, MODE, 1, 0, 0)          \
  ADAM_SAME(adam_uni##MODE##_bc, MODE, 1, 1, 0)
ADAM_MODE(0)
ADAM_MODE(1)
ADAM_MODE(2)
ADAM_MODE(3)
#define ADAM_ROW(M) {{adam_uni##M, adam_uni##M##_b, adam_uni##M##_bc}, \
                     {adam_same##M, adam_same##M##_b, adam_same##M##_bc}}
static const adam_fn ADAM_FNS[4][2][3] = {ADAM_ROW(0), ADAM_ROW(1), ADAM_ROW(2), ADAM_ROW(3)};
#undef ADAM_ROW

/* The bias-correction entries of a chunk of len <= 256 elements whose counts (before this
   step's += 1) are cs: e1[i] = bc1[cs[i] + 1], e2[i] = sbc2[cs[i] + 1] (entry()'s clamp).
   8-element groups whose counts all equal c0 take c0's entries (the same floats, broadcast);
   the others look each up (a reset's cleared column is a few elements of a row). */
static void adam_entries(const float* restrict cs, int64_t len, float c0, const AdamOpt* o,
                         float* restrict e1, float* restrict e2) {
  const float cn = c0 + 1.0f;
  const float f1 = entry(o->bc1, o->n1, cn), f2 = entry(o->sbc2, o->n2, cn);
  int64_t i = 0;
  for (; i + 8 <= len; i += 8) {
    int same = 1;
    for (int j = 0; j < 8; ++j) same &= cs[i + j] == c0;
    if (same) {
      for (int j = 0; j < 8; ++j) { e1[i + j] = f1; e2[i + j] = f2; }
      continue;
    }
    for (int j = 0; j < 8; ++j) {
      const float ci = cs[i + j] + 1.0f;
      e1[i + j] = entry(o->bc1, o->n1, ci);
      e2[i + j] = entry(o->sbc2, o->n2, ci);
    }
  }
  for (; i < len; ++i) {
    const float ci = cs[i] + 1.0f;
    e1[i] = entry(o->bc1, o->n1, ci);
    e2[i] = entry(o->sbc2, o->n2, ci);
  }
}

/* Adam's update of n weights x with gradients g[i] = dk * h[i] (m, v, counts c beside them):
   g' = pre_a g + pre_b x, cl_adam's arithmetic, x += lr d + post_b x (with the identity's
   parts skipped, as the reference's chain has no such step); pb += dk * x (before the update)
   and pc += |x| (after) where not NULL (pc only with pb). ucn > 0: every count of the tensor
   is ucn after this update and the caller keeps it (c is neither read nor written). */
static void adam_span(float* x, float* m, float* v, float* c, const float* h, float dk,
                      int64_t n, float* pb, float* pc, const AdamOpt* o, float ucn) {
  if (n <= 0) return;
  const int mode = adam_mode(o), acc = pb ? (pc ? 2 : 1) : 0;
  if (ucn > 0.0f) {
    const float b1c = entry(o->bc1, o->n1, ucn), s2c = entry(o->sbc2, o->n2, ucn);
    ADAM_FNS[mode][0][acc](x, m, v, c, h, dk, n, pb, pc, o, ucn, b1c, s2c);
    return;
  }
  const float c0 = c[0];
  int same = 1;
  for (int64_t i = 0; i < n; ++i) same &= c[i] == c0;
  if (same) {
    const float cn = c0 + 1.0f;
    const float b1c = entry(o->bc1, o->n1, cn), s2c = entry(o->sbc2, o->n2, cn);
    ADAM_FNS[mode][1][acc](x, m, v, c, h, dk, n, pb, pc, o, cn, b1c, s2c);
    return;
  }
  /* counts differ (a reset cleared some): per element, the table entries gathered for a chunk
     first so that the arithmetic still vectorises */
  const float pa = o->pre_a, pr = o->pre_b, w1 = o->w1, b2 = o->b2, w2 = o->w2;
  const float eps = o->eps, lr = o->lr, post = o->post_b;
  (void)pa; (void)pr; (void)post;
  float e1[256], e2[256], junk[256];  /* junk: where pb, pc are NULL (no branch in the loop) */
  for (int64_t s0 = 0; s0 < n; s0 += 256) {
    const int64_t len = n - s0 < 256 ? n - s0 : 256;
    float *xs = x + s0, *ms = m + s0, *vs = v + s0, *cs = c + s0;
    const float* hs = h + s0;
    adam_entries(cs, len, c0, o, e1, e2);
    if (!pb || !pc) memset(junk, 0, sizeof junk);
    float* pbs = pb ? pb + s0 : junk;
    float* pcs = pc ? pc + s0 : junk;
#define MIXED_LOOP(MODE)                                                                       \
    _Pragma("GCC ivdep")                                                                       \
    for (int64_t i = 0; i < len; ++i) {                                                        \
      const float xi = xs[i], g = dk * hs[i];                                                  \
      const float gp = ADAM_GP(MODE, g, xi);                                                   \
      const float mi = ms[i] + w1 * (gp - ms[i]), vi = vs[i] * b2 + w2 * (gp * gp);            \
      const float u = lr * ((mi / e1[i]) / (sqrtf(vi) / e2[i] + eps));                         \
      const float y = ADAM_Y(MODE, xi, u);                                                     \
      cs[i] += 1.0f;                                                                           \
      ms[i] = mi; vs[i] = vi; xs[i] = y;                                                       \
      pbs[i] += dk * xi;                                                                       \
      pcs[i] += fabsf(y);                                                                      \
    }
    switch (mode) {
      case 0: MIXED_LOOP(0) break;
      case 1: MIXED_LOOP(1) break;
      case 2: MIXED_LOOP(2) break;
      default: MIXED_LOOP(3) break;
    }
#undef MIXED_LOOP
  }
}
#undef ADAM_GP
#undef ADAM_Y

/* adam_span over one row whose counts are all *rck (>= 0, checked when the replica's block
   began: a row only a reset touched, e.g. continual backprop's fresh input-layer rows, whose
   tensor as a whole has mixed counts): the row's count is kept in *rck and written back when
   the replica stops (adam_rows_store), instead of each element's being compared, read and
   written every step; the same arithmetic as adam_span's equal-counts loop. rck NULL or < 0,
   or ucn > 0 (the whole tensor's count kept by the caller): adam_span as is. */
static void adam_row(float* x, float* m, float* v, float* c, const float* h, float dk,
                     int64_t n, float* pb, float* pc, const AdamOpt* o, float ucn, float* rck) {
  if (ucn <= 0.0f && rck && *rck >= 0.0f) {
    const float cn = *rck + 1.0f;
    adam_span(x, m, v, c, h, dk, n, pb, pc, o, cn);
    *rck = cn;
    return;
  }
  adam_span(x, m, v, c, h, dk, n, pb, pc, o, ucn);
}

/* rc[k] = the count of row k of the (K, H) counts c where all its elements agree, else -1 */
static void adam_rows_load(const float* c, int64_t K, int64_t H, float* rc) {
  for (int64_t k = 0; k < K; ++k) {
    const float* row = c + k * H;
    const float c0 = row[0];
    int same = 1;
    for (int64_t i = 0; i < H; ++i) same &= row[i] == c0;
    rc[k] = same ? c0 : -1.0f;
  }
}

/* every element of row k of c set to rc[k] where rc[k] >= 0 (adam_rows_load's rows) */
static void adam_rows_store(float* c, int64_t K, int64_t H, const float* rc) {
  for (int64_t k = 0; k < K; ++k)
    if (rc[k] >= 0.0f)
      for (int64_t i = 0; i < H; ++i) c[k * H + i] = rc[k];
}

/* L2-Init's update of one row (batch 1): w = scale * w + alpha * d_k h + gamma * w0. */
static void update_row_anchor(float* row, const float* a, float dk, const float* h, int64_t H,
                              float alpha, float scale, float gamma) {
  const float ad = alpha * dk;
  for (int64_t i = 0; i < H; ++i) row[i] = fmaf(gamma, a[i], fmaf(ad, h[i], scale * row[i]));
}

/* Rows 0..K of a layer above the input one under L2-Init (batch 1, backprop): pb += d W (before
   the update), then the anchored update; four rows per sweep as ROWS1. */
static void rows_anchor(float* w, const float* a, const float* d, const float* h, float* pb,
                        int64_t H, int64_t K, float alpha, float scale, float gamma) {
  int64_t k = 0;
  for (; k + 4 <= K; k += 4) {
    float *r0 = w + k * H, *r1 = r0 + H, *r2 = r1 + H, *r3 = r2 + H;
    const float *q0 = a + k * H, *q1 = q0 + H, *q2 = q1 + H, *q3 = q2 + H;
    const float d0 = d[k], d1 = d[k + 1], d2 = d[k + 2], d3 = d[k + 3];
    const float a0 = alpha * d0, a1 = alpha * d1, a2 = alpha * d2, a3 = alpha * d3;
    _Pragma("GCC ivdep")
    for (int64_t i = 0; i < H; ++i) {
      const float x0 = r0[i], x1 = r1[i], x2 = r2[i], x3 = r3[i], hi = h[i];
      pb[i] += ((d0 * x0 + d1 * x1) + d2 * x2) + d3 * x3;
      r0[i] = fmaf(gamma, q0[i], fmaf(a0, hi, scale * x0));
      r1[i] = fmaf(gamma, q1[i], fmaf(a1, hi, scale * x1));
      r2[i] = fmaf(gamma, q2[i], fmaf(a2, hi, scale * x2));
      r3[i] = fmaf(gamma, q3[i], fmaf(a3, hi, scale * x3));
    }
  }
  for (; k < K; ++k) {
    float* row = w + k * H;
    const float* q = a + k * H;
    const float dk = d[k], ak = alpha * dk;
    for (int64_t i = 0; i < H; ++i) {
      const float x = row[i];
      pb[i] += dk * x;
      row[i] = fmaf(gamma, q[i], fmaf(ak, h[i], scale * x));
    }
  }
}

void cl_online_block(const BlockArgs* A, int64_t r0, int64_t r1) {
  const int64_t R = A->R, T = A->T, L = A->L;
  const int64_t* width = A->width;
  void **wp = A->wp, **bp = A->bp, **agep = A->agep, **fp = A->fp, **up = A->up;
  void **uhp = A->uhp, **carryp = A->carryp, **eligp = A->eligp, **fbp = A->fbp;
  const float *x = A->x, *yreg = A->yreg, *table = A->table;
  const int64_t* ycls = A->ycls;
  float *out = A->out, *loss = A->loss, *pend_d = A->pend_d;
  const float alpha = A->alpha, scale = A->scale, decay_w = A->decay_w, keep = A->keep;
  const int act = A->act, cbp = A->cbp, nonneg = A->nonneg, cr = A->cr, sunit = A->sunit;
  const int adam = A->adam;
  const int64_t maturity = A->maturity, tsize = A->tsize;
  const double rate = A->rate;
  int64_t *start = A->start, *events = A->events, *pend_t = A->pend_t;
  char* skip = A->skip;
  double* gsum = A->gsum;
  const AdamOpt* ao = &A->ao;
  const int snp = A->snp;
  const float snp_sigma = A->snp_sigma;
  const float gamma = A->gamma;  /* L2-Init: the anchors' share of each update (ancw) */
  void **ancw = A->ancw, **ancb = A->ancb, **rsum = A->redo_sum;
  const int rgrad = A->redo_score == 1;
#if defined(__SSE__)
  /* Adam's moments of weights whose inputs stay 0 (most MNIST pixels) decay geometrically into
     subnormal floats, whose arithmetic costs ~2x here: on this thread, for this call only,
     subnormal results and inputs count as 0 (FTZ, DAZ). A moment below 1.2e-38 moves no
     float32 weight (its step is < 1e-30); the reference keeps it (docs/performance.md). */
  const unsigned csr = _mm_getcsr();
  if (adam) _mm_setcsr(csr | 0x8040u);
#endif
  const int64_t D = width[0], C = width[L], H1 = width[1];
  /* kolen-pollack's decay of the input layer's weights, folded into its (deferred) update */
  const float alpha0 = cr == CR_KP ? keep * alpha : alpha;
  const float scale0 = cr == CR_KP ? keep * scale : scale;
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
    float* buf = (float*)malloc(sizeof(float) * (size_t)(3 * hsum + 3 * C + 4 * maxw + 64));
    float* hs = buf;
    float* z = hs + hsum;
    float* d = z + C;
    float* d2 = d + maxw;
    float* below = d2 + maxw;
    float* cols = below + maxw;  /* hsum: layer l >= 1's column norms at offset of h[l - 1] */
    float* eo = cols + hsum;  /* the output error e (dfa) */
    float* rcb = eo + C;  /* hsum + C: per layer, its rows' counts (adam_row) */
    float* h[64];
    float* W[65];
    float* Bv[65];
    float* Fb[65];  /* layer l's feedback: B_l (fa, kp), D of layer l - 1 (dfa), W_l (sign) */
    double sabs[65];  /* sign symmetry: Σ |W_l| of the forward pass's weights */
    float *Mw[65], *Vw[65], *Nw[65], *Mb[65], *Vb[65], *Nb[65];  /* Adam's state (adam) */
    float *Aw[65], *Ab[65], *Rs[65];  /* L2-Init's anchors (ancw), ReDo's window sums (rsum) */
    int64_t off = 0;
    for (int64_t l = 0; l < L; ++l) {
      W[l] = (float*)wp[l] + r * width[l + 1] * width[l];
      if (adam) {
        const int64_t nw = r * width[l + 1] * width[l], nb = r * width[l + 1];
        Mw[l] = (float*)A->amw[l] + nw; Vw[l] = (float*)A->avw[l] + nw;
        Nw[l] = (float*)A->anw[l] + nw; Mb[l] = (float*)A->amb[l] + nb;
        Vb[l] = (float*)A->avb[l] + nb; Nb[l] = (float*)A->anb[l] + nb;
      }
      Bv[l] = (float*)bp[l] + r * width[l + 1];
      if (ancw) {
        Aw[l] = (float*)ancw[l] + r * width[l + 1] * width[l];
        Ab[l] = (float*)ancb[l] + r * width[l + 1];
      }
      if (rsum && l < L - 1) Rs[l] = (float*)rsum[l] + r * width[l + 1];
      Fb[l] = W[l];
      if (l > 0 && (cr == CR_FA || cr == CR_KP)) Fb[l] = (float*)fbp[l] + r * width[l + 1] * width[l];
      if (l > 0 && cr == CR_DFA) Fb[l] = (float*)fbp[l] + r * C * width[l];
      if (l < L - 1) { h[l] = hs + off; off += width[l + 1]; }
    }
    /* uniform counts (Python checked): uc[2 l], uc[2 l + 1] the counts of layer l's weights
       and biases, kept here instead of per element (< 0: per element) */
    float* uc = adam && A->ucount ? A->ucount + r * L * 2 : 0;
    /* shrink-and-perturb: sigma eps of update count + step after layer l's weight (j = 0) or
       bias (j = 1) is updated */
    const uint32_t nk0 = snp ? (uint32_t)A->snp_key[2 * r] : 0u;
    const uint32_t nk1 = snp ? (uint32_t)A->snp_key[2 * r + 1] : 0u;
#define SNP_ADD(ptr, e0, n, l, j, step)                                                       \
  do {                                                                                      \
    if (snp)                                                                                \
      snp_add(ptr, 0, e0, n, nk0, nk1, (uint32_t)A->snp_pidx[2 * (l) + (j)],                \
              (uint64_t)(A->snp_count + (step)), snp_sigma);                                \
  } while (0)
#define UCN(j) (uc && uc[j] >= 0.0f ? uc[j] + 1.0f : 0.0f)
    /* layers whose weights' counts differ (a reset touched them): each row's count, where its
       elements agree, kept in rc[l] for this block (adam_row) */
    float* rc[65];
    for (int64_t l = 0, o = 0; l < L; o += width[l + 1], ++l) {
      rc[l] = 0;
      if (adam && !(uc && uc[2 * l] >= 0.0f)) {
        rc[l] = rcb + o;
        adam_rows_load(Nw[l], width[l + 1], width[l], rc[l]);
      }
    }
#define RCK(l, k) (rc[l] ? rc[l] + (k) : 0)
#define UCSET(j, value) do { if ((value) > 0.0f) uc[j] = (value); } while (0)
    while (t < T) {
      const float* xt = x + (t * R + r) * D;
      const float ucn0 = pend ? UCN(0) : 0.0f;  /* the pending input-layer update's count */
      for (int64_t l = 0; l < L; ++l) {
        const int64_t K = width[l + 1], H = width[l];
        const float* in = l == 0 ? xt : h[l - 1];
        float* o = l == L - 1 ? z : h[l];
        const int mean_abs = cr == CR_SIGN && !sunit && l > 0;
        double acc = 0.0;
        for (int64_t k = 0; k < K; ++k) {
          float* row = W[l] + k * H;
          if (l == 0 && pend && !sk[k]) {
            if (adam)
              adam_row(row, Mw[0] + k * H, Vw[0] + k * H, Nw[0] + k * H, xprev, d0[k], H, 0, 0,
                       ao, ucn0, RCK(0, k));
            else if (ancw)
              update_row_anchor(row, Aw[0] + k * H, d0[k], xprev, H, alpha, scale, gamma);
            else
              update_row(row, d0, xprev, 1, K, H, k, alpha0, scale0);
            SNP_ADD(row, k * H, H, 0, 0, pt);
          }
          const float v = Bv[l][k] + dot(row, in, H);
          o[k] = l == L - 1 ? v : act_fwd(act, v);
          if (mean_abs) acc += l1(row, H);
        }
        sabs[l] = mean_abs ? acc / (double)(K * H) : 1.0;
      }
      if (rsum && !rgrad)  /* ReDo: the window's sum of |h| (batch 1: the mean is h) */
        for (int64_t l = 0; l < L - 1; ++l)
          for (int64_t i = 0; i < width[l + 1]; ++i) Rs[l][i] += fabsf(h[l][i]);
      if (pend) memset(sk, 0, (size_t)H1);
      UCSET(0, ucn0);
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
      memcpy(eo, d, sizeof(float) * (size_t)C);
      loss[t * R + r] = lv;
      for (int64_t l = L - 1; l >= 0; --l) {
        const int64_t K = width[l + 1], H = width[l];
        if (gsum) {  /* sum |g| of W (d times the input, an outer product) and b (d) */
          gsum[r * L + l] += l1(d, K) * (l1(l == 0 ? xt : h[l - 1], H) + 1.0);
        }
        if (rsum && rgrad && l < L - 1) {  /* ReGraMa: mean_j |d_k x_j| = |d_k| mean_j |x_j| */
          const float mx = (float)(l1(l == 0 ? xt : h[l - 1], H) / (double)H);
          for (int64_t k = 0; k < K; ++k) Rs[l][k] += fabsf(d[k]) * mx;
        }
        if (l == 0) {
          memcpy(d0, d, sizeof(float) * (size_t)K);
          xprev = xt;
          pt = t;
          pend = 1;
        } else {
          float* col = cols + (h[l - 1] - hs);
          memset(below, 0, sizeof(float) * (size_t)H);
          if (cbp) memset(col, 0, sizeof(float) * (size_t)H);
          if (adam) {  /* (backprop only: kernels.py checks) */
            const float ucw = UCN(2 * l);
            for (int64_t k = 0; k < K; ++k)
              adam_row(W[l] + k * H, Mw[l] + k * H, Vw[l] + k * H, Nw[l] + k * H, h[l - 1], d[k],
                       H, below, cbp ? col : 0, ao, ucw, RCK(l, k));
            UCSET(2 * l, ucw);
          } else if (ancw)  /* (backprop only, no cbp: block_kernel.py checks) */
            rows_anchor(W[l], Aw[l], d, h[l - 1], below, H, K, alpha, scale, gamma);
          else if (cr == CR_BP || cr == CR_DFA)
            rows1(W[l], d, h[l - 1], below, col, H, 0, K, alpha, scale, cr == CR_BP, cbp);
          else
            rows_rule(cr, W[l], Fb[l], d, h[l - 1], below, col, H, K, alpha, scale, keep, cbp);
          SNP_ADD(W[l], 0, K * H, l, 0, t);
          if (cr == CR_SIGN && !sunit) {
            const float sc = (float)sabs[l];
            for (int64_t i = 0; i < H; ++i) below[i] *= sc;
          }
          if (cr == CR_DFA)  /* below = e D_{l-1} */
            for (int64_t c = 0; c < C; ++c) {
              const float ec = eo[c], *Dc = Fb[l] + c * H;
              for (int64_t i = 0; i < H; ++i) below[i] = fmaf(ec, Dc[i], below[i]);
            }
        }
        if (adam) {
          const float ucb = UCN(2 * l + 1);
          adam_span(Bv[l], Mb[l], Vb[l], Nb[l], d, 1.0f, K, 0, 0, ao, ucb);
          UCSET(2 * l + 1, ucb);
        } else if (ancw)
          for (int64_t k = 0; k < K; ++k)
            Bv[l][k] = fmaf(gamma, Ab[l][k], fmaf(alpha, d[k], scale * Bv[l][k]));
        else
          for (int64_t k = 0; k < K; ++k) Bv[l][k] = fmaf(alpha, d[k], scale * Bv[l][k]);
        SNP_ADD(Bv[l], 0, K, l, 1, t);
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
      const float ucn0 = UCN(0);
      for (int64_t k = 0; k < H1; ++k) {
        if (sk[k]) continue;
        if (adam)
          adam_row(W[0] + k * D, Mw[0] + k * D, Vw[0] + k * D, Nw[0] + k * D, xprev, d0[k], D, 0,
                   0, ao, ucn0, RCK(0, k));
        else if (ancw)
          update_row_anchor(W[0] + k * D, Aw[0] + k * D, d0[k], xprev, D, alpha, scale, gamma);
        else
          update_row(W[0] + k * D, d0, xprev, 1, H1, D, k, alpha0, scale0);
        SNP_ADD(W[0] + k * D, k * D, D, 0, 0, pt);
      }
      memset(sk, 0, (size_t)H1);
      pend = 0;
      UCSET(0, ucn0);
    }
#undef UCN
#undef RCK
    for (int64_t l = 0; l < L; ++l)
      if (rc[l]) adam_rows_store(Nw[l], width[l + 1], width[l], rc[l]);
#undef UCSET
#undef SNP_ADD
    pend_t[r] = pend ? pt : -1;
    start[r] = t;
    free(buf);
  }
#if defined(__SSE__)
  if (adam) _mm_setcsr(csr);
#endif
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
