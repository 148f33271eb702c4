"""Array backends: NumPy always; CuPy when installed with a usable GPU; the native kernels when built.

Underneath every stage: NumPy or CuPy.
"""
import numpy as np


def array_module(x):
    """numpy for NumPy arrays, cupy for CuPy arrays: one code path for CPU and GPU. (An array type may name its own
    module as ``__xp__``: the op counter's arrays do, minidiff/fast/count.py.)"""
    own = getattr(type(x), "__xp__", None)
    if own is not None:
        return own
    if type(x).__module__.startswith("cupy"):
        import cupy
        return cupy
    return np


def get_xp(device):
    """The array module for a device name: 'cpu' -> numpy, 'cuda' -> cupy (with a clear error if unusable)."""
    if device == "cpu":
        return np
    if device == "cuda":
        ok, why = cupy_status()
        if not ok:
            raise RuntimeError(f"device 'cuda' needs CuPy and a CUDA GPU: {why}")
        import cupy
        return cupy
    raise ValueError(f"unknown device {device!r}; choose 'cpu' or 'cuda'")


def cupy_status():
    """(usable, reason): whether CuPy imports and sees at least one GPU."""
    try:
        import cupy
    except Exception as e:  # ImportError, or a broken CUDA install
        return False, f"CuPy is not importable ({type(e).__name__}: {e})"
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:
        return False, f"CuPy found no usable GPU ({type(e).__name__}: {e})"
    return (n > 0), (f"{n} GPU(s)" if n > 0 else "CuPy found no GPU")


def to_numpy(x):
    """A host NumPy copy of x (NumPy or CuPy)."""
    return x.get() if hasattr(x, "get") else np.asarray(x)
