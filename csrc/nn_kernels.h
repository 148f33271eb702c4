// nn_kernels.h: the network's CPU kernels (3x3 convolution, matrix product, GroupNorm with SiLU, SiLU, attention),
// float32, NHWC.
// nn_cpu.cpp holds the drivers (argument layout, padding, weight packing, threads); nn_isa.h the inner loops,
// compiled once per instruction set (nn_avx512.cpp, nn_avx2.cpp, nn_base.cpp). The readable reference of each
// kernel is the function of minidiff/layers.py (or unet.py) named beside it; minidiff/fast/cpu.py registers the
// kernels for those functions, and tests/test_kernels.py checks that each equals its reference.
#pragma once
#include <cstdint>

namespace md {

// Where the rows of output pixel q are: q counts pixels (img, a, b) of a (Hq, Wq) grid per image, and
// row(q) = base + img * s_img + a * s_row + b * s_col. A stride-1 convolution's input rows on the padded grid
// (nn_cpu.cpp, Grid): (Hq, Wq) = (H, W), s_img = (H + 1)(W + 1), s_row = W + 1, s_col = 1, base = the leading
// rows m; stride 2: s_row = 2 (W + 1), s_col = 2; the output rows of the pixels in order: s_img = Hq Wq,
// s_row = Wq, s_col = 1; plain rows (a matrix product): Hq = 1, Wq = s_img = rows, s_col = 1.
struct PixelMap {
    int64_t Hq, Wq, base, s_img, s_row, s_col;
};

// A sum of T shifted matrix products, out[orow(q)] = sum_t xbuf[xrow(q) + off[t]] @ w[t] (+ bias): the 3x3
// convolution over a shared-padding grid (T = 9: output pixel q reads around input row xrow(q); the stride-2
// convolution's input gradient is four such sums of 1, 2, 2 and 4 taps, one per parity of the pixel's row and
// column), or a plain matrix product (T = 1).
// Lane groups: with G = 2 each vector holds 8 (AVX-512) output channels x 2 consecutive input channels, so an
// output channel count that is a multiple of half a vector (24 on AVX-512) fills whole vectors; the pairs are
// added up when the tile is written.
struct ConvTask {
    const float* xbuf;          // input rows, ldx floats apart; K channels, zero up to K rounded up to G
    int64_t ldx;
    PixelMap xrow, orow;        // input and output row of each output pixel
    int64_t P, K;               // output pixels, input channels (a multiple of G)
    const float* w;             // (T, K / G, NC, G) packed weights: w[t, kk, c, j] = weight of input kk G + j, output c
    int64_t NC, N;              // output channels rounded up to a vector's VW / G, and as they are
    int G;                      // input channels per lane group: 1 or 2
    int T;
    int64_t off[9];             // row offset of each tap
    const float* bias;          // (N,), or (B, N) per image (bias_stride N), or null
    int64_t bias_stride;        // 0: one bias for all images
    const float* residual;      // added to the output (same layout as out), or null
    float* out;                 // output rows of N floats
    int64_t rows_per_tile;      // rows a work item covers (the instruction set's accumulator count)
    int nblocks;                // the NC G / VW vectors of a packed row go in blocks of block_vectors[i] from
    int block_start[64], block_vectors[64];   // block_start[i]
};

// The weight gradient of that product: dw[t, k, n] = sum over pixels q of xbuf[xrow(q) + off[t], k]
// dy[dyrow(q) + voff[t], n]: K values of the "x" side broadcast, times vectors of the "dy" side's N. The kernels'
// weight gradient is this with x = the layer's input and dy = its output gradient (voff = 0), or the other way
// round (x = dy, dy = the input, off = 0: the sum's transpose), whichever wastes fewer lanes.
struct WGradTask {
    const float* xbuf;          // broadcast side: rows of ldx floats
    int64_t ldx;
    PixelMap xrow, dyrow;
    int64_t K;
    const float* dy;            // vector side: rows of ldy floats (whole vectors are read: rows past the last one
    int64_t ldy;                // must exist)
    int64_t N, NP;              // dy's channels, rounded up to the vector width
    int T;
    int64_t off[9], voff[9];    // each tap's row offset on either side
    int nblocks;
    int block_start[64], block_vectors[64];
};

// One instruction set's inner loops (nn_isa.h).
struct NNKernels {
    const char* name;
    int vw;                     // floats per vector
    int acc;                    // accumulator vectors in a micro-kernel tile
    int chains;                 // independent FMA chains in fma_loop
    void (*silu_forward)(const float* x, float* y, int64_t n);
    void (*silu_backward)(const float* x, const float* dout, float* dx, int64_t n);
    void (*gn_moments)(const float* x, int64_t n, int64_t L, double* s1, double* s2);
    void (*gn_apply)(const float* x, const float* a, const float* b, int64_t n, int64_t L, int silu, float* y);
    void (*gn_backward_sums)(const float* x, const float* dout, const float* a, const float* b, int64_t n,
                             int64_t L, int silu, double* s1, double* s2, float* dh_out);
    void (*gn_backward_apply)(const float* x, const float* dh, const float* A, const float* Bx, const float* Cc,
                              int64_t n, int64_t L, float* dx);
    void (*conv_tiles)(const ConvTask& a, int64_t tile0, int64_t tile1);
    void (*conv_wgrad)(const WGradTask& a, int64_t q0, int64_t q1, float* dw, int add);   // add 0: dw written
    float (*fma_loop)(int64_t iters);   // `chains` independent FMA chains (the peak)
    void (*wino_input)(int m, const float* x, int64_t xs, int64_t H, int64_t W, int64_t C, int64_t ldv, int64_t q0,
                       int64_t n, int64_t ldt, const float* zeros, float* V);
    void (*wino_output)(int m, const float* M, int64_t ldt, int64_t H, int64_t W, int64_t N, int64_t q0, int64_t n,
                        const float* bias, int64_t bias_stride, const float* residual, float* out);
    void (*wino_dout)(int m, const float* dy, int64_t ldd, int64_t H, int64_t W, int64_t N, int64_t ldm, int64_t q0,
                      int64_t n, int64_t ldt, const float* zeros, float* D);
    void (*softmax_rows)(float* s, int64_t rows, int64_t n, int64_t ld, float scale);
    void (*softmax_backward_rows)(const float* a, float* d, int64_t rows, int64_t n, int64_t ld, float scale);
};

extern const NNKernels nn_base;
#if defined(MD_HAVE_X86_ISAS)
extern const NNKernels nn_avx2, nn_avx512;
#endif

// ---- drivers (nn_cpu.cpp): OpenMP over images, row tiles or row ranges; all threads of the machine.
const char* cpu_isa();                         // the instruction set in use
bool set_cpu_isa(const char* name);            // "avx512", "avx2", "base" or "auto"; false if the CPU lacks it
const char* const* cpu_isas_available(int* n); // the ones this CPU can run, best first
// GFLOP/s of an instruction set's FMAs on `threads` threads (0: all), registers only: the peak the kernels
// are measured against; negative if the CPU lacks that instruction set
double fma_peak_gflops(const char* name, int threads);

void silu_forward(const float* x, float* y, int64_t n);
void silu_backward(const float* x, const float* dout, float* dx, int64_t n);
// x (B, npix, C) -> y, mean (B, C), rstd (B, C)
void group_norm_forward(const float* x, const float* gamma, const float* beta, int64_t B, int64_t npix, int64_t C,
                        int64_t G, float eps, int silu, float* y, float* mean, float* rstd);
// -> dx (B, npix, C), dgamma (C), dbeta (C) (written, not accumulated)
void group_norm_backward(const float* dout, const float* x, const float* gamma, const float* beta, const float* mean,
                         const float* rstd, int64_t B, int64_t npix, int64_t C, int64_t G, int silu, float* dx,
                         float* dgamma, float* dbeta);
// x (B, H, W, K), weight (N, K, 3, 3), bias (N,) (bias_stride 0) or (B, N) (bias_stride N) or null, residual
// (B, Ho, Wo, N) or null -> out (B, Ho, Wo, N) = conv(x) + bias (+ residual); padding 1, stride 1 or 2
// (Ho = (H - 1) / stride + 1, Wo likewise)
void conv3x3_forward(const float* x, const float* weight, const float* bias, int64_t bias_stride,
                     const float* residual, int64_t B, int64_t H, int64_t W, int64_t K, int64_t N, int stride,
                     float* out);
// dout (B, Ho, Wo, N; pixels ldd >= N floats apart) -> dx (B, H, W, K) (written) and dweight (N, K, 3, 3)
// (written)
void conv3x3_backward(const float* x, const float* weight, const float* dout, int64_t ldd, int64_t B, int64_t H,
                      int64_t W, int64_t K, int64_t N, int stride, float* dx, float* dweight);
// Whether the convolutions Winograd suits (winograd_tile) use it, forward, input gradient and (for fewer shapes)
// weight gradient (the default), or all take the direct sum of 9 taps; returns the previous setting (for tests and
// benchmarks)
bool set_conv_winograd(bool on);
// the Winograd tile conv3x3_forward of these sizes (and conv3x3_backward's dx with K and N swapped) takes now, with
// the instruction set in use: 4 (F(4x4, 3x3)), 2 (F(2x2, 3x3)) or 0 (the direct sum)
int winograd_tile(int64_t H, int64_t W, int64_t K, int64_t N, int stride);
// the tile conv3x3_backward's weight gradient of these sizes takes (fewer shapes: nn_cpu.cpp)
int winograd_wgrad_tile(int64_t H, int64_t W, int64_t K, int64_t N, int stride);
// x (M, K), weight (N, K), bias (N,) or null -> out (M, N) = x weight^T + bias
void linear_forward(const float* x, const float* weight, const float* bias, int64_t M, int64_t K, int64_t N, float* out);
// dout (M, N; rows ldd >= N floats apart) -> dx (M, K) = dout weight, dweight (N, K) = dout^T x (both written)
void linear_backward(const float* x, const float* weight, const float* dout, int64_t ldd, int64_t M, int64_t K,
                     int64_t N, float* dx, float* dweight);

// ---- attention (nn_cpu.cpp), image by image: q (B, N, C), k and v (B, M, C)
// -> o (B, N, C) = A v and a = A (B, N, M) = softmax(q k^T scale) over the keys (unet.attention)
void attention_forward(const float* q, const float* k, const float* v, int64_t B, int64_t N, int64_t M, int64_t C,
                       float scale, float* o, float* a);
// a, dout (B, N, C) -> dq (B, N, C), dk and dv (B, M, C), all written (unet.attention_backward)
void attention_backward(const float* q, const float* k, const float* v, const float* a, const float* dout, int64_t B,
                        int64_t N, int64_t M, int64_t C, float scale, float* dq, float* dk, float* dv);

// ---- copies and sums (nn_cpu.cpp)
// a (M, Ca), b (M, Cb) -> out (M, Ca + Cb)
void concat_channels(const float* a, const float* b, int64_t M, int64_t Ca, int64_t Cb, float* out);
// x (B, H, W, C) -> out (B, 2H, 2W, C), each pixel copied to its 2 x 2 block; and the adjoint, dout (B, 2H, 2W, C)
// -> dx (B, H, W, C), each pixel the sum of its block
void upsample2x(const float* x, int64_t B, int64_t H, int64_t W, int64_t C, float* out);
void upsample2x_backward(const float* dout, int64_t B, int64_t H, int64_t W, int64_t C, float* dx);
// x (B, P, C; rows ld >= C floats apart) -> (B, C) per image, or (C,)
void pixel_sum(const float* x, int64_t ld, int64_t B, int64_t P, int64_t C, int per_image, float* out);

// ---- optimizer (nn_cpu.cpp), in place over n floats: optim.adam_update, optim.ema_update
void adam_update(float* p, const float* g, float* m, float* v, int64_t n, float lr, float beta1, float beta2,
                 float eps, float bias_correction1, float bias_correction2, float weight_decay);
void ema_update(float* e, const float* p, int64_t n, float decay);

}  // namespace md
