"""Counting the array operations a step issues, as a GPU would launch them, without a GPU.

A small network's step on a GPU costs one kernel launch per array operation, so the number of operations bounds what
a step costs and what a CUDA graph replays. ``CountingArray`` is a NumPy array that counts what is done with it:
  * each ufunc call, elementwise or reduction (one kernel each);
  * each copy: astype, copy, a reshape that cannot be a view, advanced indexing, assignment into an array;
  * each NumPy function that computes (concatenate, einsum, zeros, where...); views (reshape, transpose, slicing,
    broadcast_to) cost nothing.
Its array module ``xp`` (what utils.backend.array_module returns for it) makes every new array a CountingArray, and
the registry (fast/__init__.py) sends these arrays to the fast paths CuPy has (the fused references and the CUDA
kernels of fast/gpu.py), each counted as the one kernel it is there. So the count follows CuPy's code path.

    with counting() as counts:
        model.forward(x, t)           # x: a CountingArray (count.xp.asarray(...))
    counts                            # {"Conv2d 3x3": ..., "GroupNormSiLU": ..., ...} by innermost layer type

bench/bench_unet.py --count-ops prints the counts of a training step and a sampling step by layer type.
"""
import collections
import contextlib

import numpy as np

KIND = "count"
_depth = [0]                    # > 0 inside a counted operation: its own insides are not counted again
_labels = ["other"]             # the innermost layer (or phase) running now
_counts = [None]                # the Counter of the open counting() block, or None


def _count(n=1):
    if _depth[0] == 0 and _counts[0] is not None and n:
        _counts[0][_labels[-1]] += n


@contextlib.contextmanager
def _quiet():
    _depth[0] += 1
    try:
        yield
    finally:
        _depth[0] -= 1


def _plain(x):
    if isinstance(x, CountingArray):
        return x.view(np.ndarray)
    if isinstance(x, (list, tuple)):
        return type(x)(_plain(v) for v in x)
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    return x


def _wrap(x):
    if isinstance(x, np.generic):               # a NumPy scalar result is a 0-d array on a GPU
        return np.asarray(x).view(CountingArray)
    if isinstance(x, np.ndarray) and not isinstance(x, CountingArray):
        return x.view(CountingArray)
    if isinstance(x, tuple):
        return tuple(_wrap(v) for v in x)
    if isinstance(x, list):
        return [_wrap(v) for v in x]
    return x


def _shares(a, b):
    return isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and np.shares_memory(a, b)


FREE = {"reshape", "transpose", "swapaxes", "moveaxis", "broadcast_to", "broadcast_arrays", "expand_dims", "squeeze",
        "shape", "ndim", "size", "may_share_memory", "shares_memory", "result_type", "empty_like", "atleast_1d",
        "atleast_2d", "atleast_3d", "iscomplexobj", "isrealobj", "ravel", "asarray", "ascontiguousarray",
        "asanyarray", "array_equal"}
VIEW_OR_COPY = {"reshape", "ravel", "asarray", "ascontiguousarray", "asanyarray"}   # free only when a view
COPIES = {"asarray", "ascontiguousarray", "asanyarray", "array", "copy"}  # NumPy does not dispatch these to the array


def _counted(name, cost=1):
    """An ndarray method counted as ``cost`` operations (its insides not counted again)."""
    def method(self, *args, **kwargs):
        _count(cost)
        with _quiet():
            return _wrap(getattr(np.ndarray, name)(self.view(np.ndarray), *_plain(args), **_plain(kwargs)))
    return method


class CountingArray(np.ndarray):
    __fast_kind__ = KIND

    def __array_ufunc__(self, ufunc, method, *inputs, out=None, **kwargs):
        _count()
        with _quiet():
            if out is not None:
                getattr(ufunc, method)(*_plain(inputs), out=_plain(out), **kwargs)
                return out[0] if len(out) == 1 else out
            return _wrap(getattr(ufunc, method)(*_plain(inputs), **kwargs))

    def __array_function__(self, func, types, args, kwargs):
        with _quiet():
            result = func(*_plain(args), **_plain(kwargs))
        name = func.__name__
        if name not in FREE or (name in VIEW_OR_COPY and args and not _shares(result, _plain(args[0]))):
            _count()
        return _wrap(result)

    def __getitem__(self, key):
        with _quiet():
            result = super().__getitem__(_plain(key))
        if isinstance(result, np.ndarray) and not _shares(result, self):
            _count()                            # advanced indexing gathers: a copy
        return _wrap(result)

    def __setitem__(self, key, value):
        _count()
        with _quiet():
            super().__setitem__(_plain(key), _plain(value))

    sum, mean, max, min, prod, any, all, clip, dot, cumsum = (_counted(n) for n in (
        "sum", "mean", "max", "min", "prod", "any", "all", "clip", "dot", "cumsum"))
    var, std = _counted("var", 2), _counted("std", 2)
    copy, fill = _counted("copy"), _counted("fill")

    def astype(self, dtype, copy=True, **kwargs):
        if copy or np.dtype(dtype) != self.dtype:
            _count()
        with _quiet():
            return _wrap(self.view(np.ndarray).astype(dtype, copy=copy, **kwargs))

    def reshape(self, *shape, **kwargs):
        with _quiet():
            result = self.view(np.ndarray).reshape(*shape, **kwargs)
        if not _shares(result, self):
            _count()
        return _wrap(result)


class _Module:
    """numpy, with every array it makes a CountingArray and each computation counted (creation: zeros, full, arange,
    asarray of host data are one operation each; empty is free)."""
    __name__ = "minidiff.fast.count.xp"
    __fast_kind__ = KIND

    def __getattr__(self, name):
        obj = getattr(np, name)
        if not callable(obj) or isinstance(obj, type):
            return obj                          # dtypes, constants, submodules

        def call(*args, **kwargs):
            on_device = any(isinstance(a, CountingArray) for a in (*args, *kwargs.values()))
            if on_device and name not in COPIES:
                return _wrap(obj(*args, **kwargs))      # the array's own hooks count it
            with _quiet():
                result = obj(*_plain(args), **_plain(kwargs))
            if on_device:                               # asarray & co. of a device array: free when a view
                if not _shares(result, _plain(args[0])):
                    _count()
            elif name != "empty":                       # made on the device, or uploaded from the host
                _count()
            return _wrap(result)
        return call


xp = _Module()
CountingArray.__xp__ = xp


def fuse(key, reference):
    """A fused reference: one counted kernel."""
    def kernel(*args, **kwargs):
        _count()
        with _quiet():
            return reference(*args, **kwargs)
    kernel.__name__ = key
    return kernel


def table(references):
    """The registry's table for CountingArrays: CuPy's CUDA kernels (fast/gpu.py), each one counted operation, run by
    its reference (``references``: the registry's, key -> function; the fused references join on first use, as on
    CuPy)."""
    from .gpu import CUDA_KERNELS

    def kernel(key):
        def run(*args, **kwargs):
            _count()
            with _quiet():
                return references[key](*args, **kwargs)
        return run
    return {key: kernel(key) for key in CUDA_KERNELS}


def _label(layer):
    name = type(layer).__name__
    if name == "Conv2d":
        k = layer.params["weight"].shape[-1]
        name += f" {k}x{k}" + (f"/{layer.stride}" if layer.stride > 1 else "")
    return name


@contextlib.contextmanager
def counting(*models):
    """Count the operations inside the block (a Counter by the innermost running layer's type); the layers of
    ``models`` label their forward and backward passes. Ops outside any layer count under the phase names given by
    ``phase``."""
    counts = collections.Counter()
    patched = []
    for model in models:
        for _, layer in model.named_layers():
            for method in ("forward", "backward", "backward_with_emb"):
                if hasattr(type(layer), method):
                    original = getattr(layer, method)
                    setattr(layer, method, _labelled(_label(layer), original))
                    patched.append((layer, method))
    saved, _counts[0] = _counts[0], counts
    try:
        yield counts
    finally:
        _counts[0] = saved
        for layer, method in patched:
            delattr(layer, method)


@contextlib.contextmanager
def phase(name):
    """Ops in the block that no layer claims count under ``name`` (e.g. "optimizer")."""
    _labels.append(name)
    try:
        yield
    finally:
        _labels.pop()


def _labelled(name, fn):
    def run(*args, **kwargs):
        with phase(name):
            return fn(*args, **kwargs)
    return run
