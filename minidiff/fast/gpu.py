"""The CuPy table of fast paths: the CUDA kernels of minidiff._core, and the references declared
``@fast.reference(fuse=True)``, each compiled from its own code by ``cupy.fuse`` into one GPU kernel (a chain of
elementwise operations: one launch instead of one per operation), never a second, hand-copied formula.
"""
from ..utils.backend import cupy_status


def available():
    """Whether CuPy imports and sees a GPU."""
    return cupy_status()[0]


def fuse(key, reference):
    """The reference compiled into one kernel by cupy.fuse (named after its key)."""
    import cupy
    return cupy.fuse(kernel_name=key.replace(".", "_"))(reference)


def table():
    """{reference key: fast path} for CuPy arrays (the fused references join on first use)."""
    return {}
