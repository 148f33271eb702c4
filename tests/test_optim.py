"""Adam/AdamW against the formula and PyTorch, EMA decay warm-up, gradient clipping, learning-rate warm-up,
state dicts through np.savez, and a few Adam steps on a fixed batch reducing the denoising loss."""
import io
import math

import numpy as np
import pytest

from minidiff.optim import EMA, Adam, clip_grad_norm, warmup_lr
from minidiff.unet import UNet, UNetConfig


def _problem(seed=0):
    rng = np.random.default_rng(seed)
    params = {"a": rng.standard_normal((3, 4)).astype(np.float32), "b": rng.standard_normal(5).astype(np.float32)}
    grads = {k: np.zeros_like(p) for k, p in params.items()}
    return rng, params, grads


def test_adam_first_step_and_formula():
    rng, params, grads = _problem()
    p0 = {k: p.copy() for k, p in params.items()}
    opt = Adam(params, grads, lr=0.1, betas=(0.9, 0.99), eps=1e-8)
    for k in grads:
        grads[k][...] = rng.standard_normal(grads[k].shape)
    opt.step()
    # after bias correction the first step is lr * g / (|g| + eps) ~ lr * sign(g)
    for k in params:
        np.testing.assert_allclose(params[k], p0[k] - 0.1 * np.sign(grads[k]), atol=1e-6)
        assert params[k].dtype == np.float32
    # a second step against the textbook formula, in float64
    g1 = {k: g.astype(np.float64) for k, g in grads.items()}
    for k in grads:
        grads[k][...] = rng.standard_normal(grads[k].shape)
    before = {k: p.astype(np.float64) for k, p in params.items()}
    opt.step(lr=0.05)
    for k in params:
        g2 = grads[k].astype(np.float64)
        m = 0.9 * (0.1 * g1[k]) + 0.1 * g2
        v = 0.99 * (0.01 * g1[k] ** 2) + 0.01 * g2 ** 2
        want = before[k] - 0.05 * (m / (1 - 0.9 ** 2)) / (np.sqrt(v / (1 - 0.99 ** 2)) + 1e-8)
        np.testing.assert_allclose(params[k], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_adam_matches_torch(weight_decay):
    torch = pytest.importorskip("torch")
    rng, params, grads = _problem(1)
    tparams = [torch.nn.Parameter(torch.from_numpy(p.copy())) for p in params.values()]
    topt = (torch.optim.AdamW(tparams, lr=1e-2, weight_decay=weight_decay) if weight_decay
            else torch.optim.Adam(tparams, lr=1e-2))
    opt = Adam(params, grads, lr=1e-2, weight_decay=weight_decay)
    for _ in range(5):
        for (k, g), tp in zip(grads.items(), tparams):
            g[...] = rng.standard_normal(g.shape)
            tp.grad = torch.from_numpy(g.copy())
        opt.step()
        topt.step()
    for p, tp in zip(params.values(), tparams):
        np.testing.assert_allclose(p, tp.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_ema_decay_warmup_and_update():
    _, params, _ = _problem()
    ema = EMA(params, max_decay=0.999)
    assert ema.decay() == pytest.approx(0.1)                 # (1 + 0) / (10 + 0)
    e0 = ema.params["a"].copy()
    params["a"] += 1.0
    ema.update(params)                                    # decay 1/10
    np.testing.assert_allclose(ema.params["a"], 0.1 * e0 + 0.9 * params["a"], rtol=1e-6)
    assert ema.decay() == pytest.approx(2 / 11)
    ema.num_updates = 100_000
    assert ema.decay() == 0.999                           # capped at max_decay
    assert ema.params["a"] is not params["a"]


def test_clip_grad_norm():
    grads = {"a": np.full((2, 2), 3.0, np.float32), "b": np.array([4.0, 0.0], np.float32)}
    total = clip_grad_norm(grads, 100.0)
    assert total == pytest.approx(math.sqrt(4 * 9 + 16)) and grads["a"][0, 0] == 3.0   # below: untouched
    total = clip_grad_norm(grads, 1.0)
    assert total == pytest.approx(math.sqrt(52))
    new = math.sqrt(sum(float((g.astype(np.float64) ** 2).sum()) for g in grads.values()))
    assert new == pytest.approx(1.0, rel=1e-5) and grads["a"].dtype == np.float32


def test_warmup_lr():
    assert warmup_lr(0, 1e-3, 100) == pytest.approx(1e-5)
    assert warmup_lr(49, 1e-3, 100) == pytest.approx(5e-4)
    assert warmup_lr(99, 1e-3, 100) == warmup_lr(5000, 1e-3, 100) == 1e-3
    assert warmup_lr(0, 1e-3, 0) == 1e-3


def test_state_dicts_round_trip_through_npz():
    rng, params, grads = _problem(2)
    opt, ema = Adam(params, grads, lr=1e-2), EMA(params)
    for _ in range(3):
        for g in grads.values():
            g[...] = rng.standard_normal(g.shape)
        opt.step()
        ema.update(params)
    buf = io.BytesIO()
    np.savez(buf, **{f"opt.{k}": v for k, v in opt.state_dict().items()},
             **{f"ema.{k}": v for k, v in ema.state_dict().items()})
    buf.seek(0)
    z = np.load(buf, allow_pickle=False)
    params2 = {k: p.copy() for k, p in params.items()}
    grads2 = {k: g.copy() for k, g in grads.items()}
    opt2, ema2 = Adam(params2, grads2, lr=1e-2), EMA(params2)
    opt2.load_state_dict({k[4:]: z[k] for k in z.files if k.startswith("opt.")})
    ema2.load_state_dict({k[4:]: z[k] for k in z.files if k.startswith("ema.")})
    assert opt2.step_count == 3 and ema2.num_updates == 3
    opt.step()
    opt2.step()
    ema.update(params)
    ema2.update(params2)
    for k in params:
        assert np.array_equal(params[k], params2[k]) and np.array_equal(ema.params[k], ema2.params[k])
    with pytest.raises(ValueError, match="shape"):
        bad = opt.state_dict()
        bad["m.a"] = np.zeros((4, 3), np.float32)
        opt2.load_state_dict(bad)
    with pytest.raises(ValueError, match="missing"):
        ema2.load_state_dict({"num_updates": 1})


def test_adam_steps_reduce_denoising_loss():
    """Eight Adam steps on one fixed batch of a small U-Net lower the DDPM loss ||eps - eps_theta(x_t, t)||^2."""
    rng = np.random.default_rng(0)
    cfg = UNetConfig(resolution=8, base_channels=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,))
    model = UNet(cfg, seed=0)
    x0 = np.where(rng.random((16, 1, 8, 8)) > 0.5, 1.0, -1.0).astype(np.float32)
    eps = rng.standard_normal(x0.shape).astype(np.float32)
    t = rng.integers(0, 1000, 16)
    alphas_cumprod = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
    ab = alphas_cumprod[t].astype(np.float32)[:, None, None, None]
    x_t = np.sqrt(ab) * x0 + np.sqrt(1 - ab) * eps        # q_sample, DDPM eq. 4
    opt = Adam(model.params, model.grads, lr=2e-3)
    losses = []
    for _ in range(8):
        model.zero_grad()
        out = model.forward(x_t, t)
        losses.append(float(np.mean((out - eps) ** 2)))
        model.backward(2.0 * (out - eps) / out.size)
        opt.step()
    assert losses[-1] < 0.9 * losses[0], losses


def test_cosine_learning_rate():
    from minidiff.optim import learning_rate
    assert learning_rate(0, 1e-3, 100, 1100, "cosine") == warmup_lr(0, 1e-3, 100)          # warm-up first
    assert learning_rate(100, 1e-3, 100, 1100, "cosine") == pytest.approx(1e-3)             # then the full rate,
    assert learning_rate(600, 1e-3, 100, 1100, "cosine") == pytest.approx(0.5e-3)           # half way: half,
    assert learning_rate(1100, 1e-3, 100, 1100, "cosine") == pytest.approx(0.0, abs=1e-18)  # 0 at the end
    assert learning_rate(600, 1e-3, 100, 1100, "constant") == 1e-3
    with pytest.raises(ValueError, match="lr schedule"):
        learning_rate(5, 1e-3, 100, 1100, "linear")
