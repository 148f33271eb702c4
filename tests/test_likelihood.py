"""The variational bound (DDPM eq. 5, 13): Gaussian KL, discretised decoder, and the bound in bits per dimension."""
import math

import numpy as np
import pytest

from minidiff.evaluation.likelihood import (approx_standard_normal_cdf, bpd_exact, bpd_monte_carlo,
                                 discretized_gaussian_log_likelihood, normal_kl, prior_bpd, vb_term_bpd)
from minidiff.schedule import NoiseSchedule

LEVELS = np.arange(256) / 127.5 - 1.0  # the 256 pixel values in model range


@pytest.mark.parametrize("m1, v1, m2, v2", [(0.0, 1.0, 0.0, 1.0), (0.3, 0.5, -0.2, 2.0), (1.0, 0.01, 0.9, 0.02)])
def test_normal_kl_matches_numerical_integration(m1, v1, m2, v2):
    x = np.linspace(m1 - 12 * math.sqrt(v1), m1 + 12 * math.sqrt(v1), 200_001)
    p = np.exp(-(x - m1) ** 2 / (2 * v1)) / math.sqrt(2 * math.pi * v1)
    log_ratio = (-(x - m1) ** 2 / (2 * v1) - 0.5 * math.log(v1)) - (-(x - m2) ** 2 / (2 * v2) - 0.5 * math.log(v2))
    numeric = np.sum(p * log_ratio) * (x[1] - x[0])
    assert normal_kl(m1, math.log(v1), m2, math.log(v2)) == pytest.approx(numeric, abs=1e-7)


def test_approx_cdf_close_to_erf():
    x = np.linspace(-6, 6, 2001)
    exact = 0.5 * (1 + np.array([math.erf(v / math.sqrt(2)) for v in x]))
    assert np.max(np.abs(approx_standard_normal_cdf(x) - exact)) < 3.5e-4


@pytest.mark.parametrize("mean, log_scale", [(0.0, math.log(0.05)), (0.9, math.log(0.3)), (-0.99, math.log(0.01))])
def test_discretized_likelihood_is_a_distribution_over_256_levels(mean, log_scale):
    logp = discretized_gaussian_log_likelihood(LEVELS, np.full(256, mean), np.full(256, log_scale))
    assert np.exp(logp).sum() == pytest.approx(1.0, abs=1e-6)
    # each interior bin is Phi(upper) - Phi(lower) of the Gaussian (up to the tanh approximation of Phi)
    sigma = math.exp(log_scale)
    phi = lambda v: 0.5 * (1 + math.erf(v / math.sqrt(2)))  # noqa: E731
    k = 128
    exact = phi((LEVELS[k] + 1 / 255 - mean) / sigma) - phi((LEVELS[k] - 1 / 255 - mean) / sigma)
    assert math.exp(logp[k]) == pytest.approx(exact, abs=7e-4)


@pytest.mark.parametrize("batch_t", [1, 16])
def test_bound_of_the_true_noise_model_by_hand(batch_t):
    """A model that predicts the true noise recovers x_0 exactly, so every KL term L_{t-1} (t >= 2) is 0
    with sigma_t^2 = beta-tilde_t; the decoder puts the mean on the true level, so L_0 = -log(2 Phi(d) - 1) with
    d = (1/255) / sigma_1 inside and -log Phi(d) at the edges; and L_T is the closed-form Gaussian KL."""
    s = NoiseSchedule(num_train_timesteps=100)
    rng = np.random.default_rng(0)
    x0 = rng.choice(LEVELS[1:-1], size=(3, 1, 4, 4))
    x0[0, 0, 0, 0], x0[1, 0, 0, 0] = -1.0, 1.0  # edge bins

    def oracle(x_t, t):  # batch_t timesteps per call: the images repeat, timestep-major
        ab = s.alphas_cumprod[t].reshape(-1, 1, 1, 1)
        return (x_t - np.sqrt(ab) * np.tile(x0, (len(t) // len(x0), 1, 1, 1))) / np.sqrt(1 - ab)

    terms = bpd_exact(s, oracle, x0, batch_t=batch_t)["terms"]
    assert np.max(np.abs(terms[:, 1:])) < 1e-9
    sigma = math.sqrt(s.posterior_variance[1])  # the decoder's clipped log-variance at t = 1
    d = (1 / 255) / sigma
    inside = -math.log(math.erf(d / math.sqrt(2)))
    edge = -math.log(0.5 * (1 + math.erf(d / math.sqrt(2))))
    n_edge = np.array([1, 1, 0])
    expected = ((16 - n_edge) * inside + n_edge * edge) / 16 / math.log(2)
    assert terms[:, 0] == pytest.approx(expected, rel=2e-3)
    ab_T = s.alphas_cumprod[-1]
    kl_T = 0.5 * (-1 - math.log(1 - ab_T) + (1 - ab_T) + ab_T * x0 ** 2)
    assert prior_bpd(s, x0) == pytest.approx(kl_T.reshape(3, -1).mean(1) / math.log(2), rel=1e-9)


def test_exact_and_monte_carlo_bounds_agree():
    s = NoiseSchedule(num_train_timesteps=10, beta_start=1e-3, beta_end=0.3)
    rng = np.random.default_rng(1)
    x0 = rng.choice(LEVELS, size=(4, 1, 3, 3))

    def imperfect(x_t, t):  # a fixed, wrong denoiser: the bound is then well away from its minimum
        return 0.8 * x_t - 0.1

    exact = np.mean([bpd_exact(s, imperfect, x0, seed=k)["total"].mean() for k in range(40)])
    mc, se = bpd_monte_carlo(s, imperfect, x0, num_samples=2000, seed=2)
    assert se > 0 and abs(mc - exact) < 4 * se + 0.01 * abs(exact)
    with pytest.raises(ValueError, match="variance_type"):
        vb_term_bpd(s, imperfect, x0, np.zeros(4, int), x0, variance_type="learned")
