"""The U-Net: parameter count and names, config round trip, whole-network gradient check (float64, finite
differences at sampled entries of every parameter tensor), and agreement with the PyTorch reference
(tests/torch_unet.py, same weights) in outputs and every gradient. rel_error as in test_layers.py.
"""
import json

import numpy as np
import pytest

from minidiff.conditioning.unet import ClassConditionalUNet, ConditionConfig
from minidiff.unet import UNet, UNetConfig
from test_layers import GRAD_TOL, numerical_grad, rel_error

# base_channels 16: two channels per GroupNorm group (with one, GroupNorm removes every per-channel shift,
# so conv1.bias and temb_proj would have exactly zero gradient and the check would see only rounding noise)
TINY = UNetConfig(in_channels=2, resolution=8, base_channels=16, ch_mult=(1, 2), num_res_blocks=1,
                  attn_resolutions=(4,), dropout=0.1)
CLASSES = ConditionConfig(num_classes=3)


def tiny(seed=0, dtype=np.float32):
    """The tiny class-conditional U-Net every feature of the network is on in."""
    return ClassConditionalUNet(TINY, CLASSES, seed=seed, dtype=dtype)


def randomize(model, rng, scale=0.3):
    """Random values in every parameter (the DDPM init zeroes whole layers, which would hide gradients)."""
    for name, p in model.params.items():
        p[...] = rng.standard_normal(p.shape) * scale + (1.0 if name.endswith("norm1.weight") or
                                                         name.endswith("norm2.weight") else 0.0)


def test_parameter_count_matches_reference():
    assert UNet(UNetConfig()).num_parameters() == 1_623_169          # PyTorch's DDPM-style U-Net at C = 32 has as many
    assert UNet(UNetConfig(base_channels=64)).num_parameters() == 6_469_889


def test_params_grads_names_and_init():
    m = ClassConditionalUNet(UNetConfig(), ConditionConfig(num_classes=10))
    assert list(m.params) == list(m.grads)
    assert all(m.params[k].shape == m.grads[k].shape and m.params[k].dtype == np.float32 for k in m.params)
    for name in ["conv_in.weight", "down.0.res.1.conv1.weight", "down.2.attn.0.q.weight", "down.1.downsample.conv.weight",
                 "mid.attn.proj.bias", "up.1.res.2.skip.weight", "up.2.upsample.conv.weight", "class_emb.weight",
                 "temb.fc2.bias", "conv_out.weight"]:
        assert name in m.params, name
    assert m.params["class_emb.weight"].shape == (11, 128)
    # DDPM init: zero last conv of ResBlocks, attention projections and conv_out; the rest is not zero
    zero = [k for k, p in m.params.items() if not p.any()]
    assert all(".conv2." in k or ".proj." in k or k.startswith("conv_out") or k.endswith(".bias") and "norm" in k
               for k in zero)
    assert "conv_out.weight" in zero and "mid.attn.proj.weight" in zero and "up.0.res.2.conv2.weight" in zero
    assert m.params["down.0.res.0.conv1.weight"].any()
    # the same seed gives the same weights
    again = ClassConditionalUNet(UNetConfig(), ConditionConfig(num_classes=10)).params
    assert all(np.array_equal(a, b) for a, b in zip(m.params.values(), again.values()))


def test_config_round_trips_through_json():
    cfg = UNetConfig(base_channels=16, ch_mult=(1, 2), attn_resolutions=(14,), dropout=0.1)
    assert UNetConfig.from_dict(json.loads(json.dumps(cfg.asdict()))) == cfg
    with pytest.raises(ValueError, match="unknown UNetConfig option"):
        UNetConfig.from_dict({"base_chanels": 32})
    with pytest.raises(ValueError, match="multiple of 8"):
        UNetConfig(base_channels=12)
    for ch_mult in ((), (1, 0, 2), (1, -2)):                       # a level of no channels, or no levels
        with pytest.raises(ValueError, match="ch_mult must be one or more positive"):
            UNetConfig(ch_mult=ch_mult)


def test_bad_inputs_raise_clear_errors():
    m = tiny()
    x, t = np.zeros((2, 2, 8, 8), np.float32), np.array([1, 2])
    with pytest.raises(ValueError, match="shape"):
        m.forward(np.zeros((2, 1, 8, 8), np.float32), t)
    with pytest.raises(ValueError, match="float64"):
        m.forward(x.astype(np.float64), t)
    with pytest.raises(ValueError, match="int array"):
        m.forward(x, np.array([0.5, 1.0]))
    with pytest.raises(ValueError, match="class labels"):
        m.forward(x, t, np.array([0, 4]))
    with pytest.raises(ValueError, match="rng"):
        m.forward(x, t)                                  # dropout 0.1 in training mode needs an rng
    assert m.train(False).forward(x, t).shape == x.shape     # evaluation: no dropout, no rng needed
    with pytest.raises(ValueError, match="unconditional"):
        UNet(TINY).forward(x, t, np.array([0, 1]))


def test_whole_unet_gradcheck():
    """Finite differences (float64) on a tiny config with every feature on (2 levels, attention, skip
    convs, class embedding, dropout with a fixed mask): the input and 3 sampled entries of every parameter.
    Step h = 1e-4: the sampled gradients can be ~1e-4 of the loss, so smaller steps are dominated by
    rounding (errors grow as 1/h below that); at 1e-4 the worst tensor is ~3e-8."""
    rng = np.random.default_rng(0)
    m = ClassConditionalUNet(TINY, CLASSES, seed=1, dtype=np.float64)   # a UNet with a class embedding
    assert isinstance(m, UNet)
    randomize(m, rng)
    x = rng.standard_normal((2, 2, 8, 8))
    t, y = np.array([3, 900]), np.array([0, 3])          # 3 = the "no condition" token
    R = rng.standard_normal(x.shape)
    loss = lambda: float(np.sum(m.forward(x, t, y, rng=np.random.default_rng(5)) * R))  # noqa: E731
    m.zero_grad()
    m.forward(x, t, y, rng=np.random.default_rng(5))
    dx = m.backward(R)
    errors = {"x": rel_error(dx.ravel()[:40], numerical_grad(loss, x, range(40), h=1e-4))}
    for name, p in m.params.items():
        entries = rng.choice(p.size, size=min(3, p.size), replace=False)
        errors[name] = rel_error(m.grads[name].ravel()[entries], numerical_grad(loss, p, entries, h=1e-4))
    for name in [k for k in errors if k.endswith(".k.bias")]:
        errors.pop(name)                                 # exactly zero (see test_layers.test_attention_gradcheck)
        assert np.abs(m.grads[name]).max() < 1e-12
    assert len(errors) > 90
    bad = {k: v for k, v in errors.items() if not v < GRAD_TOL}
    assert not bad, bad


def test_float32_end_to_end_no_float64_leaks():
    m = tiny()
    rng = np.random.default_rng(0)
    randomize(m, rng)
    x = rng.standard_normal((2, 2, 8, 8)).astype(np.float32)
    out = m.forward(x, np.array([0, 999]), np.array([1, 2]), rng=rng)
    dx = m.backward(np.ones_like(out))
    assert out.dtype == dx.dtype == np.float32
    assert all(g.dtype == np.float32 for g in m.grads.values())


def test_eval_mode_keeps_no_caches():
    """model.train(False): same output, dropout off, no layer holds a cache, backward refuses clearly."""
    cfg = UNetConfig(in_channels=2, resolution=8, base_channels=16, ch_mult=(1, 2), num_res_blocks=1,
                     attn_resolutions=(4,))
    m = ClassConditionalUNet(cfg, CLASSES)
    randomize(m, np.random.default_rng(0))
    x, t, y = np.random.default_rng(1).standard_normal((2, 2, 8, 8)).astype(np.float32), np.array([5, 6]), None
    train_out = m.forward(x, t, y)
    assert all(layer.cache is not None for _, layer in m.named_layers() if type(layer).__name__ == "Conv2d")
    eval_out = m.train(False).forward(x, t, y)
    np.testing.assert_array_equal(train_out, eval_out)
    assert all(layer.cache is None for _, layer in m.named_layers())
    with pytest.raises(RuntimeError, match="training mode"):
        m.backward(np.ones_like(eval_out))
    m.train(True).forward(x, t, y)
    assert m.backward(np.ones_like(eval_out)).shape == x.shape


def test_to_float64_and_back():
    m = tiny(seed=3)
    before = {k: p.copy() for k, p in m.params.items()}
    m.to(np, np.float64)
    assert all(p.dtype == np.float64 and g.dtype == np.float64 for p, g in zip(m.params.values(), m.grads.values()))
    m.to(np, np.float32)
    assert all(np.array_equal(before[k], m.params[k]) for k in before)
    # the flat dicts and the layers share arrays, so in-place optimizer updates reach the layers
    m.params["conv_in.weight"][...] = 0
    assert not m.conv_in.params["weight"].any()


def test_unet_matches_torch():
    """Default C = 32 architecture with random weights, class-conditional: output, dx and every parameter
    gradient agree with PyTorch autograd in float32."""
    torch = pytest.importorskip("torch")
    from torch_unet import from_config, load_minidiff_params
    cfg = UNetConfig()
    m = ClassConditionalUNet(cfg, ConditionConfig(num_classes=10), seed=0)
    rng = np.random.default_rng(1)
    randomize(m, rng, scale=0.1)
    tm = load_minidiff_params(from_config(cfg, num_classes=10), m.params)
    assert sum(p.numel() for p in tm.parameters()) == m.num_parameters()
    x = rng.standard_normal((3, 1, 28, 28)).astype(np.float32)
    t, y = np.array([0, 500, 999]), np.array([2, 10, 7])
    d = rng.standard_normal(x.shape).astype(np.float32)
    m.zero_grad()
    out = m.forward(x, t, y)
    dx = m.backward(d)
    xt = torch.from_numpy(x).requires_grad_(True)
    ot = tm(xt, torch.from_numpy(t), torch.from_numpy(y))
    ot.backward(torch.from_numpy(d))
    assert rel_error(out, ot.detach().numpy()) < 1e-5
    assert rel_error(dx, xt.grad.numpy()) < 1e-5
    for name, p in tm.named_parameters():
        if name.endswith("k.bias"):
            continue                                     # exactly zero in exact arithmetic
        assert rel_error(m.grads[name], p.grad.numpy()) < 1e-4, name
