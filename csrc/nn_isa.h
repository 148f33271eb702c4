// nn_isa.h: the inner loops of the network's CPU kernels (nn_cpu.cpp drives them), written once in plain C++
// with GCC vector extensions and compiled once per instruction set: nn_avx512.cpp (16 floats a vector),
// nn_avx2.cpp (8) and nn_base.cpp (4: SSE2 on x86-64, NEON on arm64), each with its own -m flags and inside
// its own namespace, so the three copies never mix (nn_cpu.cpp picks one at run time, by what the CPU
// supports). This header must not include anything (it is included inside a namespace) and must not call
// inline library templates: those could be emitted once for all three instruction sets.
//
// The readable reference of every function here is in minidiff/layers.py or unet.py (named in each comment);
// the tests compare the two on random inputs.
//
// Before including: MD_VW (floats per vector) and MD_ACC (accumulator vectors the register file holds in a
// micro-kernel tile: 24 of AVX-512's 32 registers, 12 of AVX2's 16, 10 of SSE's 16: SSE's two-operand multiply
// needs a scratch register per product, and with 12 one accumulator would live on the stack).

typedef float vf __attribute__((vector_size(MD_VW * 4)));
typedef float vfu __attribute__((vector_size(MD_VW * 4), aligned(4)));   // the same, at any address
typedef int vi __attribute__((vector_size(MD_VW * 4)));

static inline vf load(const float* p) { return *(const vfu*)p; }
static inline void store(float* p, vf v) { *(vfu*)p = v; }
// every lane s. Not (vf){} + s: 0 + s is not s for s = -0, so the compiler keeps a real scalar addition and a
// register broadcast (two extra instructions per use, one on an FMA port); s - 0 is s for every s, so this
// form folds to one broadcast (from memory: a load, or an FMA's {1to16} operand)
static inline vf splat(float s) { return s - (vf){}; }
// the first n lanes only (0 <= n < MD_VW; the others read as 0): the ragged end of a channel row. AVX-512 and AVX2
// have masked moves (one instruction; GCC's builtins, as no header may be included here); SSE2 and NEON go lane by
// lane.
#if defined(__AVX512F__) && MD_VW == 16
static inline void store_n(float* p, vf v, int n) {
    __builtin_ia32_storeups512_mask(p, v, (unsigned short)((1u << n) - 1));
}
static inline vf load_n(const float* p, int n) {
    return __builtin_ia32_loadups512_mask(p, (vf){}, (unsigned short)((1u << n) - 1));
}
#elif defined(__AVX2__) && MD_VW == 8
static inline vi lanes_below(int n) { const vi l = {0, 1, 2, 3, 4, 5, 6, 7}; return l < n; }
static inline void store_n(float* p, vf v, int n) { __builtin_ia32_maskstoreps256((vf*)p, lanes_below(n), v); }
static inline vf load_n(const float* p, int n) { return __builtin_ia32_maskloadps256((const vf*)p, lanes_below(n)); }
#else
static inline void store_n(float* p, vf v, int n) { for (int l = 0; l < n; ++l) p[l] = v[l]; }
static inline vf load_n(const float* p, int n) { vf v = {}; for (int l = 0; l < n; ++l) v[l] = p[l]; return v; }
#endif
static inline vf vmin(vf a, vf b) { return a < b ? a : b; }
static inline vf vmax(vf a, vf b) { return a > b ? a : b; }
static inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

// ------------------------------------------------------------------------------------------------------------
// exp and sigmoid, lane by lane (Cephes expf: x = n ln 2 + r, |r| <= ln2 / 2, degree-6 polynomial, 2^n
// built in the exponent bits; about 1 ulp). Reference: layers.sigmoid (NumPy's tanh form, same values to
// float32 rounding).
static inline vf vexp(vf x) {
    x = vmin(vmax(x, splat(-87.3f)), splat(88.3f));                 // e^x stays a normal float
    const vf n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;   // round(x / ln 2), 1.5 * 2^23 trick
    vf r = x - n * 0.693359375f;                                    // ln 2 in two parts (Cody-Waite)
    r = r + n * 2.12194440e-4f;
    vf p = splat(1.9875691500e-4f);
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * (r * r) + r + 1.0f;
    const vi bits = (__builtin_convertvector(n, vi) + 127) << 23;    // 2^n
    return p * (vf)bits;
}

static inline vf vsigmoid(vf x) { return 1.0f / (1.0f + vexp(-x)); }

// SiLU y = x s and its derivative dy/dx = s (1 + x (1 - s)), s = sigmoid(x). Reference: layers.silu,
// layers.silu_backward.
static inline vf vsilu(vf x) { return x * vsigmoid(x); }
static inline vf vsilu_grad(vf x, vf dout) {
    const vf s = vsigmoid(x);
    return dout * s * (1.0f + x * (1.0f - s));
}

void silu_forward(const float* x, float* y, int64_t n) {
    int64_t i = 0;
    for (; i + MD_VW <= n; i += MD_VW) store(y + i, vsilu(load(x + i)));
    if (i < n) store_n(y + i, vsilu(load_n(x + i, (int)(n - i))), (int)(n - i));
}

void silu_backward(const float* x, const float* dout, float* dx, int64_t n) {
    int64_t i = 0;
    for (; i + MD_VW <= n; i += MD_VW) store(dx + i, vsilu_grad(load(x + i), load(dout + i)));
    if (i < n) {
        const int k = (int)(n - i);
        store_n(dx + i, vsilu_grad(load_n(x + i, k), load_n(dout + i, k)), k);
    }
}

// ------------------------------------------------------------------------------------------------------------
// GroupNorm (+ SiLU) on one image, NHWC: x is (npix, C) contiguous. Per-channel coefficients come tiled to a
// period L = lcm(C, MD_VW) floats (coef[j] = c[j mod C]), so the flat array is walked a vector at a time
// whatever C is. Reference: layers.group_norm, layers.group_norm_backward.

// Per-lane sums of y and of y x over the flat array, added into s1, s2 (double, L entries each, folded to
// channels by the caller), where y = f(q, i, x, k) is computed from the vector x at offset i of lane group q
// (k lanes real: the ragged end when n is not a multiple of the vector width; the others hold 0). The array is
// rows of L floats; Q lane groups at a time share a pass over it (at most 4: their accumulators stay in
// registers). Float vector sums flushed to double every 64 rows keep the sums accurate; each lane group's sums run
// in row order whatever Q is.
template <int Q, class F>
static void lane_groups(const float* x, int64_t n, int64_t L, F f, int64_t q0, double* s1, double* s2) {
    const int64_t rows = (n + L - 1) / L;
    for (int64_t j0 = 0; j0 < rows; j0 += 64) {
        vf a1[Q] = {}, a2[Q] = {};
        const int64_t j1 = imin(rows, j0 + 64);
        for (int64_t j = j0; j < j1; ++j) {
#pragma GCC unroll 4
            for (int g = 0; g < Q; ++g) {
                const int64_t i = j * L + (q0 + g) * MD_VW;
                if (i >= n) continue;                     // past a ragged last row
                const int k = (int)imin(MD_VW, n - i);
                const vf xv = k == MD_VW ? load(x + i) : load_n(x + i, k), y = f(q0 + g, i, xv, k);
                a1[g] += y;
                a2[g] += y * xv;
            }
        }
        for (int g = 0; g < Q; ++g)
            for (int l = 0; l < MD_VW; ++l) {
                s1[(q0 + g) * MD_VW + l] += a1[g][l];
                s2[(q0 + g) * MD_VW + l] += a2[g][l];
            }
    }
}

template <class F>
static void lane_sums(const float* x, int64_t n, int64_t L, F f, double* s1, double* s2) {
    const int64_t groups = L / MD_VW;
    for (int64_t q = 0; q < groups; q += 4) {
        switch (imin(4, groups - q)) {
        case 1: lane_groups<1>(x, n, L, f, q, s1, s2); break;
        case 2: lane_groups<2>(x, n, L, f, q, s1, s2); break;
        case 3: lane_groups<3>(x, n, L, f, q, s1, s2); break;
        default: lane_groups<4>(x, n, L, f, q, s1, s2); break;
        }
    }
}

// Forward: the sums of x and x^2.
void gn_moments(const float* x, int64_t n, int64_t L, double* s1, double* s2) {
    lane_sums(x, n, L, [](int64_t, int64_t, vf xv, int) { return xv; }, s1, s2);
}

// y = x a + b (then SiLU when silu), a and b tiled to L.
void gn_apply(const float* x, const float* a, const float* b, int64_t n, int64_t L, int silu, float* y) {
    for (int64_t base = 0; base < n; base += L) {
        const int64_t m = imin(L, n - base);
        int64_t j = 0;
        for (; j + MD_VW <= m; j += MD_VW) {
            const vf h = load(x + base + j) * load(a + j) + load(b + j);
            store(y + base + j, silu ? vsilu(h) : h);
        }
        if (j < m) {
            const int k = (int)(m - j);
            const vf h = load_n(x + base + j, k) * load(a + j) + load(b + j);
            store_n(y + base + j, silu ? vsilu(h) : h, k);
        }
    }
}

// The gradient reaching the normalised output: dh = dout, or with SiLU dh = dout SiLU'(x a + b) (recomputed:
// the forward pass keeps only x). Backward pass 1 sums dh and dh x per channel, and with SiLU writes dh to dh_out
// (so that pass 2 need not compute the sigmoid again); pass 2 writes dx = A dh + Bx x + Cc (in place over dh
// when dh is dx).
static inline vf gn_dh(vf x, vf dout, vf a, vf b, int silu) { return silu ? vsilu_grad(x * a + b, dout) : dout; }

void gn_backward_sums(const float* x, const float* dout, const float* a, const float* b, int64_t n, int64_t L,
                      int silu, double* s1, double* s2, float* dh_out) {
    lane_sums(x, n, L, [&](int64_t q, int64_t i, vf xv, int k) {   // past the end: x = dout = 0, so dh = 0
        const vf d = k == MD_VW ? load(dout + i) : load_n(dout + i, k);
        const vf dh = gn_dh(xv, d, load(a + q * MD_VW), load(b + q * MD_VW), silu);
        if (dh_out) {
            if (k == MD_VW) store(dh_out + i, dh);
            else store_n(dh_out + i, dh, k);
        }
        return dh;
    }, s1, s2);
}

void gn_backward_apply(const float* x, const float* dh, const float* A, const float* Bx, const float* Cc, int64_t n,
                       int64_t L, float* dx) {
    for (int64_t base = 0; base < n; base += L) {
        const int64_t m = imin(L, n - base);
        int64_t j = 0;
        for (; j + MD_VW <= m; j += MD_VW)
            store(dx + base + j, load(A + j) * load(dh + base + j) + load(Bx + j) * load(x + base + j) + load(Cc + j));
        if (j < m) {
            const int k = (int)(m - j);
            store_n(dx + base + j, load(A + j) * load_n(dh + base + j, k) + load(Bx + j) * load_n(x + base + j, k)
                    + load(Cc + j), k);
        }
    }
}

// ------------------------------------------------------------------------------------------------------------
// The 3x3 stride-1 convolution as a sum of shifted matrix products (reference: layers.conv2d and
// layers.conv2d_backward), and the plain matrix product (T = 1: layers.linear), with a register-blocked
// micro-kernel. For the convolution, input rows are pixels of the padded image grid (B, H + 1, W + 1), flattened;
// output pixel q reads input rows xrow(q) + off[t] for the 9 taps t (nn_kernels.h). A tile is R output pixels x NB
// vectors of output channels; its R * NB accumulators stay in registers through all taps and all K input channels
// (the reduction), each step a broadcast input value times a vector of weights. Tiles hold real pixels only: each
// row's input address is its own (a register per row, as a fixed stride would take), so the grid's padding rows
// cost nothing.

typedef double vd __attribute__((vector_size(MD_VW * 4)));
typedef double f64u __attribute__((aligned(4), may_alias));   // two floats read as one 8-byte value

// The G floats at p repeated across a vector: G = 1, a broadcast; G = 2, the pair (p[0], p[1]) in every two lanes
// (one 8-byte broadcast load).
template <int G>
static inline vf bcast(const float* p) {
    if constexpr (G == 1) return splat(*p);
    else return (vf)(*(const f64u*)p - (vd){});
}

static inline vi iota() { vi v; for (int l = 0; l < MD_VW; ++l) v[l] = l; return v; }

// Lanes (c, j) = 2c + j of a and b hold two partial sums of output channel c: their sums, a's channels then b's.
static inline vf fold_pairs(vf a, vf b) {
    const vi even = iota() * 2;
    return __builtin_shuffle(a, b, even) + __builtin_shuffle(a, b, even + 1);
}

// rows[i] = map's row of output pixel q0 + i, i < n: one division, then steps
static inline void map_rows(const PixelMap& m, int64_t q0, int64_t n, int64_t* rows) {
    const int64_t hw = m.Hq * m.Wq;
    int64_t img = q0 / hw, a = q0 % hw / m.Wq, b = q0 % m.Wq;
    int64_t line = m.base + img * m.s_img + a * m.s_row;          // row of pixel (img, a, 0)
    for (int64_t i = 0; i < n; ++i) {
        rows[i] = line + b * m.s_col;
        if (++b == m.Wq) {
            b = 0;
            if (++a == m.Hq) { a = 0; ++img; }
            line = m.base + img * m.s_img + a * m.s_row;
        }
    }
}

// out[0, k) = s + bias + res (each of those where not null), k lanes (0 < k <= MD_VW): a convolution's output
// vector as written
static inline void store_output(float* out, vf s, const float* bias, const float* res, int k) {
    if (k == MD_VW) {
        if (bias) s += load(bias);
        if (res) s += load(res);
        store(out, s);
    } else {
        if (bias) s += load_n(bias, k);
        if (res) s += load_n(res, k);
        store_n(out, s, k);
    }
}

// Output pixels q0 .. q0 + n (n <= R; xoff: their input rows' offsets in floats, R of them; orows: their output
// rows) of channel block [n0, n0 + NB * VW) of a packed weight row (output channels from c0): accumulate, then
// write out, adding the bias (and the residual).
template <int R, int NB, int G>
static void conv_tile(const ConvTask& a, const int64_t* xoff, const int64_t* orows, int64_t q0, int n, int64_t n0,
                      int64_t c0) {
    vf acc[R][NB];
    int64_t o[R];                                         // each row's input offset, kept in a register
    for (int r = 0; r < R; ++r) {
        o[r] = xoff[r];
        for (int nb = 0; nb < NB; ++nb) acc[r][nb] = (vf){};
    }
    const int64_t KG = a.K / G, ldw = a.NC * G;
    for (int t = 0; t < a.T; ++t) {
        const float* xt = a.xbuf + a.off[t] * a.ldx;
        const float* wt = a.w + t * a.K * a.NC + n0;
        for (int64_t kk = 0; kk < KG; ++kk) {
            vf wv[NB];
#pragma GCC unroll 4
            for (int nb = 0; nb < NB; ++nb) wv[nb] = load(wt + kk * ldw + nb * MD_VW);
#pragma GCC unroll 24
            for (int r = 0; r < R; ++r) {
                const vf xv = bcast<G>(xt + o[r] + kk * G);
#pragma GCC unroll 4
                for (int nb = 0; nb < NB; ++nb) acc[r][nb] += xv * wv[nb];
            }
        }
    }
    // the channel vectors as written: G = 2 folds each two accumulators into one vector of channels
    constexpr int NOUT = G == 1 ? NB : (NB + 1) / 2;
    const int64_t hw = a.orow.Hq * a.orow.Wq;
    for (int r = 0; r < n; ++r) {
        const int64_t row = orows[r];
        const float* bias = a.bias ? a.bias + (q0 + r) / hw * a.bias_stride : nullptr;   // per image, or shared
        const float* res = a.residual ? a.residual + row * a.N : nullptr;
        float* out = a.out + row * a.N;
        for (int v = 0; v < NOUT; ++v) {
            vf s;
            if constexpr (G == 1) s = acc[r][v];
            else s = fold_pairs(acc[r][2 * v], 2 * v + 1 < NB ? acc[r][2 * v + 1] : (vf){});
            const int64_t c = c0 + v * MD_VW;
            const int k = (int)imin(MD_VW, a.N - c);           // channels of this vector that exist
            if (k > 0) store_output(out + c, s, bias ? bias + c : nullptr, res ? res + c : nullptr, k);
        }
    }
}

template <int R, int NB>
static void conv_rows(const ConvTask& a, const int64_t* xoff, const int64_t* orows, int64_t q0, int n, int64_t n0,
                      int64_t c0) {
    for (int i = 0; i < n; i += R) {
        const int m = (int)imin(R, n - i);
        if (a.G == 2) conv_tile<R, NB, 2>(a, xoff + i, orows + i, q0 + i, m, n0, c0);
        else conv_tile<R, NB, 1>(a, xoff + i, orows + i, q0 + i, m, n0, c0);
    }
}

// Ask for the input rows of the tile from pixel q0 (one span per tap or run, at most 32 KB in all): they come in
// from L2 or memory while the tile before computes.
static void prefetch_tile(const ConvTask& a, int64_t q0) {
    if (q0 >= a.P) return;
    int64_t first, last;
    map_rows(a.xrow, q0, 1, &first);
    map_rows(a.xrow, imin(a.P, q0 + a.rows_per_tile) - 1, 1, &last);
    const int64_t span = (last - first) * a.ldx + a.K;           // floats of one tap's span
    if (span * a.T > 8192) return;
    for (int t = 0; t < a.T; ++t) {
        const float* p = a.xbuf + (first + a.off[t]) * a.ldx;
        for (int64_t i = 0; i < span; i += 16) __builtin_prefetch(p + i);
    }
}

// Row tiles [tile0, tile1) (rows_per_tile output pixels each, a multiple of every R used) of every channel block.
// Channel blocks hold up to 4 (AVX-512), 3 (AVX2) or 2 vectors (SSE2); R = MD_ACC / NB.
void conv_tiles(const ConvTask& a, int64_t tile0, int64_t tile1) {
    int64_t xoff[MD_ACC], orows[MD_ACC];
    for (int64_t tile = tile0; tile < tile1; ++tile) {
        const int64_t q0 = tile * a.rows_per_tile;
        const int n = (int)imin(a.rows_per_tile, a.P - q0);
        prefetch_tile(a, q0 + a.rows_per_tile);
        map_rows(a.xrow, q0, n, xoff);
        map_rows(a.orow, q0, n, orows);
        for (int r = 0; r < a.rows_per_tile; ++r)            // rows past P repeat the last pixel (not written)
            xoff[r] = r < n ? xoff[r] * a.ldx : xoff[n - 1];
        for (int blk = 0; blk < a.nblocks; ++blk) {
            const int64_t n0 = a.block_start[blk] * MD_VW, c0 = n0 / a.G;
            switch (a.block_vectors[blk]) {
            case 1: conv_rows<MD_ACC, 1>(a, xoff, orows, q0, n, n0, c0); break;
            case 2: conv_rows<MD_ACC / 2, 2>(a, xoff, orows, q0, n, n0, c0); break;
            case 3: conv_rows<MD_ACC / 3, 3>(a, xoff, orows, q0, n, n0, c0); break;
#if MD_ACC >= 24
            default: conv_rows<MD_ACC / 4, 4>(a, xoff, orows, q0, n, n0, c0); break;
#else
            default: break;
#endif
            }
        }
    }
}

// The weight gradient: dw[t, k, n] += sum_q xbuf[xrow(q) + off[t], k] dy[dyrow(q) + voff[t], n], pixels [q0, q1)
// (rows of ldy floats, so a last vector past N reads the next row: those lanes land in dw's padding columns, never
// read). A tile is R input channels x NB vectors of output channels; pixels go in chunks that stay in L1 while the
// 9 taps and all tiles pass over them. dw is (9, K, NP), this piece's own.
template <int R, int NB>
static void wgrad_tile(const WGradTask& a, int t, int64_t k0, int64_t n0, const int64_t* xrows, const int64_t* dyrows,
                       int64_t n, int add, float* dw) {
    vf acc[R][NB];
    float* d = dw + (t * a.K + k0) * a.NP + n0;
    for (int r = 0; r < R; ++r)
        for (int nb = 0; nb < NB; ++nb) acc[r][nb] = (vf){};
    const float* xt = a.xbuf + a.off[t] * a.ldx + k0;
    const float* dyt = a.dy + a.voff[t] * a.ldy + n0;
    for (int64_t i = 0; i < n; ++i) {
        const float* xr = xt + xrows[i] * a.ldx;
        const float* dyr = dyt + dyrows[i] * a.ldy;
        vf dv[NB];
#pragma GCC unroll 4
        for (int nb = 0; nb < NB; ++nb) dv[nb] = load(dyr + nb * MD_VW);
#pragma GCC unroll 24
        for (int r = 0; r < R; ++r) {
            const vf xv = splat(xr[r]);
#pragma GCC unroll 4
            for (int nb = 0; nb < NB; ++nb) acc[r][nb] += xv * dv[nb];
        }
    }
    for (int r = 0; r < R && k0 + r < a.K; ++r)
        for (int nb = 0; nb < NB; ++nb) {
            float* o = d + r * a.NP + nb * MD_VW;
            store(o, add ? load(o) + acc[r][nb] : acc[r][nb]);
        }
}

// add = 0: dw is written by the first chunk (every element of it), not added to
void conv_wgrad(const WGradTask& a, int64_t q0, int64_t q1, float* dw, int add) {
    // a chunk's dy rows (ldy floats each, on each of the taps' rows when the taps move them) fill about 16 KB of L1
    const int64_t per_pixel = a.ldy * (a.voff[0] != a.voff[a.T - 1] ? a.T : 1);
    const int64_t CHUNK = imin(256, 4096 / per_pixel > 16 ? 4096 / per_pixel : 16);
    int64_t xrows[256], dyrows[256];
    for (int64_t c0 = q0; c0 < q1; c0 += CHUNK) {
        const int64_t n = imin(q1, c0 + CHUNK) - c0;
        map_rows(a.xrow, c0, n, xrows);
        map_rows(a.dyrow, c0, n, dyrows);
        if (c0 > q0) add = 1;
        for (int t = 0; t < a.T; ++t) {
            for (int blk = 0; blk < a.nblocks; ++blk) {
                const int64_t n0 = a.block_start[blk] * MD_VW;
                switch (a.block_vectors[blk]) {
                case 1: for (int64_t k = 0; k < a.K; k += MD_ACC) wgrad_tile<MD_ACC, 1>(a, t, k, n0, xrows, dyrows, n, add, dw); break;
                case 2: for (int64_t k = 0; k < a.K; k += MD_ACC / 2) wgrad_tile<MD_ACC / 2, 2>(a, t, k, n0, xrows, dyrows, n, add, dw); break;
                case 3: for (int64_t k = 0; k < a.K; k += MD_ACC / 3) wgrad_tile<MD_ACC / 3, 3>(a, t, k, n0, xrows, dyrows, n, add, dw); break;
#if MD_ACC >= 24
                default: for (int64_t k = 0; k < a.K; k += MD_ACC / 4) wgrad_tile<MD_ACC / 4, 4>(a, t, k, n0, xrows, dyrows, n, add, dw); break;
#else
                default: break;
#endif
                }
            }
        }
    }
}

// ------------------------------------------------------------------------------------------------------------
// Winograd F(2x2, 3x3) (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", 2016): a stride-1 3x3
// convolution computes each 2x2 output tile Y from the 4x4 input patch d around it as Y = A^T [U . V] A, with
// V = B^T d B per input channel, U = G g G^T per (output, input) channel pair, "." a sum over input channels (for
// each of the 16 positions e of the 4x4 tile a matrix product, tiles x K times K x N: nn_cpu.cpp runs conv_tiles
// on it), and
//     B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1],  A^T = [1 1 1 0; 0 1 -1 -1].
// 16 products per 4 output pixels instead of 9 per pixel. Tile (img, i, j) of side M covers output rows M i to
// M i + M - 1 and the same columns of j, tiles numbered image by image, row by row; past the image the patch reads
// zeros and the output is not written. Reference: layers.conv2d (the same sums, in another order).

// F(4x4, 3x3) is the same with 6x6 patches around 4x4 output tiles, 36 products per 16 output pixels (2.25 a
// pixel against F(2x2)'s 4), from the points 0, 1, -1, 2, -2 and infinity:
//     B^T = [4 0 -5 0 1 0; 0 -4 -4 1 1 0; 0 4 -4 -1 1 0; 0 -2 -1 2 1 0; 0 2 -1 -2 1 0; 0 4 0 -5 0 1],
//     A^T = [1 1 1 1 1 0; 0 1 -1 2 -2 0; 0 1 1 4 4 0; 0 1 -1 8 -8 1].
// Below, M is the output tile's side (2 or 4) and the patch's is M + 2.

// B^T applied to the M + 2 values d[0], d[s], d[2 s], ... in place
template <int M>
static inline void wino_bt(vf* d, int s) {
    if constexpr (M == 2) {
        const vf d0 = d[0], d1 = d[s], d2 = d[2 * s], d3 = d[3 * s];
        d[0] = d0 - d2; d[s] = d1 + d2; d[2 * s] = d2 - d1; d[3 * s] = d1 - d3;
    } else {
        const vf d0 = d[0], d1 = d[s], d2 = d[2 * s], d3 = d[3 * s], d4 = d[4 * s], d5 = d[5 * s];
        const vf a = d4 - 4.0f * d2, b = d3 - 4.0f * d1, c = d4 - d2, e = 2.0f * (d3 - d1);
        d[0] = 4.0f * d0 - 5.0f * d2 + d4;
        d[s] = a + b;                                    // -4 d1 - 4 d2 + d3 + d4
        d[2 * s] = a - b;                                //  4 d1 - 4 d2 - d3 + d4
        d[3 * s] = c + e;                                // -2 d1 - d2 + 2 d3 + d4
        d[4 * s] = c - e;                                //  2 d1 - d2 - 2 d3 + d4
        d[5 * s] = 4.0f * d1 - 5.0f * d3 + d5;
    }
}

// A^T applied to the M + 2 values m[0], m[1], ...: the M values y
template <int M>
static inline void wino_at(const vf* m, vf* y) {
    if constexpr (M == 2) {
        y[0] = m[0] + m[1] + m[2];
        y[1] = m[1] - m[2] - m[3];
    } else {
        const vf a = m[1] + m[2], b = m[1] - m[2], c = m[3] + m[4], e = m[3] - m[4];
        y[0] = m[0] + a + c;
        y[1] = b + 2.0f * e;
        y[2] = a + 4.0f * c;
        y[3] = b + 8.0f * e + m[5];
    }
}

// B^T d B of the (M + 2)^2 patch d (row-major) in place
template <int M>
static inline void wino_bdb(vf* d) {
    constexpr int n = M + 2;
#pragma GCC unroll 6
    for (int v = 0; v < n; ++v) wino_bt<M>(d + v, n);          // B^T d: along the columns
#pragma GCC unroll 6
    for (int u = 0; u < n; ++u) wino_bt<M>(d + n * u, 1);      // (B^T d) B: along the rows
}

// Tile q of a batch of (H, W) images in M x M tiles: its image b and tile row and column (i, j), stepped in order
template <int M>
struct TileWalk {
    int64_t th, tw, b, i, j;
    TileWalk(int64_t H, int64_t W, int64_t q) : th((H + M - 1) / M), tw((W + M - 1) / M) {
        b = q / (th * tw); i = q % (th * tw) / tw; j = q % tw;
    }
    void next() { if (++j == tw) { j = 0; if (++i == th) { i = 0; ++b; } } }
};

// Tiles [q0, q0 + n) of x (B, H, W, C; pixels xs floats apart) -> V[e, q - q0, c] ((M + 2)^2 blocks of ldt rows of
// ldv floats; channels C to ldv zero). zeros: round_up(ldv, MD_VW) zero floats, read for pixels outside the image.
template <int M>
void wino_input_m(const float* x, int64_t xs, int64_t H, int64_t W, int64_t C, int64_t ldv, int64_t q0,
                  int64_t n, int64_t ldt, const float* zeros, float* V) {
    constexpr int P = M + 2, E = P * P;
    TileWalk<M> tw(H, W, q0);
    for (int64_t q = 0; q < n; ++q, tw.next()) {
        const float* p[E];                                // the patch's pixels
        for (int u = 0; u < P; ++u)
            for (int v = 0; v < P; ++v) {
                const int64_t h = M * tw.i - 1 + u, w = M * tw.j - 1 + v;
                p[P * u + v] = h >= 0 && h < H && w >= 0 && w < W ? x + ((tw.b * H + h) * W + w) * xs : zeros;
            }
        float* out = V + q * ldv;
        int64_t c = 0;
        for (; c + MD_VW <= C && c + MD_VW <= ldv; c += MD_VW) {
            vf d[E];
#pragma GCC unroll 36
            for (int e = 0; e < E; ++e) d[e] = load(p[e] + c);
            wino_bdb<M>(d);
#pragma GCC unroll 36
            for (int e = 0; e < E; ++e) store(out + e * ldt * ldv + c, d[e]);
        }
        for (; c < ldv; c += MD_VW) {                     // the ragged end
            const int k = (int)(C - c > 0 ? imin(MD_VW, C - c) : 0), m = (int)imin(MD_VW, ldv - c);
            vf d[E];
#pragma GCC unroll 36
            for (int e = 0; e < E; ++e) d[e] = load_n(p[e] + c, k);
            wino_bdb<M>(d);
#pragma GCC unroll 36
            for (int e = 0; e < E; ++e) store_n(out + e * ldt * ldv + c, d[e], m);
        }
    }
}

void wino_input(int m, const float* x, int64_t xs, int64_t H, int64_t W, int64_t C, int64_t ldv, int64_t q0,
                int64_t n, int64_t ldt, const float* zeros, float* V) {
    if (m == 4) wino_input_m<4>(x, xs, H, W, C, ldv, q0, n, ldt, zeros, V);
    else wino_input_m<2>(x, xs, H, W, C, ldv, q0, n, ldt, zeros, V);
}

// The weight gradient's side of the output (nn_cpu.cpp, winograd_wgrad): Y = A^T M A gives dM = A dY A^T, the
// M x M tile dY of the output gradient spread over the (M + 2)^2 positions (F(2x2): A's rows (1, 0), (1, 1),
// (1, -1), (0, -1); F(4x4): (1, 0, 0, 0), (1, 1, 1, 1), (1, -1, 1, -1), (1, 2, 4, 8), (1, -2, 4, -8), (0, 0, 0, 1)).
// Tiles [q0, q0 + n) of dy (B, H, W, N; pixels ldd floats apart) -> D[e, q - q0, c] ((M + 2)^2 blocks of ldt rows
// of ldm floats; channels N to ldm zero); output pixels past the image count as zero. zeros as wino_input's.

// A applied to the M values y[0], y[s], ...: the M + 2 values d[0], d[t], ...
template <int M>
static inline void wino_a(const vf* y, int s, vf* d, int t) {
    if constexpr (M == 2) {
        const vf y0 = y[0], y1 = y[s];
        d[0] = y0; d[t] = y0 + y1; d[2 * t] = y0 - y1; d[3 * t] = -y1;
    } else {
        const vf y0 = y[0], y1 = y[s], y2 = y[2 * s], y3 = y[3 * s];
        const vf a = y0 + y2, b = y1 + y3, c = y0 + 4.0f * y2, e = 2.0f * y1 + 8.0f * y3;
        d[0] = y0; d[t] = a + b; d[2 * t] = a - b; d[3 * t] = c + e; d[4 * t] = c - e; d[5 * t] = y3;
    }
}

template <int M>
void wino_dout_m(const float* dy, int64_t ldd, int64_t H, int64_t W, int64_t N, int64_t ldm, int64_t q0,
                 int64_t n, int64_t ldt, const float* zeros, float* D) {
    constexpr int P = M + 2, E = P * P;
    TileWalk<M> tw(H, W, q0);
    for (int64_t q = 0; q < n; ++q, tw.next()) {
        const float* p[M * M];                            // the tile's output pixels, row-major
        for (int u = 0; u < M; ++u)
            for (int v = 0; v < M; ++v) {
                const int64_t h = M * tw.i + u, w = M * tw.j + v;
                p[M * u + v] = h < H && w < W ? dy + ((tw.b * H + h) * W + w) * ldd : zeros;
            }
        float* out = D + q * ldm;
        for (int64_t c = 0; c < ldm; c += MD_VW) {
            const int k = (int)(N - c > 0 ? imin(MD_VW, N - c) : 0), m = (int)imin(MD_VW, ldm - c);
            vf y[M * M], t[P * M], d[E];
#pragma GCC unroll 16
            for (int e = 0; e < M * M; ++e) y[e] = k == MD_VW ? load(p[e] + c) : load_n(p[e] + c, k);
#pragma GCC unroll 4
            for (int v = 0; v < M; ++v) wino_a<M>(y + v, M, t + v, M);     // A dY: along the columns
#pragma GCC unroll 6
            for (int u = 0; u < P; ++u) wino_a<M>(t + M * u, 1, d + P * u, 1);   // (A dY) A^T: along the rows
#pragma GCC unroll 36
            for (int e = 0; e < E; ++e) {
                if (m == MD_VW) store(out + e * ldt * ldm + c, d[e]);
                else store_n(out + e * ldt * ldm + c, d[e], m);
            }
        }
    }
}

void wino_dout(int m, const float* dy, int64_t ldd, int64_t H, int64_t W, int64_t N, int64_t ldm, int64_t q0,
               int64_t n, int64_t ldt, const float* zeros, float* D) {
    if (m == 4) wino_dout_m<4>(dy, ldd, H, W, N, ldm, q0, n, ldt, zeros, D);
    else wino_dout_m<2>(dy, ldd, H, W, N, ldm, q0, n, ldt, zeros, D);
}

// out (B, H, W, N) at tiles [q0, q0 + n) = A^T M A (+ bias, + residual: store_output, as conv_tile), M[e, q - q0, c]
// ((M + 2)^2 blocks of ldt rows of N floats); bias (N,) for all images (bias_stride 0) or a row of bias_stride
// floats per image, or null
template <int M>
void wino_output_m(const float* Mt, int64_t ldt, int64_t H, int64_t W, int64_t N, int64_t q0, int64_t n,
                   const float* bias, int64_t bias_stride, const float* residual, float* out) {
    constexpr int P = M + 2;
    TileWalk<M> tw(H, W, q0);
    for (int64_t q = 0; q < n; ++q, tw.next()) {
        const float* bb = bias ? bias + tw.b * bias_stride : nullptr;
        const float* mt = Mt + q * N;
        const int rows = (int)imin(M, H - M * tw.i), cols = (int)imin(M, W - M * tw.j);
        for (int64_t c = 0; c < N; c += MD_VW) {
            const int k = (int)imin(MD_VW, N - c);
            vf r[M * P];                                  // A^T m: M rows of M + 2
#pragma GCC unroll 6
            for (int v = 0; v < P; ++v) {
                vf m[P], y[M];
#pragma GCC unroll 6
                for (int u = 0; u < P; ++u) {
                    const float* src = mt + (P * u + v) * ldt * N + c;
                    m[u] = k == MD_VW ? load(src) : load_n(src, k);
                }
                wino_at<M>(m, y);
#pragma GCC unroll 4
                for (int a = 0; a < M; ++a) r[P * a + v] = y[a];
            }
            for (int u = 0; u < rows; ++u) {
                vf y[M];                                  // (A^T m) A
                wino_at<M>(r + P * u, y);
                for (int v = 0; v < cols; ++v) {
                    const int64_t at = (((tw.b * H) + M * tw.i + u) * W + M * tw.j + v) * N + c;
                    store_output(out + at, y[v], bb ? bb + c : nullptr, residual ? residual + at : nullptr, k);
                }
            }
        }
    }
}

void wino_output(int m, const float* Mt, int64_t ldt, int64_t H, int64_t W, int64_t N, int64_t q0, int64_t n,
                 const float* bias, int64_t bias_stride, const float* residual, float* out) {
    if (m == 4) wino_output_m<4>(Mt, ldt, H, W, N, q0, n, bias, bias_stride, residual, out);
    else wino_output_m<2>(Mt, ldt, H, W, N, q0, n, bias, bias_stride, residual, out);
}

// ------------------------------------------------------------------------------------------------------------
// Attention's softmax over each row of the scores, in place: A = softmax(S scale), the row's maximum subtracted
// before exp (reference: unet.attention, layers.softmax), and its backward pass dS = A (dA - rowsum(dA A)) scale,
// written over dA (unet.attention_backward). Rows of n floats, ld apart; the ragged end of a row is one masked
// vector.
static inline float lanes_max(vf v) {
    float m = v[0];
    for (int l = 1; l < MD_VW; ++l) m = v[l] > m ? v[l] : m;
    return m;
}
static inline float lanes_sum(vf v) {
    float s = 0.0f;
    for (int l = 0; l < MD_VW; ++l) s += v[l];
    return s;
}

// R rows at a time: each row's operations are those of the row alone, in the same order (the same result), and
// the R rows' chains of dependent steps (the lane reductions, exp, the division) overlap: a row of 49 scores
// alone waited on them for most of its time.
template <int R>
static void softmax_block(float* s, int64_t n, int64_t ld, float scale) {
    const int64_t nv = n / MD_VW * MD_VW;
    const int k = (int)(n - nv);
    const vi tail = iota() < k;                              // the ragged vector's real lanes
    vf m[R], mx[R], sum[R], inv[R];
    for (int g = 0; g < R; ++g) m[g] = splat(-__builtin_inff());
    for (int64_t j = 0; j < nv; j += MD_VW)
        for (int g = 0; g < R; ++g) m[g] = vmax(m[g], load(s + g * ld + j) * scale);
    for (int g = 0; g < R; ++g) {
        if (k) m[g] = vmax(m[g], tail ? load_n(s + g * ld + nv, k) * scale : splat(-__builtin_inff()));
        mx[g] = splat(lanes_max(m[g]));
        sum[g] = (vf){};
    }
    for (int64_t j = 0; j < nv; j += MD_VW)
        for (int g = 0; g < R; ++g) {
            const vf e = vexp(load(s + g * ld + j) * scale - mx[g]);
            store(s + g * ld + j, e);
            sum[g] += e;
        }
    for (int g = 0; g < R; ++g) {
        if (k) {
            const vf e = tail ? vexp(load_n(s + g * ld + nv, k) * scale - mx[g]) : (vf){};
            store_n(s + g * ld + nv, e, k);
            sum[g] += e;
        }
        inv[g] = splat(1.0f / lanes_sum(sum[g]));            // a product per element, not a division
    }
    for (int64_t j = 0; j < nv; j += MD_VW)
        for (int g = 0; g < R; ++g) store(s + g * ld + j, load(s + g * ld + j) * inv[g]);
    if (k)
        for (int g = 0; g < R; ++g) store_n(s + g * ld + nv, load_n(s + g * ld + nv, k) * inv[g], k);
}

void softmax_rows(float* s, int64_t rows, int64_t n, int64_t ld, float scale) {
    int64_t i = 0;
    for (; i + 4 <= rows; i += 4) softmax_block<4>(s + i * ld, n, ld, scale);
    for (; i < rows; ++i) softmax_block<1>(s + i * ld, n, ld, scale);
}

template <int R>
static void softmax_backward_block(const float* a, float* d, int64_t n, int64_t ld, float scale) {
    const int64_t nv = n / MD_VW * MD_VW;
    const int k = (int)(n - nv);
    vf dot[R], rowsum[R];
    for (int g = 0; g < R; ++g) dot[g] = (vf){};
    for (int64_t j = 0; j < nv; j += MD_VW)
        for (int g = 0; g < R; ++g) dot[g] += load(d + g * ld + j) * load(a + g * ld + j);
    for (int g = 0; g < R; ++g) {
        if (k) dot[g] += load_n(d + g * ld + nv, k) * load_n(a + g * ld + nv, k);   // the other lanes read 0
        rowsum[g] = splat(lanes_sum(dot[g]));
    }
    for (int64_t j = 0; j < nv; j += MD_VW)
        for (int g = 0; g < R; ++g) {
            float* dr = d + g * ld + j;
            store(dr, load(a + g * ld + j) * (load(dr) - rowsum[g]) * scale);
        }
    if (k)
        for (int g = 0; g < R; ++g) {
            float* dr = d + g * ld + nv;
            store_n(dr, load_n(a + g * ld + nv, k) * (load_n(dr, k) - rowsum[g]) * scale, k);
        }
}

void softmax_backward_rows(const float* a, float* d, int64_t rows, int64_t n, int64_t ld, float scale) {
    int64_t i = 0;
    for (; i + 4 <= rows; i += 4) softmax_backward_block<4>(a + i * ld, d + i * ld, n, ld, scale);
    for (; i < rows; ++i) softmax_backward_block<1>(a + i * ld, d + i * ld, n, ld, scale);
}

// ------------------------------------------------------------------------------------------------------------
// The instruction set's peak: MD_CHAINS independent chains of a * x + b (one FMA each, no loads; at least 12,
// enough to fill the units whatever the tile size), `iters` times; returns a value depending on every chain so
// that none is optimised away. 2 MD_VW MD_CHAINS FLOP an iteration.
#define MD_CHAINS (MD_ACC > 12 ? MD_ACC : 12)
float fma_loop(int64_t iters) {
    vf acc[MD_CHAINS];
    for (int i = 0; i < MD_CHAINS; ++i) acc[i] = splat(1.0f + 0.001f * (float)i);
    const vf a = splat(0.999999f), b = splat(1e-7f);
    for (int64_t it = 0; it < iters; ++it) {
#pragma GCC unroll 32
        for (int i = 0; i < MD_CHAINS; ++i) acc[i] = acc[i] * a + b;
    }
    vf s = {};
    for (int i = 0; i < MD_CHAINS; ++i) s += acc[i];
    float r = 0.0f;
    for (int l = 0; l < MD_VW; ++l) r += s[l];
    return r;
}
