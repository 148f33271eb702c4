"""Fast paths for the readable reference functions: one table, one switch.
Stage 4 of the pipeline, for speed: where the native and fused kernels of layers.py, optim.py and train.py
are registered.

The math of every layer is written once, as a plain NumPy/CuPy function (layers.py, optim.py, train.py) marked
``@kernels.reference``. That function is what people read and what the tests prove (finite differences,
closed forms, PyTorch). For some of them a faster implementation of the same numbers exists:
  * NumPy float32 arrays: a native C++ kernel of minidiff._core (csrc/nn_*.cpp: AVX-512, AVX2 or SSE2, picked
    for the CPU at load time; OpenMP over the cores);
  * CuPy arrays: the reference function itself compiled into one GPU kernel by ``cupy.fuse`` (for the chains
    of elementwise operations), never a second, hand-copied formula.
``_numpy_table`` and ``_cupy_table`` below are the one place where they are registered, and calls go to them
unless the switch says otherwise:

    MINIDIFF_REFERENCE=1 python ...            # every call runs the readable reference
    with kernels.use_reference(): ...          # the same, in code (tests compare both ways)

A fast path may decline a call it does not cover (another dtype, say float64 for gradient checks, or another
kernel size) by returning NotImplemented; the reference then runs. tests/test_kernels.py checks every entry
against its reference on random inputs of several shapes.
"""
import functools
import os
from contextlib import contextmanager

import numpy as np

_references = {}            # "module.function" -> the reference function
_tables = {}                # "numpy" / "cupy" -> {"module.function": fast function}, built on first use
_reference_only = os.environ.get("MINIDIFF_REFERENCE", "0") not in ("", "0")


def reference(fn):
    """Mark ``fn`` as the readable reference of an operation: calls run the fast path registered for the
    arrays' module (the first argument's), if any and not switched off, else ``fn``. ``fn.reference`` is the
    plain function."""
    key = f"{fn.__module__.rsplit('.', 1)[-1]}.{fn.__name__}"
    _references[key] = fn

    @functools.wraps(fn)
    def dispatch(*args, **kwargs):
        if not _reference_only:
            fast = _fast_path(key, args[0])
            if fast is not None:
                out = fast(*args, **kwargs)
                if out is not NotImplemented:
                    return out
        return fn(*args, **kwargs)

    dispatch.reference = fn
    return dispatch


def _array_kind(x):
    """ "numpy" or "cupy" for a real array (a tracing proxy inside cupy.fuse gets the reference)."""
    if type(x) is np.ndarray:
        return "numpy"
    t = type(x)
    if t.__name__ == "ndarray" and t.__module__.startswith("cupy"):
        return "cupy"
    return None


def _fast_path(key, x):
    kind = _array_kind(x)
    if kind is None:
        return None
    table = _tables.get(kind)
    if table is None:
        table = _tables[kind] = _numpy_table() if kind == "numpy" else _cupy_table()
    return table.get(key)


@contextmanager
def use_reference(on=True):
    """Within the block, every call runs the readable reference (on=True) or the fast paths (on=False)."""
    global _reference_only
    saved, _reference_only = _reference_only, bool(on)
    try:
        yield
    finally:
        _reference_only = saved


def status():
    """dict: whether the switch is on, and which references have a fast path for NumPy (and CuPy, if usable)."""
    from ..utils.backend import cupy_status
    out = dict(reference_only=_reference_only, numpy=sorted(_numpy_table()))
    out["cupy"] = sorted(_cupy_table()) if cupy_status()[0] else []
    return out


# ---------------------------------------------------------------------------------------------------------------
# NumPy: native C++ kernels (csrc/nn_module.cpp), float32 only.

def _float32(*arrays):
    return all(a is None or a.dtype == np.float32 for a in arrays)


def _c(a):
    return np.ascontiguousarray(a)


def _numpy_table():
    from ..utils import native as _native
    core = _native.core
    if core is None:
        return {}

    def silu(x):
        return core.silu_forward(_c(x)) if _float32(x) else NotImplemented

    def silu_backward(x, dout):
        return core.silu_backward(_c(x), _c(dout)) if _float32(x, dout) else NotImplemented

    def group_norm(x, gamma, beta, num_groups, eps, silu=False):
        if not _float32(x, gamma, beta):
            return NotImplemented
        B, H, W, C = x.shape
        y, mean, rstd = core.group_norm_forward(_c(x).reshape(B, H * W, C), gamma, beta, num_groups, eps, silu)
        return y.reshape(x.shape), mean, rstd

    def group_norm_backward(dout, x, gamma, beta, mean, rstd, num_groups, silu=False):
        if not _float32(dout, x, gamma, beta, mean, rstd):
            return NotImplemented
        B, H, W, C = x.shape
        dx, dgamma, dbeta = core.group_norm_backward(_c(dout).reshape(B, H * W, C), _c(x).reshape(B, H * W, C), gamma,
                                                     beta, _c(mean), _c(rstd), num_groups, silu)
        return dx.reshape(x.shape), dgamma, dbeta

    def conv2d_same(x, weight, bias, residual=None):
        if weight.shape[2:] != (3, 3) or not _float32(x, weight, bias, residual):
            return NotImplemented
        return core.conv3x3_forward(_c(x), _c(weight), _c(bias), None if residual is None else _c(residual))

    def conv2d_same_backward(x, weight, dout):
        if weight.shape[2:] != (3, 3) or not _float32(x, weight, dout):
            return NotImplemented
        return core.conv3x3_backward(_c(x), _c(weight), _c(dout))

    def linear(x, weight, bias):
        if not _float32(x, weight, bias):
            return NotImplemented
        return core.linear_forward(_c(x), _c(weight), bias)

    def linear_backward(x, weight, dout):
        if not _float32(x, weight, dout):
            return NotImplemented
        return core.linear_backward(_c(x), _c(weight), _c(dout))

    return {"layers.linear": linear, "layers.linear_backward": linear_backward,
            "layers.silu": silu, "layers.silu_backward": silu_backward,
            "layers.group_norm": group_norm, "layers.group_norm_backward": group_norm_backward,
            "layers.conv2d_same": conv2d_same, "layers.conv2d_same_backward": conv2d_same_backward}


# ---------------------------------------------------------------------------------------------------------------
# CuPy: elementwise chains fused into one kernel each, compiled from the reference function itself.

FUSED = ("layers.silu", "layers.silu_backward", "layers.scale_shift", "layers.scale_shift_silu",
         "layers.scale_shift_silu_backward", "layers.group_norm_combine", "layers.bias_add", "layers.bias_residual_add",
         "optim.adam_update", "optim.ema_update", "optim.sum_of_squares", "train.squared_error_sum", "train.mse_grad")


def _cupy_table():
    try:
        import cupy
    except ImportError:
        return {}
    from .. import layers, optim, train  # noqa: F401  (their @reference functions register on import)
    return {key: cupy.fuse(kernel_name=key.replace(".", "_"))(_references[key]) for key in FUSED}
