"""The fast paths of minidiff/fast/ against the readable references they replace.

Every native CPU kernel (csrc/nn_*.cpp) is compared with its NumPy reference on random float32 inputs of several
shapes (odd sizes, channel counts that are not multiples of any vector width, one pixel, one channel), for every
instruction set this CPU can run (AVX-512, AVX2, SSE2). The backward kernels of the linear operations
(convolution, matrix product) also pass the adjoint identity <A x, y> = <x, A^T y> in float32. The whole U-Net
gives the same output and gradients both ways. Bad arrays given to the kernels directly are clear errors.
"""
import os
import subprocess
import sys

import numpy as np
import pytest

from minidiff import fast, layers, unet
from minidiff.utils import native as _native
from minidiff.conditioning.unet import ClassConditionalUNet, ConditionConfig
from minidiff.unet import UNetConfig
from test_layers import rel_error

STATUS = _native.native_status()
needs_cpu = pytest.mark.skipif(not STATUS["cpu_kernel"], reason=f"native extension unavailable: {STATUS['reason']}")
TOL = 2e-6                                      # float32: the sums run in another order, exp is ~1 ulp
# Winograd F(4x4, 3x3) (csrc/nn_isa.h) multiplies by up to 8 (and, for the weights, 1/24) in its transforms: its
# float32 error is about ten times the direct sum's (rel_error against float64: 1-5e-6, the direct sum's 1-5e-7)
TOL_F4 = 1e-5


def _isas():
    return _native.core.cpu_isas() if STATUS["cpu_kernel"] else []


@pytest.fixture(params=["avx512", "avx2", "base"])
def isa(request):
    """Run the test with each instruction set's kernels this CPU supports; back to the best one afterwards."""
    if request.param not in _isas():
        pytest.skip(f"this CPU (or build) has no {request.param}")
    _native.core.set_cpu_isa(request.param)
    yield request.param
    _native.core.set_cpu_isa("auto")


def both(fn, *args):
    """(fast, reference) results of a registered function."""
    out = fn(*args)
    with fast.use_reference():
        ref = fn(*args)
    return out, ref


def assert_close(out, ref, tol=TOL):
    out, ref = (out, ref) if isinstance(out, tuple) else ((out,), (ref,))
    assert len(out) == len(ref)
    for f, r in zip(out, ref):
        assert f.shape == r.shape and f.dtype == np.float32
        assert rel_error(f, r) < tol, rel_error(f, r)


def conv_tol(H, W, cin, cout):
    """TOL, or TOL_F4 where the convolution of these sizes (forward, input or weight gradient) takes F(4x4)"""
    core = _native.core
    tiles = (core.conv_winograd_tile(H, W, cin, cout, 1), core.conv_winograd_tile(H, W, cout, cin, 1),
             core.conv_winograd_tile(H, W, cin, cout, 1, wgrad=True))
    return TOL_F4 if 4 in tiles else TOL


def rand(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


CONV_SHAPES = [(2, 5, 7, 3, 5), (3, 28, 28, 32, 32), (2, 7, 7, 64, 64), (2, 14, 14, 24, 48), (1, 28, 28, 1, 24),
               (2, 28, 28, 24, 1), (2, 6, 6, 128, 64), (1, 3, 3, 17, 35), (1, 1, 1, 9, 9), (4, 2, 9, 40, 72)]


@needs_cpu
@pytest.mark.parametrize("B,H,W,cin,cout", CONV_SHAPES)
def test_conv2d_kernel_matches_reference(isa, B, H, W, cin, cout):
    rng = np.random.default_rng(H * 100 + cin)
    x, w, b = rand(rng, B, H, W, cin), rand(rng, cout, cin, 3, 3, scale=0.3), rand(rng, cout)
    dout, tol = rand(rng, B, H, W, cout), conv_tol(H, W, cin, cout)
    assert_close(*both(layers.conv2d, x, w, b, 1, 1), tol)
    assert_close(*both(layers.conv2d_backward, x, w, dout, 1, 1), tol)
    # a bias per image (the ResBlock's time shift) and a residual added in the same pass
    assert_close(*both(layers.conv2d, x, w, rand(rng, B, cout), 1, 1, rand(rng, B, H, W, cout)), tol)


@needs_cpu
@pytest.mark.parametrize("B,H,W,cin,cout", [(2, 28, 28, 32, 32), (2, 14, 14, 64, 64), (3, 7, 9, 24, 24), (1, 5, 4, 3, 5),
                                            (2, 1, 1, 17, 35), (1, 2, 3, 48, 8)])
def test_conv2d_stride2_kernel_matches_reference(isa, B, H, W, cin, cout):
    """Downsample's 3x3 stride-2 convolution, odd and even sizes (the input gradient's four parities)."""
    rng = np.random.default_rng(H * 100 + cin + 7)
    x, w, b = rand(rng, B, H, W, cin), rand(rng, cout, cin, 3, 3, scale=0.3), rand(rng, cout)
    dout = rand(rng, B, (H - 1) // 2 + 1, (W - 1) // 2 + 1, cout)
    assert_close(*both(layers.conv2d, x, w, b, 2, 1))
    assert_close(*both(layers.conv2d_backward, x, w, dout, 2, 1))


# Winograd (csrc/nn_isa.h) takes the stride-1 convolutions with enough channels on large enough maps: F(4x4, 3x3)
# from 16 x 16 maps and 24 channels with AVX-512 (8 x 8 and 16 channels with AVX2 and SSE2), F(2x2, 3x3) from 32
# channels on smaller maps (>= 8 x 8 with AVX-512, >= 4 x 4 with AVX2 and SSE2). The shapes: odd sizes (a last tile
# partly outside), channel counts that are not multiples of the vector width (and an odd one under AVX-512's
# channel pairs), one image (its tiles split over the threads) and several, the weight gradient in more than one
# chunk of tiles; each instruction set takes F(4x4) for some and F(2x2) for others (test below)
WINOGRAD_SHAPES = [(1, 9, 11, 33, 35), (5, 8, 8, 32, 48), (2, 28, 28, 32, 32), (3, 13, 10, 40, 72),
                   (2, 14, 14, 48, 48), (3, 11, 8, 72, 33), (1, 8, 9, 64, 40), (3, 5, 7, 40, 36), (2, 4, 4, 64, 48),
                   (2, 17, 19, 24, 40), (1, 28, 28, 72, 24), (2, 16, 16, 25, 17)]


@needs_cpu
@pytest.mark.parametrize("B,H,W,cin,cout", WINOGRAD_SHAPES)
def test_conv2d_winograd_matches_reference(isa, B, H, W, cin, cout):
    rng = np.random.default_rng(H * 10 + cout)
    x, w = rand(rng, B, H, W, cin), rand(rng, cout, cin, 3, 3, scale=0.3)
    bias, residual, dout = rand(rng, B, cout), rand(rng, B, H, W, cout), rand(rng, B, H, W, cout)
    tol = conv_tol(H, W, cin, cout)
    assert_close(*both(layers.conv2d, x, w, bias[0], 1, 1), tol)
    assert_close(*both(layers.conv2d, x, w, bias, 1, 1, residual), tol)
    assert_close(*both(layers.conv2d_backward, x, w, dout, 1, 1), tol)


# (H = W, cin, cout, stride) -> the tile of the forward pass (and of the input gradient) and of the weight gradient
# for avx512, avx2, base
WINOGRAD_RULES = [((16, 24, 24, 1), (4, 4), (4, 4), (4, 4)), ((16, 24, 16, 1), (0, 0), (4, 4), (4, 4)),
                  ((15, 32, 32, 1), (2, 0), (4, 4), (4, 4)), ((8, 64, 32, 1), (2, 2), (4, 4), (4, 4)),
                  ((8, 15, 64, 1), (0, 0), (0, 0), (0, 0)), ((7, 64, 64, 1), (0, 0), (2, 2), (2, 2)),
                  ((7, 32, 32, 1), (0, 0), (2, 0), (2, 2)), ((4, 64, 32, 1), (0, 0), (2, 2), (2, 2)),
                  ((3, 64, 64, 1), (0, 0), (0, 0), (0, 0)), ((16, 64, 64, 2), (0, 0), (0, 0), (0, 0))]


@needs_cpu
def test_winograd_takes_the_convolutions_it_suits(isa):
    """Winograd's sums run in another order than the direct kernel's (the results differ in the last bits) where
    it applies, by the tiles of WINOGRAD_RULES; elsewhere the two settings give the same bits."""
    core = _native.core
    rng = np.random.default_rng(12)

    def both_ways(x, w, dout, stride):
        out = []
        for on in (False, True):
            was = core.set_conv_winograd(on)
            try:
                out.append((layers.conv2d(x, w, None, stride, 1),) + layers.conv2d_backward(x, w, dout, stride, 1))
            finally:
                core.set_conv_winograd(was)
        return out

    for (H, cin, cout, stride), *by_isa in WINOGRAD_RULES:
        tile, dw_tile = by_isa[["avx512", "avx2", "base"].index(isa)]
        Ho = (H - 1) // stride + 1
        x, w, dout = rand(rng, 2, H, H, cin), rand(rng, cout, cin, 3, 3), rand(rng, 2, Ho, Ho, cout)
        direct, wino = both_ways(x, w, dout, stride)
        assert core.conv_winograd_tile(H, H, cin, cout, stride) == tile        # what bench_kernels.py marks
        assert core.conv_winograd_tile(H, H, cin, cout, stride, wgrad=True) == dw_tile
        assert np.array_equal(direct[0], wino[0]) != bool(tile), (H, cin, cout, stride)
        assert np.array_equal(direct[1], wino[1]) != bool(tile), (H, cin, cout, stride)             # dx
        assert np.array_equal(direct[2], wino[2]) != bool(dw_tile), (H, cin, cout, stride)          # dW
    was = core.set_conv_winograd(False)
    try:
        assert core.conv_winograd_tile(16, 16, 32, 32, 1) == 0
        assert core.conv_winograd_tile(8, 8, 64, 64, 1, wgrad=True) == 0
    finally:
        core.set_conv_winograd(was)


@needs_cpu
@pytest.mark.parametrize("shape,ca", [((2, 5, 7, 32), 8), ((3, 28, 28, 64), 32), ((1, 1, 1, 3), 1), ((4, 3, 2, 5), 0),
                                      ((2, 7, 7, 96), 96)])
def test_copy_kernels_match_reference(shape, ca):
    """The skips' concatenation and the nearest upsampling with its adjoint (exactly the reference's values: the
    adjoint adds each 2 x 2 block in NumPy's order), and the pixel sums (in double, against NumPy's float32)."""
    rng = np.random.default_rng(sum(shape) + ca)
    d = rand(rng, *shape)
    out, ref = both(layers.concat_channels, d[..., :ca].copy(), d[..., ca:].copy())
    assert out.shape == ref.shape and np.array_equal(out, ref) and np.array_equal(out, d)
    up, ref = both(layers.upsample2x, d)
    assert up.shape == ref.shape and np.array_equal(up, ref) and np.array_equal(up[:, 1::2, ::2], d)
    dup = rand(rng, *up.shape)
    out, ref = both(layers.upsample2x_backward, dup)
    assert out.shape == d.shape and np.array_equal(out, ref)
    for per_image in (False, True):
        assert_close(*both(layers.pixel_sum, d, per_image), tol=1e-5)
        if ca < shape[-1]:                                                           # a slice of channels
            assert_close(*both(layers.pixel_sum, d[..., ca:], per_image), tol=1e-5)


@needs_cpu
@pytest.mark.parametrize("n,weight_decay", [(1, 0.0), (1000003, 0.01)])
def test_optimizer_kernels_match_reference_bit_for_bit(n, weight_decay):
    """Adam and the EMA in one pass, each element with the reference's float32 operations in order: the same bits."""
    from minidiff import optim
    rng = np.random.default_rng(n)
    p, g, m = rand(rng, n), rand(rng, n), rand(rng, n, scale=0.1)
    v = np.abs(rand(rng, n, scale=0.01))
    s = [np.float32(a) for a in (1e-3, 0.9, 0.999, 1e-8, 1 - 0.9 ** 3, 1 - 0.999 ** 3, weight_decay)]
    runs = []
    for reference in (False, True):
        arrays = [a.copy() for a in (p, g, m, v)]
        with fast.use_reference(reference):
            optim.adam_update(*arrays, *s)
            optim.ema_update(arrays[2], arrays[0], np.float32(0.99))     # any two buffers
        runs.append(arrays)
    for a, b in zip(*runs):
        assert np.array_equal(a, b)


@needs_cpu
def test_kernels_take_slices_of_channels(isa):
    """Concat's backward gives views of its output's channels; the backward kernels read them in place."""
    rng = np.random.default_rng(11)
    d = rand(rng, 2, 9, 7, 40)
    x, dy = rand(rng, 2, 9, 7, 24), d[..., 8:32]
    assert not dy.flags.c_contiguous
    for w in (rand(rng, 24, 24, 3, 3, scale=0.3), rand(rng, 24, 24, 1, 1)):
        assert_close(*both(layers.conv2d_backward, x, w, dy, 1, (w.shape[-1] - 1) // 2))
    assert_close(*both(layers.conv2d_backward, x, rand(rng, 24, 24, 3, 3, scale=0.3), d[:, ::2, ::2, 8:32], 2, 1))
    assert_close(*both(layers.linear_backward, x.reshape(-1, 24), rand(rng, 24, 24), dy.reshape(-1, 24)))


@needs_cpu
@pytest.mark.parametrize("M,K,N", [(1, 1, 1), (7, 3, 5), (100, 64, 32), (3136, 64, 64), (50, 288, 32), (13, 17, 129),
                                   (64, 32, 128), (25, 1, 40)])
def test_linear_kernel_matches_reference(isa, M, K, N):
    rng = np.random.default_rng(M + K + N)
    x, w, b, dout = rand(rng, M, K), rand(rng, N, K), rand(rng, N), rand(rng, M, N)
    assert_close(*both(layers.linear, x, w, b))
    assert_close(*both(layers.linear_backward, x, w, dout))


@needs_cpu
@pytest.mark.parametrize("B,N,M,C", [(2, 49, 49, 48), (3, 5, 7, 3), (1, 1, 1, 1), (2, 17, 33, 17), (2, 256, 256, 64),
                                     (1, 16, 9, 24), (2, 3, 64, 128)])
def test_attention_kernel_matches_reference(isa, B, N, M, C):
    rng = np.random.default_rng(N + M + C)
    q, k, v, dout = rand(rng, B, N, C), rand(rng, B, M, C), rand(rng, B, M, C), rand(rng, B, N, C)
    scale = float(C) ** -0.5                    # a Python float, as AttnBlock's (a NumPy float64 would promote)
    assert_close(*both(unet.attention, q, k, v, scale))
    a = unet.attention.reference(q, k, v, scale)[1]
    assert_close(*both(unet.attention_backward, q, k, v, a, dout, scale))


@needs_cpu
# C = 36: lcm(36, 16) = 144 floats a row of the sums' lanes (nn_isa.h, lane_sums), 9 lane groups in passes of 4, 4
# and 1, with a ragged last row
@pytest.mark.parametrize("B,H,W,C,G", [(2, 7, 7, 64, 8), (3, 28, 28, 24, 8), (2, 13, 1, 40, 8), (1, 3, 5, 16, 2),
                                       (2, 5, 3, 36, 4), (2, 14, 14, 96, 8), (1, 1, 2, 8, 4)])
@pytest.mark.parametrize("silu", [False, True])
def test_group_norm_kernel_matches_reference(isa, B, H, W, C, G, silu):
    rng = np.random.default_rng(C + H)
    x = rand(rng, B, H, W, C, scale=2.0) + 0.5
    gamma, beta, dout = rand(rng, C) + 1.0, rand(rng, C), rand(rng, B, H, W, C)
    out, ref = both(layers.group_norm, x, gamma, beta, G, 1e-5, silu)
    assert_close(out, ref)
    _, mean, rstd = ref
    assert_close(*both(layers.group_norm_backward, dout, x, gamma, beta, mean, rstd, G, silu), tol=5e-6)


@needs_cpu
@pytest.mark.parametrize("n", [1, 7, 16, 17, 1000, 100003])
def test_silu_kernel_matches_reference(isa, n):
    rng = np.random.default_rng(n)
    x, dout = rand(rng, n, scale=6.0), rand(rng, n)
    x[:3] = [-200.0, 200.0, 0.0][:n]            # far tails: no overflow, the right limits
    assert_close(*both(layers.silu, x))
    assert_close(*both(layers.silu_backward, x, dout))
    y = layers.silu(x)
    assert np.all(np.isfinite(y)) and abs(y[0]) < 1e-30


@needs_cpu
@pytest.mark.parametrize("B,H,W,cin,cout", [(2, 5, 7, 3, 5), (2, 14, 14, 24, 48), (1, 3, 3, 17, 35)])
def test_conv_kernel_backward_is_the_adjoint(isa, B, H, W, cin, cout):
    """For y = conv(x, W) (no bias), <y, d> = <x, dx(d)> = <W, dW(d)>: the backward kernel is the exact adjoint
    of the forward kernel, to float32 rounding."""
    rng = np.random.default_rng(5)
    x, w, d = rand(rng, B, H, W, cin), rand(rng, cout, cin, 3, 3), rand(rng, B, H, W, cout)
    y = layers.conv2d(x, w, np.zeros(cout, np.float32), 1, 1)
    dx, dw = layers.conv2d_backward(x, w, d, 1, 1)
    yd = np.vdot(y.astype(np.float64), d)
    assert np.vdot(x.astype(np.float64), dx) == pytest.approx(yd, rel=1e-5)
    assert np.vdot(w.astype(np.float64), dw) == pytest.approx(yd, rel=1e-5)


@needs_cpu
def test_linear_kernel_backward_is_the_adjoint(isa):
    rng = np.random.default_rng(6)
    x, w, d = rand(rng, 37, 19), rand(rng, 23, 19), rand(rng, 37, 23)
    yd = np.vdot(layers.linear(x, w, np.zeros(23, np.float32)).astype(np.float64), d)
    dx, dw = layers.linear_backward(x, w, d)
    assert np.vdot(x.astype(np.float64), dx) == pytest.approx(yd, rel=1e-5)
    assert np.vdot(w.astype(np.float64), dw) == pytest.approx(yd, rel=1e-5)


@needs_cpu
def test_whole_unet_same_both_ways():
    """The class-conditional C = 32 U-Net with random weights (none zero): output, input gradient and every
    parameter gradient agree between the native kernels and the references."""
    from test_unet import randomize
    m = ClassConditionalUNet(UNetConfig(), ConditionConfig(num_classes=10), seed=0)
    rng = np.random.default_rng(3)
    randomize(m, rng, scale=0.1)
    x, t, y, d = rand(rng, 3, 1, 28, 28), np.array([0, 500, 999]), np.array([2, 10, 7]), rand(rng, 3, 1, 28, 28)
    runs = []
    for reference in (False, True):
        with fast.use_reference(reference):
            m.zero_grad()
            out = m.forward(x, t, y)
            runs.append((out, m.backward(d), {k: g.copy() for k, g in m.grads.items()}))
    (o1, dx1, g1), (o2, dx2, g2) = runs
    assert rel_error(o1, o2) < 1e-5 and rel_error(dx1, dx2) < 1e-5
    errors = {k: rel_error(g1[k], g2[k]) for k in g1 if not k.endswith("k.bias")}   # k.bias: exactly 0 (test_unet)
    bad = {k: e for k, e in errors.items() if e > 1e-4}
    assert len(errors) > 250 and not bad, bad


# ------------------------------------------------------------------------------------------ registry and switch
def test_every_fast_path_names_a_reference():
    import minidiff.optim, minidiff.step  # noqa: F401, E401  (register their references)
    refs = fast.references()
    table = fast.table("numpy")
    assert set(table) <= set(refs), set(table) - set(refs)
    assert fast._fused <= set(refs) and {"layers.silu", "optim.adam_update", "optim.ema_update"} <= fast._fused
    if STATUS["cpu_kernel"]:
        assert {"layers.conv2d", "layers.conv2d_backward", "layers.group_norm", "layers.group_norm_backward",
                "layers.silu", "layers.silu_backward", "layers.linear", "layers.linear_backward"} <= set(table)
    st = fast.status()
    assert st["reference_only"] is False and st["numpy"] == sorted(table)


def test_registry_imports_nothing_above_it():
    """fast/ is below its clients: no module of the registry imports layers, optim, the step or the trainer."""
    import ast
    import minidiff
    root = os.path.join(os.path.dirname(minidiff.__file__), "fast")
    for name in os.listdir(root):
        if name.endswith(".py"):
            tree = ast.parse(open(os.path.join(root, name)).read())
            imported = {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level}
            assert imported <= {"", "cpu", "gpu", "count", "..utils.native", "..utils.backend", "utils.native",
                                "utils.backend"}, (name, imported)


@needs_cpu
def test_use_reference_for_one_key(monkeypatch):
    calls = []
    monkeypatch.setitem(fast._tables, "numpy", {"layers.silu": lambda x: calls.append(1) or np.zeros_like(x)})
    x = np.ones(5, np.float32)
    with fast.use_reference("layers.silu"):
        assert layers.silu(x)[0] == pytest.approx(0.7310586) and calls == []
    assert not layers.silu(x).any() and calls == [1]


@needs_cpu
def test_switch_runs_the_reference(monkeypatch):
    calls = []
    monkeypatch.setitem(fast._tables, "numpy", {"layers.silu": lambda x: calls.append(1) or np.zeros_like(x)})
    x = np.ones(5, np.float32)
    assert not layers.silu(x).any() and calls == [1]              # the registered fast path
    with fast.use_reference():
        assert layers.silu(x)[0] == pytest.approx(0.7310586) and calls == [1]
    assert layers.silu.reference(x)[0] == pytest.approx(0.7310586)


def test_environment_switch():
    code = "from minidiff import fast; print(fast.status()['reference_only'])"
    for value, expected in (("1", "True"), ("0", "False")):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/",
                             env=dict(os.environ, MINIDIFF_REFERENCE=value))
        assert out.stdout.strip() == expected, out.stderr


def test_float64_and_other_kernel_sizes_run_the_reference():
    """Gradient checks run in float64: the float32 kernels decline and the reference runs (bit for bit)."""
    rng = np.random.default_rng(0)
    x, w, b = rng.standard_normal((2, 6, 6, 3)), rng.standard_normal((4, 3, 3, 3)), rng.standard_normal(4)
    y, ref = both(layers.conv2d, x, w, b, 1, 1)
    assert y.dtype == np.float64 and np.array_equal(y, ref)
    x32, w5 = x.astype(np.float32), rng.standard_normal((4, 3, 5, 5)).astype(np.float32)
    if STATUS["cpu_kernel"]:                    # 5x5: the convolution kernel declines, the reference runs
        assert fast.table("numpy")["layers.conv2d"](x32, w5, b.astype(np.float32), 1, 2) is NotImplemented
    assert_close(*both(layers.conv2d, x32, w5, b.astype(np.float32), 1, 2))


# ------------------------------------------------------------------------------------------ bad input
@needs_cpu
def test_kernels_reject_bad_arrays_clearly():
    core = _native.core
    x, w = np.zeros((2, 5, 5, 3), np.float32), np.zeros((4, 3, 3, 3), np.float32)
    with pytest.raises(TypeError, match="float32"):
        core.conv3x3_forward(x.astype(np.float64), w, None)
    with pytest.raises(TypeError, match="NumPy array"):
        core.conv3x3_forward(x.tolist(), w, None)
    with pytest.raises(ValueError, match="C-contiguous"):
        core.conv3x3_forward(np.zeros((2, 5, 10, 3), np.float32)[:, :, ::2], w, None)
    with pytest.raises(ValueError, match="input channels"):
        core.conv3x3_forward(np.zeros((2, 5, 5, 4), np.float32), w, None)
    with pytest.raises(ValueError, match="3, 3"):
        core.conv3x3_forward(x, np.zeros((4, 3, 5, 5), np.float32), None)
    with pytest.raises(ValueError, match="bias"):
        core.conv3x3_forward(x, w, np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="bias"):
        core.conv3x3_forward(x, w, np.zeros((3, 4), np.float32))
    with pytest.raises(ValueError, match="residual"):
        core.conv3x3_forward(x, w, None, np.zeros((2, 5, 5, 3), np.float32))
    with pytest.raises(ValueError, match="dimensions"):
        core.conv3x3_forward(x[0], w, None)
    with pytest.raises(ValueError, match="dout"):
        core.conv3x3_backward(x, w, np.zeros((2, 5, 5, 3), np.float32))
    with pytest.raises(ValueError, match="groups"):
        core.group_norm_forward(np.zeros((2, 4, 12), np.float32), np.ones(12, np.float32), np.zeros(12, np.float32),
                                8, 1e-5, True)
    with pytest.raises(ValueError, match="gamma"):
        core.group_norm_forward(np.zeros((2, 4, 16), np.float32), np.ones(8, np.float32), np.zeros(16, np.float32),
                                8, 1e-5, True)
    with pytest.raises(ValueError, match="shape"):
        core.group_norm_backward(np.zeros((2, 4, 16), np.float32), np.zeros((2, 5, 16), np.float32),
                                 np.ones(16, np.float32), np.zeros(16, np.float32), np.zeros((2, 16), np.float32),
                                 np.ones((2, 16), np.float32), 8, False)
    with pytest.raises(ValueError, match="shape"):
        core.silu_backward(np.zeros(5, np.float32), np.zeros(6, np.float32))
    with pytest.raises(ValueError, match="input features"):
        core.linear_forward(np.zeros((3, 4), np.float32), np.zeros((5, 3), np.float32), None)
    with pytest.raises(ValueError, match="dout"):
        core.linear_backward(np.zeros((3, 4), np.float32), np.zeros((5, 4), np.float32), np.zeros((3, 4), np.float32))
    q, kv = np.zeros((2, 5, 4), np.float32), np.zeros((2, 3, 4), np.float32)
    with pytest.raises(ValueError, match="k must have shape"):
        core.attention_forward(q, np.zeros((2, 3, 5), np.float32), kv, 0.5)
    with pytest.raises(ValueError, match="v has shape"):
        core.attention_forward(q, kv, kv[:, :2].copy(), 0.5)
    with pytest.raises(ValueError, match="a must have shape"):
        core.attention_backward(q, kv, kv, np.zeros((2, 5, 5), np.float32), q, 0.5)
    with pytest.raises(ValueError, match="dout has shape"):
        core.attention_backward(q, kv, kv, np.zeros((2, 5, 3), np.float32), kv, 0.5)
    with pytest.raises(ValueError, match="even height and width"):
        core.upsample2x_backward(np.zeros((2, 5, 4, 3), np.float32))
    with pytest.raises(ValueError, match="4 dimensions"):
        core.upsample2x(np.zeros((5, 4, 3), np.float32))
    with pytest.raises(ValueError, match="not supported|unknown"):
        core.set_cpu_isa("sse9")


needs_pages = pytest.mark.skipif(not (STATUS["cpu_kernel"] and _native.core.output_pages()),
                                 reason="the kernels' outputs keep their pages on Linux only")


PAGE = os.sysconf("SC_PAGESIZE")


def _pages():
    return _native.core.output_pages()


@needs_pages
def test_outputs_are_made_of_the_pages_of_freed_ones():
    """A large output takes fresh pages only for what the idle pages of freed outputs cannot cover, whatever their
    sizes, so the memory held is the most the outputs ever held at once."""
    rng = np.random.default_rng(5)
    xs = {n: rand(rng, n) for n in (300_000, 100_000, 500_000, 800_000)}       # 1.2, 0.4, 2.0 and 3.2 MB
    kept = []
    for n in (300_000, 100_000, 100_000, 500_000, 800_000, 300_000):
        before = _pages()
        kept.append(layers.silu(xs[n]))
        after = _pages()
        new = after["fresh"] - before["fresh"]
        bytes_ = -(-4 * n // PAGE) * PAGE
        released = before["pieces"] > 2048             # then the idle pages go first (cut into too many mappings)
        assert new == max(0, bytes_ - before["idle"]) or released and new == bytes_, (n, before, after)
        assert after["in_use"] - before["in_use"] == bytes_
        assert after["in_use"] + after["idle"] <= after["fresh"]
        assert np.array_equal(kept[-1], layers.silu(xs[n]))
        if len(kept) % 2:
            kept.pop(0)                                 # free some, keep others
    del kept
    held = _pages()
    for n in (800_000, 300_000, 500_000):               # the same again: no fresh page
        layers.silu(xs[n])
    assert _pages() == held


@needs_pages
def test_outputs_of_any_sizes_in_any_order_keep_their_values():
    """Blocks filled from pieces of other blocks, freed and cut again: every output holds what its kernel wrote,
    and the memory held never exceeds what was ever mapped."""
    rng = np.random.default_rng(7)
    x = rand(rng, 1_000_000)
    with fast.use_reference():
        ref = layers.silu(x)
    alive = []
    for i, n in enumerate(rng.integers(65_536, 1_000_000, 300)):
        alive.append((n, layers.silu(x[:n])))
        if len(alive) > 6:
            alive.pop(int(rng.integers(len(alive))))
        for m, out in alive if i % 50 == 0 else alive[-1:]:
            assert np.allclose(out, ref[:m], rtol=1e-6, atol=1e-7)
        pages = _pages()
        assert pages["in_use"] + pages["idle"] <= pages["fresh"] and pages["pieces"] <= 2048 + 300


@needs_pages
def test_kernels_write_every_element_of_reused_pages(isa):
    """Reused pages hold old values (here NaN), not zeros: every kernel must write all of its output."""
    rng = np.random.default_rng(6)
    x, w, b, d = rand(rng, 4, 28, 28, 32), rand(rng, 32, 32, 3, 3), rand(rng, 32), rand(rng, 4, 28, 28, 32)
    g = rand(rng, 32) + 1.0
    q, k, v = (rand(rng, 4, 256, 64) for _ in range(3))
    calls = [(layers.conv2d, x, w, b, 1, 1), (layers.conv2d_backward, x, w, d, 1, 1),
             (layers.conv2d_backward, x, w, d[:, ::2, ::2].copy(), 2, 1), (layers.silu_backward, x, d),
             (layers.group_norm, x, g, b, 8, 1e-5, True), (layers.concat_channels, x, d),
             (layers.upsample2x, x[:, ::2, ::2].copy()), (layers.upsample2x_backward, layers.upsample2x(d)),
             (layers.linear, x.reshape(-1, 32), w[:, :, 0, 0], b),
             (layers.linear_backward, x.reshape(-1, 32), w[:, :, 0, 0], d.reshape(-1, 32)),
             (unet.attention, q, k, v, 0.125), (unet.attention_backward, q, k, v, unet.attention(q, k, v, 0.125)[1],
                                                q, 0.125)]
    def big(out):                                       # the outputs that come from the kept pages
        return [o for o in (out if isinstance(out, tuple) else (out,)) if o.nbytes >= 256 << 10]
    for fn, *args in calls:
        old = big(fn(*args))
        poisoned = {o.ctypes.data for o in old if o.fill(np.nan) is None}
        del old                                         # their pages are idle, full of NaN
        out = fn(*args)
        assert poisoned and all(o.ctypes.data in poisoned for o in big(out)), fn.__name__
        with fast.use_reference():
            assert_close(out, fn(*args), tol=TOL_F4)


@needs_cpu
def test_kernels_are_deterministic():
    """The threads take ranges in turn, but partial sums are added in a fixed order: the same bits every time (a
    resumed training run must equal an uninterrupted one)."""
    rng = np.random.default_rng(9)
    x, w, d = rand(rng, 8, 14, 14, 32), rand(rng, 48, 32, 3, 3), rand(rng, 8, 14, 14, 48)
    g, b, dy = rand(rng, 32) + 1.0, rand(rng, 32), rand(rng, 8, 14, 14, 32)
    first = layers.conv2d_backward(x, w, d, 1, 1) + layers.linear_backward(x.reshape(-1, 32), w[:, :, 0, 0], d.reshape(-1, 48))
    _, mean, rstd = layers.group_norm(x, g, b, 8, 1e-5, True)
    gn = layers.group_norm_backward(dy, x, g, b, mean, rstd, 8, True)
    for _ in range(3):
        again = layers.conv2d_backward(x, w, d, 1, 1) + layers.linear_backward(x.reshape(-1, 32), w[:, :, 0, 0],
                                                                             d.reshape(-1, 48))
        assert all(np.array_equal(a, b) for a, b in zip(first, again))
        assert all(np.array_equal(a, b) for a, b in zip(gn, layers.group_norm_backward(dy, x, g, b, mean, rstd, 8, True)))
    q, k, v = (rand(rng, 8, 49, 32) for _ in range(3))     # attention: each image on one thread
    o, a = unet.attention(q, k, v, 0.25)
    grads = unet.attention_backward(q, k, v, a, q, 0.25)
    for _ in range(3):
        assert all(np.array_equal(p, r) for p, r in zip((o, a), unet.attention(q, k, v, 0.25)))
        assert all(np.array_equal(p, r) for p, r in zip(grads, unet.attention_backward(q, k, v, a, q, 0.25)))


def test_fused_references_are_elementwise():
    """cupy.fuse compiles only elementwise chains into one kernel: a reduction inside one (a .sum(), say) sends CuPy
    to a slower fuser that splits it into a grid-synchronised launch. Reductions stay plain xp calls."""
    import inspect
    import re
    import minidiff.layers  # noqa: F401  (registers the references)
    import minidiff.optim  # noqa: F401
    refs = fast.references()
    assert len(fast._fused) >= 7
    for key in fast._fused:
        body = inspect.getsource(refs[key]).split('"""')[-1]          # the code after the docstring
        assert not re.search(r"\.(sum|mean|max|min|var|std|prod)\(|xp\.(sum|mean|max|min|dot|vdot)\(", body), key


def _bench_kernels():
    import importlib.util
    from pathlib import Path
    spec = importlib.util.spec_from_file_location("bench_kernels", Path(__file__).resolve().parents[1] / "bench" /
                                                  "bench_kernels.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


@needs_cpu
def test_bench_kernels_shows_each_cells_best_over_rounds(monkeypatch, capsys):
    """bench_kernels.py --rounds 2: each cell is the best of its rounds, forward and backward apart; the slow NumPy
    reference is measured in the first round only."""
    bench = _bench_kernels()
    per_round = iter([(10.0, 40.0), (30.0, 20.0)])
    seen = []

    def measure(shape, a, core, isas, reference):
        fb = next(per_round)
        seen.append(reference)
        return {**{isa: fb for isa in isas}, **({"reference": fb} if reference else {}), "torch": fb}
    monkeypatch.setattr(bench, "SHAPES", [(4, 8, 8)])
    monkeypatch.setattr(bench, "measure", measure)
    monkeypatch.setattr(sys, "argv", ["bench_kernels.py", "--rounds", "2"])
    bench.main()
    cells = capsys.readouterr().out.splitlines()[-1].split(" | ")
    isas = _native.core.cpu_isas()
    assert seen == [True, False]
    assert all(c.startswith("30 / 40 (") for c in cells[1:1 + len(isas)])
    assert cells[1 + len(isas)] == "10 / 40"


@needs_cpu
def test_bench_kernels_direct_measures_without_winograd(monkeypatch, capsys):
    """--direct: the kernels run with Winograd off, and no row is marked as taking it."""
    bench = _bench_kernels()
    core = _native.core
    seen = []

    def measure(shape, a, core, isas, reference):
        seen.append(core.conv_winograd_tile(28, 28, 32, 32, 1))
        return {**{isa: (1.0, 1.0) for isa in isas}, "reference": (1.0, 1.0), "torch": (1.0, 1.0)}
    monkeypatch.setattr(bench, "SHAPES", [(28, 32, 32)])
    monkeypatch.setattr(bench, "measure", measure)
    monkeypatch.setattr(sys, "argv", ["bench_kernels.py", "--direct"])
    was = core.set_conv_winograd(True)
    try:
        bench.main()
        assert seen == [0] and "Winograd" not in capsys.readouterr().out
    finally:
        core.set_conv_winograd(was)


@needs_cpu
def test_bench_kernels_marks_the_winograd_rows(monkeypatch, capsys):
    """Rows say which convolutions take Winograd, with which tile, and whether the weight gradient does too."""
    bench = _bench_kernels()
    monkeypatch.setattr(bench, "SHAPES", [(28, 32, 32), (28, 64, 32), (7, 64, 64), (2, 64, 64)])
    monkeypatch.setattr(bench, "measure", lambda shape, a, core, isas, reference: {
        **{isa: (1.0, 1.0) for isa in isas}, "reference": (1.0, 1.0), "torch": (1.0, 1.0)})
    monkeypatch.setattr(sys, "argv", ["bench_kernels.py"])
    bench.main()
    rows = [line.split(" | ")[0] for line in capsys.readouterr().out.splitlines()[-4:]]
    isas = _native.core.cpu_isas()
    wide = "avx512" in isas
    narrow = [i for i in isas if i != "avx512"]                 # 7 x 7: F(4x4) from 8 x 8 maps there, F(2x2) here
    small = ("| 7 x 7, 64 -> 64 (Winograd 2x2 + dW: " + ", ".join(narrow) + ")" if wide and narrow
             else "| 7 x 7, 64 -> 64" if wide else "| 7 x 7, 64 -> 64 (Winograd 2x2 + dW)")
    assert rows == ["| 28 x 28, 32 -> 32 (Winograd 4x4 + dW)", "| 28 x 28, 64 -> 32 (Winograd 4x4 + dW)", small,
                    "| 2 x 2, 64 -> 64"]
    assert _native.core.cpu_isa() == isas[0]                                   # the marks leave the best one set


@pytest.mark.parametrize("args", [["--rounds", "0"], ["--reps", "0"], ["--seconds", "-1"]])
def test_bench_kernels_rejects_an_empty_measurement(monkeypatch, capsys, args):
    """--rounds 0 would print a header and no rows: an error naming the flags instead."""
    monkeypatch.setattr(sys, "argv", ["bench_kernels.py"] + args)
    with pytest.raises(SystemExit):
        _bench_kernels().main()
    assert "--rounds must be at least 1" in capsys.readouterr().err
