// step_cpu.cpp: the fused sampling step and the Philox normal generator on the CPU.
// The arithmetic lives in step_math.h (shared with step_cuda.cu); this file only loops, with OpenMP.
// The noise depends on (seed, step, element index) only, so any thread count gives the same bits.
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

// Below this many blocks of 4 elements, starting threads costs more than it saves.
static const int64_t MIN_PARALLEL_BLOCKS = 2048;

void step_cpu(const StepArgs& a, int threads) {
    const int64_t nblocks = (a.n + 3) / 4;
    const int nt = resolve_threads(threads);
    (void)nt;
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1 && nblocks >= MIN_PARALLEL_BLOCKS)
    for (int64_t block = 0; block < nblocks; ++block) step_block(a, block);
}

void normal_cpu(float* out, int64_t n, uint64_t seed, uint64_t step, int threads) {
    const int64_t nblocks = (n + 3) / 4;
    const int nt = resolve_threads(threads);
    (void)nt;
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1 && nblocks >= MIN_PARALLEL_BLOCKS)
    for (int64_t block = 0; block < nblocks; ++block) normal_block(out, n, seed, step, block);
}

}  // namespace md
