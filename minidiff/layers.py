"""Neural-network layers with hand-written backward passes, in NumPy or CuPy (xp from the arrays).

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

No Python loops over pixels or batch items; the convolution loops over its kh*kw kernel taps (and over
cache-sized blocks of rows, see shifted_matmul).
Float32 in, float32 out: constants are Python floats (weak scalars under NumPy 2 promotion rules).
"""
import math

import numpy as np

from .backend import array_module


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
# Linear:  y = x W^T + b

class Linear(Layer):
    def __init__(self, in_features, out_features, rng, dtype=np.float32):
        super().__init__()
        bound = 1.0 / math.sqrt(in_features)
        self.new_param("weight", _uniform(rng, (out_features, in_features), bound, dtype))  # (out, in)
        self.new_param("bias", _uniform(rng, (out_features,), bound, dtype))                # (out,)

    def forward(self, x):                       # x (N, in)
        self.save(x)
        return x @ self.params["weight"].T + self.params["bias"]   # (N, out)

    def backward(self, dout):                   # dout (N, out)
        x = self.cache
        self.grads["weight"] += dout.T @ x      # (out, in)
        self.grads["bias"] += dout.sum(axis=0)
        return dout @ self.params["weight"]     # dx (N, in)


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


ROWS = 1024  # rows per block in shifted_matmul: the kh*kw partial products of a block stay in cache


def shifted_matmul(buf, m, offsets, w):
    """sum_t buf[m + off_t : m + off_t + P] @ w[t]  for buf (m + P + m, K), w (T, K, N) -> (P, N).
    Computed block by block over the P output rows (ROWS at a time; a cache tiling, not a loop over
    pixels or images), each block either by accumulating the T matmuls of its shifted slices, or, when the
    output is wider than the input (N > K), by gathering the T slices side by side (a flat im2col of
    T*K columns) for one matmul. Blocking keeps the T passes over each output block in cache: ~1.7x
    faster than whole-array passes for 28x28 batches."""
    xp = array_module(buf)
    P, (T, K, N) = buf.shape[0] - 2 * m, w.shape
    out = xp.empty((P, N), dtype=buf.dtype)
    gather = N > K
    scratch = xp.empty((ROWS, T, K) if gather else (ROWS, N), dtype=buf.dtype)
    for r0 in range(0, P, ROWS):
        r1 = min(P, r0 + ROWS)
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
    dy (P, N) -> dw (T, K, N), accumulated over blocks of ROWS rows like shifted_matmul."""
    xp = array_module(buf)
    P, K, N = dy.shape[0], buf.shape[1], dy.shape[1]
    dw = xp.zeros((len(offsets), K, N), dtype=buf.dtype)
    tmp = xp.empty((K, N), dtype=buf.dtype)
    for r0 in range(0, P, ROWS):
        r1 = min(P, r0 + ROWS)
        for t, off in enumerate(offsets):
            xp.matmul(buf[m + off + r0:m + off + r1].T, dy[r0:r1], out=tmp)
            dw[t] += tmp
    return dw


class Conv2d(Layer):
    """Two ways to compute the same convolution:
      * im2col (any kernel, stride, padding): gather the kh*kw shifted copies of x into one matrix, then one
        matmul (the readable reference);
      * shifted matmuls (stride 1, 'same' padding: the U-Net's 3x3 convs): on the padded image flattened
        to rows (pad_flat: rows of W + p pixels), the input under tap (i, j) of output pixel r is row
        r + off(i, j), off = (i - p) * (W + p) + (j - p), so  y_pad = sum_taps (xbuf shifted by off) @ W[:, :, i, j]^T
        is a sum of matmuls on contiguous slices (shifted_matmul), computed on the padded grid whose padding
        rows are then dropped.
        Its backward uses the same slices:  dW[:, :, i, j] = (xbuf shifted by off)^T @ dy_pad  and
        dx_pad = sum_taps (dy_pad shifted by -off) @ W[:, :, i, j]  (a convolution with the flipped kernel).
      The shifted form avoids writing and re-reading a 9x copy of every input; both forms are tested against
      finite differences and PyTorch."""

    def __init__(self, in_channels, out_channels, kernel_size, rng, stride=1, padding=0, dtype=np.float32):
        super().__init__()
        self.k, self.stride, self.padding = kernel_size, stride, padding
        self.shifted = stride == 1 and 2 * padding == kernel_size - 1 and kernel_size > 1
        bound = 1.0 / math.sqrt(in_channels * kernel_size * kernel_size)
        self.new_param("weight", _uniform(rng, (out_channels, in_channels, kernel_size, kernel_size), bound, dtype))
        self.new_param("bias", _uniform(rng, (out_channels,), bound, dtype))

    def _wtaps(self):
        w = self.params["weight"]               # (Cout, Cin, kh, kw)
        return array_module(w).ascontiguousarray(w.transpose(2, 3, 1, 0))   # (kh, kw, Cin, Cout)

    def _offsets(self, W):
        """Row offset of tap (i, j) in the flattened padded image, taps in (i, j) order."""
        k, p = self.k, self.padding
        return [(i - p) * (W + p) + (j - p) for i in range(k) for j in range(k)]

    def forward(self, x):                       # x (B, H, W, Cin)
        B, H, W, _ = x.shape
        k, s, p = self.k, self.stride, self.padding
        wt = self._wtaps()                      # (kh, kw, Cin, Cout)
        cout = wt.shape[-1]
        if self.shifted:
            xbuf, m = pad_flat(x, p)            # (m + P + m, Cin), P = B*(H+p)*(W+p)
            self.save((x.shape, xbuf, m))
            out = shifted_matmul(xbuf, m, self._offsets(W), wt.reshape(k * k, -1, cout))   # (P, Cout)
            out = out.reshape(B, H + p, W + p, cout)[:, :H, :W, :]                         # drop the padding
            return out + self.params["bias"]    # (B, H, W, Cout), contiguous
        Ho, Wo = (H + 2 * p - k) // s + 1, (W + 2 * p - k) // s + 1
        self.save(x)                            # im2col is recomputed in backward: 9x less memory held
        out = im2col(x, k, k, s, p) @ wt.reshape(-1, cout)     # (B*Ho*Wo, Cout)
        out += self.params["bias"]
        return out.reshape(B, Ho, Wo, cout)     # (B, Ho, Wo, Cout)

    def backward(self, dout):                   # dout (B, Ho, Wo, Cout)
        xp = array_module(dout)
        k, s, p = self.k, self.stride, self.padding
        cout = dout.shape[-1]
        wt = self._wtaps()                      # (kh, kw, Cin, Cout)
        self.grads["bias"] += xp.einsum("bhwc->c", dout)   # db = sum of dout over images and pixels
        if self.shifted:
            x_shape, xbuf, m = self.cache
            B, H, W, cin = x_shape
            P = xbuf.shape[0] - 2 * m
            dbuf, _ = pad_flat(dout, p)         # (m + P + m, Cout), zero on the padding rows
            dy = dbuf[m:m + P]                  # (P, Cout)
            offsets = self._offsets(W)
            dw = shifted_matmul_t(xbuf, m, offsets, dy)                                     # (kh*kw, Cin, Cout)
            self.grads["weight"] += dw.reshape(k, k, cin, cout).transpose(3, 2, 0, 1)
            dx = shifted_matmul(dbuf, m, [-off for off in offsets], wt.reshape(k * k, cin, cout).transpose(0, 2, 1))
            return dx.reshape(B, H + p, W + p, cin)[:, :H, :W, :]                           # dx (B, H, W, Cin)
        x = self.cache
        dout = dout.reshape(-1, cout)           # (B*Ho*Wo, Cout)
        dw = im2col(x, k, k, s, p).T @ dout     # (kh*kw*Cin, Cout)
        self.grads["weight"] += dw.reshape(k, k, -1, cout).transpose(3, 2, 0, 1)
        dcols = dout @ wt.reshape(-1, cout).T   # (B*Ho*Wo, kh*kw*Cin)
        return col2im(dcols, x.shape, k, k, s, p)   # dx (B, H, W, Cin)


# ----------------------------------------------------------------------------------------------------
# GroupNorm (NHWC), affine:  xhat = (x - mu_g) / sqrt(var_g + eps) over each (sample, group of C/G
# channels, all pixels);  y = xhat * gamma + beta.
# Written with per-(sample, channel) sums over the pixels, so each pass over the big array is a plain
# reduction along one axis or one fused multiply-add, instead of reductions over two strided axes:
#   forward:  mu_g = sum x / n,  var_g = sum x^2 / n - mu_g^2  (n = H*W*C/G);  y = a x + b per (sample, channel)
#             with a = gamma rstd, b = beta - a mu.
#   backward: with dxhat = gamma dy,  dx = rstd (dxhat - mean_g(dxhat) - xhat mean_g(dxhat xhat)),
#             where both group means come from the per-channel sums S_dy = sum dy and S_dyx = sum dy x:
#             sum_pixels dy xhat = rstd (S_dyx - mu S_dy).  So dx = A dy + B x + C per (sample, channel).
# Sums over pixels are written einsum("bnc->bc", x): the same numbers as x.sum(axis=1), 2-3x faster in
# NumPy for 32-64 channels (the same holds for the convolutions' bias gradients, "bhwc->c").

class GroupNorm(Layer):
    def __init__(self, num_groups, num_channels, eps=1e-5, dtype=np.float32):
        super().__init__()
        if num_channels % num_groups:
            raise ValueError(f"GroupNorm: {num_channels} channels do not split into {num_groups} groups")
        self.G, self.eps = num_groups, eps
        self.new_param("weight", np.ones(num_channels, dtype=dtype))   # gamma (C,)
        self.new_param("bias", np.zeros(num_channels, dtype=dtype))    # beta (C,)

    def _group_mean(self, s, n):
        """(B, C) per-channel sums -> (B, C): the mean over each channel's group, repeated per channel."""
        B, C = s.shape
        g = s.reshape(B, self.G, C // self.G).sum(axis=2, keepdims=True) / n    # (B, G, 1)
        return array_module(s).broadcast_to(g, (B, self.G, C // self.G)).reshape(B, C)

    def forward(self, x):                       # x (B, H, W, C)
        xp = array_module(x)
        B, H, W, C = x.shape
        xr = x.reshape(B, H * W, C)
        n = H * W * (C // self.G)               # elements per group
        mean = self._group_mean(xp.einsum("bnc->bc", xr), n)                         # mu (B, C)
        var = self._group_mean(xp.einsum("bnc,bnc->bc", xr, xr), n) - mean * mean    # (B, C), biased
        rstd = 1.0 / xp.sqrt(xp.maximum(var, 0.0) + self.eps)                       # (B, C)
        a = rstd * self.params["weight"]                                             # (B, C)
        b = self.params["bias"] - a * mean
        self.save((x, mean, rstd))
        y = xr * a[:, None, :]
        y += b[:, None, :]
        return y.reshape(B, H, W, C)            # (B, H, W, C)

    def backward(self, dout):                   # dout (B, H, W, C)
        xp = array_module(dout)
        x, mean, rstd = self.cache
        B, H, W, C = dout.shape
        n = H * W * (C // self.G)
        gamma = self.params["weight"]
        dyr, xr = dout.reshape(B, H * W, C), x.reshape(B, H * W, C)
        s_dy = xp.einsum("bnc->bc", dyr)                         # (B, C): sum over pixels of dy
        s_dyxhat = rstd * (xp.einsum("bnc,bnc->bc", dyr, xr) - mean * s_dy)   # (B, C): sum of dy * xhat
        self.grads["weight"] += s_dyxhat.sum(axis=0)
        self.grads["bias"] += s_dy.sum(axis=0)
        k1 = self._group_mean(gamma * s_dy, n)                   # mean_g(dxhat)
        k2 = self._group_mean(gamma * s_dyxhat, n)               # mean_g(dxhat * xhat)
        A = rstd * gamma                                         # dx = A dy + Bx x + Cc
        Bx = -rstd * rstd * k2
        Cc = rstd * (rstd * k2 * mean - k1)
        dx = dyr * A[:, None, :]
        dx += xr * Bx[:, None, :]
        dx += Cc[:, None, :]
        return dx.reshape(B, H, W, C)


# ----------------------------------------------------------------------------------------------------
# SiLU:  y = x * sigmoid(x);  dy/dx = s * (1 + x * (1 - s)), s = sigmoid(x).

def sigmoid(x):
    """1 / (1 + exp(-x)) computed as (1 + tanh(x / 2)) / 2: no overflow for large |x|, one transcendental,
    and the arithmetic in place (these elementwise passes run on one core)."""
    xp = array_module(x)
    s = xp.multiply(x, 0.5)
    xp.tanh(s, out=s)
    s *= 0.5
    s += 0.5
    return s


class SiLU(Layer):
    def forward(self, x):
        s = sigmoid(x)
        self.save((x, s))
        return x * s

    def backward(self, dout):                   # dx = dout * s * (1 + x * (1 - s))
        x, s = self.cache
        g = 1.0 - s
        g *= x
        g += 1.0
        g *= s
        g *= dout
        return g


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
