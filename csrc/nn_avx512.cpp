// nn_avx512.cpp: nn_isa.h compiled for avx512 (16 floats a vector; CMakeLists.txt sets this file's -m flags).
#include "nn_kernels.h"

namespace md {
namespace avx512 {
#define MD_VW 16
#define MD_ACC 24
#include "nn_isa.h"
}  // namespace avx512

const NNKernels nn_avx512 = {"avx512", MD_VW, MD_ACC, MD_CHAINS,
    avx512::silu_forward, avx512::silu_backward, avx512::gn_moments, avx512::gn_apply,
    avx512::gn_backward_sums, avx512::gn_backward_apply, avx512::conv_tiles, avx512::conv_wgrad,
    avx512::fma_loop, avx512::wino_input, avx512::wino_output, avx512::wino_dout, avx512::softmax_rows,
    avx512::softmax_backward_rows};
}  // namespace md
