"""The NumPy table of fast paths: C++ kernels of minidiff._core (csrc/nn_*.cpp, csrc/step_cpu.cpp), float32 only.

Each function takes the arguments of the reference named by its key and returns the same values, or NotImplemented
for a call it does not cover (then the reference runs). The kernels pick AVX-512, AVX2 or SSE2 when the module
loads and run on all cores (OpenMP); tests/test_kernels.py compares each with its reference.
"""
import numpy as np

from ..utils.native import core


def _float32(*arrays):
    return all(a is None or (type(a) is np.ndarray and a.dtype == np.float32) for a in arrays)


def _c(a):
    return None if a is None else np.ascontiguousarray(a)


def _rows(a):
    """a itself where it is C-contiguous or a slice of the channels of a C-contiguous array (Concat's backward
    gives those; the kernels that take it read rows of channels one stride apart), else a C-contiguous copy."""
    s, n = a.strides, a.shape
    if a.flags.c_contiguous or (a.ndim >= 2 and s[-1] == 4 and s[-2] % 4 == 0 and s[-2] >= 4 * n[-1]
                                and all(s[i] == s[i + 1] * n[i + 1] for i in range(a.ndim - 2))):
        return a
    return np.ascontiguousarray(a)


def linear(x, weight, bias):
    if not _float32(x, weight, bias):
        return NotImplemented
    return core.linear_forward(_c(x), _c(weight), _c(bias))


def linear_backward(x, weight, dout):
    if not _float32(x, weight, dout):
        return NotImplemented
    return core.linear_backward(_c(x), _c(weight), _rows(dout))


def attention(q, k, v, scale):
    if not _float32(q, k, v) or q.ndim != 3 or 0 in q.shape or 0 in k.shape:
        return NotImplemented
    return core.attention_forward(_c(q), _c(k), _c(v), float(scale))


def attention_backward(q, k, v, a, dout, scale):
    if not _float32(q, k, v, a, dout) or q.ndim != 3 or 0 in q.shape or 0 in k.shape:
        return NotImplemented
    return core.attention_backward(_c(q), _c(k), _c(v), _c(a), _c(dout), float(scale))


def silu(x):
    return core.silu_forward(_c(x)) if _float32(x) else NotImplemented


def silu_backward(x, dout):
    return core.silu_backward(_c(x), _c(dout)) if _float32(x, dout) else NotImplemented


def group_norm(x, gamma, beta, num_groups, eps, with_silu=False):
    """The kernel keeps its statistics per channel (B, C); the reference's are per group (B, G)."""
    if not _float32(x, gamma, beta):
        return NotImplemented
    B, H, W, C = x.shape
    y, mean, rstd = core.group_norm_forward(_c(x).reshape(B, H * W, C), gamma, beta, num_groups, eps, with_silu)
    step = C // num_groups
    return y.reshape(x.shape), mean[:, ::step].copy(), rstd[:, ::step].copy()


def group_norm_backward(dout, x, gamma, beta, mean, rstd, num_groups, with_silu=False):
    if not _float32(dout, x, gamma, beta, mean, rstd):
        return NotImplemented
    B, H, W, C = x.shape
    per_channel = lambda s: np.ascontiguousarray(np.repeat(s, C // num_groups, axis=1))  # noqa: E731 (B, G) -> (B, C)
    dx, dgamma, dbeta = core.group_norm_backward(_c(dout).reshape(B, H * W, C), _c(x).reshape(B, H * W, C), gamma,
                                                 beta, per_channel(mean), per_channel(rstd), num_groups, with_silu)
    return dx.reshape(x.shape), dgamma, dbeta


def _conv3x3(weight, stride, padding):
    return weight.shape[2:] == (3, 3) and stride in (1, 2) and padding == 1


def _conv1x1(weight, stride, padding):
    return weight.shape[2:] == (1, 1) and stride == 1 and padding == 0


def conv2d(x, weight, bias, stride=1, padding=0, residual=None):
    """The 3x3 convolutions of stride 1 and 2 (the U-Net's, Downsample's), bias and residual added in the kernel's
    last pass; the 1x1 convolution as the linear kernel. The others run the reference, whose matrix product is the
    linear kernel."""
    if not _float32(x, weight, bias, residual):
        return NotImplemented
    if _conv3x3(weight, stride, padding):
        return core.conv3x3_forward(_c(x), _c(weight), _c(bias), _c(residual), stride)
    if _conv1x1(weight, stride, padding) and (bias is None or bias.ndim == 1):
        B, H, W, _ = x.shape
        y = core.linear_forward(_c(x).reshape(-1, x.shape[-1]), _c(weight[:, :, 0, 0]), _c(bias))
        y = y.reshape(B, H, W, -1)
        return y if residual is None else np.add(y, residual, out=y)
    return NotImplemented


def conv2d_backward(x, weight, dout, stride=1, padding=0):
    if not _float32(x, weight, dout):
        return NotImplemented
    if _conv3x3(weight, stride, padding):
        return core.conv3x3_backward(_c(x), _c(weight), _rows(dout), stride)
    if _conv1x1(weight, stride, padding):
        cout, cin = weight.shape[:2]
        dy = _rows(_rows(dout).reshape(-1, cout))          # a view where dout is a slice of channels
        dx, dw = core.linear_backward(_c(x).reshape(-1, cin), _c(weight[:, :, 0, 0]), dy)
        return dx.reshape(x.shape), dw.reshape(cout, cin, 1, 1)
    return NotImplemented


def pixel_sum(x, per_image=False):
    """Sums in double, each image's apart (the images' added in order: the same for any thread count)."""
    if not _float32(x) or x.ndim < 2:
        return NotImplemented
    return core.pixel_sum(_rows(x), bool(per_image))


def concat_channels(a, b):
    if not _float32(a, b) or a.ndim != b.ndim or a.ndim < 1 or a.shape[:-1] != b.shape[:-1]:
        return NotImplemented
    return core.concat_channels(_c(a), _c(b))


def upsample2x(x):
    return core.upsample2x(_c(x)) if _float32(x) and x.ndim == 4 else NotImplemented


def upsample2x_backward(dout):
    if not _float32(dout) or dout.ndim != 4 or dout.shape[1] % 2 or dout.shape[2] % 2:
        return NotImplemented
    return core.upsample2x_backward(_c(dout))


def _host_float32(*scalars):
    """The scalars as float32 values, or None if one is not a host scalar (a 0-d array on a device, say)."""
    out = []
    for s in scalars:
        if isinstance(s, np.ndarray) and s.ndim == 0 or isinstance(s, (float, int, np.floating, np.integer)):
            out.append(float(np.float32(s)))
        else:
            return None
    return out


def _in_place(*arrays):
    return all(type(a) is np.ndarray and a.dtype == np.float32 and a.flags.c_contiguous and a.flags.writeable
               and a.shape == arrays[0].shape for a in arrays)


def adam_update(p, g, m, v, lr, beta1, beta2, eps, bias_correction1, bias_correction2, weight_decay):
    """One pass in the reference's float32 operations and order (the same bits), instead of NumPy's ten."""
    s = _host_float32(lr, beta1, beta2, eps, bias_correction1, bias_correction2, weight_decay)
    if s is None or not _in_place(p, g, m, v):
        return NotImplemented
    core.adam_update(p, g, m, v, *s)


def ema_update(e, p, decay):
    s = _host_float32(decay)
    if s is None or not _in_place(e, p):
        return NotImplemented
    core.ema_update(e, p, *s)


def _step_arrays(x_t, **arrays):
    """Whether the step kernel takes these arrays: float32 C-contiguous NumPy arrays of x_t's shape."""
    return all(a is None or (type(a) is np.ndarray and a.dtype == np.float32 and a.flags.c_contiguous
                             and a.shape == x_t.shape) for a in (x_t, *arrays.values()))


def counters_ok(params):
    """Whether the noise's Philox key and counter fit the kernels' uint64 (else the reference names the problem)."""
    return all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and 0 <= v < 2 ** 64
               for v in (params.seed, params.t))


def step_scalars(params):
    """The keyword scalars of the step kernels (core.step_cpu, core.step_cuda) for a step.StepParams."""
    c = params.coefs
    return dict(a=c.a, b=c.b, c_x0=c.c_x0, c_x0prev=c.c_x0prev, c_xt=c.c_xt, c_eps=c.c_eps, sigma=c.sigma,
                guidance=float(params.guidance), clip=bool(params.clip_sample), seed=int(params.seed),
                step=int(params.t))


def step(x_t, eps, params, eps_uncond=None, x0_prev=None, out=None, x0_out=None, threads=0):
    """step.step in one pass over the elements (csrc/step_math.h), the Philox noise drawn in the same pass; OpenMP
    over the cores (threads = 0: all of them)."""
    if not _step_arrays(x_t, eps=eps, eps_uncond=eps_uncond, x0_prev=x0_prev, out=out, x0_out=x0_out):
        return NotImplemented
    if (x0_prev is None and params.coefs.c_x0prev != 0.0) or not counters_ok(params):
        return NotImplemented                   # the reference says what is wrong
    out = np.empty_like(x_t) if out is None else out
    x0 = np.empty_like(x_t) if x0_out is None else x0_out
    core.step_cpu(x_t, eps, eps_uncond, None, x0_prev, out, x0, threads=int(threads), **step_scalars(params))
    return out, x0


def table():
    """{reference key: fast path}; empty without the compiled extension."""
    if core is None:
        return {}
    return {"layers.linear": linear, "layers.linear_backward": linear_backward,
            "layers.silu": silu, "layers.silu_backward": silu_backward,
            "layers.group_norm": group_norm, "layers.group_norm_backward": group_norm_backward,
            "layers.conv2d": conv2d, "layers.conv2d_backward": conv2d_backward, "layers.pixel_sum": pixel_sum,
            "layers.concat_channels": concat_channels, "layers.upsample2x": upsample2x,
            "layers.upsample2x_backward": upsample2x_backward,
            "unet.attention": attention, "unet.attention_backward": attention_backward,
            "optim.adam_update": adam_update, "optim.ema_update": ema_update,
            "step.step": step}
