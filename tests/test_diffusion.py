"""Forward process q(x_t | x_{t-1}), closed form q(x_t | x_0), posterior q(x_{t-1} | x_t, x_0), checked by sampling."""
import numpy as np
import pytest

from minidiff.diffusion import (p_mean_variance, predict_start_from_noise, q_mean_variance, q_posterior, q_sample,
                                q_step_sample)
from minidiff.schedule import NoiseSchedule

N = 200_000  # samples per check: standard error of a mean ~ 0.0022, of a variance ~ 0.3%


def _x0(value=0.7):
    return np.full((N, 1, 1, 1), value)


@pytest.mark.parametrize("schedule", [NoiseSchedule(num_train_timesteps=50), NoiseSchedule(10, "t_over_T")])
def test_iterated_one_step_matches_closed_form(schedule):
    """Iterating article 3.1's one-step process from x_0 gives article 4.1's closed form at several t."""
    rng = np.random.default_rng(0)
    x0 = _x0()
    x = x0
    T = schedule.num_train_timesteps
    checkpoints = {0, T // 3, T // 2, T - 1}
    for t in range(T):
        x = q_step_sample(schedule, x, t, rng.standard_normal(x.shape))
        if t in checkpoints:
            mean, var = q_mean_variance(schedule, x0[:1], t)
            assert x.mean() == pytest.approx(mean.item(), abs=5 * np.sqrt(var.item() / N))
            assert x.var() == pytest.approx(var.item(), rel=0.02)
            # and the closed-form sampler gives the same moments
            xc = q_sample(schedule, x0, t, rng.standard_normal(x.shape))
            assert xc.mean() == pytest.approx(mean.item(), abs=5 * np.sqrt(var.item() / N))
            assert xc.var() == pytest.approx(var.item(), rel=0.02)


@pytest.mark.parametrize("schedule", [NoiseSchedule(), NoiseSchedule(10, "t_over_T")])
@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_posterior_matches_joint_gaussian(schedule, where):
    """Sample (x_{t-1}, x_t) from the forward process and regress x_{t-1} on x_t: for a fixed x_0 the
    conditional mean is linear in x_t, so the slope, intercept and residual variance must equal
    DDPM eq. 7's coefficients and beta-tilde_t."""
    T = schedule.num_train_timesteps
    t = {"first": 0, "middle": T // 2, "last": T - 1}[where]
    rng = np.random.default_rng(1)
    x0 = _x0(0.5)
    x_prev = x0 if t == 0 else q_sample(schedule, x0, t - 1, rng.standard_normal(x0.shape))
    x_t = q_step_sample(schedule, x_prev, t, rng.standard_normal(x0.shape))
    a, b = x_t.ravel(), x_prev.ravel()
    slope = np.cov(a, b)[0, 1] / a.var()
    intercept = b.mean() - slope * a.mean()
    resid_var = (b - intercept - slope * a).var()

    mean, var, _ = q_posterior(schedule, x0[:1], np.zeros((1, 1, 1, 1)), t)  # mean at x_t = 0 is coef1 x_0
    coef2 = schedule.posterior_mean_coef2[t]
    assert slope == pytest.approx(coef2, abs=0.01)
    assert intercept == pytest.approx(mean.item(), abs=0.01)
    assert resid_var == pytest.approx(var.item(), rel=0.02, abs=1e-6)


def test_predict_start_inverts_q_sample():
    s = NoiseSchedule()
    rng = np.random.default_rng(2)
    x0 = rng.uniform(-1, 1, (4, 1, 5, 5))
    eps = rng.standard_normal(x0.shape)
    t = np.array([0, 10, 500, 999])
    assert np.allclose(predict_start_from_noise(s, q_sample(s, x0, t, eps), t, eps), x0, atol=1e-9)


def test_p_mean_variance_equals_ddpm_eq_11_without_clipping():
    s = NoiseSchedule()
    rng = np.random.default_rng(3)
    x_t = rng.standard_normal((3, 1, 4, 4))
    eps = rng.standard_normal(x_t.shape)
    t = np.array([1, 300, 999])
    mean, var, log_var, _ = p_mean_variance(s, eps, x_t, t, clip_denoised=False)
    b, ab, a = (v[t].reshape(-1, 1, 1, 1) for v in (s.betas, s.alphas_cumprod, s.alphas))
    assert np.allclose(mean, (x_t - b / np.sqrt(1 - ab) * eps) / np.sqrt(a), atol=1e-10)
    assert np.allclose(var.ravel(), s.posterior_variance[t]) and np.allclose(np.exp(log_var.ravel()), var.ravel())
    _, var_large, _, _ = p_mean_variance(s, eps, x_t, t, variance_type="fixed_large")
    assert np.allclose(var_large.ravel(), s.betas[t])
    with pytest.raises(ValueError, match="variance_type"):
        p_mean_variance(s, eps, x_t, t, variance_type="learned")


def test_timestep_validation():
    s = NoiseSchedule(num_train_timesteps=10)
    x = np.zeros((2, 1, 2, 2))
    with pytest.raises(ValueError, match="out of range"):
        q_sample(s, x, 10, x)
    with pytest.raises(ValueError, match="shape"):
        q_sample(s, x, np.array([1, 2, 3]), x)


def test_velocity_and_its_inverse():
    """v = sqrt(ab) eps - sqrt(1 - ab) x_0 (Salimans & Ho): with x_t from q_sample, eps_from_velocity(x_t, v) gives
    back eps, and sqrt(ab) x_t - sqrt(1 - ab) v gives back x_0; at t = 0 v is nearly eps, at T - 1 nearly -x_0."""
    from minidiff.diffusion import eps_from_velocity, velocity
    sched = NoiseSchedule(1000)
    rng = np.random.default_rng(4)
    x0, eps = rng.uniform(-1, 1, (5, 1, 4, 4)), rng.standard_normal((5, 1, 4, 4))
    t = np.array([0, 10, 500, 900, 999])
    x_t, v = q_sample(sched, x0, t, eps), velocity(sched, x0, t, eps)
    np.testing.assert_allclose(eps_from_velocity(sched, x_t, t, v), eps, atol=1e-12)
    a = np.sqrt(sched.alphas_cumprod[t]).reshape(-1, 1, 1, 1)
    np.testing.assert_allclose(a * x_t - np.sqrt(1 - a ** 2) * v, x0, atol=1e-12)
    assert np.abs(v[0] - eps[0]).max() < 0.02 and np.abs(v[-1] + x0[-1]).max() < 0.01
