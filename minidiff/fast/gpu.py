"""The CuPy table of fast paths: the CUDA kernels of minidiff._core (csrc/step_cuda.cu: the fused sampling step and
the Philox normals), and the references declared ``@fast.reference(fuse=True)``, each compiled from its own code by
``cupy.fuse`` into one GPU kernel (a chain of elementwise operations: one launch instead of one per operation),
never a second, hand-copied formula.

Every kernel launches on the current CuPy stream of the arrays' device and never synchronises.
"""
import numpy as np

from ..utils.backend import cupy_status
from ..utils.native import native_status, core
from .cpu import counters_ok, step_scalars


def available():
    """Whether CuPy imports and sees a GPU."""
    return cupy_status()[0]


def fuse(key, reference):
    """The reference compiled into one kernel by cupy.fuse (named after its key)."""
    import cupy
    return cupy.fuse(kernel_name=key.replace(".", "_"))(reference)


# One step's scalars as csrc/step_math.h's StepParams record lays them out (tests/test_native.py checks the offsets
# against the compiled struct): what a CUDA graph of a sampling step reads from device memory when it is replayed.
STEP_PARAMS = np.dtype({"names": ["a", "b", "c_x0", "c_x0prev", "c_xt", "c_eps", "sigma", "guidance", "clip",
                                  "has_uncond", "seed", "step"],
                        "formats": ["<f4"] * 8 + ["<i4", "<i4", "<u8", "<u8"],
                        "offsets": [0, 4, 8, 12, 16, 20, 24, 28, 32, 36, 40, 48], "itemsize": 56})


def step_record(params):
    """A STEP_PARAMS record (a NumPy array of shape ()) of a step.StepParams."""
    rec = np.zeros((), STEP_PARAMS)
    for name, value in step_scalars(params).items():
        rec[name] = value
    return rec


def device_records(params, xp):
    """The STEP_PARAMS records of a list of step.StepParams as one (S, 56) uint8 array on the device: row i is what
    a captured sampling step reads at step i (copied into its buffer, device to device)."""
    recs = np.stack([step_record(p) for p in params])
    return xp.asarray(recs.view(np.uint8).reshape(len(params), STEP_PARAMS.itemsize))


def _ptr(a):
    return 0 if a is None else a.data.ptr


def _step_arrays(x_t, arrays):
    import cupy
    return all(a is None or (isinstance(a, cupy.ndarray) and a.dtype == np.float32 and a.flags.c_contiguous
                             and a.shape == x_t.shape and a.device.id == x_t.device.id) for a in (x_t, *arrays))


def step(x_t, eps, params, eps_uncond=None, x0_prev=None, out=None, x0_out=None):
    """step.step in one CUDA kernel (csrc/step_math.h), the Philox noise drawn in it. ``params`` is a step.StepParams,
    or a (56,) uint8 device array holding its STEP_PARAMS record, which the kernel reads when it runs (a CUDA graph
    captured once replays it for every timestep with the record rewritten in between)."""
    import cupy
    if not _step_arrays(x_t, (eps, eps_uncond, x0_prev, out, x0_out)):
        return NotImplemented
    on_device = isinstance(params, cupy.ndarray)
    if on_device and (params.dtype != np.uint8 or params.size != STEP_PARAMS.itemsize):
        raise ValueError(f"params must be a StepParams or a device uint8 array of {STEP_PARAMS.itemsize} bytes "
                         f"(one STEP_PARAMS record)")
    if not on_device and ((x0_prev is None and params.coefs.c_x0prev != 0.0) or not counters_ok(params)):
        return NotImplemented                   # the reference says what is wrong
    out = cupy.empty_like(x_t) if out is None else out
    x0 = cupy.empty_like(x_t) if x0_out is None else x0_out
    stream = cupy.cuda.get_current_stream().ptr
    with x_t.device:
        if on_device:
            core.step_cuda_params(_ptr(x_t), _ptr(eps), _ptr(eps_uncond), _ptr(x0_prev), _ptr(out), _ptr(x0),
                                  x_t.size, params.data.ptr, stream)
        else:
            core.step_cuda(_ptr(x_t), _ptr(eps), _ptr(eps_uncond), 0, _ptr(x0_prev), _ptr(out), _ptr(x0), x_t.size,
                           stream=stream, **step_scalars(params))
    return out, x0


def philox_normal(seed, step, n, xp):
    """utils.philox.philox_normal drawn by the CUDA kernel on the current device and stream (within 1e-6 of the
    NumPy reference: float32 Box-Muller)."""
    import cupy
    ints = all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in (seed, step, n))
    if not ints or not (0 <= seed < 2 ** 64 and 0 <= step < 2 ** 64 and n >= 0):
        return NotImplemented                   # the reference says what is wrong
    out = cupy.empty(int(n), dtype=cupy.float32)
    core.normal_cuda(out.data.ptr, int(n), int(seed), int(step), cupy.cuda.get_current_stream().ptr)
    return out


CUDA_KERNELS = ("step.step", "utils.philox.philox_normal")     # the references with a CUDA kernel of minidiff._core


def table():
    """{reference key: fast path} for CuPy arrays: the CUDA kernels when the extension has them (the fused
    references join on first use)."""
    if not native_status()["cuda_kernel"]:
        return {}
    return dict(zip(CUDA_KERNELS, (step, philox_normal)))
