/* The whole-step kernel (cl_online_block) and continual backprop's replacements after it
   (cl_cbp_replace). Compiled as one unit with snp_noise.c, kernels.c and block_step.c, this one
   last (kernels.py). */

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
