"""The reference sampling steps (minidiff/step.py) against closed-form results of DDPM and DDIM."""
import math

import numpy as np
import pytest

from minidiff.schedule import NoiseSchedule
from minidiff.step import (ddim_coefficients, ddim_step, ddpm_coefficients, ddpm_step, dpmpp_2m_coefficients,
                           dpmpp_2m_step)

T = 1000
SCHEDULE = NoiseSchedule(T)


def _noisy(shape=(4, 1, 8, 8), t=500, dtype=np.float64, seed=0):
    """(x0, eps, x_t) with x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps (DDPM eq. 4), x0 in [-1, 1]."""
    rng = np.random.default_rng(seed)
    x0 = rng.uniform(-1, 1, shape).astype(dtype)
    eps = rng.standard_normal(shape).astype(dtype)
    ab = SCHEDULE.alphas_cumprod[t]
    return x0, eps, (math.sqrt(ab) * x0 + math.sqrt(1 - ab) * eps).astype(dtype)


@pytest.mark.parametrize("t", [0, 1, 500, T - 1])
def test_ddpm_eq7_with_eq15_equals_eq11_without_clipping(t):
    x0, eps, x_t = _noisy(t=t)
    mean = ddpm_step(SCHEDULE, x_t, eps, t, z=np.zeros_like(x_t), clip_sample=False)
    # DDPM eq. 11: mu_theta = (x_t - beta_t / sqrt(1 - ab_t) eps) / sqrt(alpha_t)
    beta, ab = SCHEDULE.betas[t], SCHEDULE.alphas_cumprod[t]
    eq11 = (x_t - beta / math.sqrt(1 - ab) * eps) / math.sqrt(SCHEDULE.alphas[t])
    np.testing.assert_allclose(mean, eq11, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("t", [0, 500, T - 1])
def test_predicted_x0_inverts_the_forward_process(t):
    # eq. 15: with the true noise, the predicted x_0 is the x_0 that made x_t.
    x0, eps, x_t = _noisy(t=t)
    _, x0_hat = ddpm_step(SCHEDULE, x_t, eps, t, z=np.zeros_like(x_t), clip_sample=False, return_x0=True)
    np.testing.assert_allclose(x0_hat, x0, rtol=1e-7, atol=1e-7 * math.sqrt(1 / SCHEDULE.alphas_cumprod[t]))
    _, x0_d = ddim_step(SCHEDULE, x_t, eps, t, -1, 0.0, None, clip_sample=False, return_x0=True)
    np.testing.assert_array_equal(x0_d, x0_hat)


def test_ddpm_noise_scale_and_last_step():
    x0, eps, x_t = _noisy()
    z = np.random.default_rng(1).standard_normal(x_t.shape)
    t = 500
    for vt, var in [("fixed_small", SCHEDULE.posterior_variance[t]), ("fixed_large", SCHEDULE.betas[t])]:
        noisy = ddpm_step(SCHEDULE, x_t, eps, t, z, variance_type=vt)
        mean = ddpm_step(SCHEDULE, x_t, eps, t, np.zeros_like(z), variance_type=vt)
        np.testing.assert_allclose(noisy - mean, math.sqrt(var) * z, rtol=1e-9, atol=1e-12)
    # t = 0 (the paper's t = 1): the mean only, z unused and may be None
    for vt in ("fixed_small", "fixed_large"):
        np.testing.assert_array_equal(ddpm_step(SCHEDULE, x_t, eps, 0, z, variance_type=vt),
                                      ddpm_step(SCHEDULE, x_t, eps, 0, None, variance_type=vt))


def test_clipping_bounds_x0():
    _, eps, x_t = _noisy(t=900)
    eps = 3 * eps  # a bad prediction pushes x0 out of [-1, 1]
    _, x0 = ddpm_step(SCHEDULE, x_t, eps, 900, np.zeros_like(x_t), return_x0=True)
    _, raw = ddpm_step(SCHEDULE, x_t, eps, 900, np.zeros_like(x_t), clip_sample=False, return_x0=True)
    assert np.abs(raw).max() > 1 and np.abs(x0).max() <= 1
    np.testing.assert_array_equal(x0, np.clip(raw, -1, 1))


def test_guided_ddim_rederives_eps_from_the_clipped_x0():
    # With guidance, eps_u + w (eps_c - eps_u) grows with w and x0 gets clipped; the direction term then uses
    # the eps that takes the clipped x0 to x_t: eps' = (x_t - sqrt(ab_t) x0c) / sqrt(1 - ab_t).
    # Without guidance, or with w <= 1 (an interpolation), the step keeps the network's eps.
    _, eps, x_t = _noisy(t=900)
    eps_u, eps_c, w = eps, 2 * eps, 3.0
    guided = eps_u + w * (eps_c - eps_u)
    ab_t, ab_prev = SCHEDULE.alphas_cumprod[900], SCHEDULE.alphas_cumprod[800]
    got, x0c = ddim_step(SCHEDULE, x_t, eps_c, 900, 800, 0.0, None, eps_uncond=eps_u, guidance=w, return_x0=True)
    _, raw = ddim_step(SCHEDULE, x_t, guided, 900, 800, 0.0, None, clip_sample=False, return_x0=True)
    assert (np.abs(raw) > 1).mean() > 0.3 and np.array_equal(x0c, np.clip(raw, -1, 1))
    eps_rederived = (x_t - math.sqrt(ab_t) * x0c) / math.sqrt(1 - ab_t)
    np.testing.assert_allclose(got, math.sqrt(ab_prev) * x0c + math.sqrt(1 - ab_prev) * eps_rederived,
                               rtol=1e-9, atol=1e-9)
    kept = ddim_step(SCHEDULE, x_t, guided, 900, 800, 0.0, None)  # the same eps, given as unguided
    np.testing.assert_allclose(kept, math.sqrt(ab_prev) * x0c + math.sqrt(1 - ab_prev) * guided, rtol=1e-9, atol=1e-9)
    assert np.abs(kept - got).max() > 0.1
    for v in (0.0, 0.5, 1.0):
        np.testing.assert_allclose(ddim_step(SCHEDULE, x_t, eps_c, 900, 800, 0.0, None, eps_uncond=eps_u, guidance=v),
                                   ddim_step(SCHEDULE, x_t, eps_u + v * (eps_c - eps_u), 900, 800, 0.0, None),
                                   rtol=1e-12)
    # unclipped, re-deriving changes nothing: guided and unguided steps agree
    np.testing.assert_allclose(ddim_step(SCHEDULE, x_t, eps_c, 900, 800, 0.0, None, clip_sample=False,
                                         eps_uncond=eps_u, guidance=w),
                               ddim_step(SCHEDULE, x_t, guided, 900, 800, 0.0, None, clip_sample=False), rtol=1e-12)


@pytest.mark.parametrize("t", [1, 500, T - 1])
def test_ddim_eta1_one_step_is_ddpm_posterior(t):
    # DDIM eq. 16 with eta = 1 and t_prev = t - 1 gives beta-tilde_t, and (unclipped) the same mean as DDPM eq. 7.
    c = ddim_coefficients(SCHEDULE, t, t - 1, 1.0)
    assert c.sigma == pytest.approx(math.sqrt(SCHEDULE.posterior_variance[t]), rel=1e-12)
    x0, eps, x_t = _noisy(t=t)
    z = np.random.default_rng(2).standard_normal(x_t.shape)
    np.testing.assert_allclose(ddim_step(SCHEDULE, x_t, eps, t, t - 1, 1.0, z, clip_sample=False),
                               ddpm_step(SCHEDULE, x_t, eps, t, z, clip_sample=False), rtol=1e-9, atol=1e-9)


def test_ddim_eta0_is_deterministic_and_lands_on_x0_at_the_end():
    x0, eps, x_t = _noisy(t=700)
    a = ddim_step(SCHEDULE, x_t, eps, 700, 600, 0.0, None)
    c = ddim_coefficients(SCHEDULE, 700, 600, 0.0)
    assert c.sigma == 0.0
    # with the true eps, DDIM eta = 0 moves x_t to the x_{t_prev} of the same x0 and eps (DDIM eq. 12)
    ab = SCHEDULE.alphas_cumprod[600]
    np.testing.assert_allclose(a, math.sqrt(ab) * x0 + math.sqrt(1 - ab) * eps, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(ddim_step(SCHEDULE, x_t, eps, 700, -1, 0.7, None), x0, rtol=1e-9, atol=1e-9)


def test_guidance_formula():
    _, eps_c, x_t = _noisy()
    eps_u = np.random.default_rng(3).standard_normal(x_t.shape)
    z = np.zeros_like(x_t)
    step = lambda **kw: ddpm_step(SCHEDULE, x_t, kw.pop("eps"), 500, z, **kw)  # noqa: E731
    np.testing.assert_allclose(step(eps=eps_c, eps_uncond=eps_u, guidance=1.0), step(eps=eps_c), rtol=1e-12,
                               atol=1e-12)  # w = 1: the conditional model (up to rounding of eps_u + (eps_c - eps_u))
    np.testing.assert_array_equal(step(eps=eps_c, eps_uncond=eps_u, guidance=0.0), step(eps=eps_u))
    np.testing.assert_array_equal(step(eps=eps_c, eps_uncond=eps_u, guidance=4.0),
                                  step(eps=eps_u + 4.0 * (eps_c - eps_u)))
    from minidiff.step import _guided_eps
    np.testing.assert_array_equal(_guided_eps(eps_c, eps_u, 4.0), eps_u + 4.0 * (eps_c - eps_u))
    assert _guided_eps(eps_c, None, 4.0) is eps_c                 # no second prediction: no guidance


@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_coefficients_reproduce_the_reference(kind):
    x0, eps, x_t = _noisy(t=400)
    z = np.random.default_rng(4).standard_normal(x_t.shape)
    if kind == "ddpm":
        c = ddpm_coefficients(SCHEDULE, 400, "fixed_large")
        ref, x0_ref = ddpm_step(SCHEDULE, x_t, eps, 400, z, "fixed_large", clip_sample=False, return_x0=True)
    else:
        c = ddim_coefficients(SCHEDULE, 400, 350, 0.5)
        ref, x0_ref = ddim_step(SCHEDULE, x_t, eps, 400, 350, 0.5, z, clip_sample=False, return_x0=True)
    assert all(type(v) is float for v in c)
    np.testing.assert_allclose(c.a * x_t - c.b * eps, x0_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(c.c_x0 * x0_ref + c.c_xt * x_t + c.c_eps * eps + c.sigma * z, ref, rtol=1e-12,
                               atol=1e-12)


def test_float32_stays_float32():
    _, eps, x_t = _noisy(dtype=np.float32)
    z = np.zeros_like(x_t)
    assert ddpm_step(SCHEDULE, x_t, eps, 500, z).dtype == np.float32
    assert ddim_step(SCHEDULE, x_t, eps, 500, 400, 1.0, z).dtype == np.float32


def test_bad_arguments_raise_value_error():
    _, eps, x_t = _noisy()
    z = np.zeros_like(x_t)
    for t in (-1, T, 1.5, True, None):
        with pytest.raises(ValueError, match="t must be"):
            ddpm_step(SCHEDULE, x_t, eps, t, z)
    with pytest.raises(ValueError, match="variance_type"):
        ddpm_step(SCHEDULE, x_t, eps, 5, z, variance_type="learned")
    with pytest.raises(ValueError, match="variance_type"):
        ddpm_coefficients(SCHEDULE, 5, "fixed")
    for eta in (-0.1, float("nan"), float("inf"), "1"):
        with pytest.raises(ValueError, match="eta"):
            ddim_step(SCHEDULE, x_t, eps, 500, 400, eta, z)
    with pytest.raises(ValueError, match="eta .* too large"):
        ddim_coefficients(SCHEDULE, 500, 400, 50.0)
    for t_prev in (500, 600, -2):
        with pytest.raises(ValueError, match="t_prev"):
            ddim_step(SCHEDULE, x_t, eps, 500, t_prev, 0.0, z)
    with pytest.raises(ValueError, match="z .* required"):
        ddpm_step(SCHEDULE, x_t, eps, 5, None)


# --------------------------------------------------------------------------- DPM-Solver++(2M)
@pytest.mark.parametrize("t, t_prev", [(999, 899), (500, 450), (20, 0), (20, -1), (0, -1)])
def test_dpmpp_first_order_is_ddim_eta0_without_clipping(t, t_prev):
    # DPM-Solver++(1): sigma_prev / sigma_t x_t + alpha_prev (1 - e^{-h}) x0 is DDIM eq. 12 with eta = 0 (substitute
    # e^{-h} = alpha_t sigma_prev / (sigma_t alpha_prev)); guided or not, as long as nothing is clipped.
    x0, eps, x_t = _noisy(t=t)
    eps_u = np.random.default_rng(5).standard_normal(x_t.shape)
    for kw in (dict(), dict(eps_uncond=eps_u, guidance=3.0)):
        ddim = ddim_step(SCHEDULE, x_t, eps, t, t_prev, 0.0, None, clip_sample=False, **kw)
        np.testing.assert_allclose(dpmpp_2m_step(SCHEDULE, x_t, eps, t, t_prev, clip_sample=False, **kw), ddim,
                                   rtol=1e-10, atol=1e-10)
    if t_prev <= 0:  # the last two steps stay first order when a previous x_0 is given (lower_order_final)
        x0_prev = np.random.default_rng(6).uniform(-1, 1, x_t.shape)
        np.testing.assert_allclose(dpmpp_2m_step(SCHEDULE, x_t, eps, t, t_prev, x0_prev, t + 37, clip_sample=False),
                                   ddim_step(SCHEDULE, x_t, eps, t, t_prev, 0.0, None, clip_sample=False),
                                   rtol=1e-10, atol=1e-10)


def test_dpmpp_2m_second_order_update_by_hand():
    # Algorithm 2 written out: lambda = log(alpha / sigma), h = lambda_prev - lambda_t, r = h_last / h,
    # D = (1 + 1/(2r)) x0 - 1/(2r) x0_prev, x_prev = sigma_prev / sigma_t x_t - alpha_prev (e^{-h} - 1) D.
    t_last, t, t_prev = 700, 600, 450
    _, eps, x_t = _noisy(t=t)
    x0_prev = np.random.default_rng(7).uniform(-1, 1, x_t.shape)
    ab = SCHEDULE.alphas_cumprod
    lam = {k: 0.5 * math.log(ab[k] / (1 - ab[k])) for k in (t_last, t, t_prev)}
    h, r = lam[t_prev] - lam[t], (lam[t] - lam[t_last]) / (lam[t_prev] - lam[t])
    x0 = (x_t - math.sqrt(1 - ab[t]) * eps) / math.sqrt(ab[t])
    D = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * x0_prev
    expected = math.sqrt((1 - ab[t_prev]) / (1 - ab[t])) * x_t - math.sqrt(ab[t_prev]) * (math.exp(-h) - 1) * D
    got, got_x0 = dpmpp_2m_step(SCHEDULE, x_t, eps, t, t_prev, x0_prev, t_last, clip_sample=False, return_x0=True)
    np.testing.assert_allclose(got_x0, x0, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-10)
    assert np.abs(got - ddim_step(SCHEDULE, x_t, eps, t, t_prev, 0.0, None, clip_sample=False)).max() > 1e-2
    # the coefficients the kernel uses expand the same update
    c = dpmpp_2m_coefficients(SCHEDULE, t, t_prev, t_last)
    assert all(type(v) is float for v in c) and c.c_eps == 0.0 and c.sigma == 0.0 and c.c_x0prev < 0
    np.testing.assert_allclose(c.c_x0 * x0 + c.c_x0prev * x0_prev + c.c_xt * x_t, expected, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(c.a * x_t - c.b * eps, x0, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("t_last, t, t_prev", [(None, 999, 899), (999, 899, 799), (300, 200, 100)])
def test_dpmpp_2m_is_exact_for_one_data_point(t_last, t, t_prev):
    # If every prediction is the same x_0 (the data is one point), the ODE's solution is
    # x_{t_prev} = sqrt(ab_prev) x0 + sqrt(1 - ab_prev) eps, and both orders land on it (D = x0).
    x0, eps, x_t = _noisy(t=t)
    got = dpmpp_2m_step(SCHEDULE, x_t, eps, t, t_prev, None if t_last is None else x0, t_last)
    ab = SCHEDULE.alphas_cumprod[t_prev]
    np.testing.assert_allclose(got, math.sqrt(ab) * x0 + math.sqrt(1 - ab) * eps, rtol=1e-9, atol=1e-9)


def test_dpmpp_last_step_to_minus_one_is_x0_and_finite():
    # t_prev = -1: alpha = 1, sigma = 0, lambda = +inf, so h = +inf, e^{-h} = 0: x_{-1} = x0, with no inf or NaN
    # on the way (np.errstate raises on any), whether or not a previous x_0 is passed.
    _, eps, x_t = _noisy(t=30)
    x0_prev = np.random.default_rng(8).uniform(-1, 1, x_t.shape)
    with np.errstate(all="raise"):
        for args in ((None, None), (x0_prev, 60)):
            got, x0 = dpmpp_2m_step(SCHEDULE, x_t, 3 * eps, 30, -1, *args, return_x0=True)
            np.testing.assert_array_equal(got, x0)
            assert np.abs(x0).max() == 1.0  # clipped
    c = dpmpp_2m_coefficients(SCHEDULE, 30, -1, 60)
    assert (c.c_x0, c.c_x0prev, c.c_xt, c.c_eps, c.sigma) == (1.0, 0.0, 0.0, 0.0, 0.0)


def test_dpmpp_clips_x0_and_needs_no_eps_rederived():
    # The update combines the clipped x_0 and x_t only, so guidance w > 1 needs no eps re-derived (c_eps = 0).
    _, eps, x_t = _noisy(t=900)
    eps_u, eps_c, w = eps, 2 * eps, 3.0
    got, x0 = dpmpp_2m_step(SCHEDULE, x_t, eps_c, 900, 800, eps_uncond=eps_u, guidance=w, return_x0=True)
    _, raw = dpmpp_2m_step(SCHEDULE, x_t, eps_u + w * (eps_c - eps_u), 900, 800, clip_sample=False, return_x0=True)
    assert (np.abs(raw) > 1).mean() > 0.3 and np.array_equal(x0, np.clip(raw, -1, 1))
    c = dpmpp_2m_coefficients(SCHEDULE, 900, 800)
    np.testing.assert_allclose(got, c.c_x0 * x0 + c.c_xt * x_t, rtol=1e-12, atol=1e-12)


def test_dpmpp_bad_arguments_raise_value_error():
    _, eps, x_t = _noisy()
    x0_prev = np.zeros_like(x_t)
    for t_prev in (500, 600, -2):
        with pytest.raises(ValueError, match="t_prev"):
            dpmpp_2m_step(SCHEDULE, x_t, eps, 500, t_prev)
    for t_last in (500, 400, T, 2.5):
        with pytest.raises(ValueError, match="t_last"):
            dpmpp_2m_step(SCHEDULE, x_t, eps, 500, 400, x0_prev, t_last)
        with pytest.raises(ValueError, match="t_last"):
            dpmpp_2m_coefficients(SCHEDULE, 500, 400, t_last)
    with pytest.raises(ValueError, match="go together"):
        dpmpp_2m_step(SCHEDULE, x_t, eps, 500, 400, x0_prev)
    with pytest.raises(ValueError, match="go together"):
        dpmpp_2m_step(SCHEDULE, x_t, eps, 500, 400, None, 600)
    with pytest.raises(ValueError, match="x0_prev has shape"):
        dpmpp_2m_step(SCHEDULE, x_t, eps, 500, 400, x0_prev[:1], 600)


def test_article_4_1_schedule_cannot_predict_x0():
    # beta_T = 1 makes alpha-bar_T = 0: the schedule's own error surfaces.
    sched = NoiseSchedule(10, beta_schedule="t_over_T")
    x = np.zeros((2, 3))
    with pytest.raises(ValueError, match="undefined"):
        ddpm_step(sched, x, x, 9, x)
    with pytest.raises(ValueError, match="undefined"):
        ddim_coefficients(sched, 9, 5, 0.0)
    with pytest.raises(ValueError, match="undefined"):
        dpmpp_2m_coefficients(sched, 9, 5)
    with pytest.raises(ValueError, match="undefined"):
        dpmpp_2m_step(sched, x, x, 9, 5)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmsolver++"])
def test_sampler_steps_turn_each_paper_step_into_the_one_formula(sampler):
    """A whole trajectory in float64: step.step with the coefficients of sampler_steps equals the sampler's own
    paper-form step (ddpm_step, ddim_step with eta 0.3, dpmpp_2m_step) at every step, with clipping and guidance."""
    from minidiff.step import StepParams, sampler_steps, step
    from minidiff.utils.philox import philox_normal
    sched = NoiseSchedule(50)
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 1, 4, 4))
    x_paper, x0_prev, t_last, seed, w = x.copy(), np.zeros_like(x), None, 11, 2.0
    eta = 0.3 if sampler == "ddim" else 0.0
    plan = sampler_steps(sched, sampler, 8, eta=eta)
    assert [t for t, _ in plan] == (list(range(49, -1, -1)) if sampler == "ddpm" else list(
        np.unique(np.linspace(0, 49, 8).round().astype(int))[::-1]))
    for i, (t, coefs) in enumerate(plan):
        t_prev = plan[i + 1][0] if i + 1 < len(plan) else -1
        eps, eps_u = rng.standard_normal(x.shape), rng.standard_normal(x.shape)
        x, x0 = step.reference(x, eps, StepParams(coefs, w, True, seed, t), eps_uncond=eps_u, x0_prev=x0_prev)
        z = philox_normal(seed, t, x.size).reshape(x.shape).astype(np.float64)
        if sampler == "ddpm":
            x_paper = ddpm_step(sched, x_paper, eps, t, z, clip_sample=True, eps_uncond=eps_u, guidance=w)
        elif sampler == "ddim":
            x_paper = ddim_step(sched, x_paper, eps, t, t_prev, eta, z, clip_sample=True, eps_uncond=eps_u,
                                guidance=w)
        else:
            x_paper, x0_p = dpmpp_2m_step(sched, x_paper, eps, t, t_prev, None if t_last is None else x0_prev,
                                          t_last, clip_sample=True, eps_uncond=eps_u, guidance=w, return_x0=True)
            np.testing.assert_allclose(x0, x0_p, rtol=1e-12, atol=1e-12)
            t_last = t
        x0_prev = x0
        np.testing.assert_allclose(x, x_paper, rtol=1e-10, atol=1e-10)
        x_paper = x.copy()                      # compare step by step, not the drift of two roundings
