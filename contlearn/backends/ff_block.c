/* The Forward-Forward agent's whole online steps (batch 1) for a block of steps, replica by
   replica (contlearn/backends/ff_block.py binds it; docs/forward_forward.md, "Speed"). Compiled
   as one unit with the kernels before it in C_SOURCES (kernels.py), whose act_fwd, act_bwd,
   dot and l1 it uses.

   One step of one replica, as the agent's hand-written step computes it
   (agents/ff_network.py label_pass, agents/ff_step.py hand_step, FFAgent._fused_update):
   - every label c embedded into the input (replace: the first C values become the one-hot;
     append: the one-hot follows the D values), each normalised by the scale s all of them
     share (their squared lengths are all |x0|^2 + 1, x0 the input without a label), so layer
     1's pre-activation is z1[c] = (W1 x0 + W1[:, off + c]) / (s + eps) + b1;
   - layer l > 1 reads the normalised activity of layer l - 1 for every label;
   - G_l[c] = sum_j h_l[c, j]^2 (mean: / H_l); the prediction scores[c] are the sum of G_l[c]
     over the layers l >= first, computed before any update;
   - the step's positive is label y's row, its negative label n's (n != y, drawn by the caller);
     per layer, L_l = (softplus(theta - G+) + softplus(G- - theta)) / 2, dL/dh = -sigma(theta -
     G+) h+ on the positive and sigma(G- - theta) h- on the negative (mean: / H_l),
     delta = dL/dh * act'(z), and every layer's update from the weights the forward pass read:
     W = scale W + alpha (delta+ i+^T + delta- i-^T), b = scale b + alpha (delta+ + delta-),
     i the layer's (normalised) input on each row;
   - with adam, Adam's update instead (AdamOpt, block_step.c): g' = pre_a g + pre_b theta, the
     moments of amw ... avb updated, theta += lr d + post_b theta, the bias corrections of
     count ucount[r, l, j] + 1 + t (every element of a tensor has the same count: the caller
     checks it and adds T to the counts afterwards);
   - with L2-Init's anchors (ancw not NULL): W = scale W + alpha g + gamma W0 (b likewise);
   - with shrink-and-perturb's noise (snp): after layer l's update, W += snp_sigma eps and
     b += snp_sigma eps (snp_noise.c's eps[r, snp_count + t, p, e], p = 2 l for W, 2 l + 1
     for b: the parameter order hidden1.weight, hidden1.bias, ...);
   - if gsum is not NULL: gsum[r, l] += sum |dL/dW_l| + sum |dL/db_l|.
   No OpenMP: the caller runs disjoint replica ranges on threads of its own. */

/* Every argument of cl_ff_block (ff_block.py's FFBlockArgs mirrors it field by field and
   checks its size against cl_ff_block_args_size at load). */
typedef struct {
  int64_t R, T, L, D, C;
  const int64_t* width; /* L + 1: the embedded input's length, then each hidden width */
  void** wp;            /* per layer: (R, width[l + 1], width[l]) float */
  void** bp;            /* per layer: (R, width[l + 1]) float */
  const float* x;       /* (T, R, D): inputs without a label */
  const int64_t* y;     /* (T, R): true labels */
  const int64_t* neg;   /* (T, R): the negatives' labels */
  const float* theta;   /* (L) */
  float* scores;        /* (T, R, C) */
  float* loss;          /* (T, R) */
  double* gsum;         /* (R, L) or NULL */
  float alpha, scale;
  int32_t act, append, length, mean, first;
  int32_t adam;
  void** amw; /* per layer: Adam's first and second moments of the weights, of the biases */
  void** avw;
  void** amb;
  void** avb;
  const float* ucount; /* (R, L, 2): each tensor's count before the block */
  AdamOpt ao;
  float gamma;          /* L2-Init: the anchors' share (ancw NULL: none) */
  void** ancw;          /* per layer: the anchors of the weights (R, H, I), of the biases */
  void** ancb;
  int32_t snp;          /* shrink-and-perturb's noise after each layer's update */
  float snp_sigma;
  const int64_t* snp_key; /* (R, 2) */
  int64_t snp_count;    /* the learner's update count before the block's first step */
} FFBlockArgs;

/* Adam's update of n values x with gradients g (moments m, v), count cn after this step */
static void ff_adam(float* x, float* m, float* v, const float* g, int64_t n, const AdamOpt* o,
                    float cn) {
  const float b1c = entry(o->bc1, o->n1, cn), s2c = entry(o->sbc2, o->n2, cn);
  ADAM_FNS[adam_mode(o)][0][0](x, m, v, 0, g, 1.0f, n, 0, 0, o, cn, b1c, s2c);
}

int64_t cl_ff_block_args_size(void) { return (int64_t)sizeof(FFBlockArgs); }

static float ff_softplus(float v) { return v > 20.0f ? v : log1pf(expf(v)); }
static float ff_sigmoid(float v) { return 1.0f / (1.0f + expf(-v)); }

/* sum v[i]^2 in double */
static double ff_sumsq(const float* v, int64_t n) {
  double s = 0.0;
  for (int64_t i = 0; i < n; ++i) s += (double)v[i] * (double)v[i];
  return s;
}

/* the normalisation's 1 / (scale + eps) for a vector of n values with sum of squares sq */
static float ff_inv(double sq, int64_t n, int length) {
  const float scale = length ? sqrtf((float)sq) : sqrtf((float)(sq / (double)n));
  return 1.0f / (scale + 1e-8f);
}

/* row[k] = scale row[k] + alpha (dp ip[k] + dn in[k]) for k < n; returns sum |dp ip[k] +
   dn in[k]| when asked (l1 != 0), else 0 */
static double ff_row_update(float* row, float dp, const float* ip, float dn, const float* in,
                            int64_t n, float alpha, float scale, int l1, const float* anc,
                            float gamma) {
  if (anc) { /* L2-Init: + gamma row0 */
    double s = 0.0;
    for (int64_t k = 0; k < n; ++k) {
      const float g = dp * ip[k] + dn * in[k];
      row[k] = scale * row[k] + alpha * g + gamma * anc[k];
      if (l1) s += fabsf(g);
    }
    return s;
  }
  if (!l1) {
    for (int64_t k = 0; k < n; ++k) row[k] = scale * row[k] + alpha * (dp * ip[k] + dn * in[k]);
    return 0.0;
  }
  float lane[16] = {0};
  int64_t k = 0;
  for (; k + 16 <= n; k += 16)
    for (int j = 0; j < 16; ++j) {
      const float g = dp * ip[k + j] + dn * in[k + j];
      row[k + j] = scale * row[k + j] + alpha * g;
      lane[j] += fabsf(g);
    }
  double s = 0.0;
  for (int j = 0; j < 16; ++j) s += lane[j];
  for (; k < n; ++k) {
    const float g = dp * ip[k] + dn * in[k];
    row[k] = scale * row[k] + alpha * g;
    s += fabsf(g);
  }
  return s;
}

/* returns 0, or -1 if its scratch memory could not be allocated (nothing computed) */
int64_t cl_ff_block(const FFBlockArgs* A, int64_t r0, int64_t r1) {
  const int64_t R = A->R, T = A->T, L = A->L, D = A->D, C = A->C;
  const int64_t* width = A->width;
  const int64_t Din = width[0], off = A->append ? D : 0, lo = A->append ? 0 : C;
  int64_t hsum = 0, hmax = 0;
  for (int64_t l = 1; l <= L; ++l) {
    hsum += width[l];
    hmax = width[l] > hmax ? width[l] : hmax;
  }
  /* scratch: z, h and the normalised h of every layer for every label (C * hsum each), each
     layer's goodness per label (L * C), the input rows of layer 1 (2 * Din), the deltas */
  int64_t imax = Din;
  for (int64_t l = 1; l < L; ++l) imax = width[l] > imax ? width[l] : imax;
  /* (+ Adam's gradient row and the biases' gradients) */
  float* buf = (float*)malloc(sizeof(float) * (size_t)(3 * C * hsum + L * C + 2 * Din +
                                                       4 * hmax + imax));
  if (!buf) return -1;
  float *Z = buf, *Hh = Z + C * hsum, *Hn = Hh + C * hsum, *G = Hn + C * hsum;
  float *ip = G + L * C, *in = ip + Din, *dp = in + Din, *dn = dp + hmax, *base = dn + hmax;
  float *gb = base + hmax, *grow = gb + hmax;
  const float alpha = A->alpha, scale = A->scale;
  for (int64_t r = r0; r < r1; ++r) {
    for (int64_t t = 0; t < T; ++t) {
      const float* x = A->x + (t * R + r) * D;
      const int64_t yl = A->y[t * R + r], nl = A->neg[t * R + r];
      /* layer 1: z1[c] = (W1 x0 + W1[:, off + c]) inv + b1 */
      double sq = 1.0;
      for (int64_t k = lo; k < D; ++k) sq += (double)x[k] * (double)x[k];
      const float inv = ff_inv(sq, Din, A->length);
      {
        const int64_t H = width[1];
        const float* W = (const float*)A->wp[0] + r * H * Din;
        const float* b = (const float*)A->bp[0] + r * H;
        for (int64_t j = 0; j < H; ++j) base[j] = dot(W + j * Din + lo, x + lo, D - lo);
        for (int64_t c = 0; c < C; ++c)
          for (int64_t j = 0; j < H; ++j) {
            const float z = (base[j] + W[j * Din + off + c]) * inv + b[j];
            Z[c * H + j] = z;
            Hh[c * H + j] = act_fwd(A->act, z);
          }
      }
      /* every layer's goodness and normalised activity; layer l + 1's forward pass */
      for (int64_t l = 0, o = 0; l < L; o += C * width[l + 1], ++l) {
        const int64_t H = width[l + 1];
        for (int64_t c = 0; c < C; ++c) {
          const float* h = Hh + o + c * H;
          const double s = ff_sumsq(h, H);
          G[l * C + c] = A->mean ? (float)(s / (double)H) : (float)s;
          const float iv = ff_inv(s, H, A->length);
          for (int64_t j = 0; j < H; ++j) Hn[o + c * H + j] = h[j] * iv;
        }
        if (l + 1 == L) break;
        const int64_t K = width[l + 2], o2 = o + C * H;
        const float* W = (const float*)A->wp[l + 1] + r * K * H;
        const float* b = (const float*)A->bp[l + 1] + r * K;
        for (int64_t k = 0; k < K; ++k)
          for (int64_t c = 0; c < C; ++c) {
            const float z = dot(W + k * H, Hn + o + c * H, H) + b[k];
            Z[o2 + c * K + k] = z;
            Hh[o2 + c * K + k] = act_fwd(A->act, z);
          }
      }
      float* sc = A->scores + (t * R + r) * C;
      for (int64_t c = 0; c < C; ++c) {
        float s = 0.0f;
        for (int64_t l = A->first; l < L; ++l) s += G[l * C + c];
        sc[c] = s;
      }
      /* the step: every layer's deltas, loss and update */
      float total = 0.0f;
      for (int64_t l = 0, o = 0; l < L; o += C * width[l + 1], ++l) {
        const int64_t H = width[l + 1], I = width[l];
        const float th = A->theta[l], gp = G[l * C + yl], gn = G[l * C + nl];
        total += 0.5f * (ff_softplus(th - gp) + ff_softplus(gn - th));
        float cp = -ff_sigmoid(th - gp), cn = ff_sigmoid(gn - th);
        if (A->mean) {
          cp /= (float)H;
          cn /= (float)H;
        }
        const float *hp = Hh + o + yl * H, *hn = Hh + o + nl * H;
        for (int64_t j = 0; j < H; ++j) {
          dp[j] = act_bwd(A->act, hp[j] * cp, hp[j]);
          dn[j] = act_bwd(A->act, hn[j] * cn, hn[j]);
        }
        const float *vp, *vn;
        if (l == 0) { /* the embedded, normalised positive and negative inputs */
          for (int64_t k = 0; k < D; ++k) ip[k] = in[k] = k < lo ? 0.0f : x[k] * inv;
          for (int64_t k = D; k < Din; ++k) ip[k] = in[k] = 0.0f;
          ip[off + yl] = inv;
          in[off + nl] = inv;
          vp = ip;
          vn = in;
        } else {
          const int64_t op = o - C * I;
          vp = Hn + op + yl * I;
          vn = Hn + op + nl * I;
        }
        float* W = (float*)A->wp[l] + r * H * I;
        float* b = (float*)A->bp[l] + r * H;
        double g1 = 0.0;
        if (A->adam) {
          const float* uc = A->ucount + (r * L + l) * 2;
          float *mw = (float*)A->amw[l] + r * H * I, *vw = (float*)A->avw[l] + r * H * I;
          for (int64_t j = 0; j < H; ++j) {
            for (int64_t k = 0; k < I; ++k) grow[k] = dp[j] * vp[k] + dn[j] * vn[k];
            if (A->gsum) g1 += l1(grow, I);
            ff_adam(W + j * I, mw + j * I, vw + j * I, grow, I, &A->ao, uc[0] + 1.0f + t);
            gb[j] = dp[j] + dn[j];
          }
          if (A->gsum) g1 += l1(gb, H);
          ff_adam(b, (float*)A->amb[l] + r * H, (float*)A->avb[l] + r * H, gb, H, &A->ao,
                  uc[1] + 1.0f + t);
        } else {
          const float* aw = A->ancw ? (const float*)A->ancw[l] + r * H * I : 0;
          const float* ab = A->ancw ? (const float*)A->ancb[l] + r * H : 0;
          for (int64_t j = 0; j < H; ++j) {
            g1 += ff_row_update(W + j * I, dp[j], vp, dn[j], vn, I, alpha, scale, A->gsum != 0,
                                aw ? aw + j * I : 0, A->gamma);
            const float g = dp[j] + dn[j];
            b[j] = ab ? scale * b[j] + alpha * g + A->gamma * ab[j] : scale * b[j] + alpha * g;
            g1 += fabsf(g);
          }
        }
        if (A->gsum) A->gsum[r * L + l] += g1;
        if (A->snp) {
          const uint32_t k0 = (uint32_t)A->snp_key[2 * r], k1 = (uint32_t)A->snp_key[2 * r + 1];
          const uint64_t at = (uint64_t)(A->snp_count + t);
          snp_add(W, 0, 0, H * I, k0, k1, (uint32_t)(2 * l), at, A->snp_sigma);
          snp_add(b, 0, 0, H, k0, k1, (uint32_t)(2 * l + 1), at, A->snp_sigma);
        }
      }
      A->loss[t * R + r] = total;
    }
  }
  free(buf);
  return 0;
}
