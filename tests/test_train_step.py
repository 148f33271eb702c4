"""The training objective: loss_simple's value against DDPM eq. 14 computed by hand, its gradient against float64
finite differences, for eps and v targets, uniform and Min-SNR-gamma weights."""
import math

import numpy as np
import pytest

from minidiff.schedule import NoiseSchedule
from minidiff.train_step import loss_simple, loss_weights
from minidiff.unet import UNetConfig

SCHED = NoiseSchedule(100)


class Affine:
    """A stand-in network whose output is known: out = c * x_t + o, with an output offset o (B, C, H, W) that the
    finite differences perturb (d loss / d out = d loss / d o)."""

    def __init__(self, shape, prediction_type, seed=0):
        self.config = UNetConfig(prediction_type=prediction_type)
        self.o = np.random.default_rng(seed).standard_normal(shape)
        self.c = 0.3

    def forward(self, x_t, t, y=None, rng=None):
        return self.c * x_t + self.o


def _batch(shape=(3, 1, 4, 4), seed=1):
    rng = np.random.default_rng(seed)
    return rng.uniform(-1, 1, shape), np.array([0, 41, 99]), rng.standard_normal(shape)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("weighting", ["uniform", "min_snr"])
def test_loss_simple_value_and_gradient(prediction, weighting):
    x0, t, eps = _batch()
    model = Affine(x0.shape, prediction)
    w = loss_weights(SCHED, prediction, weighting, snr_gamma=5.0)
    weights = None if weighting == "uniform" else w
    loss, dout = loss_simple(model, SCHED, x0, t, eps, weights=weights)
    # by hand: x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps (DDPM eq. 4); the target eps, or v = sqrt(ab) eps - sqrt(1-ab) x0
    ab = SCHED.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    x_t = np.sqrt(ab) * x0 + np.sqrt(1 - ab) * eps
    target = eps if prediction == "epsilon" else np.sqrt(ab) * eps - np.sqrt(1 - ab) * x0
    err = model.c * x_t + model.o - target
    by_hand = np.mean(w[t].reshape(-1, 1, 1, 1) * err ** 2)          # w = 1: DDPM eq. 14's mean squared error
    assert float(loss) == pytest.approx(by_hand, rel=1e-12)
    # d loss / d out by centred differences on the network's output
    h, flat, numeric = 1e-6, model.o.reshape(-1), []
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + h
        up = float(loss_simple(model, SCHED, x0, t, eps, weights=weights)[0])
        flat[i] = old - h
        down = float(loss_simple(model, SCHED, x0, t, eps, weights=weights)[0])
        flat[i] = old
        numeric.append((up - down) / (2 * h))
    np.testing.assert_allclose(dout.reshape(-1), numeric, rtol=1e-6, atol=1e-10)


def test_min_snr_weights_change_the_loss_as_the_formula_says():
    """Min-SNR-gamma w_t = min(SNR_t, gamma) / SNR_t (eps target): the loss of each image is its uniform loss times
    w_t, and the nearly clean timesteps (SNR_t > gamma) are the ones weighted down."""
    x0, t, eps = _batch()
    model = Affine(x0.shape, "epsilon")
    snr = SCHED.alphas_cumprod / (1 - SCHED.alphas_cumprod)
    w = loss_weights(SCHED, "epsilon", "min_snr", snr_gamma=5.0)
    np.testing.assert_allclose(w, np.minimum(snr, 5.0) / snr, rtol=1e-12)
    assert w[0] < 1 and w[-1] == 1.0 and math.isclose(w[0], 5.0 / snr[0])
    per_image = []
    for i in range(3):
        sub = slice(i, i + 1)
        m = Affine(x0[sub].shape, "epsilon")
        m.o = model.o[sub]
        per_image.append(float(loss_simple(m, SCHED, x0[sub], t[sub], eps[sub])[0]))
    weighted = float(loss_simple(model, SCHED, x0, t, eps, weights=w)[0])
    assert weighted == pytest.approx(np.mean(w[t] * np.array(per_image)), rel=1e-12)
