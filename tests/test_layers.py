"""Every layer's backward pass against centred finite differences (float64), and against PyTorch autograd
(float32, skipped without torch).

Relative error used throughout: rel_error(a, b) = max|a - b| / max(1e-8, max|a| + max|b|), over all the
entries compared. Gradient checks must be below 1e-6 (they are ~1e-9..1e-11); PyTorch comparisons in
float32 below 1e-5.
"""
import math

import numpy as np
import pytest

from minidiff.conditioning.text import Embedding
from minidiff.layers import Concat, Conv2d, Dropout, GroupNorm, Linear, SiLU, Upsample2x, col2im, im2col, timestep_embedding
from minidiff.unet import AttnBlock, attention, attention_backward

GRAD_TOL = 1e-6
TORCH_TOL = 1e-5


def rel_error(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b)) / max(1e-8, np.max(np.abs(a)) + np.max(np.abs(b))))


def numerical_grad(loss, x, entries=None, h=1e-6):
    """Centred differences (loss(x + h e_i) - loss(x - h e_i)) / 2h at the flat indices `entries` (all if None),
    perturbing x in place and restoring it."""
    flat = x.reshape(-1)
    entries = range(flat.size) if entries is None else entries
    g = []
    for i in entries:
        old = flat[i]
        flat[i] = old + h
        lp = loss()
        flat[i] = old - h
        lm = loss()
        flat[i] = old
        g.append((lp - lm) / (2 * h))
    return np.array(g)


def zero_grads(layer):
    for _, lyr, key in layer.named_params():
        lyr.grads[key][...] = 0


def gradcheck(layer, inputs, forward, backward, seed=0):
    """Check d(sum(forward(*inputs) * R))/d(every input and parameter) for a random R; returns the worst
    relative error per tensor as a dict."""
    rng = np.random.default_rng(seed)
    R = rng.standard_normal(forward(*inputs).shape)
    loss = lambda: float(np.sum(forward(*inputs) * R))  # noqa: E731
    zero_grads(layer)
    forward(*inputs)
    dins = backward(R)
    dins = dins if isinstance(dins, tuple) else (dins,)
    errors = {}
    for i, (x, dx) in enumerate(zip(inputs, dins)):
        errors[f"input{i}"] = rel_error(dx, numerical_grad(loss, x).reshape(x.shape))
    for name, lyr, key in layer.named_params():
        errors[name] = rel_error(lyr.grads[key], numerical_grad(loss, lyr.params[key]).reshape(lyr.params[key].shape))
    return errors


def assert_small(errors, tol=GRAD_TOL):
    bad = {k: v for k, v in errors.items() if not v < tol}
    assert not bad, f"relative errors above {tol}: {bad}"


def randomize(layer, rng, scale=0.5):
    """Replace every parameter by random values in place (so no gradient hides behind a zero or a one)."""
    for _, lyr, key in layer.named_params():
        lyr.params[key][...] = rng.standard_normal(lyr.params[key].shape) * scale
        if key == "weight" and isinstance(lyr, GroupNorm):
            lyr.params[key] += 1.0


# ---------------------------------------------------------------------------------------------------
# finite-difference gradient checks, float64

def test_linear_gradcheck():
    rng = np.random.default_rng(0)
    lyr = Linear(5, 4, rng, dtype=np.float64)
    x = rng.standard_normal((3, 5))
    assert_small(gradcheck(lyr, [x], lyr.forward, lyr.backward))


@pytest.mark.parametrize("k,stride,padding", [(3, 1, 1), (3, 2, 1), (1, 1, 0), (2, 2, 0), (3, 1, 0), (5, 1, 2)])
def test_conv2d_gradcheck(k, stride, padding):
    rng = np.random.default_rng(1)
    lyr = Conv2d(3, 4, k, rng, stride=stride, padding=padding, dtype=np.float64)
    x = rng.standard_normal((2, 6, 6, 3))                    # NHWC
    assert_small(gradcheck(lyr, [x], lyr.forward, lyr.backward))


@pytest.mark.parametrize("k,stride,padding", [(3, 1, 1), (3, 2, 1), (1, 1, 0)])
def test_conv2d_is_its_definition(k, stride, padding):
    """y[b, p, q, o] = bias[o] + sum_{i, j, c} x_pad[b, s p + i, s q + j, c] W[o, c, i, j], summed term by term
    over a padded copy, equals layers.conv2d (im2col and one product), with a bias per image and a residual too."""
    from minidiff.layers import conv2d
    rng = np.random.default_rng(11)
    x, w = rng.standard_normal((2, 7, 6, 3)), rng.standard_normal((4, 3, k, k))
    bias, shift = rng.standard_normal(4), rng.standard_normal((2, 4))
    xpad = np.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    Ho, Wo = (7 + 2 * padding - k) // stride + 1, (6 + 2 * padding - k) // stride + 1
    want = np.zeros((2, Ho, Wo, 4)) + bias
    for i in range(k):
        for j in range(k):
            patch = xpad[:, i:i + stride * (Ho - 1) + 1:stride, j:j + stride * (Wo - 1) + 1:stride, :]
            want += patch @ w[:, :, i, j].T
    np.testing.assert_allclose(conv2d(x, w, bias, stride, padding), want, rtol=1e-12, atol=1e-12)
    residual = rng.standard_normal(want.shape)
    np.testing.assert_allclose(conv2d(x, w, bias + shift, stride, padding, residual),
                               want + shift[:, None, None, :] + residual, rtol=1e-12, atol=1e-12)


def test_im2col_col2im_are_adjoint():
    """<im2col(x), c> == <x, col2im(c)> for any x, c: the backward of the gather is the scatter-add."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 7, 7, 3))
    cols = im2col(x, 3, 3, 2, 1)
    c = rng.standard_normal(cols.shape)
    assert np.vdot(cols, c) == pytest.approx(np.vdot(x, col2im(c, x.shape, 3, 3, 2, 1)), rel=1e-12)


def test_groupnorm_gradcheck():
    rng = np.random.default_rng(3)
    lyr = GroupNorm(2, 6, dtype=np.float64)
    randomize(lyr, rng)
    x = rng.standard_normal((2, 3, 4, 6)) * 2 + 1
    assert_small(gradcheck(lyr, [x], lyr.forward, lyr.backward))


def test_silu_gradcheck():
    rng = np.random.default_rng(4)
    lyr = SiLU()
    x = rng.standard_normal((3, 7)) * 3
    assert_small(gradcheck(lyr, [x], lyr.forward, lyr.backward))


def test_silu_large_inputs_do_not_overflow():
    x = np.array([-1000.0, -90.0, 0.0, 90.0, 1000.0], dtype=np.float32)
    with np.errstate(all="raise"):
        y = SiLU().forward(x)
    np.testing.assert_allclose(y, [0.0, 0.0, 0.0, 90.0, 1000.0], atol=1e-6)


def test_upsample_gradcheck():
    rng = np.random.default_rng(5)
    lyr = Upsample2x()
    x = rng.standard_normal((2, 3, 2, 4))
    y = lyr.forward(x)
    assert y.shape == (2, 6, 4, 4) and np.array_equal(y[:, 1::2, ::2], x) and np.array_equal(y[:, ::2, 1::2], x)
    assert_small(gradcheck(lyr, [x], lyr.forward, lyr.backward))


def test_concat_gradcheck():
    rng = np.random.default_rng(6)
    lyr = Concat()
    a, b = rng.standard_normal((2, 3, 3, 2)), rng.standard_normal((2, 3, 3, 5))
    assert_small(gradcheck(lyr, [a, b], lyr.forward, lyr.backward))


def test_attention_gradcheck():
    rng = np.random.default_rng(7)
    lyr = AttnBlock(8, rng, num_groups=2, dtype=np.float64)
    randomize(lyr, rng)
    x = rng.standard_normal((2, 3, 3, 8))
    errors = gradcheck(lyr, [x], lyr.forward, lyr.backward)
    # softmax(q (k + b)^T) = softmax(q k^T): the key bias shifts every score of a query row equally, so its
    # gradient is exactly zero (finite differences give only rounding noise; compare absolutely).
    errors.pop("k.bias")
    assert np.max(np.abs(lyr.k.grads["bias"])) < 1e-12
    assert_small(errors)


def test_attention_backward_is_the_gradient_of_attention():
    """unet.attention_backward against float64 finite differences of <attention(q, k, v)[0], dout>, with fewer
    keys than queries (M != N)."""
    rng = np.random.default_rng(17)
    q, k, v = rng.standard_normal((2, 5, 3)), rng.standard_normal((2, 4, 3)), rng.standard_normal((2, 4, 3))
    dout, scale = rng.standard_normal((2, 5, 3)), 0.7
    o, a = attention(q, k, v, scale)
    assert np.allclose(a.sum(axis=-1), 1.0) and a.shape == (2, 5, 4)
    grads = attention_backward(q, k, v, a, dout, scale)
    loss = lambda: float(np.sum(attention(q, k, v, scale)[0] * dout))        # noqa: E731
    errors = {name: rel_error(g, numerical_grad(loss, x).reshape(x.shape))
              for name, x, g in zip("qkv", (q, k, v), grads)}
    assert_small(errors)


def test_embedding_gradcheck():
    rng = np.random.default_rng(8)
    lyr = Embedding(5, 3, rng, dtype=np.float64)
    idx = np.array([0, 4, 4, 2])                              # a repeated index must accumulate
    assert_small(gradcheck(lyr, [], lambda: lyr.forward(idx), lambda d: lyr.backward(d) or ()))


def test_dropout_gradcheck_and_scaling():
    rng = np.random.default_rng(9)
    lyr = Dropout(0.3)
    x = rng.standard_normal((4, 5))
    # a fresh generator with the same seed per call: the same mask every forward
    assert_small(gradcheck(lyr, [x], lambda x: lyr.forward(x, np.random.default_rng(1)), lyr.backward))
    y = lyr.forward(np.ones((200, 500)), np.random.default_rng(2))
    assert set(np.unique(y)) == {0.0, 1.0 / 0.7} and abs(y.mean() - 1.0) < 0.01
    assert lyr.forward(x, None) is x                          # evaluation: identity


def test_gradients_accumulate():
    """backward adds into grads (+=): two backward passes give twice the gradient."""
    rng = np.random.default_rng(10)
    lyr = Conv2d(2, 3, 3, rng, padding=1, dtype=np.float64)
    x, d = rng.standard_normal((1, 4, 4, 2)), rng.standard_normal((1, 4, 4, 3))
    lyr.forward(x)
    lyr.backward(d)
    once = {k: g.copy() for k, g in lyr.grads.items()}
    lyr.backward(d)
    for k in once:
        np.testing.assert_allclose(lyr.grads[k], 2 * once[k])


def test_timestep_embedding():
    t = np.array([0, 1, 500, 999])
    e = timestep_embedding(t, 32, np.float32)
    assert e.shape == (4, 32) and e.dtype == np.float32
    f = np.exp(-math.log(10000.0) * np.arange(16) / 15)
    np.testing.assert_allclose(e[:, :16], np.sin(t[:, None] * f), atol=1e-6)
    np.testing.assert_allclose(e[:, 16:], np.cos(t[:, None] * f), atol=1e-6)
    assert np.array_equal(e[0], np.r_[np.zeros(16), np.ones(16)])


def test_float32_stays_float32():
    rng = np.random.default_rng(11)
    x = rng.standard_normal((2, 4, 4, 8)).astype(np.float32)
    for lyr in [Conv2d(8, 8, 3, rng, padding=1), GroupNorm(2, 8), SiLU(), Upsample2x(), AttnBlock(8, rng, 2)]:
        y = lyr.forward(x)
        dx = lyr.backward(np.ones_like(y))
        assert y.dtype == dx.dtype == np.float32, type(lyr).__name__
        assert all(g.dtype == np.float32 for _, lr, k in lyr.named_params() for g in [lr.grads[k]])


# ---------------------------------------------------------------------------------------------------
# PyTorch autograd, float32, same weights

def _torch_check(lyr, tlayer, x_nhwc, fwd=None, tfwd=None, param_map=None):
    """Run our layer and the torch layer (NCHW) on the same input, compare output, dx and param grads."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(12)
    fwd = fwd or lyr.forward
    tfwd = tfwd or tlayer
    with torch.no_grad():
        for name, p in tlayer.named_parameters():
            p.copy_(torch.from_numpy(lyr_param(lyr, name)))
    y = fwd(x_nhwc)
    d = rng.standard_normal(y.shape).astype(np.float32)
    zero_grads(lyr)
    dx = lyr.backward(d)
    xt = torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2))).requires_grad_(True)
    yt = tfwd(xt)
    yt.backward(torch.from_numpy(np.ascontiguousarray(d.transpose(0, 3, 1, 2))))
    assert rel_error(y.transpose(0, 3, 1, 2), yt.detach().numpy()) < TORCH_TOL
    assert rel_error(dx.transpose(0, 3, 1, 2), xt.grad.numpy()) < TORCH_TOL
    for name, p in tlayer.named_parameters():
        if name.endswith("k.bias"):             # exactly zero in exact arithmetic (see test_attention_gradcheck)
            assert max(np.abs(lyr_grad(lyr, name)).max(), p.grad.abs().max().item()) < 1e-4
            continue
        assert rel_error(lyr_grad(lyr, name), p.grad.numpy()) < TORCH_TOL, name


def lyr_param(lyr, name):
    return dict((n, lr.params[k]) for n, lr, k in lyr.named_params())[name]


def lyr_grad(lyr, name):
    return dict((n, lr.grads[k]) for n, lr, k in lyr.named_params())[name]


@pytest.mark.parametrize("k,stride,padding", [(3, 1, 1), (3, 2, 1), (1, 1, 0)])
def test_conv2d_matches_torch(k, stride, padding):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(13)
    lyr = Conv2d(6, 5, k, rng, stride=stride, padding=padding)
    x = rng.standard_normal((3, 9, 9, 6)).astype(np.float32)
    _torch_check(lyr, torch.nn.Conv2d(6, 5, k, stride=stride, padding=padding), x)


def test_groupnorm_matches_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(14)
    lyr = GroupNorm(8, 16)
    randomize(lyr, rng)
    x = (rng.standard_normal((3, 5, 5, 16)) * 3 + 1).astype(np.float32)
    _torch_check(lyr, torch.nn.GroupNorm(8, 16), x)


def test_attention_matches_torch():
    pytest.importorskip("torch")
    from torch_unet import AttnBlock as TorchAttn
    rng = np.random.default_rng(15)
    lyr = AttnBlock(16, rng)
    randomize(lyr, rng)
    x = rng.standard_normal((2, 7, 7, 16)).astype(np.float32)
    _torch_check(lyr, TorchAttn(16), x)


def test_silu_upsample_linear_embedding_match_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(16)
    x = rng.standard_normal((2, 3, 4, 5)).astype(np.float32)
    _torch_check(SiLU(), torch.nn.SiLU(), x)
    _torch_check(Upsample2x(), torch.nn.Upsample(scale_factor=2, mode="nearest"), x)
    # Linear and Embedding work on (N, features): compare directly
    lin, tlin = Linear(5, 3, rng), torch.nn.Linear(5, 3)
    with torch.no_grad():
        tlin.weight.copy_(torch.from_numpy(lin.params["weight"]))
        tlin.bias.copy_(torch.from_numpy(lin.params["bias"]))
    xl = rng.standard_normal((4, 5)).astype(np.float32)
    d = rng.standard_normal((4, 3)).astype(np.float32)
    y = lin.forward(xl)
    dx = lin.backward(d)
    xt = torch.from_numpy(xl).requires_grad_(True)
    tlin(xt).backward(torch.from_numpy(d))
    assert rel_error(y, tlin(xt).detach().numpy()) < TORCH_TOL
    assert rel_error(dx, xt.grad.numpy()) < TORCH_TOL
    assert rel_error(lin.grads["weight"], tlin.weight.grad.numpy()) < TORCH_TOL
    assert rel_error(lin.grads["bias"], tlin.bias.grad.numpy()) < TORCH_TOL
    emb, temb = Embedding(6, 4, rng), torch.nn.Embedding(6, 4)
    with torch.no_grad():
        temb.weight.copy_(torch.from_numpy(emb.params["weight"]))
    idx = np.array([1, 5, 1, 0])
    d = rng.standard_normal((4, 4)).astype(np.float32)
    assert np.array_equal(emb.forward(idx), temb(torch.from_numpy(idx)).detach().numpy())
    emb.backward(d)
    temb(torch.from_numpy(idx)).backward(torch.from_numpy(d))
    assert rel_error(emb.grads["weight"], temb.weight.grad.numpy()) < TORCH_TOL
