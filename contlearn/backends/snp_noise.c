/* Shrink-and-perturb's counter-based noise for the compiled kernels: kernels.py compiles this
   file and kernels.c as one unit, this one first (snp_add is called by cl_online_block). */
#include <math.h>
#include <stdint.h>
#include <string.h>

/* Shrink-and-perturb's noise (docs/design.md §4d; contlearn/learners/philox.py is the
   reference, bit for bit): eps[r, t, p, e] for e in chunk c = e / 1024, i = e % 1024, is
   normal (i / 16) % 2 of pair (i / 16) / 2 of lane i % 16: the lane's xoshiro128++ state is
   Philox4x32-10 at counter (16 c + lane, p, t mod 2^32, t / 2^32) under replica r's key
   (k0, k1) (s3 = 1 if all four words are 0); each pair takes the lane's next two outputs a, b
   and gives a float32 Box-Muller pair (rho cos 2 pi v, rho sin 2 pi v), rho = sqrt(-2 ln u),
   u, v = ((a, b) >> 9 + 1/2) 2^-23, the logarithm and sin/cos as fixed float polynomials
   (-ffp-contract=off keeps every operation rounded as written). The 16 lanes vectorise. */
#define SNP_LANES 16
#define SNP_PAIRS 32
#define SNP_CHUNK (2 * SNP_LANES * SNP_PAIRS)
/* 2 / (2 j + 1); (-1)^j / (2 j + 1)!; (-1)^j / (2 j)!, j = 0..4, as the nearest floats */
static const float SNP_LOG[5] = {0x1p+1f, 0x1.555556p-1f, 0x1.99999ap-2f, 0x1.24924ap-2f,
                                 0x1.c71c72p-3f};
static const float SNP_SIN[5] = {0x1p+0f, -0x1.555556p-3f, 0x1.111112p-7f, -0x1.a01a02p-13f,
                                 0x1.71de3ap-19f};
static const float SNP_COS[5] = {0x1p+0f, -0x1p-1f, 0x1.555556p-5f, -0x1.6c16c2p-10f,
                                 0x1.a01a02p-16f};
#define SNP_LN2 0x1.62e43p-1f
#define SNP_TWO_PI 0x1.921fb6p+2f

/* c4 z^4 + ... + c0 by Horner, in this order */
static inline float snp_h5(float z, const float* c) {
  return (((c[4] * z + c[3]) * z + c[2]) * z + c[1]) * z + c[0];
}
static inline uint32_t snp_rotl(uint32_t x, int k) { return (x << k) | (x >> (32 - k)); }

/* the 1024 normals of chunk c into out. Compiled twice, for AVX-512 and for the build's
   target, chosen at load time: the same IEEE operations, so the same bits. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx512f", "default")))
#endif
static void snp_chunk(uint32_t k0, uint32_t k1, uint64_t c, uint32_t p, uint64_t t,
                      float* out) {
  uint32_t s0[SNP_LANES], s1[SNP_LANES], s2[SNP_LANES], s3[SNP_LANES];
  for (int j = 0; j < SNP_LANES; ++j) {
    s0[j] = (uint32_t)(c * SNP_LANES + (uint64_t)j); s1[j] = p;
    s2[j] = (uint32_t)t; s3[j] = (uint32_t)(t >> 32);
  }
  uint32_t ka = k0, kb = k1;
  for (int rnd = 0; rnd < 10; ++rnd) {
    if (rnd) { ka += 0x9E3779B9u; kb += 0xBB67AE85u; }
    for (int j = 0; j < SNP_LANES; ++j) {
      const uint64_t p0 = (uint64_t)0xD2511F53u * s0[j], p1 = (uint64_t)0xCD9E8D57u * s2[j];
      const uint32_t n0 = (uint32_t)(p1 >> 32) ^ s1[j] ^ ka;
      const uint32_t n2 = (uint32_t)(p0 >> 32) ^ s3[j] ^ kb;
      s1[j] = (uint32_t)p1; s3[j] = (uint32_t)p0; s0[j] = n0; s2[j] = n2;
    }
  }
  for (int j = 0; j < SNP_LANES; ++j) s3[j] |= (s0[j] | s1[j] | s2[j] | s3[j]) == 0u;
  for (int n = 0; n < SNP_PAIRS; ++n) {
    float* cs = out + 2 * n * SNP_LANES;
    float* sn = cs + SNP_LANES;
    for (int j = 0; j < SNP_LANES; ++j) {
      uint32_t w[2];
      for (int o = 0; o < 2; ++o) { /* xoshiro128++ */
        w[o] = snp_rotl(s0[j] + s3[j], 7) + s0[j];
        const uint32_t sh = s1[j] << 9;
        s2[j] ^= s0[j]; s3[j] ^= s1[j]; s1[j] ^= s2[j]; s0[j] ^= s3[j];
        s2[j] ^= sh; s3[j] = snp_rotl(s3[j], 11);
      }
      /* ln u = k ln 2 + s P(s^2), u = m 2^k (m > sqrt 2: m / 2, k + 1), s = (m - 1)/(m + 1) */
      const float u = ((float)(int32_t)(w[0] >> 9) + 0.5f) * 0x1p-23f;
      uint32_t ub;
      memcpy(&ub, &u, sizeof ub);
      uint32_t mb = (ub & 0x007FFFFFu) | 0x3F800000u;
      const uint32_t big = mb > 0x3FB504F3u;
      mb -= big << 23;
      float m;
      memcpy(&m, &mb, sizeof m);
      const float k = (float)((int32_t)(ub >> 23) - 127 + (int32_t)big);
      const float s = (m - 1.0f) / (m + 1.0f), z = s * s;
      const float rho = sqrtf(-2.0f * (k * SNP_LN2 + s * snp_h5(z, SNP_LOG)));
      /* sin and cos of 2 pi v: q = floor(4 v + 1/2), phi = 2 pi (v - q / 4), Taylor in phi^2,
         turned by q quarter turns */
      const uint32_t hv = w[1] >> 9, q = (hv + 0x100000u) >> 21;
      const float v = ((float)(int32_t)hv + 0.5f) * 0x1p-23f;
      const float phi = SNP_TWO_PI * (v - (float)(int32_t)q * 0.25f), y = phi * phi;
      const float S = snp_h5(y, SNP_SIN) * phi, C = snp_h5(y, SNP_COS);
      const uint32_t odd = q & 1u, neg_sin = (q >> 1) & 1u, neg_cos = (q ^ (q >> 1)) & 1u;
      const float a = odd ? C : S, b = odd ? S : C;
      cs[j] = rho * (neg_cos ? -b : b);
      sn[j] = rho * (neg_sin ? -a : a);
    }
  }
}

/* the last chunk this thread drew (rows of one parameter ask for the same chunk in turn) */
static __thread struct {
  int valid;
  uint32_t k0, k1, p;
  uint64_t t, c;
  float eps[SNP_CHUNK];
} snp_last;

/* chunk c's normals, drawn or taken from this thread's last chunk */
static const float* snp_chunk_of(uint32_t k0, uint32_t k1, uint64_t c, uint32_t p,
                                 uint64_t t) {
  if (!(snp_last.valid && snp_last.k0 == k0 && snp_last.k1 == k1 && snp_last.p == p &&
        snp_last.t == t && snp_last.c == c)) {
    snp_chunk(k0, k1, c, p, t, snp_last.eps);
    snp_last.valid = 1;
    snp_last.k0 = k0; snp_last.k1 = k1; snp_last.p = p; snp_last.t = t; snp_last.c = c;
  }
  return snp_last.eps;
}

/* x[i] += sigma eps[t, p, e0 + i] for i < n under key (k0, k1); eps0 (not NULL): store the
   normals there instead (x unread) */
static void snp_add(float* x, float* eps0, int64_t e0, int64_t n, uint32_t k0, uint32_t k1,
                    uint32_t p, uint64_t t, float sigma) {
  const int64_t end = e0 + n;
  int64_t e = e0;
  while (e < end) {
    const uint64_t c = (uint64_t)e / SNP_CHUNK;
    const int64_t lim = end < (int64_t)(c + 1) * SNP_CHUNK ? end : (int64_t)(c + 1) * SNP_CHUNK;
    const float* src = snp_chunk_of(k0, k1, c, p, t) + (e - (int64_t)c * SNP_CHUNK);
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
