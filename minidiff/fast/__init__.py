"""Fast paths beside the readable references: one registry, one table per array kind, one switch.

The math of every hot operation is written once, as a plain NumPy/CuPy function marked ``@fast.reference``
(``layers.conv2d``, ``layers.group_norm``, ``optim.adam_update``, ``step.step``...). That function is what people
read and what the tests prove (finite differences, closed forms, PyTorch). Faster implementations of the same
numbers are registered for it by array kind, in one table each:

  * NumPy arrays (fast/cpu.py): the C++ kernels of minidiff._core (csrc/), AVX-512, AVX2 or SSE2 picked for the CPU
    when it loads, OpenMP over the cores;
  * CuPy arrays (fast/gpu.py): the CUDA kernels of minidiff._core, and the references marked
    ``@fast.reference(fuse=True)`` compiled into one GPU kernel each by ``cupy.fuse`` (never a hand-copied formula).

A call goes to the fast path for its first argument's array kind, if there is one, unless the switch says otherwise:

    MINIDIFF_REFERENCE=1 python ...              # every call runs the readable reference
    with fast.use_reference(): ...               # the same, in code
    with fast.use_reference("step.step"): ...    # only these references

A fast path may decline a call it does not cover (another dtype, such as float64 for the gradient checks, or another
kernel size) by returning NotImplemented; the reference then runs. tests/test_kernels.py checks every entry against
its reference. This module imports nothing of minidiff: the tables are loaded on first use, by their names.
"""
import functools
import os
from contextlib import contextmanager

import numpy as np

_references = {}            # "module.function" -> the reference function
_fused = set()              # keys whose CuPy fast path is the reference compiled by cupy.fuse
_tables = {}                # "numpy" / "cupy" -> {key: fast function}, built on first use
_reference_only = os.environ.get("MINIDIFF_REFERENCE", "0") not in ("", "0")
_reference_keys = frozenset()   # use_reference(*keys): these keys run their reference


def reference(fn=None, *, fuse=False, by_xp=False):
    """Mark ``fn`` as the readable reference of an operation: calls run the fast path registered for the first
    argument's array kind, if any and not switched off, else ``fn``. ``fuse=True`` declares that on CuPy the fast
    path is ``fn`` itself compiled by ``cupy.fuse`` (for a chain of elementwise operations). ``by_xp=True``: the
    table is chosen by the array module passed as ``xp=`` (a function that makes arrays, such as a noise
    generator), not by the first argument. ``fn.reference`` is the plain function. Usable as ``@fast.reference``
    and ``@fast.reference(fuse=True)``."""
    if fn is None:
        return functools.partial(reference, fuse=fuse, by_xp=by_xp)
    key = f"{fn.__module__.removeprefix('minidiff.')}.{fn.__name__}"
    _references[key] = fn
    if fuse:
        _fused.add(key)

    @functools.wraps(fn)
    def dispatch(*args, **kwargs):
        if not _reference_only and key not in _reference_keys:
            fast = _fast_path(key, module_kind(kwargs.get("xp", np)) if by_xp else array_kind(args[0]))
            if fast is not None:
                out = fast(*args, **kwargs)
                if out is not NotImplemented:
                    return out
        return fn(*args, **kwargs)

    dispatch.reference = fn
    dispatch.key = key
    return dispatch


def module_kind(xp):
    """ "numpy" or "cupy" for an array module (or the kind it declares: the op counter's, fast/count.py)."""
    return getattr(xp, "__fast_kind__", None) or ("cupy" if xp.__name__ == "cupy" else "numpy")


def array_kind(x):
    """ "numpy" or "cupy" for a real array (or the kind its type declares); None otherwise (a tracing proxy inside
    cupy.fuse gets the reference)."""
    t = type(x)
    if t is np.ndarray:
        return "numpy"
    if t.__name__ == "ndarray" and t.__module__.startswith("cupy"):
        return "cupy"
    return getattr(t, "__fast_kind__", None)


def table(kind):
    """The fast paths for one array kind: {key: function} ({} when the kernels or CuPy are missing). On CuPy the
    fused references are compiled when first called, and join the table then."""
    if kind not in _tables:
        if kind == "numpy":
            from .cpu import table as make
        elif kind == "cupy":
            from .gpu import table as make
        else:
            from .count import table
            make = functools.partial(table, _references)
        _tables[kind] = make()
    return _tables[kind]


def _fast_path(key, kind):
    if kind is None:
        return None
    fast = table(kind).get(key)
    if fast is None and kind != "numpy" and key in _fused:
        if kind == "cupy":
            from .gpu import fuse
        else:
            from .count import fuse
        fast = _tables[kind][key] = fuse(key, _references[key])
    return fast


def has_fast_path(key, xp):
    """Whether calls of ``key`` on arrays of module ``xp`` run a fast path now (switch and tables considered)."""
    if _reference_only or key in _reference_keys:
        return False
    return _fast_path(key, module_kind(xp)) is not None


def references():
    """{key: reference function} of every reference registered so far (its module imported)."""
    return dict(_references)


@contextmanager
def use_reference(*keys, on=True):
    """Within the block, every call runs its readable reference (or, given keys such as "step.step", only those
    do); on=False turns the fast paths back on everywhere."""
    global _reference_only, _reference_keys
    saved = _reference_only, _reference_keys
    if keys:
        _reference_keys = _reference_keys | frozenset(keys) if on else frozenset()
    else:
        _reference_only = bool(on)
        if not on:
            _reference_keys = frozenset()
    try:
        yield
    finally:
        _reference_only, _reference_keys = saved


def status():
    """dict: whether the switch is on, and which references have a fast path for NumPy (and for CuPy)."""
    from .gpu import available
    cupy = sorted(set(table("cupy")) | (_fused if available() else set()))
    return dict(reference_only=_reference_only, numpy=sorted(table("numpy")), cupy=cupy)
