// step_cuda.cu: the fused sampling step and the Philox normal generator on the GPU.
// Same arithmetic as the CPU (step_math.h); one thread handles one block of 4 elements (one Philox call),
// grid-stride loop, launched on the caller's stream; no synchronisation here. Compiled without fast-math
// and with --fmad=false (see CMakeLists.txt) so the GPU rounds like the CPU kernel the tests check.
#include <cuda_runtime.h>

#include "kernels.h"

namespace md {

static const int THREADS_PER_BLOCK = 256;
static const int64_t MAX_GRID = 65535;

static int grid_for(int64_t nblocks) {
    const int64_t g = (nblocks + THREADS_PER_BLOCK - 1) / THREADS_PER_BLOCK;
    return (int)(g < MAX_GRID ? g : MAX_GRID);
}

__global__ void step_kernel(StepArgs a) {
    const int64_t nblocks = (a.n + 3) / 4;
    for (int64_t b = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; b < nblocks; b += (int64_t)gridDim.x * blockDim.x)
        step_block(a, b);
}

__global__ void step_kernel_params(StepArgs a, const StepParams* p) {
    a.k = p->k;
    a.seed = p->seed;
    a.step = p->step;
    a.k.has_uncond = a.eps_u != nullptr;
    const int64_t nblocks = (a.n + 3) / 4;
    for (int64_t b = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; b < nblocks; b += (int64_t)gridDim.x * blockDim.x)
        step_block(a, b);
}

__global__ void normal_kernel(float* out, int64_t n, uint64_t seed, uint64_t step) {
    const int64_t nblocks = (n + 3) / 4;
    for (int64_t b = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; b < nblocks; b += (int64_t)gridDim.x * blockDim.x)
        normal_block(out, n, seed, step, b);
}

static const char* last_error() {
    const cudaError_t e = cudaGetLastError();
    return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}

const char* step_cuda(const StepArgs& a, uintptr_t stream) {
    if (a.n == 0) return nullptr;
    step_kernel<<<grid_for((a.n + 3) / 4), THREADS_PER_BLOCK, 0, (cudaStream_t)stream>>>(a);
    return last_error();
}

const char* step_cuda_params(const StepArgs& a, const StepParams* params, uintptr_t stream) {
    if (a.n == 0) return nullptr;
    step_kernel_params<<<grid_for((a.n + 3) / 4), THREADS_PER_BLOCK, 0, (cudaStream_t)stream>>>(a, params);
    return last_error();
}

const char* normal_cuda(float* out, int64_t n, uint64_t seed, uint64_t step, uintptr_t stream) {
    if (n == 0) return nullptr;
    normal_kernel<<<grid_for((n + 3) / 4), THREADS_PER_BLOCK, 0, (cudaStream_t)stream>>>(out, n, seed, step);
    return last_error();
}

}  // namespace md
