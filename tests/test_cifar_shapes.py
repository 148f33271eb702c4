"""The network at CIFAR-10's shape: RGB 32x32 images with DDPM's CIFAR-10 layout (ch_mult (1, 2, 2, 2), attention at
16x16, so maps of 32, 16, 8 and 4 pixels). Its gradient check (float64), the native kernels against their references
at 3 input channels and on 4x4 and 8x8 maps, and agreement with the PyTorch twin."""
import numpy as np
import pytest

from minidiff import fast, layers
from minidiff.unet import UNet, UNetConfig
from minidiff.utils import native as _native
from test_kernels import conv_tol
from test_layers import GRAD_TOL, rel_error
from test_unet import randomize

CIFAR = dict(in_channels=3, resolution=32, ch_mult=(1, 2, 2, 2), attn_resolutions=(16,))
needs_cpu = pytest.mark.skipif(not _native.native_status()["cpu_kernel"], reason="native extension unavailable")


def test_cifar_layout_gradcheck():
    """Finite differences (float64) at 32x32 RGB, four levels, attention at 16: for the input and for every parameter
    tensor p, the derivative along a random direction v (standard normal entries) against <dL/dp, v>, the error
    relative to |dL/dp| (the size <dL/dp, v> has): every entry takes part, and a tensor whose gradient is small but
    right is not judged by the loss's rounding (it sums 3,072 outputs). Some directions curve strongly (the time
    embedding's: an error of ~1e-6 at h = 1e-3, shrinking as h^2), so the central differences at h and h/2 are
    combined by one Richardson step, (4 D(h/2) - D(h)) / 3, whose error is O(h^4). Left is the forward pass's own
    float64 rounding, ~3e-12 of the loss's size here, which over h = 2e-3 limits what the differences resolve to ~1e-8
    in absolute terms: a tensor passes when the difference is below 1e-6 |dL/dp| + 1e-8 (a wrong gradient is off by
    about |dL/dp|)."""
    rng = np.random.default_rng(0)
    m = UNet(UNetConfig(base_channels=16, num_res_blocks=1, **CIFAR), seed=1, dtype=np.float64)   # 2 channels a group
    randomize(m, rng)
    x = rng.standard_normal((1, 3, 32, 32))
    t = np.array([300])
    R = rng.standard_normal(x.shape)
    loss = lambda: float(np.sum(m.forward(x, t) * R))  # noqa: E731
    m.zero_grad()
    m.forward(x, t)
    grads = {"x": m.backward(R), **{k: g.copy() for k, g in m.grads.items()}}

    def derivative(p, v, h):                    # (L(p + h v) - L(p - h v)) / 2h, p restored
        p += h * v
        up = loss()
        p -= 2 * h * v
        down = loss()
        p += h * v
        return (up - down) / (2 * h)

    errors, h = {}, 2e-3
    for name, p in [("x", x)] + list(m.params.items()):
        g = grads[name]
        if not np.abs(g).max() > 1e-12:
            continue                            # exactly zero: the k.bias of attention (test_layers)
        v = rng.standard_normal(p.shape)
        numeric = (4 * derivative(p, v, h / 2) - derivative(p, v, h)) / 3
        errors[name] = (abs(np.sum(g * v) - numeric), np.linalg.norm(g))
    assert len(errors) > 100 and "up.1.attn.1.q.bias" in errors
    bad = {k: e for k, (e, size) in errors.items() if not e < GRAD_TOL * size + 1e-8}
    assert not bad, bad


@needs_cpu
@pytest.mark.parametrize("B,H,cin,cout", [(2, 32, 3, 32), (2, 32, 32, 3), (3, 8, 64, 64), (2, 8, 128, 64),
                                          (3, 4, 64, 64), (2, 4, 128, 64), (2, 4, 64, 5)])
def test_native_kernels_at_cifar_shapes(B, H, cin, cout):
    """conv_in (3 -> C), conv_out (C -> 3) at 32x32, and the 8x8 and 4x4 maps of the deepest levels, forward and
    backward, every instruction set this CPU runs."""
    rng = np.random.default_rng(H + cin)
    x = rng.standard_normal((B, H, H, cin)).astype(np.float32)
    w = (rng.standard_normal((cout, cin, 3, 3)) * 0.3).astype(np.float32)
    b, d = rng.standard_normal(cout).astype(np.float32), rng.standard_normal((B, H, H, cout)).astype(np.float32)
    for isa in _native.core.cpu_isas():
        _native.core.set_cpu_isa(isa)
        try:
            for fn, args in ((layers.conv2d, (x, w, b, 1, 1)), (layers.conv2d_backward, (x, w, d, 1, 1))):
                got = fn(*args)
                with fast.use_reference():
                    want = fn(*args)
                for g, r in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
                    assert rel_error(g, r) < max(3e-6, conv_tol(H, H, cin, cout)), (isa, fn.__name__)
        finally:
            _native.core.set_cpu_isa("auto")


def test_cifar_layout_matches_torch():
    torch = pytest.importorskip("torch")
    from torch_unet import from_config, load_minidiff_params
    cfg = UNetConfig(base_channels=16, num_res_blocks=1, **CIFAR)
    m = UNet(cfg, seed=0)
    rng = np.random.default_rng(2)
    randomize(m, rng, scale=0.1)
    tm = load_minidiff_params(from_config(cfg), m.params)
    x = rng.standard_normal((2, 3, 32, 32)).astype(np.float32)
    t, d = np.array([10, 900]), rng.standard_normal((2, 3, 32, 32)).astype(np.float32)
    m.zero_grad()
    out = m.forward(x, t)
    dx = m.backward(d)
    xt = torch.from_numpy(x).requires_grad_(True)
    ot = tm(xt, torch.from_numpy(t))
    ot.backward(torch.from_numpy(d))
    assert rel_error(out, ot.detach().numpy()) < 1e-5 and rel_error(dx, xt.grad.numpy()) < 1e-5
    for name, p in tm.named_parameters():
        if not name.endswith("k.bias"):
            assert rel_error(m.grads[name], p.grad.numpy()) < 1e-4, name
