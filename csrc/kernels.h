// kernels.h: the CPU and CUDA entry points (plain C++, no pybind11, no CUDA headers).
#pragma once
#include <cstdint>

#include "step_math.h"

// Bumped whenever a signature the Python side calls changes; minidiff/_native.py checks it.
#define MINIDIFF_ABI_VERSION 3

namespace md {

// CPU (step_cpu.cpp): OpenMP over blocks of 4 elements; threads = 0 means all available.
void step_cpu(const StepArgs& a, int threads);
void normal_cpu(float* out, int64_t n, uint64_t seed, uint64_t step, int threads);
bool cpu_has_openmp();
int cpu_max_threads();

// CUDA (step_cuda.cu): launched on `stream` (a cudaStream_t as an integer), no synchronisation.
// Return nullptr on success, else the CUDA error string.
const char* step_cuda(const StepArgs& a, uintptr_t stream);
// The same with a.k, a.seed and a.step read from device memory when the kernel runs (a StepParams record).
const char* step_cuda_params(const StepArgs& a, const StepParams* params, uintptr_t stream);
const char* normal_cuda(float* out, int64_t n, uint64_t seed, uint64_t step, uintptr_t stream);

}  // namespace md
