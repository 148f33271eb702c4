// nn_base.cpp: nn_isa.h compiled for base (4 floats a vector, tiles of 10 accumulators: nn_isa.h says why;
// CMakeLists.txt sets this file's -m flags).
#include "nn_kernels.h"

namespace md {
namespace base {
#define MD_VW 4
#define MD_ACC 10
#include "nn_isa.h"
}  // namespace base

const NNKernels nn_base = {"base", MD_VW, MD_ACC, MD_CHAINS,
    base::silu_forward, base::silu_backward, base::gn_moments, base::gn_apply, base::gn_backward_sums,
    base::gn_backward_apply, base::conv_tiles, base::conv_wgrad, base::fma_loop,
    base::wino_input, base::wino_output, base::wino_dout, base::softmax_rows, base::softmax_backward_rows};
}  // namespace md
