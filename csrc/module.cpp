// module.cpp: the pybind11 module minidiff._core. Thin bindings: check arrays (the Python wrapper
// minidiff/step.py checks them first with friendlier messages), release the GIL, call the kernels.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <stdexcept>
#include <string>

#include "kernels.h"

namespace py = pybind11;

namespace {

// A C-contiguous float32 array of n elements; TypeError / ValueError otherwise (never a crash).
py::array checked(const py::handle& h, const char* name, int64_t n, bool writeable) {
    if (!py::isinstance<py::array>(h)) throw py::type_error(std::string(name) + " must be a NumPy array");
    py::array a = py::reinterpret_borrow<py::array>(h);
    if (!a.dtype().is(py::dtype::of<float>()))
        throw py::type_error(std::string(name) + " must be float32 (the kernel's type), got " +
                             std::string(py::str(a.dtype())));
    if (!(a.flags() & py::array::c_style)) throw py::value_error(std::string(name) + " must be C-contiguous");
    if (n >= 0 && a.size() != n)
        throw py::value_error(std::string(name) + " has " + std::to_string(a.size()) + " elements, expected " +
                              std::to_string(n));
    if (writeable && !a.writeable()) throw py::value_error(std::string(name) + " is read-only");
    return a;
}

md::StepCoefs make_coefs(double a, double b, double c_x0, double c_x0prev, double c_xt, double c_eps, double sigma,
                         double guidance, bool clip, bool has_uncond) {
    md::StepCoefs k;
    k.a = (float)a; k.b = (float)b;
    k.c_x0 = (float)c_x0; k.c_x0prev = (float)c_x0prev; k.c_xt = (float)c_xt; k.c_eps = (float)c_eps;
    k.sigma = (float)sigma; k.guidance = (float)guidance; k.clip = clip ? 1 : 0; k.has_uncond = has_uncond ? 1 : 0;
    return k;
}

void step_cpu(py::handle x_t, py::handle eps, py::handle eps_uncond, py::handle z, py::handle x0_prev, py::handle out,
              py::handle x0_out, double a, double b, double c_x0, double c_x0prev, double c_xt, double c_eps,
              double sigma, double guidance, bool clip, uint64_t seed, uint64_t step, int threads) {
    py::array xa = checked(x_t, "x_t", -1, false);
    const int64_t n = xa.size();
    py::array ea = checked(eps, "eps", n, false), oa = checked(out, "out", n, true);
    py::array ua, za, pa, x0a;
    md::StepArgs args{};
    if (!eps_uncond.is_none()) { ua = checked(eps_uncond, "eps_uncond", n, false); args.eps_u = (const float*)ua.data(); }
    if (!z.is_none()) { za = checked(z, "z", n, false); args.z = (const float*)za.data(); }
    if (!x0_prev.is_none()) { pa = checked(x0_prev, "x0_prev", n, false); args.x0_prev = (const float*)pa.data(); }
    if (!x0_out.is_none()) { x0a = checked(x0_out, "x0_out", n, true); args.x0_out = (float*)x0a.mutable_data(); }
    args.x_t = (const float*)xa.data();
    args.eps_c = (const float*)ea.data();
    args.out = (float*)oa.mutable_data();
    args.n = n;
    args.seed = seed;
    args.step = step;
    args.k = make_coefs(a, b, c_x0, c_x0prev, c_xt, c_eps, sigma, guidance, clip, args.eps_u != nullptr);
    py::gil_scoped_release nogil;
    md::step_cpu(args, threads);
}

py::array_t<float> normal_cpu(uint64_t seed, uint64_t step, int64_t n, int threads) {
    if (n < 0) throw py::value_error("n must be >= 0");
    py::array_t<float> out(n);
    float* p = out.mutable_data();
    {
        py::gil_scoped_release nogil;
        md::normal_cpu(p, n, seed, step, threads);
    }
    return out;
}

#ifdef MINIDIFF_WITH_CUDA
void raise_if(const char* err) {
    if (err) throw std::runtime_error(std::string("minidiff CUDA kernel launch failed: ") + err);
}

void step_cuda(uintptr_t x_t, uintptr_t eps, uintptr_t eps_uncond, uintptr_t z, uintptr_t x0_prev, uintptr_t out,
               uintptr_t x0_out, int64_t n, double a, double b, double c_x0, double c_x0prev, double c_xt, double c_eps,
               double sigma, double guidance, bool clip, uint64_t seed, uint64_t step, uintptr_t stream) {
    if (n < 0) throw py::value_error("n must be >= 0");
    if (n > 0 && (!x_t || !eps || !out)) throw py::value_error("x_t, eps and out must be non-null device pointers");
    md::StepArgs args{};
    args.x_t = (const float*)x_t;
    args.eps_c = (const float*)eps;
    args.eps_u = (const float*)eps_uncond;  // 0 = none
    args.z = (const float*)z;               // 0 = generate
    args.x0_prev = (const float*)x0_prev;   // 0 = none
    args.out = (float*)out;
    args.x0_out = (float*)x0_out;           // 0 = not wanted
    args.n = n;
    args.seed = seed;
    args.step = step;
    args.k = make_coefs(a, b, c_x0, c_x0prev, c_xt, c_eps, sigma, guidance, clip, eps_uncond != 0);
    raise_if(md::step_cuda(args, stream));
}

void step_cuda_params(uintptr_t x_t, uintptr_t eps, uintptr_t eps_uncond, uintptr_t x0_prev, uintptr_t out,
                      uintptr_t x0_out, int64_t n, uintptr_t params, uintptr_t stream) {
    if (n < 0) throw py::value_error("n must be >= 0");
    if (n > 0 && (!x_t || !eps || !out || !params))
        throw py::value_error("x_t, eps, out and params must be non-null device pointers");
    md::StepArgs args{};
    args.x_t = (const float*)x_t;
    args.eps_c = (const float*)eps;
    args.eps_u = (const float*)eps_uncond;  // 0 = none
    args.x0_prev = (const float*)x0_prev;   // 0 = none
    args.out = (float*)out;
    args.x0_out = (float*)x0_out;           // 0 = not wanted
    args.n = n;
    raise_if(md::step_cuda_params(args, (const md::StepParams*)params, stream));
}

void normal_cuda(uintptr_t out, int64_t n, uint64_t seed, uint64_t step, uintptr_t stream) {
    if (n < 0) throw py::value_error("n must be >= 0");
    if (n > 0 && !out) throw py::value_error("out must be a non-null device pointer");
    raise_if(md::normal_cuda((float*)out, n, seed, step, stream));
}
#endif

}  // namespace

namespace md {
void bind_nn(py::module_& m);  // nn_module.cpp: the network's CPU kernels
}

PYBIND11_MODULE(_core, m) {
    m.doc() = "minidiff native kernels: the fused sampling step, the Philox4x32-10 normal generator and the "
              "network's CPU kernels (3x3 convolution, GroupNorm + SiLU, SiLU)";
    md::bind_nn(m);
    m.attr("ABI_VERSION") = MINIDIFF_ABI_VERSION;
    m.def("has_cuda", []() {
#ifdef MINIDIFF_WITH_CUDA
        return true;
#else
        return false;
#endif
    }, "Whether the CUDA kernel was compiled in (says nothing about a GPU being present).");
    m.def("has_openmp", &md::cpu_has_openmp, "Whether the CPU kernel was compiled with OpenMP.");
    m.def("max_threads", &md::cpu_max_threads, "Threads the CPU kernel uses with threads=0.");
    m.def("step_params_layout", []() {
        md::StepParams p{};
        auto off = [&](const void* f) { return (int64_t)((const char*)f - (const char*)&p); };
        py::dict d;
        d["a"] = off(&p.k.a); d["b"] = off(&p.k.b); d["c_x0"] = off(&p.k.c_x0); d["c_x0prev"] = off(&p.k.c_x0prev);
        d["c_xt"] = off(&p.k.c_xt); d["c_eps"] = off(&p.k.c_eps); d["sigma"] = off(&p.k.sigma);
        d["guidance"] = off(&p.k.guidance); d["clip"] = off(&p.k.clip); d["has_uncond"] = off(&p.k.has_uncond);
        d["seed"] = off(&p.seed); d["step"] = off(&p.step); d["itemsize"] = (int64_t)sizeof(p);
        return d;
    }, "Byte offsets of the StepParams record (and its size): minidiff.step.STEP_PARAMS must match.");
    m.def("philox4x32_10", [](std::array<uint32_t, 4> ctr, std::array<uint32_t, 2> key) {
        md::U32x4 c;
        for (int i = 0; i < 4; ++i) c.x[i] = ctr[i];
        const md::U32x4 r = md::philox4x32_10(c, key[0], key[1]);
        return std::array<uint32_t, 4>{r.x[0], r.x[1], r.x[2], r.x[3]};
    }, py::arg("counter"), py::arg("key"), "One Philox4x32-10 block (for known-answer tests).");
    m.def("step_cpu", &step_cpu, py::arg("x_t"), py::arg("eps"), py::arg("eps_uncond"), py::arg("z"),
          py::arg("x0_prev"), py::arg("out"), py::arg("x0_out"), py::arg("a"), py::arg("b"), py::arg("c_x0"),
          py::arg("c_x0prev"), py::arg("c_xt"), py::arg("c_eps"), py::arg("sigma"), py::arg("guidance"),
          py::arg("clip"), py::arg("seed"), py::arg("step"), py::arg("threads"),
          "Fused sampling step on C-contiguous float32 NumPy arrays (see minidiff.step.fused_step).");
    m.def("normal_cpu", &normal_cpu, py::arg("seed"), py::arg("step"), py::arg("n"), py::arg("threads") = 0,
          "n float32 standard normals from Philox4x32-10 (equal to minidiff.philox.philox_normal).");
#ifdef MINIDIFF_WITH_CUDA
    m.def("step_cuda", &step_cuda, py::arg("x_t"), py::arg("eps"), py::arg("eps_uncond"), py::arg("z"),
          py::arg("x0_prev"), py::arg("out"), py::arg("x0_out"), py::arg("n"), py::arg("a"), py::arg("b"),
          py::arg("c_x0"), py::arg("c_x0prev"), py::arg("c_xt"), py::arg("c_eps"), py::arg("sigma"),
          py::arg("guidance"), py::arg("clip"), py::arg("seed"), py::arg("step"), py::arg("stream"),
          "Fused sampling step on device pointers (0 = absent), launched on `stream`, not synchronised.");
    m.def("step_cuda_params", &step_cuda_params, py::arg("x_t"), py::arg("eps"), py::arg("eps_uncond"),
          py::arg("x0_prev"), py::arg("out"), py::arg("x0_out"), py::arg("n"), py::arg("params"), py::arg("stream"),
          "Fused sampling step whose scalars are read from a StepParams record in device memory (CUDA graphs).");
    m.def("normal_cuda", &normal_cuda, py::arg("out"), py::arg("n"), py::arg("seed"), py::arg("step"),
          py::arg("stream"), "Philox normals into a device buffer, launched on `stream`, not synchronised.");
#endif
}
