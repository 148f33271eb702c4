"""Neural-network layers with hand-written backward passes, in NumPy or CuPy (xp from the arrays).
Stage 4 of the pipeline, the network's parts (unet.py puts them together; kernels.py makes the hot ones fast).

Each layer is a class with ``params`` and ``grads`` (dicts name -> array, same keys and shapes) and a
``forward`` / ``backward`` pair side by side:
  * ``forward`` computes the output and caches exactly what ``backward`` needs (``self.cache``);
  * ``backward(dout)`` returns the gradient with respect to the input(s) and ADDS (``+=``) the parameter
    gradients into ``grads``. Nothing here zeroes a gradient: that happens in one place, the model's
    ``zero_grad``.
Composite layers (ResBlock, AttnBlock in unet.py, and the ones below) register children with ``add``;
``named_params`` walks the tree so the optimizer and checkpoints see one flat, ordered dict.

Layout. Images are NHWC (channels last) inside the network: a convolution is then a matrix product
with pixels as rows and channels as columns (im2col (B*Ho*Wo, kh*kw*Cin) @ (kh*kw*Cin, Cout), or, for
the 3x3 stride-1 convolutions, a sum of 9 matmuls on shifted row slices of the flattened padded image;
see Conv2d), whose result is already NHWC, and the per-pixel channel vectors that 1x1 convolutions,
GroupNorm and attention work on are contiguous. The U-Net converts from and to the public NCHW layout at
its boundary. Weights are stored in PyTorch's layout ((Cout, Cin, kh, kw) for convolutions, (out, in) for
Linear) so checkpoints map one to one onto the PyTorch reference.

The math of the hot operations is written once as module functions marked ``@fast.reference``
(conv2d_same, group_norm, silu, linear and their backward passes, and the elementwise chains inside them): the
readable reference that the tests prove. kernels.py registers faster implementations of the same numbers for
them (native C++ for float32 NumPy arrays, one fused kernel per chain for CuPy); MINIDIFF_REFERENCE=1 runs the
references everywhere.

No Python loops over pixels or batch items; the convolution loops over its kh*kw kernel taps (and over
cache-sized blocks of rows, see shifted_matmul).
Float32 in, float32 out: constants are Python floats (weak scalars under NumPy 2 promotion rules).
"""
import math

import numpy as np

from . import fast
from .utils.backend import array_module


class Layer:
    """Base class: parameter/gradient dicts and named children."""

    def __init__(self):
        self.params = {}     # name -> array
        self.grads = {}      # name -> array, same shape; accumulated by backward, zeroed by the model
        self.children = {}   # name -> Layer, in forward order
        self.cache = None    # what forward saved for backward
        self.training = True  # False: forward keeps no cache (evaluation: less memory, no backward)

    def add(self, name, layer):
        """Register a child layer under `name` (its parameters become `name.<param>`)."""
        self.children[name] = layer
        return layer

    def save(self, cache):
        """Keep what backward needs, in training mode only."""
        self.cache = cache if self.training else None

    def new_param(self, name, value):
        self.params[name] = value
        self.grads[name] = array_module(value).zeros_like(value)

    def named_layers(self, prefix=""):
        """(dotted name, layer) for this layer and every descendant, in registration order."""
        yield prefix, self
        for name, child in self.children.items():
            yield from child.named_layers(f"{prefix}{name}.")

    def named_params(self, prefix=""):
        """(dotted name, layer, key) for every parameter in the tree."""
        for lprefix, layer in self.named_layers(prefix):
            for key in layer.params:
                yield lprefix + key, layer, key


def _uniform(rng, shape, bound, dtype):
    """PyTorch's default init for Conv2d/Linear weights and biases: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    return rng.uniform(-bound, bound, size=shape).astype(dtype)


# ----------------------------------------------------------------------------------------------------
# Linear:  y = x W^T + b   (also the matrix product of the 1x1 and the im2col convolutions)

@fast.reference
def linear(x, weight, bias):
    """x (N, in) @ weight (out, in)^T + bias (out,) -> (N, out)."""
    return x @ weight.T + bias


@fast.reference
def linear_backward(x, weight, dout):
    """(dx = dout W (N, in), dweight = dout^T x (out, in)) for dout (N, out)."""
    return dout @ weight, dout.T @ x


class Linear(Layer):
    def __init__(self, in_features, out_features, rng, dtype=np.float32):
        super().__init__()
        bound = 1.0 / math.sqrt(in_features)
        self.new_param("weight", _uniform(rng, (out_features, in_features), bound, dtype))  # (out, in)
        self.new_param("bias", _uniform(rng, (out_features,), bound, dtype))                # (out,)

    def forward(self, x):                       # x (N, in)
        self.save(x)
        return linear(x, self.params["weight"], self.params["bias"])   # (N, out)

    def backward(self, dout):                   # dout (N, out)
        dx, dw = linear_backward(self.cache, self.params["weight"], dout)
        self.grads["weight"] += dw              # (out, in)
        self.grads["bias"] += dout.sum(axis=0)
        return dx                               # (N, in)


# ----------------------------------------------------------------------------------------------------
# Conv2d (NHWC):  y[b, p, q, o] = bias[o] + sum_{i, j, c} x_pad[b, s*p + i, s*q + j, c] * W[o, c, i, j]
# computed as im2col(x) @ W_mat with W_mat[(i, j, c), o] = W[o, c, i, j].

def im2col(x, kh, kw, stride, padding):
    """x (B, H, W, C) -> cols (B*Ho*Wo, kh*kw*C), column order (i, j, c); one strided copy per kernel tap."""
    xp = array_module(x)
    B, H, W, C = x.shape
    Ho, Wo = (H + 2 * padding - kh) // stride + 1, (W + 2 * padding - kw) // stride + 1
    if kh == kw == 1 and stride == 1 and padding == 0:
        return x.reshape(B * H * W, C)
    if padding:
        xpad = xp.zeros((B, H + 2 * padding, W + 2 * padding, C), dtype=x.dtype)
        xpad[:, padding:padding + H, padding:padding + W, :] = x
    else:
        xpad = x
    cols = xp.empty((B, Ho, Wo, kh, kw, C), dtype=x.dtype)
    for i in range(kh):
        for j in range(kw):
            cols[:, :, :, i, j, :] = xpad[:, i:i + stride * (Ho - 1) + 1:stride, j:j + stride * (Wo - 1) + 1:stride, :]
    return cols.reshape(B * Ho * Wo, kh * kw * C)


def col2im(dcols, x_shape, kh, kw, stride, padding):
    """Adjoint of im2col: dcols (B*Ho*Wo, kh*kw*C) -> dx (B, H, W, C), summing the taps that overlap."""
    xp = array_module(dcols)
    B, H, W, C = x_shape
    Ho, Wo = (H + 2 * padding - kh) // stride + 1, (W + 2 * padding - kw) // stride + 1
    if kh == kw == 1 and stride == 1 and padding == 0:
        return dcols.reshape(B, H, W, C)
    dcols = dcols.reshape(B, Ho, Wo, kh, kw, C)
    dxpad = xp.zeros((B, H + 2 * padding, W + 2 * padding, C), dtype=dcols.dtype)
    for i in range(kh):
        for j in range(kw):
            dxpad[:, i:i + stride * (Ho - 1) + 1:stride, j:j + stride * (Wo - 1) + 1:stride, :] += dcols[:, :, :, i, j, :]
    return dxpad[:, padding:padding + H, padding:padding + W, :]


def pad_flat(x, p):
    """x (B, H, W, C) -> (buf, m): x zero-padded and flattened to rows for the shifted matmuls.
    Each image row is followed by p zero pixels and each image by p zero rows, so the grid is
    (B, H + p, W + p) and neighbours share their padding: the p zeros after row r are also the left
    padding of row r + 1, the p zero rows after image b the top padding of image b + 1 (p*(W+p) + p = m
    zero rows before the first image and after the last stand in for the rest). Against padding every
    side (H + 2p) x (W + 2p), this is 7% fewer rows at 28x28, 12% at 14x14, 21% at 7x7, p = 1."""
    xp = array_module(x)
    B, H, W, C = x.shape
    m = p * (W + p) + p                         # largest |row offset| of a tap
    P = B * (H + p) * (W + p)
    buf = xp.zeros((P + 2 * m, C), dtype=x.dtype)
    buf[m:m + P].reshape(B, H + p, W + p, C)[:, :H, :W, :] = x
    return buf, m


ROWS = 1024  # rows per block in shifted_matmul on the CPU: the kh*kw partial products of a block stay in cache

# How the shifted matmuls run, per array module. "blocked" (the CPU): blocks of ROWS output rows, each the sum of
# the T products of its shifted slices (or, when the output is wider than the input, N > K, one product of the T
# slices gathered side by side); blocking keeps the T passes over a block in cache, ~1.7x faster than
# whole-array passes for 28x28 batches. "whole" (the GPU): the T shifted slices of all rows gathered side by side
# (a flat im2col of T*K columns) and ONE product, so a convolution is a handful of kernel launches instead of
# (rows / ROWS) x T small ones. Both run on either module (the tests check "whole" on NumPy).
SHIFTED_FORM = {"numpy": "blocked", "cupy": "whole"}


def _shifted_form(xp):
    return SHIFTED_FORM["numpy" if xp is np else "cupy"]


def shifted_matmul(buf, m, offsets, w):
    """sum_t buf[m + off_t : m + off_t + P] @ w[t]  for buf (m + P + m, K), w (T, K, N) -> (P, N), in the form
    SHIFTED_FORM names for the arrays' module (a cache tiling over rows, not a loop over pixels or images)."""
    xp = array_module(buf)
    P, (T, K, N) = buf.shape[0] - 2 * m, w.shape
    whole = _shifted_form(xp) == "whole"
    rows = P if whole else ROWS
    out = xp.empty((P, N), dtype=buf.dtype)
    gather = whole or N > K
    scratch = xp.empty((rows, T, K) if gather else (rows, N), dtype=buf.dtype)
    for r0 in range(0, P, rows):
        r1 = min(P, r0 + rows)
        o, sc = out[r0:r1], scratch[:r1 - r0]
        if gather:
            for t, off in enumerate(offsets):
                sc[:, t, :] = buf[m + off + r0:m + off + r1]
            xp.matmul(sc.reshape(r1 - r0, T * K), w.reshape(T * K, N), out=o)
            continue
        for t, off in enumerate(offsets):
            xp.matmul(buf[m + off + r0:m + off + r1], w[t], out=o if t == 0 else sc)
            if t:
                o += sc
    return out


def shifted_matmul_t(buf, m, offsets, dy):
    """The weight gradient of shifted_matmul: dw[t] = (buf shifted by off_t)^T @ dy  for buf (m + P + m, K),
    dy (P, N) -> dw (T, K, N): per tap, accumulated over blocks of ROWS rows ("blocked"), or one product of the
    gathered slices ("whole")."""
    xp = array_module(buf)
    P, K, N = dy.shape[0], buf.shape[1], dy.shape[1]
    T = len(offsets)
    if _shifted_form(xp) == "whole":
        cols = xp.empty((P, T, K), dtype=buf.dtype)
        for t, off in enumerate(offsets):
            cols[:, t, :] = buf[m + off:m + off + P]
        return (cols.reshape(P, T * K).T @ dy).reshape(T, K, N)
    dw = xp.zeros((T, K, N), dtype=buf.dtype)
    tmp = xp.empty((K, N), dtype=buf.dtype)
    for r0 in range(0, P, ROWS):
        r1 = min(P, r0 + ROWS)
        for t, off in enumerate(offsets):
            xp.matmul(buf[m + off + r0:m + off + r1].T, dy[r0:r1], out=tmp)
            dw[t] += tmp
    return dw


def _same_offsets(k, W):
    """Row offset of tap (i, j) in the flattened padded image (pad_flat, p = (k - 1) / 2), taps in (i, j) order."""
    p = (k - 1) // 2
    return [(i - p) * (W + p) + (j - p) for i in range(k) for j in range(k)]


@fast.reference
def bias_add(y, bias):
    return y + bias


@fast.reference
def bias_residual_add(y, bias, residual):
    return y + bias + residual


@fast.reference
def conv2d_same(x, weight, bias, residual=None):
    """Stride-1 'same' convolution (odd k, p = (k - 1) / 2), NHWC: x (B, H, W, Cin), weight (Cout, Cin, k, k),
    bias (Cout,) or one per image (B, Cout), optional residual (B, H, W, Cout) added to the output
    -> (B, H, W, Cout). On the padded image flattened to rows (pad_flat: rows of W + p pixels), the input under
    tap (i, j) of output row r is row r + off(i, j), so
        y_pad = sum_taps (xbuf shifted by off) @ W[:, :, i, j]^T,
    a sum of matmuls on contiguous slices (shifted_matmul), whose padding rows are then dropped in the pass that
    adds the bias (and the residual)."""
    B, H, W, _ = x.shape
    cout, cin, k, _ = weight.shape
    p = (k - 1) // 2
    wt = array_module(weight).ascontiguousarray(weight.transpose(2, 3, 1, 0)).reshape(k * k, cin, cout)
    xbuf, m = pad_flat(x, p)                                                   # (m + P + m, Cin)
    out = shifted_matmul(xbuf, m, _same_offsets(k, W), wt)                     # (P, Cout), P = B*(H+p)*(W+p)
    y = out.reshape(B, H + p, W + p, cout)[:, :H, :W, :]                       # the real pixels (a view)
    bias = bias.reshape(B, 1, 1, cout) if bias.ndim == 2 else bias
    return bias_add(y, bias) if residual is None else bias_residual_add(y, bias, residual)   # (B, H, W, Cout)


@fast.reference
def conv2d_same_backward(x, weight, dout):
    """Gradients of conv2d_same: (dx (B, H, W, Cin), dweight (Cout, Cin, k, k)). On the same rows,
        dW[:, :, i, j] = (xbuf shifted by off)^T @ dy_pad   and   dx_pad = sum_taps (dy_pad shifted by -off) @ W[:, :, i, j]
    (a convolution with the flipped kernel)."""
    B, H, W, cin = x.shape
    cout, _, k, _ = weight.shape
    p = (k - 1) // 2
    wt = array_module(weight).ascontiguousarray(weight.transpose(2, 3, 1, 0)).reshape(k * k, cin, cout)
    offsets = _same_offsets(k, W)
    xbuf, m = pad_flat(x, p)
    dbuf, _ = pad_flat(dout, p)                 # (m + P + m, Cout), zero on the padding rows
    dw = shifted_matmul_t(xbuf, m, offsets, dbuf[m:m + xbuf.shape[0] - 2 * m])       # (k*k, Cin, Cout)
    dx = shifted_matmul(dbuf, m, [-off for off in offsets], wt.transpose(0, 2, 1))
    return dx.reshape(B, H + p, W + p, cin)[:, :H, :W, :], dw.reshape(k, k, cin, cout).transpose(3, 2, 0, 1)


class Conv2d(Layer):
    """Two ways to compute the same convolution:
      * im2col (any kernel, stride, padding): gather the kh*kw shifted copies of x into one matrix, then one
        matmul (the readable general form);
      * conv2d_same (stride 1, 'same' padding: the U-Net's 3x3 convs): shifted matmuls on the flattened padded
        image, which avoid writing and re-reading a 9x copy of every input (and, for float32 on the CPU, the
        native kernel registered for it in kernels.py).
      Both forms are tested against finite differences and PyTorch, and against each other."""

    def __init__(self, in_channels, out_channels, kernel_size, rng, stride=1, padding=0, dtype=np.float32):
        super().__init__()
        self.k, self.stride, self.padding = kernel_size, stride, padding
        self.same = stride == 1 and 2 * padding == kernel_size - 1 and kernel_size > 1
        bound = 1.0 / math.sqrt(in_channels * kernel_size * kernel_size)
        self.new_param("weight", _uniform(rng, (out_channels, in_channels, kernel_size, kernel_size), bound, dtype))
        self.new_param("bias", _uniform(rng, (out_channels,), bound, dtype))

    def _wmat(self):
        """The weight as the (Cout, kh*kw*Cin) matrix of im2col's column order (i, j, c)."""
        w = self.params["weight"]
        return array_module(w).ascontiguousarray(w.transpose(0, 2, 3, 1)).reshape(w.shape[0], -1)

    def forward(self, x, shift=None, residual=None):
        """x (B, H, W, Cin) -> (B, Ho, Wo, Cout). shift (B, Cout): added to the bias per image (the ResBlock's time
        embedding); residual (B, Ho, Wo, Cout): added to the output. Both in the convolution's own last pass;
        their gradients are the caller's (the pixel sums of dout per image, and dout)."""
        w, b = self.params["weight"], self.params["bias"]
        if shift is not None:
            b = b + shift                       # (B, Cout)
        self.save(x)                            # backward recomputes the padded copy / im2col: less memory held
        if self.same:
            return conv2d_same(x, w, b, residual)   # (B, H, W, Cout)
        B, H, W, _ = x.shape
        k, s, p = self.k, self.stride, self.padding
        Ho, Wo = (H + 2 * p - k) // s + 1, (W + 2 * p - k) // s + 1
        out = linear(im2col(x, k, k, s, p), self._wmat(), self.params["bias"]).reshape(B, Ho, Wo, -1)
        if shift is not None:
            out += shift[:, None, None, :]
        if residual is not None:
            out += residual
        return out                              # (B, Ho, Wo, Cout)

    def backward(self, dout):                   # dout (B, Ho, Wo, Cout)
        xp = array_module(dout)
        x, w = self.cache, self.params["weight"]
        self.grads["bias"] += xp.einsum("bhwc->c", dout)   # db = sum of dout over images and pixels
        if self.same:
            dx, dw = conv2d_same_backward(x, w, dout)
            self.grads["weight"] += dw
            return dx                           # (B, H, W, Cin)
        k, s, p = self.k, self.stride, self.padding
        cout = dout.shape[-1]
        dcols, dw = linear_backward(im2col(x, k, k, s, p), self._wmat(), dout.reshape(-1, cout))
        self.grads["weight"] += dw.reshape(cout, k, k, -1).transpose(0, 3, 1, 2)
        return col2im(dcols, x.shape, k, k, s, p)   # dx (B, H, W, Cin)


# ----------------------------------------------------------------------------------------------------
# SiLU:  y = x * sigmoid(x);  dy/dx = s * (1 + x * (1 - s)), s = sigmoid(x).
# The elementwise chains below are plain expressions so that, on CuPy, each compiles into one fused kernel
# (kernels.py); on the CPU the native kernels registered for silu, silu_backward and group_norm replace them.

def sigmoid(x):
    """1 / (1 + exp(-x)) computed as (1 + tanh(x / 2)) / 2: no overflow for large |x|, one transcendental."""
    return 0.5 + 0.5 * array_module(x).tanh(0.5 * x)


@fast.reference
def silu(x):
    return x * sigmoid(x)


@fast.reference
def silu_backward(x, dout):
    """dx = dout * s * (1 + x * (1 - s)), s = sigmoid(x) recomputed from the input (the forward keeps only x)."""
    s = sigmoid(x)
    return dout * s * (1.0 + x * (1.0 - s))


class SiLU(Layer):
    def forward(self, x):
        self.save(x)
        return silu(x)

    def backward(self, dout):
        return silu_backward(self.cache, dout)


# ----------------------------------------------------------------------------------------------------
# GroupNorm (NHWC), affine:  xhat = (x - mu_g) / sqrt(var_g + eps) over each (sample, group of C/G
# channels, all pixels);  y = xhat * gamma + beta;  optionally followed by SiLU (GroupNormSiLU: the
# pre-activation in front of every ResBlock convolution, one pass instead of two).
# Written with per-(sample, channel) sums over the pixels, so each pass over the big array is a plain
# reduction along one axis or one fused multiply-add, instead of reductions over two strided axes:
#   forward:  mu_g = sum x / n,  var_g = sum x^2 / n - mu_g^2  (n = H*W*C/G);  y = a x + b per (sample, channel)
#             with a = gamma rstd, b = beta - a mu.
#   backward: with dxhat = gamma dy,  dx = rstd (dxhat - mean_g(dxhat) - xhat mean_g(dxhat xhat)),
#             where both group means come from the per-channel sums S_dy = sum dy and S_dyx = sum dy x:
#             sum_pixels dy xhat = rstd (S_dyx - mu S_dy).  So dx = A dy + B x + C per (sample, channel).
#             With SiLU, dy is the gradient reaching the normalised output: dout SiLU'(a x + b), recomputed.
# Sums over pixels are written einsum("bnc->bc", x): the same numbers as x.sum(axis=1), 2-3x faster in
# NumPy for 32-64 channels (the same holds for the convolutions' bias gradients, "bhwc->c").

def _group_mean(s, num_groups, n):
    """(B, C) per-channel sums -> (B, C): the mean over each channel's group, repeated per channel."""
    B, C = s.shape
    g = s.reshape(B, num_groups, C // num_groups).sum(axis=2, keepdims=True) / n    # (B, G, 1)
    return array_module(s).broadcast_to(g, (B, num_groups, C // num_groups)).reshape(B, C)


@fast.reference
def scale_shift(x, a, b):
    return x * a + b


@fast.reference
def scale_shift_silu(x, a, b):
    return silu(x * a + b)


@fast.reference
def scale_shift_silu_backward(x, a, b, dout):
    """The gradient reaching h = a x + b when y = SiLU(h): dout SiLU'(h)."""
    return silu_backward(x * a + b, dout)


@fast.reference
def group_norm_combine(dy, x, A, Bx, Cc):
    return dy * A + x * Bx + Cc


@fast.reference
def group_norm(x, gamma, beta, num_groups, eps, silu=False):
    """x (B, H, W, C) -> (y, mean (B, C), rstd (B, C)), y = [SiLU](gamma xhat + beta)."""
    xp = array_module(x)
    B, H, W, C = x.shape
    xr = x.reshape(B, H * W, C)
    n = H * W * (C // num_groups)               # elements per group
    mean = _group_mean(xp.einsum("bnc->bc", xr), num_groups, n)                             # mu (B, C)
    var = _group_mean(xp.einsum("bnc,bnc->bc", xr, xr), num_groups, n) - mean * mean        # (B, C), biased
    rstd = 1.0 / xp.sqrt(xp.maximum(var, 0.0) + eps)                                       # (B, C)
    a = rstd * gamma                                                                        # (B, C)
    b = beta - a * mean
    y = (scale_shift_silu if silu else scale_shift)(xr, a[:, None, :], b[:, None, :])
    return y.reshape(B, H, W, C), mean, rstd


@fast.reference
def group_norm_backward(dout, x, gamma, beta, mean, rstd, num_groups, silu=False):
    """-> (dx (B, H, W, C), dgamma (C,), dbeta (C,)) of group_norm."""
    xp = array_module(dout)
    B, H, W, C = dout.shape
    n = H * W * (C // num_groups)
    dyr, xr = dout.reshape(B, H * W, C), x.reshape(B, H * W, C)
    if silu:                                    # the gradient reaching the normalised output
        a = rstd * gamma
        dyr = scale_shift_silu_backward(xr, a[:, None, :], (beta - a * mean)[:, None, :], dyr)
    s_dy = xp.einsum("bnc->bc", dyr)                             # (B, C): sum over pixels of dy
    s_dyxhat = rstd * (xp.einsum("bnc,bnc->bc", dyr, xr) - mean * s_dy)   # (B, C): sum of dy * xhat
    k1 = _group_mean(gamma * s_dy, num_groups, n)                # mean_g(dxhat)
    k2 = _group_mean(gamma * s_dyxhat, num_groups, n)            # mean_g(dxhat * xhat)
    A = rstd * gamma                                             # dx = A dy + Bx x + Cc
    Bx = -rstd * rstd * k2
    Cc = rstd * (rstd * k2 * mean - k1)
    dx = group_norm_combine(dyr, xr, A[:, None, :], Bx[:, None, :], Cc[:, None, :])
    return dx.reshape(B, H, W, C), s_dyxhat.sum(axis=0), s_dy.sum(axis=0)


class GroupNorm(Layer):
    silu = False                                # GroupNormSiLU: followed by SiLU

    def __init__(self, num_groups, num_channels, eps=1e-5, dtype=np.float32):
        super().__init__()
        if num_channels % num_groups:
            raise ValueError(f"GroupNorm: {num_channels} channels do not split into {num_groups} groups")
        self.G, self.eps = num_groups, eps
        self.new_param("weight", np.ones(num_channels, dtype=dtype))   # gamma (C,)
        self.new_param("bias", np.zeros(num_channels, dtype=dtype))    # beta (C,)

    def forward(self, x):                       # x (B, H, W, C)
        y, mean, rstd = group_norm(x, self.params["weight"], self.params["bias"], self.G, self.eps, self.silu)
        self.save((x, mean, rstd))
        return y                                # (B, H, W, C)

    def backward(self, dout):                   # dout (B, H, W, C)
        x, mean, rstd = self.cache
        dx, dgamma, dbeta = group_norm_backward(dout, x, self.params["weight"], self.params["bias"], mean, rstd,
                                                self.G, self.silu)
        self.grads["weight"] += dgamma
        self.grads["bias"] += dbeta
        return dx


class GroupNormSiLU(GroupNorm):
    """SiLU(GroupNorm(x)) in one layer (the parameters are GroupNorm's)."""
    silu = True


# ----------------------------------------------------------------------------------------------------
# Dropout (inverted):  y = x * mask / (1 - p), mask ~ Bernoulli(1 - p) drawn from the caller's rng.

class Dropout(Layer):
    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x, rng=None):
        """rng: np.random.Generator in training, None in evaluation (identity)."""
        if rng is None or self.p == 0.0:
            self.cache = None
            return x
        xp = array_module(x)
        mask = xp.asarray(rng.random(x.shape, dtype=np.float32) >= self.p).astype(x.dtype) * (1.0 / (1.0 - self.p))
        self.cache = mask
        return x * mask

    def backward(self, dout):
        return dout if self.cache is None else dout * self.cache


# ----------------------------------------------------------------------------------------------------
# Nearest-neighbour 2x upsampling (NHWC): y[b, 2p + a, 2q + c] = x[b, p, q] for a, c in {0, 1}.

class Upsample2x(Layer):
    def forward(self, x):                       # x (B, H, W, C)
        xp = array_module(x)
        B, H, W, C = x.shape
        return xp.broadcast_to(x[:, :, None, :, None, :], (B, H, 2, W, 2, C)).reshape(B, 2 * H, 2 * W, C)

    def backward(self, dout):                   # dout (B, 2H, 2W, C)
        B, H2, W2, C = dout.shape
        d = dout.reshape(B, H2 // 2, 2, W2 // 2, 2, C)
        return array_module(dout).einsum("bhiwjc->bhwc", d)   # dx (B, H, W, C): each pixel sums its 2x2 copies


# ----------------------------------------------------------------------------------------------------
# Channel concatenation (U-Net skips):  y = [a, b] along channels.

class Concat(Layer):
    def forward(self, a, b):                    # a (B, H, W, Ca), b (B, H, W, Cb)
        xp = array_module(a)
        self.save(a.shape[-1])
        return xp.concatenate([a, b], axis=-1)  # (B, H, W, Ca + Cb)

    def backward(self, dout):
        ca = self.cache
        return dout[..., :ca], dout[..., ca:]   # da, db


# ----------------------------------------------------------------------------------------------------
# Embedding table:  y = W[idx].  Its gradient adds each row of dout into the row it was read from
# (a scatter-add: repeated indices accumulate; shared with the text encoder's token table).

class Embedding(Layer):
    def __init__(self, num_embeddings, dim, rng, dtype=np.float32):
        super().__init__()
        self.new_param("weight", rng.standard_normal((num_embeddings, dim)).astype(dtype))  # N(0, 1) like PyTorch

    def forward(self, idx):                     # idx (N,) int
        self.save(idx)
        return self.params["weight"][idx]       # (N, dim)

    def backward(self, dout):                   # dout (N, dim): row idx[i] of the table receives dout[i]
        scatter_add(self.grads["weight"], self.cache, dout)
        return None                             # integer input: no gradient


def scatter_add(a, idx, values):
    """a[idx[i]] += values[i], repeated indices accumulating (np.add.at; cupyx.scatter_add on the GPU)."""
    if array_module(a) is np:
        np.add.at(a, idx, values)
    else:
        import cupyx
        cupyx.scatter_add(a, idx, values)


# ----------------------------------------------------------------------------------------------------
# Sinusoidal timestep embedding (Transformer positional encoding, as in the DDPM code):
#   emb[n, k] = sin(t_n * f_k),  emb[n, half + k] = cos(t_n * f_k),  f_k = 10000^(-k / (half - 1)).
# No parameters and no gradient (t is an integer).

def timestep_embedding(t, dim, dtype=np.float32):
    xp = array_module(t)
    half = dim // 2
    freqs = xp.exp(-math.log(10000.0) * xp.arange(half, dtype=xp.float64) / (half - 1))   # (half,)
    args = xp.asarray(t, dtype=xp.float64)[:, None] * freqs[None, :]                      # (N, half)
    emb = xp.concatenate([xp.sin(args), xp.cos(args)], axis=1)                            # (N, 2*half)
    if dim % 2:
        emb = xp.concatenate([emb, xp.zeros_like(emb[:, :1])], axis=1)
    return emb.astype(dtype)                    # computed in float64, cast once


# ----------------------------------------------------------------------------------------------------
# Single-head spatial self-attention with residual (DDPM's AttnBlock):
#   h = GroupNorm(x);  q, k, v = 1x1 convs of h;  A = softmax(q k^T / sqrt(C)) over keys;
#   y = x + proj(A v).

def softmax(s):
    xp = array_module(s)
    e = xp.exp(s - s.max(axis=-1, keepdims=True))
    e /= e.sum(axis=-1, keepdims=True)
    return e


class AttnBlock(Layer):
    def __init__(self, channels, rng, num_groups=8, dtype=np.float32):
        super().__init__()
        self.norm = self.add("norm", GroupNorm(num_groups, channels, dtype=dtype))
        self.q = self.add("q", Conv2d(channels, channels, 1, rng, dtype=dtype))
        self.k = self.add("k", Conv2d(channels, channels, 1, rng, dtype=dtype))
        self.v = self.add("v", Conv2d(channels, channels, 1, rng, dtype=dtype))
        self.proj = self.add("proj", Conv2d(channels, channels, 1, rng, dtype=dtype))

    def forward(self, x):                       # x (B, H, W, C)
        B, H, W, C = x.shape
        h = self.norm.forward(x)
        q = self.q.forward(h).reshape(B, H * W, C)                 # (B, N, C), N = H*W
        k = self.k.forward(h).reshape(B, H * W, C)
        v = self.v.forward(h).reshape(B, H * W, C)
        scale = 1.0 / math.sqrt(C)
        a = softmax((q @ k.transpose(0, 2, 1)) * scale)            # (B, N, N): query rows, key columns
        o = (a @ v).reshape(B, H, W, C)                            # (B, H, W, C)
        self.save((q, k, v, a, scale))
        return x + self.proj.forward(o)

    def backward(self, dout):                   # dout (B, H, W, C)
        q, k, v, a, scale = self.cache
        B, H, W, C = dout.shape
        do = self.proj.backward(dout).reshape(B, H * W, C)         # (B, N, C)
        da = do @ v.transpose(0, 2, 1)                             # (B, N, N)
        dv = a.transpose(0, 2, 1) @ do                             # (B, N, C)
        ds = a * (da - (da * a).sum(axis=-1, keepdims=True))       # softmax backward, (B, N, N)
        ds *= scale
        dq = ds @ k                                                # (B, N, C)
        dk = ds.transpose(0, 2, 1) @ q                             # (B, N, C)
        dh = (self.q.backward(dq.reshape(B, H, W, C)) + self.k.backward(dk.reshape(B, H, W, C))
              + self.v.backward(dv.reshape(B, H, W, C)))
        return dout + self.norm.backward(dh)                       # residual + attention branch


# ----------------------------------------------------------------------------------------------------
# Model: a whole network (the U-Net, the evaluation classifier): flat parameter dicts, device moves,
# gradient zeroing and the train/eval switch, shared by every network.

class Model(Layer):
    """Subclasses build their layers with ``add`` and call ``self._collect()`` at the end of __init__;
    ``self.dtype`` is the parameters' dtype."""

    def _collect(self):
        """The flat ordered dicts name -> array that the optimizer and checkpoints walk (shared arrays)."""
        named = list(self.named_params())
        self.params = {name: layer.params[key] for name, layer, key in named}
        self.grads = {name: layer.grads[key] for name, layer, key in named}

    def to(self, xp, dtype=None):
        """Move every parameter (and gradient) to numpy or cupy, optionally casting; returns self."""
        dtype = np.dtype(dtype or self.dtype)
        for _, layer in self.named_layers():
            for key in layer.params:
                layer.params[key] = xp.asarray(layer.params[key], dtype=dtype)
                layer.grads[key] = xp.zeros_like(layer.params[key])
        self.dtype = dtype
        self._collect()
        return self

    def zero_grad(self):
        """The one place gradients are zeroed (in place: layers and optimizer keep their references)."""
        for g in self.grads.values():
            g[...] = 0

    def num_parameters(self):
        return int(sum(p.size for p in self.params.values()))

    def train(self, mode=True):
        """Training mode: dropout on, every layer caches for backward. Evaluation: dropout off, no caches
        (less memory: large sampling batches fit), backward unavailable."""
        for _, layer in self.named_layers():
            layer.training = bool(mode)
        return self
