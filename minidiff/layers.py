"""Neural-network layers with hand-written backward passes, in NumPy or CuPy (xp from the arrays).
Step 4 of the reading order: the network's parts (unet.py puts them together).

Each layer is a class with ``params`` and ``grads`` (dicts name -> array, same keys and shapes) and a
``forward`` / ``backward`` pair side by side:
  * ``forward`` computes the output and caches exactly what ``backward`` needs (``self.cache``);
  * ``backward(dout)`` returns the gradient with respect to the input(s) and ADDS (``+=``) the parameter
    gradients into ``grads``. Nothing here zeroes a gradient: that happens in one place, the model's
    ``zero_grad``.
Composite layers (ResBlock and AttnBlock in unet.py) register children with ``add``; ``named_params`` walks
the tree; a whole network is a Model (model.py), whose parameters the optimizer and checkpoints see as one dict.

Layout. Images are NHWC (channels last) inside the network: a convolution is then a matrix product with pixels
as rows and channels as columns (im2col (B*Ho*Wo, kh*kw*Cin) @ (kh*kw*Cin, Cout)), whose result is already NHWC,
and the per-pixel channel vectors that 1x1 convolutions, GroupNorm and attention work on are contiguous. The
U-Net converts from and to the public NCHW layout at its boundary. Weights are stored in PyTorch's layout
((Cout, Cin, kh, kw) for convolutions, (out, in) for Linear) so checkpoints map one to one onto the PyTorch
reference (tests/torch_unet.py).

The math of the hot operations (linear, conv2d, group_norm, silu, upsample2x and their backward passes) is written
once as plain functions marked ``@fast.reference``, the readable reference that the tests prove; minidiff/fast/
registers faster versions of the same numbers (C++ kernels, fused CuPy kernels) for them (docs/network.md).
No Python loops over pixels or batch items (col2im loops over the kh*kw kernel taps). Float32 in, float32 out:
constants are Python floats (weak scalars under NumPy 2 promotion rules).
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
# Linear:  y = x W^T + b   (also the matrix product of every convolution, on its im2col patches)

@fast.reference
def linear(x, weight, bias):
    """x (N, in) @ weight (out, in)^T + bias (out,) -> (N, out); bias None: no bias."""
    y = x @ weight.T
    return y if bias is None else y + bias


@fast.reference
def linear_backward(x, weight, dout):
    """(dx = dout W (N, in), dweight = dout^T x (out, in)) for dout (N, out); dbias = sum of dout over N."""
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
# computed as im2col(x) @ W_mat^T, W_mat[o, (i, j, c)] = W[o, c, i, j]: a linear map of each output pixel's patch.

def im2col(x, kh, kw, stride, padding):
    """x (B, H, W, C) -> cols (B*Ho*Wo, kh*kw*C), column order (i, j, c): the kh x kw window of every output pixel,
    read as a view of the zero-padded image (sliding_window_view) and copied once into rows."""
    xp = array_module(x)
    B, H, W, C = x.shape
    if kh == kw == 1 and stride == 1 and padding == 0:
        return x.reshape(B * H * W, C)
    xpad = xp.zeros((B, H + 2 * padding, W + 2 * padding, C), dtype=x.dtype)
    xpad[:, padding:padding + H, padding:padding + W, :] = x
    windows = xp.lib.stride_tricks.sliding_window_view(xpad, (kh, kw), axis=(1, 2))[:, ::stride, ::stride]
    Ho, Wo = windows.shape[1:3]                 # (B, Ho, Wo, C, kh, kw)
    return windows.transpose(0, 1, 2, 4, 5, 3).reshape(B * Ho * Wo, kh * kw * C)


def col2im(dcols, x_shape, kh, kw, stride, padding):
    """Adjoint of im2col: dcols (B*Ho*Wo, kh*kw*C) -> dx (B, H, W, C), summing the taps that overlap."""
    xp = array_module(dcols)
    B, H, W, C = x_shape
    Ho, Wo = (H + 2 * padding - kh) // stride + 1, (W + 2 * padding - kw) // stride + 1
    dcols = dcols.reshape(B, Ho, Wo, kh, kw, C)
    dxpad = xp.zeros((B, H + 2 * padding, W + 2 * padding, C), dtype=dcols.dtype)
    for i in range(kh):
        for j in range(kw):
            dxpad[:, i:i + stride * (Ho - 1) + 1:stride, j:j + stride * (Wo - 1) + 1:stride] += dcols[:, :, :, i, j]
    return dxpad[:, padding:padding + H, padding:padding + W, :]


def conv_weight_matrix(weight):
    """(Cout, Cin, kh, kw) -> W_mat (Cout, kh*kw*Cin) in im2col's column order (i, j, c)."""
    cout = weight.shape[0]
    return array_module(weight).ascontiguousarray(weight.transpose(0, 2, 3, 1)).reshape(cout, -1)


@fast.reference
def conv2d(x, weight, bias, stride=1, padding=0, residual=None):
    """x (B, H, W, Cin), weight (Cout, Cin, k, k), bias (Cout,), one per image (B, Cout) or None, optional residual
    (B, Ho, Wo, Cout) -> y = conv(x) + bias (+ residual), (B, Ho, Wo, Cout)."""
    B, H, W, _ = x.shape
    cout, _, k, _ = weight.shape
    Ho, Wo = (H + 2 * padding - k) // stride + 1, (W + 2 * padding - k) // stride + 1
    shared = bias is None or bias.ndim == 1
    y = linear(im2col(x, k, k, stride, padding), conv_weight_matrix(weight), bias if shared else None)
    y = y.reshape(B, Ho, Wo, cout)
    if not shared:
        y = y + bias[:, None, None, :]          # one bias per image
    return y if residual is None else y + residual


@fast.reference
def conv2d_backward(x, weight, dout, stride=1, padding=0):
    """(dx (B, H, W, Cin), dweight (Cout, Cin, k, k)) of conv2d for dout (B, Ho, Wo, Cout): the product's gradients
    on the patches, dW_mat = dout^T im2col(x); and dx, for a 'same' convolution (stride 1, p = (k - 1) / 2) the
    convolution of dout with the flipped kernel, W'[c, o, i, j] = W[o, c, k-1-i, k-1-j], otherwise the patches'
    gradients dout W_mat taken back to their pixels (col2im). dbias is the sum of dout (the layer's)."""
    cout, cin, k, _ = weight.shape
    cols, dy = im2col(x, k, k, stride, padding), dout.reshape(-1, cout)
    if stride == 1 and 2 * padding == k - 1:
        dx = conv2d(dout, weight[:, :, ::-1, ::-1].transpose(1, 0, 2, 3), None, 1, padding)
        dwmat = dy.T @ cols
    else:
        dcols, dwmat = linear_backward(cols, conv_weight_matrix(weight), dy)
        dx = col2im(dcols, x.shape, k, k, stride, padding)
    return dx, dwmat.reshape(cout, k, k, cin).transpose(0, 3, 1, 2)


@fast.reference
def pixel_sum(x, per_image=False):
    """The sum of x (B, ..., C) over its pixels, and over the images unless ``per_image``: (C,) or (B, C), the
    gradient of a bias added at every pixel (a convolution's; the ResBlock's time shift, per image)."""
    return x.sum(axis=tuple(range(1 if per_image else 0, x.ndim - 1)))


class Conv2d(Layer):
    def __init__(self, in_channels, out_channels, kernel_size, rng, stride=1, padding=0, dtype=np.float32):
        super().__init__()
        self.stride, self.padding = stride, padding
        bound = 1.0 / math.sqrt(in_channels * kernel_size * kernel_size)
        self.new_param("weight", _uniform(rng, (out_channels, in_channels, kernel_size, kernel_size), bound, dtype))
        self.new_param("bias", _uniform(rng, (out_channels,), bound, dtype))

    def forward(self, x, shift=None, residual=None):
        """x (B, H, W, Cin) -> (B, Ho, Wo, Cout). shift (B, Cout): added to the bias per image (the ResBlock's time
        embedding); residual (B, Ho, Wo, Cout): added to the output. Their gradients are the caller's (the pixel
        sums of dout per image, and dout)."""
        b = self.params["bias"] if shift is None else self.params["bias"] + shift   # (Cout,) or (B, Cout)
        self.save(x)
        return conv2d(x, self.params["weight"], b, self.stride, self.padding, residual)

    def backward(self, dout):                   # dout (B, Ho, Wo, Cout)
        dx, dw = conv2d_backward(self.cache, self.params["weight"], dout, self.stride, self.padding)
        self.grads["weight"] += dw
        self.grads["bias"] += pixel_sum(dout)   # db = sum of dout over images and pixels
        return dx                               # (B, H, W, Cin)


# ----------------------------------------------------------------------------------------------------
# SiLU:  y = x * sigmoid(x);  dy/dx = s * (1 + x * (1 - s)), s = sigmoid(x).

def sigmoid(x):
    """1 / (1 + exp(-x)) computed as (1 + tanh(x / 2)) / 2: no overflow for large |x|, one transcendental."""
    return 0.5 + 0.5 * array_module(x).tanh(0.5 * x)


@fast.reference(fuse=True)
def silu(x):
    return x * sigmoid(x)


@fast.reference(fuse=True)
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
# GroupNorm (Wu & He 2018), NHWC, affine: over each (image, group of C/G channels, all pixels)
#   xhat = (x - mu_g) / sqrt(var_g + eps),   y = gamma xhat + beta;
#   with dxhat = gamma dy:  dx = rstd (dxhat - mean_g(dxhat) - xhat mean_g(dxhat xhat)),
#   dgamma = sum dy xhat,  dbeta = sum dy.
# GroupNormSiLU follows it by SiLU (the pre-activation in front of every ResBlock convolution), in one layer.

@fast.reference(fuse=True)
def normalize(xg, mean, rstd):
    """xhat = (x - mu_g) rstd_g, on x grouped as (B, N, G, C/G) with the statistics (B, 1, G, 1)."""
    return (xg - mean) * rstd


@fast.reference(fuse=True)
def affine(xhat, gamma, beta):
    """y = gamma xhat + beta, per channel."""
    return xhat * gamma + beta


@fast.reference(fuse=True)
def normalize_backward(dxhat, xhat, mean_dxhat, mean_dxhat_xhat, rstd):
    """dx = rstd (dxhat - mean_g(dxhat) - xhat mean_g(dxhat xhat)), the gradient through xhat's statistics."""
    return rstd * (dxhat - mean_dxhat - xhat * mean_dxhat_xhat)


def _groups(x, num_groups):
    B, H, W, C = x.shape
    return x.reshape(B, H * W, num_groups, C // num_groups)   # (B, N, G, C/G)


@fast.reference
def group_norm(x, gamma, beta, num_groups, eps, with_silu=False):
    """x (B, H, W, C) -> (y, mean (B, G), rstd (B, G)), y = gamma xhat + beta, then SiLU if ``with_silu``."""
    xp = array_module(x)
    xg = _groups(x, num_groups)
    mean = xg.mean(axis=(1, 3))                                 # mu_g
    rstd = 1.0 / xp.sqrt(xg.var(axis=(1, 3)) + eps)              # 1 / sqrt(var_g + eps), var_g biased
    xhat = normalize(xg, mean[:, None, :, None], rstd[:, None, :, None]).reshape(x.shape)
    y = affine(xhat, gamma, beta)
    return (silu(y) if with_silu else y), mean, rstd


@fast.reference
def group_norm_backward(dout, x, gamma, beta, mean, rstd, num_groups, with_silu=False):
    """-> (dx (B, H, W, C), dgamma (C,), dbeta (C,)) of group_norm; with SiLU, dy = SiLU'(gamma xhat + beta) dout
    first (the pre-activation recomputed: the forward keeps only x)."""
    stats = lambda s: s[:, None, :, None]       # noqa: E731  (B, G) -> (B, 1, G, 1)
    xhat = normalize(_groups(x, num_groups), stats(mean), stats(rstd))            # (B, N, G, C/G)
    dy = dout if not with_silu else silu_backward(affine(xhat.reshape(x.shape), gamma, beta), dout)
    dgamma = (dy * xhat.reshape(x.shape)).sum(axis=(0, 1, 2))
    dbeta = dy.sum(axis=(0, 1, 2))
    dxhat = (dy * gamma).reshape(xhat.shape)
    dx = normalize_backward(dxhat, xhat, dxhat.mean(axis=(1, 3), keepdims=True),
                            (dxhat * xhat).mean(axis=(1, 3), keepdims=True), stats(rstd))
    return dx.reshape(x.shape), dgamma, dbeta


class GroupNorm(Layer):
    with_silu = False                           # GroupNormSiLU: followed by SiLU

    def __init__(self, num_groups, num_channels, eps=1e-5, dtype=np.float32):
        super().__init__()
        if num_channels % num_groups:
            raise ValueError(f"GroupNorm: {num_channels} channels do not split into {num_groups} groups")
        self.G, self.eps = num_groups, eps
        self.new_param("weight", np.ones(num_channels, dtype=dtype))   # gamma (C,)
        self.new_param("bias", np.zeros(num_channels, dtype=dtype))    # beta (C,)

    def forward(self, x):                       # x (B, H, W, C)
        y, mean, rstd = group_norm(x, self.params["weight"], self.params["bias"], self.G, self.eps, self.with_silu)
        self.save((x, mean, rstd))
        return y                                # (B, H, W, C)

    def backward(self, dout):                   # dout (B, H, W, C)
        x, mean, rstd = self.cache
        dx, dgamma, dbeta = group_norm_backward(dout, x, self.params["weight"], self.params["bias"], mean, rstd,
                                                self.G, self.with_silu)
        self.grads["weight"] += dgamma
        self.grads["bias"] += dbeta
        return dx


class GroupNormSiLU(GroupNorm):
    """SiLU(GroupNorm(x)) in one layer (the parameters are GroupNorm's)."""
    with_silu = True


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

@fast.reference
def upsample2x(x):                              # x (B, H, W, C) -> y (B, 2H, 2W, C)
    B, H, W, C = x.shape
    return array_module(x).broadcast_to(x[:, :, None, :, None], (B, H, 2, W, 2, C)).reshape(B, 2 * H, 2 * W, C)


@fast.reference
def upsample2x_backward(dout):                  # dout (B, 2H, 2W, C) -> dx (B, H, W, C): the sum of each pixel's copies
    B, H2, W2, C = dout.shape
    return dout.reshape(B, H2 // 2, 2, W2 // 2, 2, C).sum(axis=(2, 4))


class Upsample2x(Layer):
    def forward(self, x):
        return upsample2x(x)

    def backward(self, dout):
        return upsample2x_backward(dout)


# ----------------------------------------------------------------------------------------------------
# Channel concatenation (U-Net skips):  y = [a, b] along channels.

@fast.reference
def concat_channels(a, b):                      # a (B, H, W, Ca), b (B, H, W, Cb) -> [a, b] (B, H, W, Ca + Cb)
    return array_module(a).concatenate([a, b], axis=-1)


class Concat(Layer):
    def forward(self, a, b):                    # a (B, H, W, Ca), b (B, H, W, Cb)
        self.save(a.shape[-1])
        return concat_channels(a, b)            # (B, H, W, Ca + Cb)

    def backward(self, dout):                   # -> da, db: dout split where a's channels end
        return dout[..., :self.cache], dout[..., self.cache:]


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
# Softmax over the last axis, shifted by the maximum (no overflow)

def softmax(s):
    xp = array_module(s)
    e = xp.exp(s - s.max(axis=-1, keepdims=True))
    e /= e.sum(axis=-1, keepdims=True)
    return e
