// nn_module.cpp: Python bindings of the network's CPU kernels (nn_kernels.h), part of minidiff._core.
// Every array is checked here (dtype, C-contiguity, shapes), so bad input is a TypeError or ValueError, never a
// crash; minidiff/fast/cpu.py calls these only for inputs the kernels take and uses the references otherwise.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <list>
#include <map>
#include <mutex>
#include <new>
#include <stdexcept>

#ifdef __linux__
#include <sys/mman.h>
#include <unistd.h>
#endif
#include <string>
#include <vector>

#include "nn_kernels.h"

namespace py = pybind11;

namespace md {
namespace {

using Shape = std::vector<py::ssize_t>;

std::string shape_str(const py::array& a) {
    std::string s = "(";
    for (py::ssize_t i = 0; i < a.ndim(); ++i) s += (i ? ", " : "") + std::to_string(a.shape(i));
    return s + (a.ndim() == 1 ? ",)" : ")");
}

// A C-contiguous float32 array of `ndim` dimensions (any ndim when -1).
py::array arr(const py::handle& h, const char* name, int ndim) {
    if (!py::isinstance<py::array>(h)) throw py::type_error(std::string(name) + " must be a NumPy array");
    py::array a = py::reinterpret_borrow<py::array>(h);
    if (!a.dtype().is(py::dtype::of<float>()))
        throw py::type_error(std::string(name) + " must be float32 (the kernels' type), got " +
                             std::string(py::str(a.dtype())));
    if (!(a.flags() & py::array::c_style)) throw py::value_error(std::string(name) + " must be C-contiguous");
    if (ndim >= 0 && a.ndim() != ndim)
        throw py::value_error(std::string(name) + " must have " + std::to_string(ndim) + " dimensions, got shape " +
                              shape_str(a));
    return a;
}

// As arr, but also a slice of the channels (last axis) of a C-contiguous array, as Concat's backward gives: the
// last axis contiguous, the others rows (pixels) of one stride, *ld floats (>= the channels) apart.
py::array arr_rows(const py::handle& h, const char* name, int ndim, int64_t* ld) {
    if (!py::isinstance<py::array>(h)) throw py::type_error(std::string(name) + " must be a NumPy array");
    py::array a = py::reinterpret_borrow<py::array>(h);
    const py::ssize_t nd = a.ndim();
    if (a.flags() & py::array::c_style || nd < 2) {
        *ld = nd ? a.shape(nd - 1) : 0;
        return arr(h, name, ndim);
    }
    bool rows = a.strides(nd - 1) == 4 && a.strides(nd - 2) % 4 == 0 && a.strides(nd - 2) >= 4 * a.shape(nd - 1);
    for (py::ssize_t i = 0; rows && i + 2 < nd; ++i) rows = a.strides(i) == a.strides(i + 1) * a.shape(i + 1);
    if (!rows) return arr(h, name, ndim);                 // the error arr names
    if (!a.dtype().is(py::dtype::of<float>()))
        throw py::type_error(std::string(name) + " must be float32 (the kernels' type), got " +
                             std::string(py::str(a.dtype())));
    if (ndim >= 0 && nd != ndim)
        throw py::value_error(std::string(name) + " must have " + std::to_string(ndim) + " dimensions, got shape " +
                              shape_str(a));
    *ld = a.strides(nd - 2) / 4;
    return a;
}

void same_shape(const py::array& a, const char* an, const py::array& b, const char* bn) {
    bool same = a.ndim() == b.ndim();
    for (py::ssize_t i = 0; same && i < a.ndim(); ++i) same = a.shape(i) == b.shape(i);
    if (!same)
        throw py::value_error(std::string(an) + " has shape " + shape_str(a) + " but " + bn + " has shape " +
                              shape_str(b));
}

void vector_of(const py::array& a, const char* name, py::ssize_t n) {
    if (a.ndim() != 1 || a.shape(0) != n)
        throw py::value_error(std::string(name) + " must have shape (" + std::to_string(n) + ",), got " + shape_str(a));
}

const float* ptr(const py::array& a) { return static_cast<const float*>(a.data()); }

// ---- The outputs' memory
// Fresh memory from the system is new pages, which the OS zeroes when they are first touched: ~10% of a forward
// pass when every large output (256 KB or more: malloc often maps those fresh and unmaps them when freed) is fresh.
// So the pages of freed outputs are kept, and a new output is made of them: the idle block of its size if there is
// one, else idle pages moved into place (mremap moves page tables and copies nothing). Fresh pages are mapped only
// when no idle ones are left, so the memory held, in use or idle, is at most the most the outputs ever held at
// once. Linux only; elsewhere the outputs come from NumPy.
#ifdef __linux__
class OutputPages {
  public:
    static constexpr size_t kMin = 256 << 10;           // smaller ones come from malloc's heap, which reuses them
    static constexpr size_t kMaxPieces = 2048;          // mappings the kept pages may be cut into (Linux allows 65530)

    char* get(size_t bytes) {                           // bytes: a multiple of the page size
        std::lock_guard<std::mutex> lock(mutex_);
        for (auto it = idle_.rbegin(); it != idle_.rend(); ++it)        // the most recently freed of this size
            if (it->second == bytes) {
                char* p = it->first;
                idle_.erase(std::next(it).base());
                idle_bytes_ -= bytes;
                in_use_ += bytes;
                return p;
            }
        if (pieces_.size() > kMaxPieces) release_idle();               // cut too finely: those pages go
        void* fresh = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (fresh == MAP_FAILED) throw std::bad_alloc();
        char* p = static_cast<char*>(fresh);            // address space only: no page is touched yet
        size_t done = 0;
        while (done < bytes && !idle_.empty()) {        // fill it with idle pages: the smallest block that
            const size_t need = bytes - done;           // finishes it, else the largest
            auto pick = idle_.begin();
            for (auto it = idle_.begin(); it != idle_.end(); ++it)
                if (it->second >= need ? pick->second < need || it->second < pick->second
                                       : pick->second < need && it->second > pick->second)
                    pick = it;
            const size_t take = std::min(need, pick->second);
            move(pick->first, take, p + done);
            done += take;
            idle_bytes_ -= take;
            if (take == pick->second) idle_.erase(pick);
            else pick->first += take, pick->second -= take;        // the rest of it stays idle
        }
        if (done < bytes) pieces_[p + done] = bytes - done;
        fresh_bytes_ += bytes - done;
        in_use_ += bytes;
        return p;
    }

    void put(char* p, size_t bytes) {
        std::lock_guard<std::mutex> lock(mutex_);
        in_use_ -= bytes;
        idle_.emplace_back(p, bytes);
        idle_bytes_ += bytes;
    }

    py::dict stats() {
        std::lock_guard<std::mutex> lock(mutex_);
        return py::dict(py::arg("in_use") = in_use_, py::arg("idle") = idle_bytes_,
                        py::arg("fresh") = fresh_bytes_, py::arg("pieces") = pieces_.size());
    }

  private:
    // Moves the pages of [from, from + n) to `to`, one mapping at a time: before Linux 6.17 mremap moves only
    // within one mapping, and a block filled from several idle ones is several mappings.
    void move(char* from, size_t n, char* to) {
        auto it = std::prev(pieces_.upper_bound(from));                 // the mapping that holds `from`
        while (n) {
            char* const start = it->first;
            const size_t len = it->second, off = from - start, part = std::min(n, len - off);
            if (mremap(from, part, part, MREMAP_MAYMOVE | MREMAP_FIXED, to) == MAP_FAILED) throw std::bad_alloc();
            pieces_.erase(it);
            if (off) pieces_[start] = off;
            if (off + part < len) pieces_[from + part] = len - off - part;
            pieces_[to] = part;
            from += part, to += part, n -= part;
            if (n && (it = pieces_.find(from)) == pieces_.end()) throw std::logic_error("OutputPages: lost a mapping");
        }
    }

    void release_idle() {                               // unmaps the idle blocks (they begin and end on pieces)
        for (const auto& [p, bytes] : idle_) {
            munmap(p, bytes);
            pieces_.erase(pieces_.lower_bound(p), pieces_.lower_bound(p + bytes));
        }
        idle_.clear();
        idle_bytes_ = 0;
    }

    std::mutex mutex_;
    std::list<std::pair<char*, size_t>> idle_;         // in the order they were freed
    std::map<char*, size_t> pieces_;                   // the mappings that make up the blocks, by address
    size_t in_use_ = 0, idle_bytes_ = 0, fresh_bytes_ = 0;
};

OutputPages& output_pages() {
    static auto* pages = new OutputPages;               // never destroyed: arrays may outlive the module
    return *pages;
}

py::array_t<float> empty(const Shape& shape) {
    size_t n = 1;
    for (py::ssize_t d : shape) n *= static_cast<size_t>(d);
    static const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    const size_t bytes = (n * sizeof(float) + page - 1) / page * page;
    if (bytes < OutputPages::kMin) return py::array_t<float>(shape);
    using Block = std::pair<char*, size_t>;
    auto* block = new Block(output_pages().get(bytes), bytes);
    py::capsule owner(block, [](void* b) {              // the array's base: its pages go back when it dies
        output_pages().put(static_cast<Block*>(b)->first, static_cast<Block*>(b)->second);
        delete static_cast<Block*>(b);
    });
    return py::array_t<float>(shape, reinterpret_cast<float*>(block->first), owner);
}

py::dict output_pages_stats() { return output_pages().stats(); }
#else
py::array_t<float> empty(const Shape& shape) { return py::array_t<float>(shape); }

py::dict output_pages_stats() { return py::dict(); }
#endif

// ---- SiLU (layers.silu, layers.silu_backward)
py::array py_silu_forward(py::handle x_) {
    py::array x = arr(x_, "x", -1);
    py::array_t<float> y = empty(Shape(x.shape(), x.shape() + x.ndim()));
    {
        py::gil_scoped_release nogil;
        md::silu_forward(ptr(x), y.mutable_data(), x.size());
    }
    return y;
}

py::array py_silu_backward(py::handle x_, py::handle dout_) {
    py::array x = arr(x_, "x", -1), dout = arr(dout_, "dout", -1);
    same_shape(dout, "dout", x, "x");
    py::array_t<float> dx = empty(Shape(x.shape(), x.shape() + x.ndim()));
    {
        py::gil_scoped_release nogil;
        md::silu_backward(ptr(x), ptr(dout), dx.mutable_data(), x.size());
    }
    return dx;
}

// ---- GroupNorm with optional SiLU (layers.group_norm, layers.group_norm_backward); x is (B, npix, C)
void check_groups(py::ssize_t C, int64_t G) {
    if (G < 1 || C % G) throw py::value_error(std::to_string(C) + " channels do not split into " + std::to_string(G) +
                                              " groups");
}

py::tuple py_group_norm_forward(py::handle x_, py::handle gamma_, py::handle beta_, int64_t G, double eps, bool silu) {
    py::array x = arr(x_, "x", 3), gamma = arr(gamma_, "gamma", 1), beta = arr(beta_, "beta", 1);
    const py::ssize_t B = x.shape(0), npix = x.shape(1), C = x.shape(2);
    vector_of(gamma, "gamma", C);
    vector_of(beta, "beta", C);
    check_groups(C, G);
    py::array_t<float> y = empty({B, npix, C}), mean = empty({B, C}), rstd = empty({B, C});
    {
        py::gil_scoped_release nogil;
        md::group_norm_forward(ptr(x), ptr(gamma), ptr(beta), B, npix, C, G, (float)eps, silu, y.mutable_data(),
                               mean.mutable_data(), rstd.mutable_data());
    }
    return py::make_tuple(y, mean, rstd);
}

py::tuple py_group_norm_backward(py::handle dout_, py::handle x_, py::handle gamma_, py::handle beta_, py::handle mean_,
                              py::handle rstd_, int64_t G, bool silu) {
    py::array dout = arr(dout_, "dout", 3), x = arr(x_, "x", 3), gamma = arr(gamma_, "gamma", 1);
    py::array beta = arr(beta_, "beta", 1), mean = arr(mean_, "mean", 2), rstd = arr(rstd_, "rstd", 2);
    same_shape(dout, "dout", x, "x");
    const py::ssize_t B = x.shape(0), npix = x.shape(1), C = x.shape(2);
    vector_of(gamma, "gamma", C);
    vector_of(beta, "beta", C);
    if (mean.shape(0) != B || mean.shape(1) != C) throw py::value_error("mean must have shape (B, C)");
    same_shape(rstd, "rstd", mean, "mean");
    check_groups(C, G);
    py::array_t<float> dx = empty({B, npix, C}), dgamma = empty({C}), dbeta = empty({C});
    {
        py::gil_scoped_release nogil;
        md::group_norm_backward(ptr(dout), ptr(x), ptr(gamma), ptr(beta), ptr(mean), ptr(rstd), B, npix, C, G, silu,
                                dx.mutable_data(), dgamma.mutable_data(), dbeta.mutable_data());
    }
    return py::make_tuple(dx, dgamma, dbeta);
}

// ---- 3x3 stride-1 'same' convolution, NHWC (layers.conv2d, layers.conv2d_backward)
void check_conv(const py::array& x, const py::array& weight) {
    if (weight.shape(2) != 3 || weight.shape(3) != 3)
        throw py::value_error("weight must be (Cout, Cin, 3, 3), got " + shape_str(weight));
    if (weight.shape(1) != x.shape(3))
        throw py::value_error("weight expects " + std::to_string(weight.shape(1)) + " input channels but x has " +
                              std::to_string(x.shape(3)));
}

void check_stride(int stride) {
    if (stride != 1 && stride != 2) throw py::value_error("stride must be 1 or 2, got " + std::to_string(stride));
}

py::array py_conv3x3_forward(py::handle x_, py::handle weight_, py::handle bias_, py::handle residual_, int stride) {
    py::array x = arr(x_, "x", 4), weight = arr(weight_, "weight", 4);
    check_conv(x, weight);
    check_stride(stride);
    const py::ssize_t B = x.shape(0), H = x.shape(1), W = x.shape(2), K = x.shape(3), N = weight.shape(0);
    const py::ssize_t Ho = H ? (H - 1) / stride + 1 : 0, Wo = W ? (W - 1) / stride + 1 : 0;
    py::array bias, residual;                   // keep the arrays alive while the kernel runs
    const float *bias_ptr = nullptr, *res_ptr = nullptr;
    int64_t bias_stride = 0;
    if (!bias_.is_none()) {
        bias = arr(bias_, "bias", -1);
        if (bias.ndim() == 2 && bias.shape(0) == B && bias.shape(1) == N) bias_stride = N;   // one bias per image
        else vector_of(bias, "bias (or (B, Cout) per image)", N);
        bias_ptr = ptr(bias);
    }
    py::array_t<float> out = empty({B, Ho, Wo, N});
    if (!residual_.is_none()) {
        residual = arr(residual_, "residual", 4);
        same_shape(residual, "residual", out, "the output");
        res_ptr = ptr(residual);
    }
    if (B * H * W == 0 || N == 0) {             // nothing to compute (an empty batch, no channels)
        if (out.size()) std::fill(out.mutable_data(), out.mutable_data() + out.size(), 0.0f);
        return out;
    }
    {
        py::gil_scoped_release nogil;
        md::conv3x3_forward(ptr(x), ptr(weight), bias_ptr, bias_stride, res_ptr, B, H, W, K, N, stride,
                            out.mutable_data());
    }
    return out;
}

py::tuple py_conv3x3_backward(py::handle x_, py::handle weight_, py::handle dout_, int stride) {
    int64_t ldd;
    py::array x = arr(x_, "x", 4), weight = arr(weight_, "weight", 4), dout = arr_rows(dout_, "dout", 4, &ldd);
    check_conv(x, weight);
    check_stride(stride);
    const py::ssize_t B = x.shape(0), H = x.shape(1), W = x.shape(2), K = x.shape(3), N = weight.shape(0);
    const py::ssize_t Ho = H ? (H - 1) / stride + 1 : 0, Wo = W ? (W - 1) / stride + 1 : 0;
    if (dout.shape(0) != B || dout.shape(1) != Ho || dout.shape(2) != Wo || dout.shape(3) != N)
        throw py::value_error("dout must have shape (B, Ho, Wo, Cout) = (" + std::to_string(B) + ", " +
                              std::to_string(Ho) + ", " + std::to_string(Wo) + ", " + std::to_string(N) + "), got " +
                              shape_str(dout));
    py::array_t<float> dx = empty({B, H, W, K}), dweight = empty({N, K, 3, 3});
    if (B * H * W == 0 || N == 0 || K == 0) {   // nothing to sum
        std::fill(dx.mutable_data(), dx.mutable_data() + dx.size(), 0.0f);
        std::fill(dweight.mutable_data(), dweight.mutable_data() + dweight.size(), 0.0f);
        return py::make_tuple(dx, dweight);
    }
    {
        py::gil_scoped_release nogil;
        md::conv3x3_backward(ptr(x), ptr(weight), ptr(dout), ldd, B, H, W, K, N, stride, dx.mutable_data(),
                             dweight.mutable_data());
    }
    return py::make_tuple(dx, dweight);
}

// ---- x @ weight^T + bias (layers.linear, layers.linear_backward)
py::array py_linear_forward(py::handle x_, py::handle weight_, py::handle bias_) {
    py::array x = arr(x_, "x", 2), weight = arr(weight_, "weight", 2);
    const py::ssize_t M = x.shape(0), K = x.shape(1), N = weight.shape(0);
    if (weight.shape(1) != K)
        throw py::value_error("weight has " + std::to_string(weight.shape(1)) + " input features but x has " +
                              std::to_string(K));
    py::array bias;
    const float* bias_ptr = nullptr;
    if (!bias_.is_none()) {
        bias = arr(bias_, "bias", 1);
        vector_of(bias, "bias", N);
        bias_ptr = ptr(bias);
    }
    py::array_t<float> out = empty({M, N});
    {
        py::gil_scoped_release nogil;
        md::linear_forward(ptr(x), ptr(weight), bias_ptr, M, K, N, out.mutable_data());
    }
    return out;
}

py::tuple py_linear_backward(py::handle x_, py::handle weight_, py::handle dout_) {
    int64_t ldd;
    py::array x = arr(x_, "x", 2), weight = arr(weight_, "weight", 2), dout = arr_rows(dout_, "dout", 2, &ldd);
    const py::ssize_t M = x.shape(0), K = x.shape(1), N = weight.shape(0);
    if (weight.shape(1) != K)
        throw py::value_error("weight has " + std::to_string(weight.shape(1)) + " input features but x has " +
                              std::to_string(K));
    if (dout.shape(0) != M || dout.shape(1) != N)
        throw py::value_error("dout must have shape (" + std::to_string(M) + ", " + std::to_string(N) + "), got " +
                              shape_str(dout));
    py::array_t<float> dx = empty({M, K}), dweight = empty({N, K});
    {
        py::gil_scoped_release nogil;
        md::linear_backward(ptr(x), ptr(weight), ptr(dout), ldd, M, K, N, dx.mutable_data(), dweight.mutable_data());
    }
    return py::make_tuple(dx, dweight);
}

// ---- attention (unet.attention, unet.attention_backward): q (B, N, C), k and v (B, M, C)
void attention_shapes(const py::array& q, const py::array& k, const py::array& v) {
    if (k.shape(0) != q.shape(0) || k.shape(2) != q.shape(2))
        throw py::value_error("k must have shape (" + std::to_string(q.shape(0)) + ", M, " +
                              std::to_string(q.shape(2)) + ") for q " + shape_str(q) + ", got " + shape_str(k));
    same_shape(v, "v", k, "k");
}

py::tuple py_attention_forward(py::handle q_, py::handle k_, py::handle v_, float scale) {
    py::array q = arr(q_, "q", 3), k = arr(k_, "k", 3), v = arr(v_, "v", 3);
    attention_shapes(q, k, v);
    const py::ssize_t B = q.shape(0), N = q.shape(1), M = k.shape(1), C = q.shape(2);
    py::array_t<float> o = empty({B, N, C}), a = empty({B, N, M});
    {
        py::gil_scoped_release nogil;
        md::attention_forward(ptr(q), ptr(k), ptr(v), B, N, M, C, scale, o.mutable_data(), a.mutable_data());
    }
    return py::make_tuple(o, a);
}

py::tuple py_attention_backward(py::handle q_, py::handle k_, py::handle v_, py::handle a_, py::handle dout_,
                                float scale) {
    py::array q = arr(q_, "q", 3), k = arr(k_, "k", 3), v = arr(v_, "v", 3), a = arr(a_, "a", 3);
    py::array dout = arr(dout_, "dout", 3);
    attention_shapes(q, k, v);
    const py::ssize_t B = q.shape(0), N = q.shape(1), M = k.shape(1), C = q.shape(2);
    same_shape(dout, "dout", q, "q");
    if (a.shape(0) != B || a.shape(1) != N || a.shape(2) != M)
        throw py::value_error("a must have shape (" + std::to_string(B) + ", " + std::to_string(N) + ", " +
                              std::to_string(M) + "), got " + shape_str(a));
    py::array_t<float> dq = empty({B, N, C}), dk = empty({B, M, C}), dv = empty({B, M, C});
    {
        py::gil_scoped_release nogil;
        md::attention_backward(ptr(q), ptr(k), ptr(v), ptr(a), ptr(dout), B, N, M, C, scale, dq.mutable_data(),
                               dk.mutable_data(), dv.mutable_data());
    }
    return py::make_tuple(dq, dk, dv);
}

// ---- copies and sums (layers.concat_channels, layers.upsample2x and its backward, layers.pixel_sum), channels last
py::array py_concat_channels(py::handle a_, py::handle b_) {
    py::array a = arr(a_, "a", -1), b = arr(b_, "b", -1);
    if (a.ndim() < 1 || a.ndim() != b.ndim()) throw py::value_error("a and b must have the same dimensions");
    for (py::ssize_t i = 0; i + 1 < a.ndim(); ++i)
        if (a.shape(i) != b.shape(i))
            throw py::value_error("a " + shape_str(a) + " and b " + shape_str(b) + " differ before the last axis");
    const py::ssize_t Ca = a.shape(a.ndim() - 1), Cb = b.shape(b.ndim() - 1), M = Ca ? a.size() / Ca : 0;
    Shape shape(a.shape(), a.shape() + a.ndim());
    shape.back() = Ca + Cb;
    py::array_t<float> out = empty(shape);
    if (Ca == 0 || Cb == 0 || out.size() == 0) {
        if (out.size()) std::copy(Ca ? ptr(a) : ptr(b), (Ca ? ptr(a) : ptr(b)) + out.size(), out.mutable_data());
        return out;
    }
    {
        py::gil_scoped_release nogil;
        md::concat_channels(ptr(a), ptr(b), M, Ca, Cb, out.mutable_data());
    }
    return out;
}

py::array py_upsample2x(py::handle x_) {
    py::array x = arr(x_, "x", 4);
    const py::ssize_t B = x.shape(0), H = x.shape(1), W = x.shape(2), C = x.shape(3);
    py::array_t<float> out = empty({B, 2 * H, 2 * W, C});
    if (out.size()) {
        py::gil_scoped_release nogil;
        md::upsample2x(ptr(x), B, H, W, C, out.mutable_data());
    }
    return out;
}

py::array py_upsample2x_backward(py::handle dout_) {
    py::array dout = arr(dout_, "dout", 4);
    const py::ssize_t B = dout.shape(0), H = dout.shape(1) / 2, W = dout.shape(2) / 2, C = dout.shape(3);
    if (dout.shape(1) % 2 || dout.shape(2) % 2)
        throw py::value_error("dout " + shape_str(dout) + " must have an even height and width (2H, 2W)");
    py::array_t<float> dx = empty({B, H, W, C});
    if (dx.size()) {
        py::gil_scoped_release nogil;
        md::upsample2x_backward(ptr(dout), B, H, W, C, dx.mutable_data());
    }
    return dx;
}

py::array py_pixel_sum(py::handle x_, bool per_image) {
    int64_t ld;
    py::array x = arr_rows(x_, "x", -1, &ld);
    if (x.ndim() < 2) throw py::value_error("x must be (B, ..., C), got " + shape_str(x));
    const py::ssize_t B = x.shape(0), C = x.shape(x.ndim() - 1);
    const py::ssize_t P = B && C ? x.size() / (B * C) : 0;
    py::array_t<float> out = per_image ? empty({B, C}) : empty({C});
    if (B == 0 || P == 0) {
        std::fill(out.mutable_data(), out.mutable_data() + out.size(), 0.0f);
        return out;
    }
    {
        py::gil_scoped_release nogil;
        md::pixel_sum(ptr(x), ld, B, P, C, per_image, out.mutable_data());
    }
    return out;
}

// ---- optimizer (optim.adam_update, optim.ema_update), in place
void writable(const py::array& a, const char* name) {
    if (!a.writeable()) throw py::value_error(std::string(name) + " must be writeable (it is updated in place)");
}

void py_adam_update(py::handle p_, py::handle g_, py::handle m_, py::handle v_, float lr, float beta1, float beta2,
                    float eps, float bias_correction1, float bias_correction2, float weight_decay) {
    py::array p = arr(p_, "p", -1), g = arr(g_, "g", -1), m = arr(m_, "m", -1), v = arr(v_, "v", -1);
    same_shape(g, "g", p, "p");
    same_shape(m, "m", p, "p");
    same_shape(v, "v", p, "p");
    writable(p, "p");
    writable(m, "m");
    writable(v, "v");
    py::gil_scoped_release nogil;
    md::adam_update(static_cast<float*>(p.mutable_data()), ptr(g), static_cast<float*>(m.mutable_data()),
                    static_cast<float*>(v.mutable_data()), p.size(), lr, beta1, beta2, eps, bias_correction1,
                    bias_correction2, weight_decay);
}

void py_ema_update(py::handle e_, py::handle p_, float decay) {
    py::array e = arr(e_, "e", -1), p = arr(p_, "p", -1);
    same_shape(p, "p", e, "e");
    writable(e, "e");
    py::gil_scoped_release nogil;
    md::ema_update(static_cast<float*>(e.mutable_data()), ptr(p), e.size(), decay);
}

}  // namespace

void bind_nn(py::module_& m) {
    m.def("cpu_isa", &md::cpu_isa, "The instruction set the network kernels use: avx512, avx2 or base.");
    m.def("set_cpu_isa", [](const std::string& name) {
        if (!md::set_cpu_isa(name.c_str()))
            throw py::value_error("instruction set '" + name + "' is unknown or not supported by this CPU");
        return std::string(md::cpu_isa());
    }, py::arg("name"), "Use another instruction set's kernels ('auto': the best this CPU supports).");
    m.def("set_conv_winograd", &md::set_conv_winograd, py::arg("on"),
          "3x3 convolutions of stride 1 with enough channels on large enough maps by Winograd F(4x4, 3x3) or "
          "F(2x2, 3x3) (True, the default; conv_winograd_tile says which) or all by the direct sum of 9 taps "
          "(False); returns the previous setting.");
    m.def("conv_winograd_tile", [](int64_t H, int64_t W, int64_t cin, int64_t cout, int stride, bool wgrad) {
        return wgrad ? md::winograd_wgrad_tile(H, W, cin, cout, stride) : md::winograd_tile(H, W, cin, cout, stride);
    }, py::arg("H"), py::arg("W"), py::arg("cin"), py::arg("cout"), py::arg("stride"), py::arg("wgrad") = false,
          "The Winograd tile conv3x3_forward of these sizes (and the input gradient) takes under the current "
          "setting and instruction set: 4 (F(4x4, 3x3)), 2 (F(2x2, 3x3)) or 0 (the direct sum); wgrad=True: the "
          "weight gradient's.");
    m.def("cpu_isas", []() {
        int n = 0;
        const char* const* names = md::cpu_isas_available(&n);
        py::list out;
        for (int i = 0; i < n; ++i) out.append(names[i]);
        return out;
    }, "The instruction sets this CPU can run, best first.");
    m.def("fma_peak_gflops", [](const std::string& name, int threads) {
        double g;
        {
            py::gil_scoped_release nogil;
            g = md::fma_peak_gflops(name.c_str(), threads);
        }
        if (g < 0) throw py::value_error("instruction set '" + name + "' is unknown or not supported by this CPU");
        return g;
    }, py::arg("isa"), py::arg("threads") = 0,
          "GFLOP/s of the instruction set's FMAs in registers on `threads` threads (0: all): the peak the kernels "
          "are measured against (about 0.1 s).");
    m.def("silu_forward", &py_silu_forward, py::arg("x"));
    m.def("silu_backward", &py_silu_backward, py::arg("x"), py::arg("dout"));
    m.def("group_norm_forward", &py_group_norm_forward, py::arg("x"), py::arg("gamma"), py::arg("beta"),
          py::arg("num_groups"), py::arg("eps"), py::arg("silu"), "x (B, npix, C) -> (y, mean (B, C), rstd (B, C))");
    m.def("group_norm_backward", &py_group_norm_backward, py::arg("dout"), py::arg("x"), py::arg("gamma"),
          py::arg("beta"), py::arg("mean"), py::arg("rstd"), py::arg("num_groups"), py::arg("silu"),
          "-> (dx, dgamma, dbeta)");
    m.def("conv3x3_forward", &py_conv3x3_forward, py::arg("x"), py::arg("weight"), py::arg("bias"),
          py::arg("residual") = py::none(), py::arg("stride") = 1,
          "x (B, H, W, Cin), weight (Cout, Cin, 3, 3), bias (Cout,) or (B, Cout) or None, residual (B, Ho, Wo, Cout) "
          "or None -> conv(x) + bias (+ residual), (B, Ho, Wo, Cout); padding 1, stride 1 or 2 "
          "(Ho = (H - 1) // stride + 1)");
    m.def("conv3x3_backward", &py_conv3x3_backward, py::arg("x"), py::arg("weight"), py::arg("dout"),
          py::arg("stride") = 1, "-> (dx (B, H, W, Cin), dweight (Cout, Cin, 3, 3))");
    m.def("output_pages", &output_pages_stats,
          "bytes of the kernels' large outputs in use, idle (kept for the next ones) and fresh (ever mapped new); "
          "pieces: the mappings they are made of");
    m.def("concat_channels", &py_concat_channels, py::arg("a"), py::arg("b"), "[a, b] along the last axis");
    m.def("upsample2x", &py_upsample2x, py::arg("x"), "x (B, H, W, C) -> (B, 2H, 2W, C), nearest neighbour");
    m.def("upsample2x_backward", &py_upsample2x_backward, py::arg("dout"),
          "dout (B, 2H, 2W, C) -> (B, H, W, C), each pixel the sum of its 2 x 2 block");
    m.def("pixel_sum", &py_pixel_sum, py::arg("x"), py::arg("per_image") = false,
          "x (B, ..., C) -> the sum over pixels and images (C,), or over pixels (B, C) per image");
    m.def("adam_update", &py_adam_update, py::arg("p"), py::arg("g"), py::arg("m"), py::arg("v"), py::arg("lr"),
          py::arg("beta1"), py::arg("beta2"), py::arg("eps"), py::arg("bias_correction1"),
          py::arg("bias_correction2"), py::arg("weight_decay"), "optim.adam_update in place, float32");
    m.def("ema_update", &py_ema_update, py::arg("e"), py::arg("p"), py::arg("decay"),
          "optim.ema_update in place: e <- decay e + (1 - decay) p, float32");
    m.def("linear_forward", &py_linear_forward, py::arg("x"), py::arg("weight"), py::arg("bias"),
          "x (M, K), weight (N, K), bias (N,) or None -> x weight^T + bias (M, N)");
    m.def("linear_backward", &py_linear_backward, py::arg("x"), py::arg("weight"), py::arg("dout"),
          "-> (dx (M, K), dweight (N, K))");
    m.def("attention_forward", &py_attention_forward, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("scale"),
          "q (B, N, C), k and v (B, M, C) -> (o = A v (B, N, C), A = softmax(q k^T scale) (B, N, M))");
    m.def("attention_backward", &py_attention_backward, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("a"),
          py::arg("dout"), py::arg("scale"), "-> (dq (B, N, C), dk (B, M, C), dv (B, M, C))");
}

}  // namespace md
