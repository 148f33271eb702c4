"""A Model's flat buffers (minidiff/model.py): every parameter and gradient a view of one buffer each, kept across
.to() and checkpoint loading; one flat Adam / EMA / clipping step equal to the per-tensor step; a parameter shared
by two layers is one slot whose gradient adds both contributions."""
import numpy as np
import pytest

from minidiff.layers import Linear
from minidiff.model import ALIGN, FlatDict, Model
from minidiff.optim import EMA, Adam, clip_grad_norm
from minidiff.unet import UNet, UNetConfig
from minidiff.utils.checkpoint import load_params_into

TINY = UNetConfig(resolution=8, base_channels=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,))


def _aliased(model):
    """Every layer's parameter and gradient is the model's view of its flat buffers."""
    for name, layer, key in model.named_params():
        for mine, flat in ((layer.params[key], model.params), (layer.grads[key], model.grads)):
            if not (mine is flat[name] and np.shares_memory(mine, flat.flat)):
                return False
    return True


def test_views_alias_the_buffers():
    m = UNet(TINY, seed=0)
    assert isinstance(m.params, FlatDict) and m.params.flat.ndim == 1 and _aliased(m)
    offsets = sorted(o for o, _ in m.params.layout.values())
    assert all(o % ALIGN == 0 for o in offsets) and len(set(offsets)) == len(offsets)
    m.params.flat[...] = 0.5                            # one write reaches every layer
    assert all((p == 0.5).all() for p in m.params.values()) and (m.conv_in.params["weight"] == 0.5).all()
    m.conv_in.grads["weight"] += 1.0                    # a layer's += lands in the flat gradient buffer
    assert m.grads.flat.sum() == m.conv_in.grads["weight"].size
    m.zero_grad()
    assert not m.grads.flat.any()
    assert m.num_parameters() == sum(p.size for p in m.params.values())


def test_to_and_loading_keep_the_aliasing():
    m = UNet(TINY, seed=1)
    before = {k: p.copy() for k, p in m.params.items()}
    m.to(np, np.float64)
    assert m.params.flat.dtype == np.float64 and _aliased(m)
    assert all(np.array_equal(before[k], m.params[k]) for k in before)
    m.to(np, np.float32)
    other = UNet(TINY, seed=2)
    load_params_into(other.params, {k: p for k, p in m.params.items()}, "weights", "test")
    assert _aliased(other) and np.array_equal(other.params.flat, m.params.flat)


def test_flat_adam_ema_and_clipping_equal_the_per_tensor_step():
    """The same arithmetic, once over the buffers or once per tensor: the same numbers, bit for bit."""
    rng = np.random.default_rng(0)
    m = UNet(TINY, seed=0)
    m.params.flat[...] = rng.standard_normal(m.params.flat.shape)
    per_tensor = {k: p.copy() for k, p in m.params.items()}
    grads = {k: np.zeros_like(p) for k, p in per_tensor.items()}
    flat_opt, dict_opt = Adam(m.params, m.grads, lr=1e-2, weight_decay=0.01), Adam(per_tensor, grads, lr=1e-2,
                                                                                       weight_decay=0.01)
    flat_ema, dict_ema = EMA(m.params, 0.9), EMA(per_tensor, 0.9)
    assert isinstance(flat_opt.m, FlatDict) and not isinstance(dict_opt.m, FlatDict)
    for _ in range(3):
        for k, g in grads.items():
            g[...] = rng.standard_normal(g.shape) * 3
            m.grads[k][...] = g
        norms = clip_grad_norm(m.grads, 1.0), clip_grad_norm(grads, 1.0)
        np.testing.assert_allclose(norms[0], norms[1], rtol=1e-5)
        for k in grads:
            np.testing.assert_allclose(m.grads[k], grads[k], rtol=1e-5, atol=1e-9)
            grads[k][...] = m.grads[k]                  # the same clipped gradient for both updates
        flat_opt.step()
        dict_opt.step()
        flat_ema.update(m.params)
        dict_ema.update(per_tensor)
    for k in per_tensor:
        np.testing.assert_array_equal(m.params[k], per_tensor[k])
        np.testing.assert_array_equal(flat_ema.params[k], dict_ema.params[k])
        np.testing.assert_array_equal(flat_opt.m[k], dict_opt.m[k])
    state = flat_opt.state_dict()
    assert set(state) == set(dict_opt.state_dict()) and all(np.shares_memory(state[f"v.{k}"], flat_opt.v.flat)
                                                            for k in per_tensor)


class TwoLinears(Model):
    """y = W2 (W1 x) with W2 the same array as W1 (a tied weight): two layers, one parameter."""

    def __init__(self, rng):
        super().__init__()
        self.dtype = np.dtype(np.float64)
        self.a = self.add("a", Linear(4, 4, rng, np.float64))
        self.b = self.add("b", Linear(4, 4, rng, np.float64))
        self.b.params["weight"], self.b.grads["weight"] = self.a.params["weight"], self.a.grads["weight"]
        self._collect()

    def forward(self, x):
        return self.b.forward(self.a.forward(x))

    def backward(self, dout):
        return self.a.backward(self.b.backward(dout))


def test_a_shared_parameter_is_one_slot_and_its_gradient_adds():
    rng = np.random.default_rng(3)
    m = TwoLinears(rng)
    assert m.a.params["weight"] is m.b.params["weight"] and m.params["a.weight"] is m.params["b.weight"]
    assert m.num_parameters() == 16 + 4 + 4
    x, d = rng.standard_normal((5, 4)), rng.standard_normal((5, 4))
    m.zero_grad()
    m.forward(x)
    m.backward(d)
    W, b1 = m.params["a.weight"], m.params["a.bias"]
    h = x @ W.T + b1
    want = d.T @ h + (d @ W).T @ x                      # both uses of W: d(y)/dW from layer b plus from layer a
    np.testing.assert_allclose(m.grads["a.weight"], want, rtol=1e-12)
    loss = lambda: float(np.sum(m.forward(x) * d))      # noqa: E731
    h_, num = 1e-6, np.zeros(16)
    flat = W.reshape(-1)
    for i in range(16):
        old = flat[i]
        flat[i] = old + h_
        up = loss()
        flat[i] = old - h_
        num[i] = (up - loss()) / (2 * h_)
        flat[i] = old
    np.testing.assert_allclose(m.grads["a.weight"].reshape(-1), num, rtol=1e-6)


def test_fused_scalars_stay_in_the_parameters_dtype():
    """Every scalar reaching the fused Adam and EMA updates is a float32 (a Python float would make CuPy's fused
    kernel compute in float64); checked on NumPy arrays that refuse any float64 result."""
    class NoFloat64(np.ndarray):
        def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
            for a in inputs:
                if isinstance(a, float) or (isinstance(a, np.generic) and a.dtype == np.float64):
                    raise AssertionError(f"{ufunc.__name__} got the float64 scalar {a!r}")
            plain = [np.asarray(a) if isinstance(a, NoFloat64) else a for a in inputs]
            if "out" in kwargs:
                kwargs["out"] = tuple(np.asarray(o) for o in kwargs["out"])
            out = getattr(ufunc, method)(*plain, **kwargs)
            assert out.dtype != np.float64, ufunc.__name__
            return out.view(NoFloat64) if isinstance(out, np.ndarray) else out
    m = UNet(TINY, seed=0)
    m._set_flat(m.params.flat.view(NoFloat64), m.grads.flat.view(NoFloat64))
    opt, ema = Adam(m.params, m.grads, lr=1e-3, weight_decay=0.1), EMA(m.params)
    m.grads.flat[...] = 0.25
    with pytest.raises(AssertionError, match="float64 scalar"):   # the check bites on a raw Python float
        m.params.flat * 0.5
    opt.step()
    ema.update(m.params)
    assert m.params.flat.dtype == np.float32
