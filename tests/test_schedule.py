"""Noise schedules (article 3.1, 4.1, 5.2; Nichol & Dhariwal eq. 17) and their derived quantities."""
import math

import numpy as np
import pytest

from minidiff.schedule import NoiseSchedule, make_beta_schedule


def test_linear_defaults_match_article_5_2():
    s = NoiseSchedule()
    assert s.num_train_timesteps == 1000 and s.betas.dtype == np.float64
    assert s.betas[0] == pytest.approx(1e-4) and s.betas[-1] == pytest.approx(0.02)
    assert np.allclose(np.diff(s.betas), (0.02 - 1e-4) / 999)


def test_alphas_cumprod_is_product_up_to_t():
    s = NoiseSchedule()
    for t in (0, 1, 499, 999):  # index t is the paper's t + 1
        assert s.alphas_cumprod[t] == pytest.approx(math.prod(1 - b for b in s.betas[: t + 1]), rel=1e-12)
    assert s.alphas_cumprod_prev[0] == 1.0
    assert np.array_equal(s.alphas_cumprod_prev[1:], s.alphas_cumprod[:-1])


def test_article_bar_alphas_is_alpha_bar_prev():
    """Article section 5.2 computes `bar_alphas = alphas_prod / alphas`: that is alpha-bar_{t-1}, not alpha-bar_t.

    Using it in q_sample under-noises x_t by one step; the variance of x_t at the first step even comes out 0."""
    s = NoiseSchedule()
    article_bar_alphas = np.cumprod(s.alphas) / s.alphas
    assert np.allclose(article_bar_alphas, s.alphas_cumprod_prev, rtol=1e-12)
    assert not np.allclose(article_bar_alphas, s.alphas_cumprod, rtol=1e-6)
    # At the paper's t = 1, q(x_1 | x_0) must have variance beta_1, but the article's formula gives 0.
    assert 1 - s.alphas_cumprod[0] == pytest.approx(s.betas[0])
    assert 1 - article_bar_alphas[0] == pytest.approx(0.0, abs=1e-15)
    # And sampled x_t really has the variance 1 - alpha-bar_t (not 1 - the article's value).
    from minidiff.diffusion import q_sample
    rng = np.random.default_rng(0)
    t = 0
    x0 = np.zeros((200_000, 1, 1, 1))
    xt = q_sample(s, x0, t, rng.standard_normal(x0.shape))
    assert xt.var() == pytest.approx(1 - s.alphas_cumprod[t], rel=0.02)


def test_article_4_1_example_reaches_pure_noise_without_nans():
    s = NoiseSchedule(num_train_timesteps=10, beta_schedule="t_over_T")
    assert np.allclose(s.betas, np.arange(1, 11) / 10) and s.betas[-1] == 1.0
    assert s.alphas_cumprod[-1] == 0.0 and s.sqrt_one_minus_alphas_cumprod[-1] == 1.0
    for name, value in vars(s).items():
        if isinstance(value, np.ndarray):
            assert np.all(np.isfinite(value)), name
    # x_0 cannot be recovered from pure noise: a clear error, not inf/NaN.
    with pytest.raises(ValueError, match="undefined at timestep index 9"):
        s.sqrt_recip_alphas_cumprod
    with pytest.raises(ValueError, match="undefined"):
        s.sqrt_recip_alphas


def test_cosine_schedule():
    s = NoiseSchedule(beta_schedule="cosine")
    assert s.betas.max() <= 0.999 and s.betas[-1] == pytest.approx(0.999)
    t = np.arange(1, 1000)
    f = np.cos((t / 1000 + 0.008) / 1.008 * np.pi / 2) ** 2 / np.cos(0.008 / 1.008 * np.pi / 2) ** 2
    assert np.allclose(s.alphas_cumprod[:-1], f, rtol=1e-9)  # unclipped part follows alpha-bar(t) = f(t)/f(0)
    assert np.all(np.isfinite(s.sqrt_recip_alphas_cumprod))


def test_posterior_quantities_at_the_ends():
    s = NoiseSchedule()
    assert s.posterior_variance[0] == 0.0  # beta-tilde_1 = 0: x_0 is known given x_1 and x_0
    assert s.posterior_log_variance_clipped[0] == s.posterior_log_variance_clipped[1]
    assert s.posterior_mean_coef1[0] == pytest.approx(1.0) and s.posterior_mean_coef2[0] == 0.0
    t = 500
    assert s.posterior_variance[t] == pytest.approx(
        s.betas[t] * (1 - s.alphas_cumprod[t - 1]) / (1 - s.alphas_cumprod[t]))


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_train_timesteps=0), "num_train_timesteps"),
    (dict(num_train_timesteps=2.5), "num_train_timesteps"),
    (dict(beta_start=0.0), r"\(0, 1\]"),
    (dict(beta_end=1.5), r"\(0, 1\]"),
    (dict(beta_start=0.03, beta_end=0.02), "must not exceed"),
    (dict(beta_schedule="quadratic"), "unknown beta_schedule 'quadratic'"),
])
def test_invalid_settings_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NoiseSchedule(**kwargs)


def test_custom_betas_validated():
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        NoiseSchedule(betas=[0.1, 0.0, 0.2])
    assert NoiseSchedule(betas=[0.1, 0.2]).config["beta_schedule"] == "custom"


def test_make_beta_schedule_lengths():
    for name in ("linear", "cosine", "t_over_T"):
        assert make_beta_schedule(name, 7).shape == (7,)
