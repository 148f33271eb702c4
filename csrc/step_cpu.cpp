// step_cpu.cpp: the fused sampling step and the Philox normal generator on the CPU.
// The arithmetic lives in step_math.h (shared with step_cuda.cu); this file only loops. Work is split
// into chunks of CHUNK elements: OpenMP spreads the chunks over threads, and inside a chunk two simple
// loops (Philox normals into a small buffer, then the element-wise step) let the compiler vectorise.
// The noise depends on (seed, step, element index) only, so any thread count gives the same bits.
#include <algorithm>
#include <cstdlib>  // defines __GLIBC__ where glibc is the C library

#include "kernels.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace md {

bool cpu_has_openmp() {
#ifdef _OPENMP
    return true;
#else
    return false;
#endif
}

int cpu_max_threads() {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

static int resolve_threads(int threads) { return threads > 0 ? threads : cpu_max_threads(); }

// x86-64 builds get an AVX2 clone of the chunk loops (8 floats per instruction; no FMA, so the same
// rounding), picked at load time by the CPU; other targets compile the plain version.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__GLIBC__)  // needs ifunc
#define MD_CPU_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define MD_CPU_CLONES
#endif

static const int64_t CHUNK = 1024;                  // elements per chunk (a multiple of 4)
static const int64_t MIN_PARALLEL_CHUNKS = 8;       // below this, starting threads costs more than it saves

// Normals of elements [i0, i0 + m) (i0 a multiple of 4) into z[0 .. m), m <= CHUNK.
MD_CPU_CLONES static void normal_chunk(float* z, int64_t i0, int64_t m, uint64_t seed, uint64_t step) {
    const int64_t nfull = m / 4, block0 = i0 / 4;
#pragma omp simd
    for (int64_t b = 0; b < nfull; ++b) {
        const F32x4 g = philox_normal4(seed, step, (uint64_t)(block0 + b));
        z[4 * b + 0] = g.x[0];
        z[4 * b + 1] = g.x[1];
        z[4 * b + 2] = g.x[2];
        z[4 * b + 3] = g.x[3];
    }
    if (m % 4) normal_block(z - i0, i0 + m, seed, step, block0 + nfull);  // the last, partial block
}

static const float ZEROS[CHUNK] = {};             // the x0_prev of steps without one (its coefficient is 0 then)

MD_CPU_CLONES static void step_chunk(const StepArgs& a, int64_t i0, int64_t m) {
    alignas(64) float zbuf[CHUNK];
    const float* z = a.z ? a.z + i0 : zbuf;
    if (!a.z) {
        if (a.k.sigma != 0.0f) normal_chunk(zbuf, i0, m, a.seed, a.step);
        else std::fill(zbuf, zbuf + m, 0.0f);  // sigma = 0: no noise needed
    }
    const StepCoefs k = a.k;
    const float *x_t = a.x_t + i0, *eps_c = a.eps_c + i0, *eps_u = a.eps_u ? a.eps_u + i0 : nullptr;
    const float* x0p = a.x0_prev ? a.x0_prev + i0 : ZEROS;
    float *out = a.out + i0, *x0_out = a.x0_out ? a.x0_out + i0 : nullptr;
    // One loop per case so each vectorises (no per-element tests of loop-invariant flags).
    float x0;
    if (eps_u && x0_out) {
        for (int64_t j = 0; j < m; ++j) {
            out[j] = step_one(k, x_t[j], eps_c[j], eps_u[j], x0p[j], z[j], &x0);
            x0_out[j] = x0;
        }
    } else if (eps_u) {
        for (int64_t j = 0; j < m; ++j) out[j] = step_one(k, x_t[j], eps_c[j], eps_u[j], x0p[j], z[j], &x0);
    } else if (x0_out) {
        for (int64_t j = 0; j < m; ++j) {
            out[j] = step_one(k, x_t[j], eps_c[j], 0.0f, x0p[j], z[j], &x0);
            x0_out[j] = x0;
        }
    } else {
        for (int64_t j = 0; j < m; ++j) out[j] = step_one(k, x_t[j], eps_c[j], 0.0f, x0p[j], z[j], &x0);
    }
}

void step_cpu(const StepArgs& a, int threads) {
    const int64_t nchunks = (a.n + CHUNK - 1) / CHUNK;
    const int nt = resolve_threads(threads);
    (void)nt;
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1 && nchunks >= MIN_PARALLEL_CHUNKS)
    for (int64_t c = 0; c < nchunks; ++c) step_chunk(a, c * CHUNK, std::min(CHUNK, a.n - c * CHUNK));
}

void normal_cpu(float* out, int64_t n, uint64_t seed, uint64_t step, int threads) {
    const int64_t nchunks = (n + CHUNK - 1) / CHUNK;
    const int nt = resolve_threads(threads);
    (void)nt;
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1 && nchunks >= MIN_PARALLEL_CHUNKS)
    for (int64_t c = 0; c < nchunks; ++c) normal_chunk(out + c * CHUNK, c * CHUNK, std::min(CHUNK, n - c * CHUNK), seed, step);
}

}  // namespace md
