/* Shrink-and-perturb's counter-based noise for the compiled kernels: kernels.py compiles this
   file and kernels.c as one unit, this one first (snp_add is called by cl_online_block). */
#include <math.h>
#include <stdint.h>
#include <string.h>

/* Shrink-and-perturb's noise (docs/design.md §4d; contlearn/learners/philox.py is the
   reference, bit for bit): eps[r, t, p, e] is normal e % 4 of Philox4x32-10 at counter
   (e / 4, p, t mod 2^32, t / 2^32) under replica r's key (k0, k1). Four words give four
   normals by Box-Muller, in double with +, -, *, /, sqrt only (the logarithm and sin/cos as
   fixed polynomials; -ffp-contract=off keeps every operation rounded as written), rounded to
   float once. Chunks of SNP_CHUNK counters, so that the rounds vectorise. */
#define SNP_CHUNK 64
static const double SNP_LOG[8] = {2.0, 0.6666666666666666, 0.4, 0.2857142857142857,
                                  0.2222222222222222, 0.18181818181818182,
                                  0.15384615384615385, 0.13333333333333333};
static const double SNP_SIN[8] = {1.0, -0.16666666666666666, 0.008333333333333333,
                                  -0.0001984126984126984, 2.7557319223985893e-06,
                                  -2.505210838544172e-08, 1.6059043836821613e-10,
                                  -7.647163731819816e-13};
static const double SNP_COS[9] = {1.0, -0.5, 0.041666666666666664, -0.001388888888888889,
                                  2.48015873015873e-05, -2.755731922398589e-07,
                                  2.08767569878681e-09, -1.1470745597729725e-11,
                                  4.779477332387385e-14};

/* (double) w for a uint32 w, exactly, by the int32 conversion AVX2 has */
#define SNP_U32D(w) ((double)(int32_t)((w) ^ 0x80000000u) + 2147483648.0)
/* C[7] z^7 + ... + C[0] by Horner, in this order */
static inline double snp_h8(double z, const double* C) {
  double acc = C[7];
  acc = acc * z + C[6]; acc = acc * z + C[5]; acc = acc * z + C[4]; acc = acc * z + C[3];
  acc = acc * z + C[2]; acc = acc * z + C[1]; acc = acc * z + C[0];
  return acc;
}
#define SNP_H8(z, C) snp_h8(z, C)

/* ln u, u = (w + 1/2) 2^-32: v = 2w + 1 = m 2^k, m in [1, 2) (m > sqrt 2: m / 2, k + 1);
   (k - 33) ln 2 + 2 atanh(s), s = (m - 1) / (m + 1), the series to s^15 by Horner in s^2.
   Integer compares and bit selects only (a float compare would keep the loop from
   vectorising); m / 2 and k + 1 are exact either way. */
static inline double snp_log(double wd) {
  const double v = 2.0 * wd + 1.0;
  uint64_t bits;
  memcpy(&bits, &v, sizeof bits);
  uint64_t mb = (bits & 0x000FFFFFFFFFFFFFull) | 0x3FF0000000000000ull;
  const uint64_t big = mb > 0x3FF6A09E667F3BCDull;  /* m > sqrt 2 (the double nearest) */
  mb -= big << 52;  /* m / 2 */
  /* the exponent as a double: 2^52 + (bits >> 52) + big, less 2^52 + 1023 + 33, exact */
  const uint64_t eb = ((bits >> 52) + big) | 0x4330000000000000ull;
  double m, k;
  memcpy(&m, &mb, sizeof m);
  memcpy(&k, &eb, sizeof k);
  k = k - 4503599627371552.0;
  const double s = (m - 1.0) / (m + 1.0), z = s * s;
  return k * 0.6931471805599453 + s * SNP_H8(z, SNP_LOG);
}

/* sin and cos of 2 pi u, u = (w + 1/2) 2^-32: q = floor(4u + 1/2) = (w + 2^29) >> 30,
   phi = 2 pi (u - q/4), Taylor in phi^2, turned by q quarter turns */
static inline void snp_sincos(uint32_t w, double* sn, double* cs) {
  const double u = (SNP_U32D(w) + 0.5) * 0x1p-32;
  const uint64_t q = ((uint64_t)w + 0x20000000u) >> 30;
  const double phi = 6.283185307179586 * (u - (double)(int32_t)q * 0.25), z = phi * phi;
  const double s = SNP_H8(z, SNP_SIN) * phi;
  const double c = SNP_H8(z, (SNP_COS + 1)) * z + SNP_COS[0];
  const uint64_t odd = q & 1u, neg_sin = (q >> 1) & 1u, neg_cos = (q ^ (q >> 1)) & 1u;
  const double a = odd ? c : s, b = odd ? s : c;
  *sn = neg_sin ? -a : a;
  *cs = neg_cos ? -b : b;
}

/* out[4 i + j] = normal j of counter (b0 + i, p, t lo, t hi), i < n <= SNP_CHUNK. Compiled
   twice, for AVX-512 and for the build's target, chosen at load time (1.6x on this machine's
   EPYC): the same IEEE operations, so the same bits. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx512f", "default")))
#endif
static void snp_blocks(uint32_t k0, uint32_t k1, uint64_t b0, int64_t n, uint32_t p,
                       uint64_t t, float* out) {
  uint32_t c0[SNP_CHUNK], c1[SNP_CHUNK], c2[SNP_CHUNK], c3[SNP_CHUNK];
  for (int64_t i = 0; i < n; ++i) {
    c0[i] = (uint32_t)(b0 + (uint64_t)i); c1[i] = p;
    c2[i] = (uint32_t)t; c3[i] = (uint32_t)(t >> 32);
  }
  uint32_t ka = k0, kb = k1;
  for (int rnd = 0; rnd < 10; ++rnd) {
    if (rnd) { ka += 0x9E3779B9u; kb += 0xBB67AE85u; }
    for (int64_t i = 0; i < n; ++i) {
      const uint64_t p0 = (uint64_t)0xD2511F53u * c0[i], p1 = (uint64_t)0xCD9E8D57u * c2[i];
      const uint32_t n0 = (uint32_t)(p1 >> 32) ^ c1[i] ^ ka;
      const uint32_t n2 = (uint32_t)(p0 >> 32) ^ c3[i] ^ kb;
      c1[i] = (uint32_t)p1; c3[i] = (uint32_t)p0; c0[i] = n0; c2[i] = n2;
    }
  }
  double rho[2 * SNP_CHUNK], sn[2 * SNP_CHUNK], cs[2 * SNP_CHUNK];
  _Pragma("GCC ivdep")
  for (int64_t i = 0; i < n; ++i) {
    rho[i] = sqrt(-2.0 * snp_log(SNP_U32D(c0[i])));
    rho[SNP_CHUNK + i] = sqrt(-2.0 * snp_log(SNP_U32D(c2[i])));
  }
  _Pragma("GCC ivdep")
  for (int64_t i = 0; i < n; ++i) {
    snp_sincos(c1[i], sn + i, cs + i);
    snp_sincos(c3[i], sn + SNP_CHUNK + i, cs + SNP_CHUNK + i);
  }
  for (int64_t i = 0; i < n; ++i) {
    out[4 * i] = (float)(rho[i] * cs[i]);
    out[4 * i + 1] = (float)(rho[i] * sn[i]);
    out[4 * i + 2] = (float)(rho[SNP_CHUNK + i] * cs[SNP_CHUNK + i]);
    out[4 * i + 3] = (float)(rho[SNP_CHUNK + i] * sn[SNP_CHUNK + i]);
  }
}

/* x[i] += sigma eps[t, p, e0 + i] for i < n under key (k0, k1); eps0 (not NULL): store the
   normals there instead (x unread) */
static void snp_add(float* x, float* eps0, int64_t e0, int64_t n, uint32_t k0, uint32_t k1,
                    uint32_t p, uint64_t t, float sigma) {
  float eps[4 * SNP_CHUNK];
  const int64_t end = e0 + n;
  int64_t e = e0;
  while (e < end) {
    const uint64_t b0 = (uint64_t)e / 4u;
    const int64_t left = (end - 4 * (int64_t)b0 + 3) / 4;
    const int64_t nb = left < SNP_CHUNK ? left : SNP_CHUNK;
    snp_blocks(k0, k1, b0, nb, p, t, eps);
    const int64_t lim = end < 4 * ((int64_t)b0 + nb) ? end : 4 * ((int64_t)b0 + nb);
    const float* src = eps + (e - 4 * (int64_t)b0);
    if (eps0)
      memcpy(eps0 + (e - e0), src, sizeof(float) * (size_t)(lim - e));
    else {
      float* dst = x + (e - e0);
      for (int64_t i = 0; i < lim - e; ++i) dst[i] = dst[i] + sigma * src[i];
    }
    e = lim;
  }
}

/* eps[r, t, p, e] for r < R, e < numel into out (R, numel); keys (R, 2) */
void cl_snp_normals(const int64_t* keys, int64_t R, int64_t t, int64_t p, int64_t numel,
                    float* out, int threads) {
  #pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t r = 0; r < R; ++r)
    snp_add(0, out + r * numel, 0, numel, (uint32_t)keys[2 * r], (uint32_t)keys[2 * r + 1],
            (uint32_t)p, (uint64_t)t, 0.0f);
}
