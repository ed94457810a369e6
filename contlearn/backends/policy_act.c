/* PPO's acting step on the CPU: the policy MLP's mean on the few rows of one loop step and the
   action mean + std * noise, in one call (contlearn/backends/ppo_acting.py binds it; torch's
   path is three batched products and an addcmul, ~20 us of dispatch for ~0.2 MFLOP).

   PolicyActArgs holds what stays put for a rollout (checked once by the binding): per affine
   layer l its weights (R, dims[l + 1], dims[l]) and bias (R, dims[l + 1]), the rollout's noise
   (R, T, E, A) and std (R, A); a call passes one step's observations (R, E, dims[0]), the step
   t and the action (R, E, A) to write:
     h_0 = obs[r, e];  h_{l+1}[k] = act(b_l[r, k] + w_l[r, k, :] . h_l)  (no act on the last);
     action[r, e, a] = h_L[a] + std[r, a] * noise[r, t, e, a].
   act: 0 relu. Each dot product runs in 32 float lanes (fmaf) over blocks of 32, then blocks
   of 8 in the first 8 lanes, the lanes added in a fixed tree, the remainder by fmaf: the same
   bits with or without AVX2 (fmaf rounds once in both), whatever R and E. */

#include <math.h>
#include <stdint.h>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

#define CL_POLICY_MAX_LAYERS 8

typedef struct {
  int64_t R, E, T, layers, act;
  int64_t dims[CL_POLICY_MAX_LAYERS + 1];
  const float* weight[CL_POLICY_MAX_LAYERS];
  const float* bias[CL_POLICY_MAX_LAYERS];
  const float* noise;
  const float* std;
  float* scratch; /* 2 x the widest layer */
} PolicyActArgs;

int64_t cl_policy_act_args_size(void) { return (int64_t)sizeof(PolicyActArgs); }

static float lanes_total(const float* s) {
  return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
}

static float dot32(const float* w, const float* x, int64_t n) {
  int64_t i = 0;
  float s[8];
#if defined(__AVX2__) && defined(__FMA__)
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  for (; i + 32 <= n; i += 32) {
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i), _mm256_loadu_ps(x + i), a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 8), _mm256_loadu_ps(x + i + 8), a1);
    a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 16), _mm256_loadu_ps(x + i + 16), a2);
    a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 24), _mm256_loadu_ps(x + i + 24), a3);
  }
  for (; i + 8 <= n; i += 8)
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i), _mm256_loadu_ps(x + i), a0);
  _mm256_storeu_ps(s, _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
#else
  float a[32] = {0};
  for (; i + 32 <= n; i += 32)
    for (int l = 0; l < 32; ++l) a[l] = fmaf(w[i + l], x[i + l], a[l]);
  for (; i + 8 <= n; i += 8)
    for (int l = 0; l < 8; ++l) a[l] = fmaf(w[i + l], x[i + l], a[l]);
  for (int l = 0; l < 8; ++l) s[l] = (a[l] + a[8 + l]) + (a[16 + l] + a[24 + l]);
#endif
  float acc = lanes_total(s);
  for (; i < n; ++i) acc = fmaf(w[i], x[i], acc);
  return acc;
}

void cl_policy_act(const PolicyActArgs* p, const float* obs, int64_t t, float* action) {
  const int64_t L = p->layers, D = p->dims[0], A = p->dims[L];
  int64_t widest = 0;
  for (int64_t l = 1; l <= L; ++l) widest = p->dims[l] > widest ? p->dims[l] : widest;
  for (int64_t r = 0; r < p->R; ++r) {
    for (int64_t e = 0; e < p->E; ++e) {
      const float* in = obs + (r * p->E + e) * D;
      float* out = p->scratch;
      for (int64_t l = 0; l < L; ++l) {
        const int64_t K = p->dims[l + 1], H = p->dims[l];
        const float* w = p->weight[l] + r * K * H;
        const float* b = p->bias[l] + r * K;
        const int last = l == L - 1;
        for (int64_t k = 0; k < K; ++k) {
          const float z = b[k] + dot32(w + k * H, in, H);
          out[k] = !last && p->act == 0 && !(z > 0.0f) && z == z ? 0.0f : z;
        }
        in = out;
        out = out == p->scratch ? p->scratch + widest : p->scratch;
      }
      const float* z = p->noise + ((r * p->T + t) * p->E + e) * A;
      const float* sd = p->std + r * A;
      float* a = action + (r * p->E + e) * A;
      for (int64_t j = 0; j < A; ++j) a[j] = in[j] + sd[j] * z[j];
    }
  }
}
