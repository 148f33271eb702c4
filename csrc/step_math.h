// step_math.h: the arithmetic of one sampling step, shared by the C++ (step_cpu.cpp) and CUDA
// (step_cuda.cu) kernels, so the CPU tests verify the very functions the GPU runs.
// The readable NumPy reference of every function here is minidiff/philox.py and minidiff/step.py.
//
// 1. Philox4x32-10 (Salmon, Moraes, Dror, Shaw, "Parallel random numbers: as easy as 1, 2, 3", SC 2011),
//    checked against Random123's known-answer vectors (tests/test_philox.py).
//      key     = (seed lo32, seed hi32)                       64-bit seed
//      counter = (block lo32, block hi32, step lo32, step hi32)
//    Element i of a noise tensor uses block i / 4 and output lane i % 4, so the noise depends only on
//    (seed, step, i): the same for any thread count, on CPU and GPU.
// 2. uint32 -> uniform in (0, 1]:  u = ((x >> 8) + 1) * 2^-24. The top 24 bits are exact in float32,
//    u is never 0 (so log(u) is finite) and 1 is reachable (log(1) = 0, fine).
// 3. Box-Muller (float32, no fast-math) on lanes (0, 1) and (2, 3):
//      r = sqrt(-2 log u_even), theta = 2 pi u_odd, z_even = r cos(theta), z_odd = r sin(theta).
//    log, sin and cos are our own branch-free float32 functions below (about 1 ulp, Cephes polynomials),
//    identical on CPU and GPU and vectorisable on the CPU. minidiff/philox.py computes the same formula
//    in float64 and rounds once; this float32 version stays within ~2 ulps of r (< 1e-6, since |z| < 6).
// Both kernels are compiled without fast-math and without FMA contraction (-ffp-contract=off,
// nvcc --fmad=false), so the CPU and the GPU round every operation here the same way.
// 4. The fused step (see step_one below; DDPM eq. 15 / DDIM eq. 12 / DPM-Solver++(2M) Algorithm 2 and the
//    coefficients from minidiff/step.py's ddpm_coefficients / ddim_coefficients / dpmpp_2m_coefficients).
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define MD_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__)
#define MD_HD inline __attribute__((always_inline))  // inlined into the CPU loops, which then vectorise
#else
#define MD_HD inline
#endif

namespace md {

// Philox4x32 multipliers and Weyl key increments (Salmon et al. 2011, Random123 philox.h).
constexpr uint32_t PHILOX_M0 = 0xD2511F53u;
constexpr uint32_t PHILOX_M1 = 0xCD9E8D57u;
constexpr uint32_t PHILOX_W0 = 0x9E3779B9u;  // golden ratio
constexpr uint32_t PHILOX_W1 = 0xBB67AE85u;  // sqrt(3) - 1

struct U32x4 { uint32_t x[4]; };
struct F32x4 { float x[4]; };

// One Philox round: two 32x32 -> 64-bit multiplies, the high halves xored with the other words and the key.
MD_HD void philox_round(uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3, uint32_t k0, uint32_t k1) {
    const uint64_t p0 = (uint64_t)PHILOX_M0 * c0;
    const uint64_t p1 = (uint64_t)PHILOX_M1 * c2;
    const uint32_t hi0 = (uint32_t)(p0 >> 32), lo0 = (uint32_t)p0;
    const uint32_t hi1 = (uint32_t)(p1 >> 32), lo1 = (uint32_t)p1;
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
}

// Philox4x32-10: ten rounds, the key bumped by (W0, W1) between rounds.
MD_HD U32x4 philox4x32_10(U32x4 c, uint32_t k0, uint32_t k1) {
    uint32_t c0 = c.x[0], c1 = c.x[1], c2 = c.x[2], c3 = c.x[3];
    philox_round(c0, c1, c2, c3, k0, k1);
#if defined(__CUDACC__)
#pragma unroll
#elif defined(__GNUC__) && !defined(__clang__)
#pragma GCC unroll 9
#endif
    for (int r = 1; r < 10; ++r) {
        k0 += PHILOX_W0;
        k1 += PHILOX_W1;
        philox_round(c0, c1, c2, c3, k0, k1);
    }
    U32x4 out;
    out.x[0] = c0; out.x[1] = c1; out.x[2] = c2; out.x[3] = c3;
    return out;
}

// uint32 -> float32 uniform in (0, 1]: (top 24 bits + 1) / 2^24, exact in float32.
MD_HD float uint_to_uniform(uint32_t x) {
    return (float)((x >> 8) + 1u) * (1.0f / 16777216.0f);
}

// Bit casts (for the exponent split in md_logf).
MD_HD uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
    return __float_as_uint(f);
#else
    uint32_t u;
    std::memcpy(&u, &f, sizeof u);
    return u;
#endif
}
MD_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
    return __uint_as_float(u);
#else
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
#endif
}

// Natural log of a normal positive float32 (here u in [2^-24, 1]), branch-free so the CPU loop vectorises;
// the same code runs on the GPU. Cephes logf (S. Moshier): u = m 2^e, m in [sqrt(1/2), sqrt(2)),
// log u = e ln 2 + log1p(m - 1) with a degree-9 polynomial; peak relative error ~8e-8 (about 1 ulp).
MD_HD float md_logf(float u) {
    const uint32_t bits = float_bits(u);
    float e = (float)((int)(bits >> 23) - 126);              // u = m 2^e, m in [0.5, 1)
    float m = bits_float((bits & 0x007FFFFFu) | 0x3F000000u);
    // move m to [sqrt(1/2), sqrt(2)): if m < sqrt(1/2), m = 2m and e = e - 1 (arithmetic, not a branch)
    const float small = m < 0.70710678118654752440f ? 1.0f : 0.0f;
    e = e - small;
    m = m + m * small - 1.0f;
    const float z = m * m;
    float y = 7.0376836292e-2f;
    y = y * m - 1.1514610310e-1f;
    y = y * m + 1.1676998740e-1f;
    y = y * m - 1.2420140846e-1f;
    y = y * m + 1.4249322787e-1f;
    y = y * m - 1.6668057665e-1f;
    y = y * m + 2.0000714765e-1f;
    y = y * m - 2.4999993993e-1f;
    y = y * m + 3.3333331174e-1f;
    y = y * m * z;
    y += -2.12194440e-4f * e;                                // ln 2 = 0.693359375 - 2.12194440e-4 (two parts)
    y += -0.5f * z;
    return (m + y) + 0.693359375f * e;
}

// sin(2 pi u) and cos(2 pi u) for u in [0, 1], branch-free. Exact quadrant reduction: q = round(4 u),
// f = u - q/4 is exact (Sterbenz), so the angle 2 pi f in [-pi/4, pi/4] carries no reduction error;
// Cephes sinf/cosf polynomials there (about 1 ulp), then rotate by q quarter turns.
MD_HD void md_sincos2pi(float u, float* s_out, float* c_out) {
    const float q = (float)(uint32_t)(4.0f * u + 0.5f);      // nearest quarter turn, 0..4
    const float a = (u - 0.25f * q) * 6.28318530717958647692f;
    const float z = a * a;
    float s = -1.9515295891e-4f;
    s = s * z + 8.3321608736e-3f;
    s = s * z - 1.6666654611e-1f;
    s = a + a * z * s;
    float c = 2.443315711809948e-5f;
    c = c * z - 1.388731625493765e-3f;
    c = c * z + 4.166664568298827e-2f;
    c = z * z * c - 0.5f * z + 1.0f;
    // rotate by q quarter turns: odd q swaps sin and cos; sin changes sign for q & 2, cos for (q + 1) & 2
    const uint32_t qi = (uint32_t)q;
    const bool odd = (qi & 1u) != 0;
    const float sq = odd ? c : s, cq = odd ? s : c;
    *s_out = bits_float(float_bits(sq) ^ ((qi & 2u) << 30));
    *c_out = bits_float(float_bits(cq) ^ (((qi + 1u) & 2u) << 30));
}

// Box-Muller: two uniforms in (0, 1] -> two independent standard normals (r cos theta, r sin theta).
MD_HD void box_muller(float u_r, float u_theta, float* z_cos, float* z_sin) {
    const float r = sqrtf(-2.0f * md_logf(u_r));
    float s, c;
    md_sincos2pi(u_theta, &s, &c);
    *z_cos = r * c;
    *z_sin = r * s;
}

// The four standard normals of block `block` (elements 4*block .. 4*block+3) for (seed, step).
MD_HD F32x4 philox_normal4(uint64_t seed, uint64_t step, uint64_t block) {
    U32x4 c;
    c.x[0] = (uint32_t)block;
    c.x[1] = (uint32_t)(block >> 32);
    c.x[2] = (uint32_t)step;
    c.x[3] = (uint32_t)(step >> 32);
    const U32x4 b = philox4x32_10(c, (uint32_t)seed, (uint32_t)(seed >> 32));
    F32x4 z;
    box_muller(uint_to_uniform(b.x[0]), uint_to_uniform(b.x[1]), &z.x[0], &z.x[1]);
    box_muller(uint_to_uniform(b.x[2]), uint_to_uniform(b.x[3]), &z.x[2], &z.x[3]);
    return z;
}

// Scalar coefficients of one step (float32, as the kernel computes), see minidiff/step.py.
struct StepCoefs {
    float a;         // 1 / sqrt(alpha-bar_t)
    float b;         // sqrt(1 / alpha-bar_t - 1)
    float c_x0;      // weight of the predicted x_0
    float c_x0prev;  // weight of the previous step's x_0 (DPM-Solver++(2M) second order; 0 otherwise)
    float c_xt;      // weight of x_t
    float c_eps;     // weight of eps
    float sigma;     // standard deviation of the added noise
    float guidance;  // w of classifier-free guidance (used only with eps_uncond)
    int clip;        // clamp the predicted x_0 to [-1, 1]
    int has_uncond;  // eps_uncond given
};

// One element of the fused step; eps_u is read only when k.has_uncond, x0_prev is 0 when absent.
//   eps    = eps_u + w (eps_c - eps_u)                     classifier-free guidance (Ho & Salimans)
//   x0     = a x_t - b eps  [clamped to [-1, 1]]           DDPM eq. 15, DDIM eq. 12's "predicted x_0"
//   eps    = (a x_t - x0) / b   only when clipped and guided with w > 1: eps re-derived from the clipped x_0
//   x_prev = c_x0 x0 + c_x0prev x0_prev + c_xt x_t + c_eps eps + sigma z
//                                                          DDPM eq. 7 / DDIM eq. 12 / DPM-Solver++ Algorithm 2
MD_HD float step_one(const StepCoefs& k, float x_t, float eps_c, float eps_u, float x0_prev, float z, float* x0_out) {
    float eps = k.has_uncond ? eps_u + k.guidance * (eps_c - eps_u) : eps_c;
    float x0 = k.a * x_t - k.b * eps;
    if (k.clip) {
        x0 = x0 < -1.0f ? -1.0f : (x0 > 1.0f ? 1.0f : x0);  // like np.clip: NaN stays NaN
        if (k.has_uncond && k.guidance > 1.0f) eps = (k.a * x_t - x0) / k.b;
    }
    *x0_out = x0;
    return k.c_x0 * x0 + k.c_x0prev * x0_prev + k.c_xt * x_t + k.c_eps * eps + k.sigma * z;
}

// Pointers and sizes of one fused step. eps_u, z, x0_prev and x0_out may be null: no guidance, generate z with
// Philox from (seed, step), no previous x_0 (read as 0), do not write x_0. out may alias x_t (each element is
// read before it is written).
struct StepArgs {
    const float* x_t;    // (n,)
    const float* eps_c;  // (n,) conditional (or only) noise prediction
    const float* eps_u;  // (n,) unconditional noise prediction, or null
    const float* z;      // (n,) given noise, or null
    const float* x0_prev;  // (n,) x_0 predicted by the previous step (DPM-Solver++(2M)), or null
    float* out;          // (n,) x_{t-1}
    float* x0_out;       // (n,) predicted x_0, or null
    int64_t n;
    uint64_t seed, step;
    StepCoefs k;
};

// The scalars of a step as they lie in device memory for a captured sampling step (a CUDA graph bakes kernel
// arguments in, so a graph replayed for every timestep reads them from here; minidiff/step.py's STEP_PARAMS is
// the same record, checked against sizeof and the offsets by tests/test_native.py).
struct StepParams {
    StepCoefs k;
    uint64_t seed, step;
};

// Elements 4*block .. 4*block+3 of the step (the work of one CPU loop iteration or one CUDA thread).
MD_HD void step_block(const StepArgs& a, int64_t block) {
    F32x4 g = {{0.0f, 0.0f, 0.0f, 0.0f}};
    if (a.z == nullptr && a.k.sigma != 0.0f) g = philox_normal4(a.seed, a.step, (uint64_t)block);  // sigma = 0: no noise needed
    const int64_t i0 = 4 * block;
    const int m = a.n - i0 < 4 ? (int)(a.n - i0) : 4;
    for (int j = 0; j < m; ++j) {
        const int64_t i = i0 + j;
        float x0;
        const float z = a.z ? a.z[i] : g.x[j];
        const float x_prev = step_one(a.k, a.x_t[i], a.eps_c[i], a.eps_u ? a.eps_u[i] : 0.0f,
                                      a.x0_prev ? a.x0_prev[i] : 0.0f, z, &x0);
        a.out[i] = x_prev;
        if (a.x0_out) a.x0_out[i] = x0;
    }
}

// Elements 4*block .. 4*block+3 of philox_normal(seed, step, n).
MD_HD void normal_block(float* out, int64_t n, uint64_t seed, uint64_t step, int64_t block) {
    const F32x4 g = philox_normal4(seed, step, (uint64_t)block);
    const int64_t i0 = 4 * block;
    const int m = n - i0 < 4 ? (int)(n - i0) : 4;
    for (int j = 0; j < m; ++j) out[i0 + j] = g.x[j];
}

}  // namespace md
