/* The whole-step kernel's parts (cl_online_block in block_loop.c): the activations and their
   derivatives, the argument structs, Adam's specialised row loops and L2-Init's anchored rows.
   Compiled as one unit with snp_noise.c, kernels.c and block_loop.c, in that order (kernels.py). */

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

