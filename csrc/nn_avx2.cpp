// nn_avx2.cpp: nn_isa.h compiled for avx2 (8 floats a vector; CMakeLists.txt sets this file's -m flags).
#include "nn_kernels.h"

namespace md {
namespace avx2 {
#define MD_VW 8
#define MD_ACC 12
#include "nn_isa.h"
}  // namespace avx2

const NNKernels nn_avx2 = {"avx2", MD_VW, MD_ACC, MD_CHAINS,
    avx2::silu_forward, avx2::silu_backward, avx2::gn_moments, avx2::gn_apply, avx2::gn_backward_sums,
    avx2::gn_backward_apply, avx2::conv_tiles, avx2::conv_wgrad, avx2::fma_loop,
    avx2::wino_input, avx2::wino_output, avx2::wino_dout, avx2::softmax_rows, avx2::softmax_backward_rows};
}  // namespace md
