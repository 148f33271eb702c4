// nn_cpu.cpp: drivers of the network's CPU kernels: they lay out the arguments (padding, weight packing),
// split the work over OpenMP threads and call one instruction set's inner loops (nn_isa.h), chosen when the
// module loads from what the CPU supports (set_cpu_isa overrides it, for tests and benchmarks).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <vector>

#include "nn_kernels.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace md {

// ------------------------------------------------------------------------------------------------ instruction set
static bool cpu_has(const char* name) {
#if defined(MD_HAVE_X86_ISAS)
    __builtin_cpu_init();
    if (!std::strcmp(name, "avx512"))                // every -m flag nn_avx512.cpp is compiled with (CMakeLists.txt)
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
               __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    if (!std::strcmp(name, "avx2")) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
    return !std::strcmp(name, "base");
}

static const NNKernels* by_name(const char* name) {
#if defined(MD_HAVE_X86_ISAS)
    if (!std::strcmp(name, "avx512")) return &nn_avx512;
    if (!std::strcmp(name, "avx2")) return &nn_avx2;
#endif
    if (!std::strcmp(name, "base")) return &nn_base;
    return nullptr;
}

static const char* const ISAS[] = {"avx512", "avx2", "base"};

static const NNKernels* best() {
    for (const char* name : ISAS)
        if (by_name(name) && cpu_has(name)) return by_name(name);
    return &nn_base;
}

static const NNKernels* isa = best();

const char* cpu_isa() { return isa->name; }

bool set_cpu_isa(const char* name) {
    if (!std::strcmp(name, "auto")) { isa = best(); return true; }
    if (!by_name(name) || !cpu_has(name)) return false;
    isa = by_name(name);
    return true;
}

const char* const* cpu_isas_available(int* n) {
    static const char* list[3];
    static int count = -1;
    if (count < 0) {
        count = 0;
        for (const char* name : ISAS)
            if (by_name(name) && cpu_has(name)) list[count++] = name;
    }
    *n = count;
    return list;
}

double fma_peak_gflops(const char* name, int threads) {
    const NNKernels* k = by_name(name);
    if (!k || !cpu_has(name)) return -1.0;
#ifdef _OPENMP
    const int nt = threads > 0 ? threads : omp_get_max_threads();
#else
    const int nt = 1;
#endif
    const int64_t iters = 1 << 20;
    double best = 0.0;
    for (int rep = 0; rep < 5; ++rep) {                 // the best of 5 (another program may hold a core)
        volatile float sink = 0.0f;
        const auto t0 = std::chrono::steady_clock::now();
#pragma omp parallel num_threads(nt)
        { const float r = k->fma_loop(iters); if (r == 12345.0f) sink = r; }
        const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        const double gflops = 2.0 * k->vw * k->chains * (double)iters * nt / dt * 1e-9;
        if (gflops > best) best = gflops;
        (void)sink;
    }
    return best;
}

// ------------------------------------------------------------------------------------------------ threads, scratch
static int num_threads() {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

// Run f(i0, i1, piece) on [0, n) cut into at most max_pieces() contiguous ranges ("pieces") that the threads take
// in turn (a few per thread: when another program holds a core for a while, the other thread takes over its
// share instead of waiting); one piece when there are fewer than `min_per_thread` items per thread (starting
// threads would cost more). Partial sums go into one buffer per piece, added up in piece order afterwards: the
// result does not depend on which thread ran what (a resumed training run is bit for bit the same).
static int max_pieces() { return 4 * num_threads(); }

static int threads_for(int64_t n, int64_t min_per_thread) {
    int nt = num_threads();
    if (nt > 1 && n < min_per_thread * nt) nt = (int)(n / min_per_thread > 1 ? n / min_per_thread : 1);
    return nt;
}

// how many pieces parallel_ranges cuts [0, n) into
static int num_pieces(int64_t n, int64_t min_per_thread) {
    const int nt = threads_for(n, min_per_thread);
    return nt <= 1 ? 1 : (int)(n < 4 * nt ? n : 4 * nt);
}

template <class F>
static void parallel_ranges(int64_t n, int64_t min_per_thread, F f) {
    const int nt = threads_for(n, min_per_thread);
    if (nt <= 1) { f(0, n, 0); return; }
    const int64_t pieces = num_pieces(n, min_per_thread);
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
    for (int64_t i = 0; i < pieces; ++i) f(n * i / pieces, n * (i + 1) / pieces, (int)i);
}

// Buffers reused from call to call (a fresh allocation of several MB per call would fault its pages in every
// time); one set per calling thread.
struct Scratch {
    std::vector<float> xbuf, dybuf, wpack, wgrad, wsum, local_x, local_dy, wino_u, wino_v, wino_m, wino_z;
    std::vector<float> attn_w, attn_d, attn_t;
    float* get(std::vector<float>& v, size_t n) {
        if (v.size() < n) v.resize(n);
        return v.data();
    }
};
static thread_local Scratch scratch;

// ------------------------------------------------------------------------------------------------ SiLU
static const int64_t ELEMWISE_MIN = 1 << 15;   // elements per thread worth starting a thread for

void silu_forward(const float* x, float* y, int64_t n) {
    parallel_ranges(n, ELEMWISE_MIN, [&](int64_t i0, int64_t i1, int) { isa->silu_forward(x + i0, y + i0, i1 - i0); });
}

void silu_backward(const float* x, const float* dout, float* dx, int64_t n) {
    parallel_ranges(n, ELEMWISE_MIN, [&](int64_t i0, int64_t i1, int) {
        isa->silu_backward(x + i0, dout + i0, dx + i0, i1 - i0);
    });
}

// ------------------------------------------------------------------------------------------------ GroupNorm
// Per-channel coefficients are tiled to L = lcm(C, vw) floats, so the inner loops walk whole vectors.
static int64_t period(int64_t C, int64_t vw) {
    int64_t a = C, b = vw;
    while (b) { const int64_t t = a % b; a = b; b = t; }
    return C / a * vw;
}

static void tile_to(float* dst, const float* src, int64_t C, int64_t L) {
    for (int64_t j = 0; j < L; ++j) dst[j] = src[j % C];
}

// sums over the L positions of each channel, then over each group's channels
static void fold(const double* s, int64_t C, int64_t L, double* per_channel) {
    for (int64_t c = 0; c < C; ++c) per_channel[c] = 0.0;
    for (int64_t j = 0; j < L; ++j) per_channel[j % C] += s[j];
}

static void group_mean(const double* per_channel, int64_t C, int64_t G, double count, double* out) {
    const int64_t cg = C / G;
    for (int64_t g = 0; g < G; ++g) {
        double s = 0.0;
        for (int64_t c = g * cg; c < (g + 1) * cg; ++c) s += per_channel[c];
        for (int64_t c = g * cg; c < (g + 1) * cg; ++c) out[c] = s / count;
    }
}

void group_norm_forward(const float* x, const float* gamma, const float* beta, int64_t B, int64_t npix, int64_t C,
                        int64_t G, float eps, int silu, float* y, float* mean, float* rstd) {
    const int64_t L = period(C, isa->vw), n = npix * C;
    const double count = (double)npix * (double)(C / G);
    parallel_ranges(B, 1, [&](int64_t b0, int64_t b1, int) {
        std::vector<double> s1(L), s2(L), c1(C), c2(C), m1(C), m2(C);
        std::vector<float> at(L), bt(L), a(C), bb(C);
        for (int64_t b = b0; b < b1; ++b) {
            std::fill(s1.begin(), s1.end(), 0.0);
            std::fill(s2.begin(), s2.end(), 0.0);
            isa->gn_moments(x + b * n, n, L, s1.data(), s2.data());
            fold(s1.data(), C, L, c1.data());
            fold(s2.data(), C, L, c2.data());
            group_mean(c1.data(), C, G, count, m1.data());   // mu_g
            group_mean(c2.data(), C, G, count, m2.data());   // E[x^2] over the group
            for (int64_t c = 0; c < C; ++c) {
                const double var = m2[c] - m1[c] * m1[c];
                const float mu = (float)m1[c], r = (float)(1.0 / std::sqrt((var > 0.0 ? var : 0.0) + eps));
                mean[b * C + c] = mu;
                rstd[b * C + c] = r;
                a[c] = r * gamma[c];                          // y = a x + b, as layers.group_norm forms it
                bb[c] = beta[c] - a[c] * mu;
            }
            tile_to(at.data(), a.data(), C, L);
            tile_to(bt.data(), bb.data(), C, L);
            isa->gn_apply(x + b * n, at.data(), bt.data(), n, L, silu, y + b * n);
        }
    });
}

void group_norm_backward(const float* dout, const float* x, const float* gamma, const float* beta, const float* mean,
                         const float* rstd, int64_t B, int64_t npix, int64_t C, int64_t G, int silu, float* dx,
                         float* dgamma, float* dbeta) {
    const int64_t L = period(C, isa->vw), n = npix * C;
    const double count = (double)npix * (double)(C / G);
    const int np = max_pieces();
    std::vector<double> dg((size_t)np * C, 0.0), db((size_t)np * C, 0.0);   // per-piece partial sums
    parallel_ranges(B, 1, [&](int64_t b0, int64_t b1, int piece) {
        std::vector<double> s1(L), s2(L), sdy(C), sdyx(C), k1(C), k2(C), t1(C), t2(C);
        std::vector<float> at(L), bt(L), At(L), Bt(L), Ct(L), a(C), bb(C), A(C), Bx(C), Cc(C);
        for (int64_t b = b0; b < b1; ++b) {
            const float* mu = mean + b * C;
            const float* r = rstd + b * C;
            for (int64_t c = 0; c < C; ++c) {
                a[c] = r[c] * gamma[c];
                bb[c] = beta[c] - a[c] * mu[c];
            }
            tile_to(at.data(), a.data(), C, L);
            tile_to(bt.data(), bb.data(), C, L);
            std::fill(s1.begin(), s1.end(), 0.0);
            std::fill(s2.begin(), s2.end(), 0.0);
            // with SiLU, pass 1 leaves dh in dx, and pass 2 reads it there and overwrites it (without, dh is dout)
            float* dh = silu ? dx + b * n : nullptr;
            isa->gn_backward_sums(x + b * n, dout + b * n, at.data(), bt.data(), n, L, silu, s1.data(), s2.data(), dh);
            fold(s1.data(), C, L, sdy.data());               // S_dy = sum over pixels of dh
            fold(s2.data(), C, L, sdyx.data());              // S_dyx = sum of dh x
            for (int64_t c = 0; c < C; ++c) {
                const double s_dyxhat = r[c] * (sdyx[c] - mu[c] * sdy[c]);   // sum of dh xhat
                dg[(size_t)piece * C + c] += s_dyxhat;
                db[(size_t)piece * C + c] += sdy[c];
                t1[c] = gamma[c] * sdy[c];
                t2[c] = gamma[c] * s_dyxhat;
            }
            group_mean(t1.data(), C, G, count, k1.data());   // mean_g(dxhat)
            group_mean(t2.data(), C, G, count, k2.data());   // mean_g(dxhat xhat)
            for (int64_t c = 0; c < C; ++c) {                // dx = A dh + Bx x + Cc
                A[c] = (float)(r[c] * gamma[c]);
                Bx[c] = (float)(-(double)r[c] * r[c] * k2[c]);
                Cc[c] = (float)(r[c] * ((double)r[c] * k2[c] * mu[c] - k1[c]));
            }
            tile_to(At.data(), A.data(), C, L);
            tile_to(Bt.data(), Bx.data(), C, L);
            tile_to(Ct.data(), Cc.data(), C, L);
            isa->gn_backward_apply(x + b * n, dh ? dh : dout + b * n, At.data(), Bt.data(), Ct.data(), n, L, dx + b * n);
        }
    });
    for (int64_t c = 0; c < C; ++c) {
        double g = 0.0, d = 0.0;
        for (int p = 0; p < np; ++p) { g += dg[(size_t)p * C + c]; d += db[(size_t)p * C + c]; }
        dgamma[c] = (float)g;
        dbeta[c] = (float)d;
    }
}

// ------------------------------------------------------------------------------------------------ 3x3 convolution
// The shared-padding grid: image b, row h, column w is grid row m + (b (H + 1) + h)(W + 1) + w; row H and
// column W of each image are zero padding; m = W + 2 zero rows before the first image and after the last stand in
// for the rest. Tap (i, j) of the pixel at grid row p reads row p + (i - 1)(W + 1) + (j - 1).

struct Grid {
    int64_t H, W, Wp, P, m, slack;
    Grid(int64_t B, int64_t H_, int64_t W_) : H(H_), W(W_), Wp(W_ + 1) {
        P = B * (H + 1) * Wp;
        m = Wp + 1;
        slack = 2;                       // whole vectors read past a last row's end: zero rows there
    }
    int64_t rows() const { return m + P + m + slack; }
    void offsets(int64_t* off) const {
        for (int i = 0; i < 3; ++i)
            for (int j = 0; j < 3; ++j) off[i * 3 + j] = (i - 1) * Wp + (j - 1);
    }
};

// Image x (H, W, C; pixels xs >= C floats apart) into slot b of the grid in buf (rows of ld >= C floats, zero past
// C): its pixels, its padding column and row.
static void pad_image(const float* x, int64_t xs, int64_t b, const Grid& g, int64_t C, int64_t ld, float* buf) {
    float* img = buf + (g.m + b * (g.H + 1) * g.Wp) * ld;
    for (int64_t h = 0; h < g.H; ++h) {
        float* row = img + h * g.Wp * ld;
        const float* src = x + h * g.W * xs;
        if (ld == C && xs == C) {
            std::memcpy(row, src, sizeof(float) * g.W * C);
        } else {
            for (int64_t w = 0; w < g.W; ++w) {
                std::memcpy(row + w * ld, src + w * xs, sizeof(float) * C);
                std::memset(row + w * ld + C, 0, sizeof(float) * (ld - C));
            }
        }
        std::memset(row + g.W * ld, 0, sizeof(float) * ld);
    }
    std::memset(img + g.H * g.Wp * ld, 0, sizeof(float) * g.Wp * ld);
}

// The B images of x (B, H, W, C; pixels xs floats apart) onto the grid g in buf, every element written once; in
// parallel or not.
static void pad_images(const float* x, int64_t xs, int64_t B, const Grid& g, int64_t C, int64_t ld, float* buf,
                       bool parallel) {
    std::memset(buf, 0, sizeof(float) * g.m * ld);
    std::memset(buf + (g.m + g.P) * ld, 0, sizeof(float) * (g.m + g.slack) * ld);
    auto images = [&](int64_t b0, int64_t b1, int) {
        for (int64_t b = b0; b < b1; ++b) pad_image(x + b * g.H * g.W * xs, xs, b, g, C, ld, buf);
    };
    if (parallel) parallel_ranges(B, 1, images);
    else images(0, B, 0);
}

// Output channels in blocks of at most 4 (AVX-512), 3 (AVX2) or 2 vectors (SSE2's smaller tiles), as even as
// possible.
template <class Task>
static void plan_blocks(Task& t, int64_t vectors, int acc) {
    const int nbv = (int)vectors, nbmax = acc >= 24 ? 4 : acc >= 12 ? 3 : 2;
    const int nblocks = (nbv + nbmax - 1) / nbmax;
    t.nblocks = nblocks;
    for (int i = 0, start = 0; i < nblocks; ++i) {
        const int v = nbv / nblocks + (i < nbv % nblocks ? 1 : 0);
        t.block_start[i] = start;
        t.block_vectors[i] = v;
        start += v;
    }
}

static int64_t round_up(int64_t n, int64_t k) { return (n + k - 1) / k * k; }

// Input channels per lane group for N output channels: 2 when vectors of channel pairs waste fewer lanes (N = 24
// on AVX-512: 24 of 24 lanes instead of 24 of 32).
static int lane_group(int64_t N) {
    const int64_t vw = isa->vw;
    return round_up(N, vw / 2) < round_up(N, vw) ? 2 : 1;
}

// wp (T, KG / G, NC, G) from the weights w(c, k, t) = src[c sc + k sk + toff(t)]: wp[t, kk, c, j] = w(c, kk G + j, t),
// zero past N and K (pack_row: one row (t, kk), s = src + toff(t)). Every layout here is such a strided view, so
// the inner loop is one strided copy (a generic w(c, k, t) per element cost 4 cycles each: a third of a 4 x 4 layer's
// forward at batch 1). The rows split over the threads (a layer of 128 -> 64 channels packs 74k weights every call).
static void pack_row(const float* s, int64_t sc, int64_t sk, int64_t kk, int64_t K, int64_t N, int64_t NC, int G,
                     float* row) {
    for (int j = 0; j < G; ++j) {
        const int64_t k = kk * G + j;
        int64_t c = 0;
        if (k < K)
            for (const float* sj = s + k * sk; c < N; ++c) row[c * G + j] = sj[c * sc];
        for (; c < NC; ++c) row[c * G + j] = 0.0f;
    }
}

template <class F>
static void pack_weights(int T, int64_t K, int64_t KG, int64_t N, int64_t NC, int G, const float* src, int64_t sc,
                         int64_t sk, F toff, float* wp) {
    const int64_t KK = KG / G;
    parallel_ranges(T * KK, std::max<int64_t>(1, 4096 / (NC * G)), [&](int64_t r0, int64_t r1, int) {
        for (int64_t row = r0; row < r1; ++row)
            pack_row(src + toff((int)(row / KK)), sc, sk, row % KK, K, N, NC, G, wp + row * NC * G);
    });
}
static int64_t no_taps(int) { return 0; }
static int64_t tap_index(int t) { return t; }

static ConvTask conv_task(const float* xbuf, int64_t ldx, int64_t KG, const float* wp, int64_t N, int G,
                          const float* bias, int64_t bias_stride, const float* residual, float* out) {
    ConvTask t;
    t.xbuf = xbuf; t.ldx = ldx; t.K = KG; t.w = wp; t.N = N; t.G = G; t.NC = round_up(N, isa->vw / G);
    t.bias = bias; t.bias_stride = bias_stride; t.residual = residual; t.out = out;
    t.rows_per_tile = isa->acc;
    plan_blocks(t, t.NC * G / isa->vw, isa->acc);
    return t;
}

static void run_tiles(const ConvTask& t, bool parallel) {
    const int64_t tiles = (t.P + t.rows_per_tile - 1) / t.rows_per_tile;
    if (parallel) parallel_ranges(tiles, 4, [&](int64_t i0, int64_t i1, int) { isa->conv_tiles(t, i0, i1); });
    else isa->conv_tiles(t, 0, tiles);
}

// Input rows on the grid of output pixel (a, b) of an (Hq, Wq) output: grid pixel (s a, s b); output rows in order.
static PixelMap grid_map(const Grid& g, int64_t Hq, int64_t Wq, int64_t s) {
    return PixelMap{Hq, Wq, g.m, (g.H + 1) * g.Wp, s * g.Wp, s};
}
static PixelMap dense_map(int64_t Hq, int64_t Wq) { return PixelMap{Hq, Wq, 0, Hq * Wq, Wq, 1}; }

// the first image of piece `piece` of the batch in for_image_groups (parallel_ranges' cut)
static int64_t piece_start(int64_t B, int piece) { return B * piece / num_pieces(B, 1); }

static int64_t out_size(int64_t n, int stride) { return n ? (n - 1) / stride + 1 : 0; }   // 3x3, padding 1

// The three taps (i, 0), (i, 1), (i, 2) of a kernel row read grid rows p - 1, p, p + 1 around p + (i - 1)(W + 1):
// one run of 3 K consecutive floats, whose packed weights are consecutive too. So a task takes T = 3 runs of
// 3 K inputs instead of 9 taps of K: inner loops three times as long, a third of the loop overhead.
static void row_runs(const Grid& g, int64_t K, ConvTask& t) {
    t.T = 3;
    t.K = 3 * K;
    for (int i = 0; i < 3; ++i) t.off[i] = (i - 1) * g.Wp - 1;
}

// The convolutions work image by image where there are enough images: each piece of the batch (parallel_ranges)
// pads a few images at a time into its thread's own grid, small enough to stay in L2 while the micro-kernels read
// it, and computes them (the padded copy never goes out to memory and back). With fewer images than that (a
// sampling batch of one) the whole batch is padded once and the row tiles are split over the threads.
static bool by_images(int64_t B) { return num_threads() == 1 || B >= 2 * num_threads(); }

// images per padded group: about 512 KB of grid
static int64_t group_images(int64_t H, int64_t W, int64_t ld) {
    const int64_t bytes = (H + 1) * (W + 1) * ld * 4;
    return std::max<int64_t>(1, (512 << 10) / std::max<int64_t>(bytes, 1));
}

// for each group of images [b, b + nb) of the batch: f(b, nb, parallel, piece)
template <class F>
static void for_image_groups(int64_t B, int64_t group, F f) {
    if (!by_images(B)) { f(0, B, true, 0); return; }
    parallel_ranges(B, 1, [&](int64_t b0, int64_t b1, int piece) {
        for (int64_t b = b0; b < b1; b += group) f(b, std::min(group, b1 - b), false, piece);
    });
}

// ------------------------------------------------------------------------------------------------ Winograd
// F(m x m, 3x3), m = 2 or 4 (nn_isa.h, wino_input): the weights transformed and packed as (m + 2)^2 "taps" (one per
// tile position e), then per chunk of tiles: the input transform, (m + 2)^2 matrix products on the micro-kernels
// (tiles x K @ K x N), the output transform (+ bias, + residual). Which convolutions take which tile
// (winograd_tile, winograd_wgrad_tile) was measured: with few channels the products are too short to pay for the
// transforms, and on small maps the tiles' overhang (64 pixels computed for 49 on a 7 x 7 map) and the border cost
// more than they save, the more so with AVX-512's fast products (bench_kernels.py, docs/performance.md); the rest
// keep the direct sum of 9 taps.
static bool winograd_on = true;

// n zero floats (this thread's), read by the transforms for pixels outside the image
static const float* wino_zeros(int64_t n) {
    float* z = scratch.get(scratch.wino_z, (size_t)n);
    std::fill(z, z + n, 0.0f);
    return z;
}

bool set_conv_winograd(bool on) {
    const bool was = winograd_on;
    winograd_on = on;
    return was;
}

// F(4x4) on maps of at least 16 x 16 with AVX-512 (8 x 8 with AVX2 and SSE2) and at least 24 channels on both
// sides (16 with AVX2 and SSE2); otherwise F(2x2) for at least 32 channels, on maps of at least 8 x 8 with AVX-512
// and 4 x 4 with AVX2 and SSE2; otherwise the direct sum (0). Measured per shape (docs/performance.md): at 28 x 28
// F(4x4) is the fastest of the three with every instruction set from 24 channels on, 1.2-2.0x as fast as F(2x2);
// at 14 x 14 it ties with F(2x2) on AVX-512 and mostly wins on the others, at 7 x 7 and 4 x 4 it loses forward
int winograd_tile(int64_t H, int64_t W, int64_t K, int64_t N, int stride) {
    if (!winograd_on || stride != 1) return 0;
    const bool wide = isa->vw >= 16;
    const int64_t map4 = wide ? 16 : 8, ch4 = wide ? 24 : 16, map2 = wide ? 8 : 4;
    if (H >= map4 && W >= map4 && K >= ch4 && N >= ch4) return 4;
    if (H >= map2 && W >= map2 && K >= 32 && N >= 32) return 2;
    return 0;
}

// The weight gradient's products save in proportion to K N, its two transforms (of x and of dy) cost in
// proportion to K + N. F(4x4)'s 36 products per 16 pixels (against the direct sum's 9 a pixel) pay for them at
// every shape it takes; F(2x2)'s 16 per 4 pixels do from K N / (K + N) >= 20 (at 32 -> 32, where it is 16,
// AVX-512 loses 13% and AVX2 4%; SSE2's slower products gain everywhere)
int winograd_wgrad_tile(int64_t H, int64_t W, int64_t K, int64_t N, int stride) {
    const int m = winograd_tile(H, W, K, N, stride);
    return m == 4 || (m == 2 && (isa->vw <= 4 || K * N >= 20 * (K + N))) ? m : 0;
}

// G applied to the 3 values g[0], g[s], g[2 s]: the m + 2 values u[0], u[s], ... (F(2x2, 3x3):
// G = [1 0 0; 1/2 1/2 1/2; 1/2 -1/2 1/2; 0 0 1]; F(4x4, 3x3), in double, as 1/6 and 1/24 are not exact in float:
// G = [1/4 0 0; -1/6 -1/6 -1/6; -1/6 1/6 -1/6; 1/24 1/12 1/6; 1/24 -1/12 1/6; 0 0 1])
template <class T>
static void wino_g(int m, const T* g, int s, T* u) {
    const T g0 = g[0], g1 = g[s], g2 = g[2 * s];
    if (m == 2) {
        u[0] = g0; u[s] = T(0.5) * (g0 + g1 + g2); u[2 * s] = T(0.5) * (g0 - g1 + g2); u[3 * s] = g2;
    } else {
        u[0] = g0 / 4; u[s] = -(g0 + g1 + g2) / 6; u[2 * s] = -(g0 - g1 + g2) / 6;
        u[3 * s] = g0 / 24 + g1 / 12 + g2 / 6; u[4 * s] = g0 / 24 - g1 / 12 + g2 / 6; u[5 * s] = g2;
    }
}

// G^T applied to the m + 2 values d[0], d[s], ...: the 3 values o[0], o[t], o[2 t] (the weight gradient's side;
// F(4x4) in double)
static void wino_gt(int m, const float* d, int s, float* o, int t) {
    if (m == 2) {
        const float d0 = d[0], d1 = d[s], d2 = d[2 * s], d3 = d[3 * s];
        o[0] = d0 + 0.5f * (d1 + d2); o[t] = 0.5f * (d1 - d2); o[2 * t] = 0.5f * (d1 + d2) + d3;
    } else {
        const double d0 = d[0], d1 = d[s], d2 = d[2 * s], d3 = d[3 * s], d4 = d[4 * s], d5 = d[5 * s];
        o[0] = (float)(d0 / 4 - (d1 + d2) / 6 + (d3 + d4) / 24);
        o[t] = (float)((d2 - d1) / 6 + (d3 - d4) / 12);
        o[2 * t] = (float)((d3 + d4 - d1 - d2) / 6 + d5);
    }
}

// U = G g G^T ((m + 2)^2 values, row-major) for the 3x3 kernel g[t] = w(t) (t = 3 i + j)
template <class T, class F>
static void wino_weight_t(int m, F w, float* u) {
    const int n = m + 2;
    T g[9], gg[6 * 3], uu[6 * 6];
    for (int t = 0; t < 9; ++t) g[t] = (T)w(t);
    for (int j = 0; j < 3; ++j) wino_g(m, g + j, 3, gg + j);             // G g: along the columns
    for (int a = 0; a < n; ++a) wino_g(m, gg + 3 * a, 1, uu + n * a);    // (G g) G^T: along the rows
    for (int e = 0; e < n * n; ++e) u[e] = (float)uu[e];
}

template <class F>
static void wino_weight(int m, F w, float* u) {
    if (m == 2) wino_weight_t<float>(m, w, u);
    else wino_weight_t<double>(m, w, u);
}

// out (B, H, W, N) = conv3x3(x) + bias (+ residual), x (B, H, W, K; pixels xs floats apart), stride 1, weights
// w(n, k, t)
template <class F>
static void winograd_conv(int m, const float* x, int64_t xs, int64_t B, int64_t H, int64_t W, int64_t K, int64_t N,
                          F w, const float* bias, int64_t bias_stride, const float* residual, float* out) {
    const int G = lane_group(N), E = (m + 2) * (m + 2);
    const int64_t KG = round_up(K, G), NC = round_up(N, isa->vw / G), tiles = (H + m - 1) / m * ((W + m - 1) / m);
    float* u = scratch.get(scratch.wino_u, (size_t)(E * N * K));
    parallel_ranges(N * K, 256, [&](int64_t i0, int64_t i1, int) {
        for (int64_t i = i0; i < i1; ++i) wino_weight(m, [&](int t) { return w(i / K, i % K, t); }, u + E * i);
    });
    float* wp = scratch.get(scratch.wpack, (size_t)(E * KG * NC));
    pack_weights(E, K, KG, N, NC, G, u, K * E, E, tap_index, wp);
    // tiles in chunks: V and M (E rows a tile each) in about 512 KB, a whole number of row tiles; each chunk
    // transformed in, multiplied and transformed out while it stays in L2 (every output pixel is its own chunk's:
    // the result does not depend on the threads)
    const int64_t P = B * tiles, rt = isa->acc;
    const int64_t per_tile = E * (KG + N) * 4, chunk = rt * std::max<int64_t>(1, (512 << 10) / (per_tile * rt));
    const float* zeros = wino_zeros(round_up(KG, isa->vw));
    parallel_ranges((P + chunk - 1) / chunk, 1, [&](int64_t c0, int64_t c1, int) {
        float* V = scratch.get(scratch.wino_v, (size_t)(E * chunk * KG));
        float* M = scratch.get(scratch.wino_m, (size_t)(E * chunk * N));
        ConvTask t = conv_task(V, KG, KG, wp, N, G, nullptr, 0, nullptr, M);
        t.xrow = t.orow = PixelMap{1, chunk, 0, chunk, 0, 1};
        t.T = 1; t.off[0] = 0;
        for (int64_t ci = c0; ci < c1; ++ci) {
            const int64_t q0 = ci * chunk, n = std::min(chunk, P - q0);
            isa->wino_input(m, x, xs, H, W, K, KG, q0, n, chunk, zeros, V);
            t.P = n;
            for (int e = 0; e < E; ++e) {
                t.xbuf = V + e * chunk * KG; t.w = wp + e * KG * NC; t.out = M + e * chunk * N;
                isa->conv_tiles(t, 0, (n + rt - 1) / rt);
            }
            isa->wino_output(m, M, chunk, H, W, N, q0, n, bias, bias_stride, residual, out);
        }
    });
}

void conv3x3_forward(const float* x, const float* weight, const float* bias, int64_t bias_stride,
                     const float* residual, int64_t B, int64_t H, int64_t W, int64_t K, int64_t N, int stride,
                     float* out) {
    if (const int m = winograd_tile(H, W, K, N, stride)) {
        winograd_conv(m, x, K, B, H, W, K, N, [&](int64_t n, int64_t k, int t) { return weight[(n * K + k) * 9 + t]; },
                      bias, bias_stride, residual, out);
        return;
    }
    const int64_t Ho = out_size(H, stride), Wo = out_size(W, stride);
    const int G = lane_group(N);
    const int64_t KG = round_up(K, G), NC = round_up(N, isa->vw / G);
    float* wp = scratch.get(scratch.wpack, (size_t)(9 * KG * NC));
    pack_weights(9, K, KG, N, NC, G, weight, 9 * K, 9, tap_index, wp);
    for_image_groups(B, group_images(H, W, KG), [&](int64_t b, int64_t nb, bool parallel, int) {
        const Grid g(nb, H, W);
        float* xbuf = scratch.get(parallel ? scratch.xbuf : scratch.local_x, (size_t)(g.rows() * KG));
        pad_images(x + b * H * W * K, K, nb, g, K, KG, xbuf, parallel);
        const int64_t first = b * Ho * Wo;                  // the group's first output pixel
        ConvTask t = conv_task(xbuf, KG, KG, wp, N, G, bias ? bias + b * bias_stride : nullptr, bias_stride,
                               residual ? residual + first * N : nullptr, out + first * N);
        t.xrow = grid_map(g, Ho, Wo, stride);
        t.orow = dense_map(Ho, Wo);
        t.P = nb * Ho * Wo;
        row_runs(g, KG, t);
        run_tiles(t, parallel);
    });
}

// The sum of the per-piece partial weight gradients part[piece] (`part` floats each), in piece order
static float* sum_pieces(const float* partial, size_t part, int np) {
    float* total = scratch.get(scratch.wsum, part);
    parallel_ranges((int64_t)part, 1 << 14, [&](int64_t e0, int64_t e1, int) {
        std::memcpy(total + e0, partial + e0, sizeof(float) * (e1 - e0));
        for (int p = 1; p < np; ++p) {
            const float* src = partial + part * p;
            for (int64_t e = e0; e < e1; ++e) total[e] += src[e];
        }
    });
    return total;
}

// ... into dweight[n, k, t] (= (N, K, 3, 3) for T = 9) from pieces (T, K, NP)
static void sum_wgrad(const float* partial, size_t part, int np, int T, int64_t K, int64_t N, int64_t NP,
                      float* dweight) {
    const float* total = sum_pieces(partial, part, np);
    for (int64_t n = 0; n < N; ++n)
        for (int64_t k = 0; k < K; ++k)
            for (int t = 0; t < T; ++t) dweight[(n * K + k) * T + t] = total[(t * K + k) * NP + n];
}

// the task's pixels [0, P) (P > 0) into partial (`part` floats a piece, each written), split over the threads;
// returns the pieces
static const int64_t WGRAD_MIN = 256;                 // pixels per thread worth starting a thread for
static int parallel_wgrad(const WGradTask& t, int64_t P, float* partial, size_t part, int add) {
    parallel_ranges(P, WGRAD_MIN, [&](int64_t q0, int64_t q1, int piece) {
        isa->conv_wgrad(t, q0, q1, partial + part * piece, add);
    });
    return num_pieces(P, WGRAD_MIN);
}

// The weight gradient the same way: M[e] = V[e] U[e] (e = the (m + 2)^2 tile positions) gives
// dU[e] (K x N) = sum over tiles of V[e]^T dM[e], dM = A dY A^T (nn_isa.h, wino_dout), and dW = G^T dU G per
// (output, input) channel pair: 16 (F(2x2)) or 36 (F(4x4)) products of length tiles (a quarter or a sixteenth of
// the pixels) instead of 9 of length pixels.
// x (B, H, W, K), dy (B, H, W, N; pixels ldd floats apart) -> dweight (N, K, 3, 3). Chunks of tiles as
// winograd_conv's; one partial dU per piece of the chunks, added up in piece order (deterministic, as the direct
// weight gradient).
static void winograd_wgrad(int m, const float* x, const float* dy, int64_t ldd, int64_t B, int64_t H, int64_t W,
                           int64_t K, int64_t N, float* dweight) {
    const int n6 = m + 2, E = n6 * n6;
    const int64_t vw = isa->vw, NP = round_up(N, vw), P = B * ((H + m - 1) / m) * ((W + m - 1) / m);
    const int64_t chunk = std::max<int64_t>(16, (512 << 10) / (E * (K + NP) * 4)), nchunks = (P + chunk - 1) / chunk;
    const size_t part = (size_t)(E * K * NP);
    float* partial = scratch.get(scratch.wgrad, part * max_pieces());
    const float* zeros = wino_zeros(round_up(std::max(K, NP), vw));
    WGradTask t;
    t.ldx = K; t.K = K; t.ldy = NP; t.N = N; t.NP = NP; t.T = 1; t.off[0] = t.voff[0] = 0;
    plan_blocks(t, NP / vw, isa->acc);
    parallel_ranges(nchunks, 1, [&](int64_t c0, int64_t c1, int piece) {
        // V: E blocks of chunk rows of K floats, and whole vectors read past its last row (the tiles' R inputs)
        float* V = scratch.get(scratch.wino_v, (size_t)(E * chunk * K + 64));
        float* D = scratch.get(scratch.wino_m, (size_t)(E * chunk * NP));
        std::fill(V + E * chunk * K, V + E * chunk * K + 64, 0.0f);
        WGradTask tc = t;
        for (int64_t ci = c0; ci < c1; ++ci) {
            const int64_t q0 = ci * chunk, n = std::min(chunk, P - q0);
            isa->wino_input(m, x, K, H, W, K, K, q0, n, chunk, zeros, V);
            isa->wino_dout(m, dy, ldd, H, W, N, NP, q0, n, chunk, zeros, D);
            tc.xrow = tc.dyrow = PixelMap{1, n, 0, n, 0, 1};
            for (int e = 0; e < E; ++e) {
                tc.xbuf = V + e * chunk * K; tc.dy = D + e * chunk * NP;
                isa->conv_wgrad(tc, 0, n, partial + part * piece + e * K * NP, ci > c0);
            }
        }
    });
    const float* du = sum_pieces(partial, part, num_pieces(nchunks, 1));      // dU[e, k, n]
    // dW = G^T dU G (G: wino_g), along the rows of dU, then along its columns
    parallel_ranges(N * K, 256, [&](int64_t i0, int64_t i1, int) {
        for (int64_t i = i0; i < i1; ++i) {
            const int64_t n = i / K, k = i % K;
            float d[36], g[6 * 3];
            for (int e = 0; e < E; ++e) d[e] = du[(e * K + k) * NP + n];
            for (int a = 0; a < n6; ++a) wino_gt(m, d + n6 * a, 1, g + 3 * a, 1);    // dU G
            for (int j = 0; j < 3; ++j) wino_gt(m, g + j, 3, dweight + i * 9 + j, 3);   // G^T (dU G)
        }
    });
}

void conv3x3_backward(const float* x, const float* weight, const float* dout, int64_t ldd, int64_t B, int64_t H,
                      int64_t W, int64_t K, int64_t N, int stride, float* dx, float* dweight) {
    const int64_t Ho = out_size(H, stride), Wo = out_size(W, stride);
    const int G = lane_group(K);
    const int64_t NG = round_up(N, G), KC = round_up(K, isa->vw / G);

    // dx: for stride 1, conv(dy, flipped kernel): tap t = (i, j) uses W[n, k, 2 - i, 2 - j] as its (N, K) matrix.
    // For stride 2, input pixel (h, w) = (2a + ph, 2b + pw) gets tap (i, j) of output pixel ((h + 1 - i) / 2,
    // (w + 1 - j) / 2) where those are whole: i = 1 for even h; i = 0 (output row a + 1) and i = 2 (row a) for
    // odd h; columns alike: one sum of 1, 2, 2 or 4 taps per parity (ph, pw), over dout's grid.
    struct Part { int ph, pw, T, taps[9]; int64_t off[9]; float* wp; };
    std::vector<Part> parts;
    const int64_t Wpy = Wo + 1;                            // dout's grid's row
    const int wino = winograd_tile(H, W, N, K, stride);   // dx by Winograd (and dW where that pays), first
    if (wino) {
        winograd_conv(wino, dout, ldd, B, H, W, N, K, [&](int64_t k, int64_t n, int t) {
            return weight[(n * K + k) * 9 + 8 - t];
        }, nullptr, 0, nullptr, dx);
        if (const int m = winograd_wgrad_tile(H, W, K, N, stride)) {
            winograd_wgrad(m, x, dout, ldd, B, H, W, K, N, dweight);
            return;
        }
    }
    for (int ph = 0; ph < stride && !wino; ++ph)
        for (int pw = 0; pw < stride; ++pw) {
            Part pt{ph, pw, 0, {}, {}, nullptr};
            for (int i = 0; i < 3; ++i)
                for (int j = 0; j < 3; ++j) {
                    if (stride == 1) {
                        pt.taps[pt.T] = 8 - (i * 3 + j);
                        pt.off[pt.T++] = (i - 1) * Wpy + (j - 1);
                    } else if ((i == 1) == (ph == 0) && (j == 1) == (pw == 0)) {
                        pt.taps[pt.T] = i * 3 + j;
                        pt.off[pt.T++] = (i == 0 ? Wpy : 0) + (j == 0 ? 1 : 0);
                    }
                }
            parts.push_back(pt);
        }
    float* wp = scratch.get(scratch.wpack, (size_t)(9 * NG * KC));
    for (Part& pt : parts) {
        pt.wp = wp;
        pack_weights(pt.T, N, NG, K, KC, G, weight, 9, 9 * K, [&](int t) { return (int64_t)pt.taps[t]; }, wp);
        wp += pt.T * NG * KC;
    }

    // dW[n, k, i, j] = sum over output pixels of xbuf[xrow + off(i, j), k] dy[dyrow, n]: kernel row i's three taps
    // as one run of 3K inputs (as forward); broadcast x, times vectors of dy's N channels (dw (3, 3K, NP)), or,
    // when vectors of the 3K run waste fewer lanes (N = 24 on AVX-512: 75% of each vector), broadcast dy times
    // vectors of x's run (dw (3, N, KP)). One partial sum per piece (written by the piece's first group of
    // images), added up in piece order at the end.
    const int64_t vw = isa->vw, NP = round_up(N, vw), KP = round_up(3 * K, vw);
    const bool swap = (double)KP * round_up(N, 8) / (3 * K * N) < (double)NP * round_up(3 * K, 8) / (3 * K * N);
    const size_t part = (size_t)(swap ? 3 * N * KP : 9 * K * NP);
    float* partial = scratch.get(scratch.wgrad, part * max_pieces());
    int np = by_images(B) ? num_pieces(B, 1) : 0;

    const int64_t group = group_images(H, W, K + NG);
    for_image_groups(B, group, [&](int64_t b, int64_t nb, bool parallel, int piece) {
        const Grid g(nb, H, W), gy(nb, Ho, Wo);            // x's grid, dout's (the same for stride 1)
        float* dybuf = scratch.get(parallel ? scratch.dybuf : scratch.local_dy, (size_t)(gy.rows() * NG));
        pad_images(dout + b * Ho * Wo * ldd, ldd, nb, gy, N, NG, dybuf, parallel);
        for (const Part& pt : parts) {
            const int64_t Hq = stride == 1 ? H : (H - pt.ph + 1) / 2, Wq = stride == 1 ? W : (W - pt.pw + 1) / 2;
            if (Hq == 0 || Wq == 0) continue;
            ConvTask t = conv_task(dybuf, NG, NG, pt.wp, K, G, nullptr, 0, nullptr, dx + b * H * W * K);
            t.xrow = grid_map(gy, Hq, Wq, 1);
            t.orow = PixelMap{Hq, Wq, pt.ph * W + pt.pw, H * W, stride * W, stride};
            t.P = nb * Hq * Wq; t.T = pt.T;
            for (int i = 0; i < pt.T; ++i) t.off[i] = pt.off[i];
            if (stride == 1) row_runs(gy, NG, t);           // the flipped taps in runs of three, as forward
            run_tiles(t, parallel);
        }
        float* xbuf = scratch.get(parallel ? scratch.xbuf : scratch.local_x, (size_t)(g.rows() * K));
        pad_images(x + b * H * W * K, K, nb, g, K, K, xbuf, parallel);
        WGradTask t;
        const PixelMap xrow = grid_map(g, Ho, Wo, stride), dyrow = grid_map(gy, Ho, Wo, 1);
        t.T = 3;
        for (int i = 0; i < 3; ++i) {
            t.off[i] = swap ? 0 : (i - 1) * g.Wp - 1;
            t.voff[i] = swap ? (i - 1) * g.Wp - 1 : 0;
        }
        if (!swap) {
            t.xbuf = xbuf; t.ldx = K; t.xrow = xrow; t.K = 3 * K;
            t.dy = dybuf; t.ldy = NG; t.dyrow = dyrow; t.N = N; t.NP = NP;
        } else {
            t.xbuf = dybuf; t.ldx = NG; t.xrow = dyrow; t.K = N;
            t.dy = xbuf; t.ldy = K; t.dyrow = xrow; t.N = 3 * K; t.NP = KP;
        }
        plan_blocks(t, t.NP / isa->vw, isa->acc);
        if (parallel) np = parallel_wgrad(t, nb * Ho * Wo, partial, part, 0);
        else isa->conv_wgrad(t, 0, nb * Ho * Wo, partial + part * piece, b > piece_start(B, piece));
    });
    if (!swap) {
        sum_wgrad(partial, part, np, 9, K, N, NP, dweight);     // dw (3, 3K, NP) is dw (9, K, NP)
        return;
    }
    const float* total = sum_pieces(partial, part, np);        // dw (3, N, KP): [i, n, j K + k]
    for (int64_t n = 0; n < N; ++n)
        for (int64_t k = 0; k < K; ++k)
            for (int i = 0; i < 3; ++i)
                for (int j = 0; j < 3; ++j) dweight[(n * K + k) * 9 + i * 3 + j] = total[(i * N + n) * KP + j * K + k];
}

// ------------------------------------------------------------------------------------------------ matrix products
// The same micro-kernels with one tap (T = 1) and plain rows. The weight gradient reads whole vectors past a row's
// end (into the next row); the arrays here have no slack after their last row, so the last row goes through a
// zero-padded copy.

// out (M, N) = x (M, K; rows ldx floats apart) @ wp (K, NC G) (+ bias), its row tiles over the threads or not
static void run_matmul(const float* x, int64_t ldx, int64_t M, int64_t K, const float* wp, int64_t N, int G,
                       const float* bias, float* out, bool parallel = true) {
    ConvTask t = conv_task(x, ldx, K, wp, N, G, bias, 0, nullptr, out);
    t.xrow = t.orow = PixelMap{1, M, 0, M, 0, 1};
    t.P = M; t.T = 1; t.off[0] = 0;
    run_tiles(t, parallel);
}

void linear_forward(const float* x, const float* weight, const float* bias, int64_t M, int64_t K, int64_t N,
                    float* out) {
    const int G = K % 2 == 0 ? lane_group(N) : 1;      // x's rows are read in place: K must be a multiple of G
    const int64_t NC = round_up(N, isa->vw / G);
    float* wp = scratch.get(scratch.wpack, (size_t)(K * NC));
    pack_weights(1, K, K, N, NC, G, weight, K, 1, no_taps, wp);
    run_matmul(x, K, M, K, wp, N, G, bias, out);
}

void linear_backward(const float* x, const float* weight, const float* dout, int64_t ldd, int64_t M, int64_t K,
                     int64_t N, float* dx, float* dweight) {
    const int G = N % 2 == 0 ? lane_group(K) : 1;      // dx = dout @ weight
    const int64_t KC = round_up(K, isa->vw / G);
    float* wp = scratch.get(scratch.wpack, (size_t)(N * KC));
    pack_weights(1, N, N, K, KC, G, weight, 1, K, no_taps, wp);
    run_matmul(dout, ldd, M, N, wp, K, G, nullptr, dx);

    // dweight[n, k] = sum_p dout[p, n] x[p, k]: rows split over threads into (K, NP) partial sums; the last row
    // (whose whole vectors would read past the arrays' ends) from padded copies, into the first piece
    if (M == 0) {
        std::memset(dweight, 0, sizeof(float) * N * K);
        return;
    }
    WGradTask t;
    t.xbuf = x; t.ldx = K; t.K = K; t.dy = dout; t.ldy = ldd; t.N = N; t.NP = round_up(N, isa->vw); t.T = 1;
    t.off[0] = t.voff[0] = 0;
    t.xrow = t.dyrow = PixelMap{1, M, 0, M, 0, 1};
    plan_blocks(t, t.NP / isa->vw, isa->acc);
    const int np = max_pieces();
    const size_t part = (size_t)(K * t.NP);
    float* partial = scratch.get(scratch.wgrad, part * np);
    std::memset(partial, 0, sizeof(float) * part * np);
    if (M > 1) parallel_wgrad(t, M - 1, partial, part, 1);
    const int64_t pad = round_up(K + N, isa->vw) + 4 * isa->acc;   // room for whole vectors and tiles past the end
    float* xl = scratch.get(scratch.xbuf, (size_t)(2 * pad));
    std::memset(xl, 0, sizeof(float) * 2 * pad);
    std::memcpy(xl, x + (M - 1) * K, sizeof(float) * K);
    std::memcpy(xl + pad, dout + (M - 1) * ldd, sizeof(float) * N);
    WGradTask last = t;
    last.xbuf = xl;
    last.dy = xl + pad;
    last.xrow = last.dyrow = PixelMap{1, 1, 0, 1, 0, 1};
    isa->conv_wgrad(last, 0, 1, partial, 1);
    sum_wgrad(partial, part, np, 1, K, N, t.NP, dweight);
}

// ------------------------------------------------------------------------------------------------ attention
// unet.attention and unet.attention_backward image by image, each image's products on one thread (the images
// split over the threads, so the result does not depend on them), on the same micro-kernels.

// out (P, N) = x (P, K; rows ldx floats apart) @ W with W[k, n] = w[n sn + k sk], on this thread: W packed as the
// convolutions' weights (pack_weights' layout, T = 1), then run_matmul
static void thread_matmul(const float* x, int64_t ldx, int64_t P, int64_t K, int64_t N, const float* w, int64_t sn,
                          int64_t sk, float* out) {
    const int G = K % 2 == 0 ? lane_group(N) : 1;      // x's rows are read in place: K must be a multiple of G
    const int64_t NC = round_up(N, isa->vw / G);
    float* wp = scratch.get(scratch.attn_w, (size_t)(K * NC));
    for (int64_t kk = 0; kk < K / G; ++kk) pack_row(w, sn, sk, kk, K, N, NC, G, wp + kk * NC * G);
    run_matmul(x, ldx, P, K, wp, N, G, nullptr, out, false);
}

// (rows, cols) -> (cols, rows), in blocks of 16 x 16 whose lines on both sides stay in L1 (element by element,
// each store of a 256 x 256 transpose would go to another line: 40% of the backward pass)
static void transpose(const float* a, int64_t rows, int64_t cols, float* at) {
    for (int64_t i0 = 0; i0 < rows; i0 += 16)
        for (int64_t j0 = 0; j0 < cols; j0 += 16)
            for (int64_t j = j0; j < std::min(j0 + 16, cols); ++j)
                for (int64_t i = i0; i < std::min(i0 + 16, rows); ++i) at[j * rows + i] = a[i * cols + j];
}

void attention_forward(const float* q, const float* k, const float* v, int64_t B, int64_t N, int64_t M, int64_t C,
                       float scale, float* o, float* a) {
    parallel_ranges(B, 1, [&](int64_t b0, int64_t b1, int) {
        for (int64_t b = b0; b < b1; ++b) {
            const float *qb = q + b * N * C, *kb = k + b * M * C, *vb = v + b * M * C;
            float* ab = a + b * N * M;
            thread_matmul(qb, C, N, C, M, kb, C, 1, ab);                   // S = q k^T
            isa->softmax_rows(ab, N, M, M, scale);                                                     // A
            thread_matmul(ab, M, N, M, C, vb, 1, C, o + b * N * C);
        }
    });
}

void attention_backward(const float* q, const float* k, const float* v, const float* a, const float* dout, int64_t B,
                        int64_t N, int64_t M, int64_t C, float scale, float* dq, float* dk, float* dv) {
    parallel_ranges(B, 1, [&](int64_t b0, int64_t b1, int) {
        float* ds = scratch.get(scratch.attn_d, (size_t)(N * M));
        float* t = scratch.get(scratch.attn_t, (size_t)(N * M));
        for (int64_t b = b0; b < b1; ++b) {
            const float *qb = q + b * N * C, *kb = k + b * M * C, *vb = v + b * M * C, *ab = a + b * N * M;
            const float* db = dout + b * N * C;
            thread_matmul(db, C, N, C, M, vb, C, 1, ds);                   // dA
            isa->softmax_backward_rows(ab, ds, N, M, M, scale);                                          // dS
            thread_matmul(ds, M, N, M, C, kb, 1, C, dq + b * N * C);
            transpose(ds, N, M, t);                                  // dk = dS^T q
            thread_matmul(t, N, M, N, C, qb, 1, C, dk + b * M * C);
            transpose(ab, N, M, t);                                  // dv = A^T dout
            thread_matmul(t, N, M, N, C, db, 1, C, dv + b * M * C);
        }
    });
}

}  // namespace md

namespace md {

// ------------------------------------------------------------------------------------------------ copies and sums
// Memory-bound passes of the U-Net (layers.concat_channels, layers.upsample2x and its backward, layers.pixel_sum),
// rows split over the threads.

static const int64_t COPY_MIN = 1 << 14;      // floats per thread worth starting a thread for

void concat_channels(const float* a, const float* b, int64_t M, int64_t Ca, int64_t Cb, float* out) {
    const int64_t C = Ca + Cb;
    parallel_ranges(M, COPY_MIN / (C + 1) + 1, [&](int64_t r0, int64_t r1, int) {
        for (int64_t r = r0; r < r1; ++r) {
            std::memcpy(out + r * C, a + r * Ca, sizeof(float) * Ca);
            std::memcpy(out + r * C + Ca, b + r * Cb, sizeof(float) * Cb);
        }
    });
}

// Row r of x (image b, row i: r = b H + i) is rows 2r and 2r + 1 of the output, 2W C floats each.
void upsample2x(const float* x, int64_t B, int64_t H, int64_t W, int64_t C, float* out) {
    const int64_t L = 2 * W * C;
    parallel_ranges(B * H, COPY_MIN / (2 * L + 1) + 1, [&](int64_t r0, int64_t r1, int) {
        for (int64_t r = r0; r < r1; ++r) {
            const float* xr = x + r * W * C;
            float* o = out + 2 * r * L;
            for (int64_t j = 0; j < W; ++j) {
                std::memcpy(o + 2 * j * C, xr + j * C, sizeof(float) * C);
                std::memcpy(o + (2 * j + 1) * C, xr + j * C, sizeof(float) * C);
            }
            std::memcpy(o + L, o, sizeof(float) * L);
        }
    });
}

void upsample2x_backward(const float* dout, int64_t B, int64_t H, int64_t W, int64_t C, float* dx) {
    const int64_t L = 2 * W * C;
    parallel_ranges(B * H, COPY_MIN / (2 * L + 1) + 1, [&](int64_t r0, int64_t r1, int) {
        for (int64_t r = r0; r < r1; ++r) {
            const float* __restrict d0 = dout + 2 * r * L;
            const float* __restrict d1 = d0 + L;
            float* __restrict o = dx + r * W * C;
            for (int64_t j = 0; j < W; ++j)
#pragma omp simd
                for (int64_t c = 0; c < C; ++c) {
                    const int64_t a = 2 * j * C + c, b = a + C;
                    o[j * C + c] = d0[a] + d0[b] + d1[a] + d1[b];
                }
        }
    });
}

// x (B, P, C) -> out (B, C) (per_image) or (C,): sums over the pixels (and the images), in double over float sums
// of 32 pixels; each image's sum is its own, the images' added in order, so the result does not depend on the
// threads.
void pixel_sum(const float* x, int64_t ld, int64_t B, int64_t P, int64_t C, int per_image, float* out) {
    std::vector<double> sums((size_t)(B * C), 0.0);
    parallel_ranges(B, COPY_MIN / (P * C + 1) + 1, [&](int64_t b0, int64_t b1, int) {
        for (int64_t b = b0; b < b1; ++b) {
            double* s = sums.data() + b * C;
            const float* xb = x + b * P * ld;
            std::vector<float> block(C);
            for (int64_t p0 = 0; p0 < P; p0 += 32) {       // float sums of 32 pixels, flushed to double
                std::fill(block.begin(), block.end(), 0.0f);
                for (int64_t p = p0; p < std::min(P, p0 + 32); ++p)
                    for (int64_t c = 0; c < C; ++c) block[c] += xb[p * ld + c];
                for (int64_t c = 0; c < C; ++c) s[c] += block[c];
            }
        }
    });
    if (per_image) {
        for (int64_t i = 0; i < B * C; ++i) out[i] = (float)sums[i];
        return;
    }
    for (int64_t c = 0; c < C; ++c) {
        double s = 0.0;
        for (int64_t b = 0; b < B; ++b) s += sums[b * C + c];
        out[c] = (float)s;
    }
}

}  // namespace md

namespace md {

// ------------------------------------------------------------------------------------------------ optimizer
// optim.adam_update and optim.ema_update in one pass over the flat buffers, each element with the reference's float32
// operations in its order (this file is compiled without FMA contraction), so the results are the reference's to
// the bit.

void adam_update(float* p, const float* g, float* m, float* v, int64_t n, float lr, float beta1, float beta2,
                 float eps, float bias_correction1, float bias_correction2, float weight_decay) {
    const float c1 = 1.0f - beta1, c2 = 1.0f - beta2;
    parallel_ranges(n, COPY_MIN, [&](int64_t i0, int64_t i1, int) {
        float* __restrict pp = p;
        float* __restrict mm = m;
        float* __restrict vv = v;
        const float* __restrict gg = g;
#pragma omp simd
        for (int64_t i = i0; i < i1; ++i) {
            const float mi = mm[i] * beta1 + c1 * gg[i];
            const float vi = vv[i] * beta2 + c2 * (gg[i] * gg[i]);
            mm[i] = mi;
            vv[i] = vi;
            const float m_hat = mi / bias_correction1, v_hat = vi / bias_correction2;
            pp[i] = pp[i] - lr * (m_hat / (std::sqrt(v_hat) + eps) + weight_decay * pp[i]);
        }
    });
}

void ema_update(float* e, const float* p, int64_t n, float decay) {
    const float c = 1.0f - decay;
    parallel_ranges(n, COPY_MIN, [&](int64_t i0, int64_t i1, int) {
        float* __restrict ee = e;
        const float* __restrict pp = p;
#pragma omp simd
        for (int64_t i = i0; i < i1; ++i) ee[i] = ee[i] * decay + c * pp[i];
    });
}

}  // namespace md
