"""The forward process, its closed form and posterior, and the reverse-process Gaussian.
Step 2 of the reading order: the process the network learns to reverse (used by train_step.py for x_t and the
target, by the bound in evaluation/likelihood.py, by sample.py to read a v-prediction as eps).

Article 3.1 (q(x_t | x_{t-1})), 4.1 (q(x_t | x_0)), 3.2 (p_theta(x_{t-1} | x_t) = N(mu_theta, Sigma_theta));
DDPM (Ho et al. 2020) eq. 2, 4, 6, 7, 11, 14, 15. Timestep indices t = 0..T-1 stand for the paper's
t = 1..T (see schedule.py). Every function works on NumPy or CuPy arrays (xp from the array), with t an
integer array of shape (B,) or a Python int, and noise passed in explicitly so randomness stays visible.
"""
import numpy as np

from .utils.backend import array_module
from .schedule import extract


def _timesteps(sched, t, x):
    """t as an int array of shape (B,) on x's device, checked against 0 <= t < T (on the host: timesteps already on
    a GPU are not read back, that would stall it; train.TrainStep checks them before they go there)."""
    xp = array_module(x)
    if xp is not np and array_module(t) is np:
        t = np.asarray(t)                       # check on the host, then copy once
    t = array_module(t).asarray(t)
    if t.ndim == 0:
        t = array_module(t).full((x.shape[0],), int(t))
    if t.shape != (x.shape[0],) or t.dtype.kind not in "iu":
        raise ValueError(f"t must be an int scalar or an int array of shape ({x.shape[0]},), got {t.dtype} {t.shape}")
    if array_module(t) is np and (int(t.min()) < 0 or int(t.max()) >= sched.num_train_timesteps):
        raise ValueError(f"timestep out of range [0, {sched.num_train_timesteps}): {int(t.min())}..{int(t.max())}")
    return xp.asarray(t)


def q_step_sample(sched, x_prev, t, noise):
    """One forward step, article 3.1 / DDPM eq. 2: x_t = sqrt(1 - beta_t) x_{t-1} + sqrt(beta_t) z."""
    t = _timesteps(sched, t, x_prev)
    return extract(sched.sqrt_alphas, t, x_prev) * x_prev + extract(np.sqrt(sched.betas), t, x_prev) * noise


def q_mean_variance(sched, x0, t):
    """Moments of q(x_t | x_0) = N(sqrt(ab_t) x_0, (1 - ab_t) I), article 4.1 / DDPM eq. 4."""
    t = _timesteps(sched, t, x0)
    mean = extract(sched.sqrt_alphas_cumprod, t, x0) * x0
    variance = extract(1.0 - sched.alphas_cumprod, t, x0)
    return mean, variance


DEVICE_TABLES = ("sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod")   # what _at reads, on x's device


def prepare_tables(sched, xp, dtype):
    """Make the device copies of the tables ``_at`` reads now: a CUDA graph's step must find them made, not make
    them inside its capture (from its own memory pool)."""
    for name in DEVICE_TABLES:
        sched.table(name, xp, dtype)


def _at(sched, name, t, x):
    """sched.<name>[t] shaped (B, 1, 1, ...) against x, from the table cached on x's device (no host copy)."""
    return sched.table(name, array_module(x), x.dtype)[t].reshape((-1,) + (1,) * (x.ndim - 1))


def q_sample(sched, x0, t, noise):
    """Sample q(x_t | x_0) in one jump (article 4.1): x_t = sqrt(ab_t) x_0 + sqrt(1 - ab_t) eps."""
    t = _timesteps(sched, t, x0)
    return _at(sched, "sqrt_alphas_cumprod", t, x0) * x0 + _at(sched, "sqrt_one_minus_alphas_cumprod", t, x0) * noise


def velocity(sched, x0, t, noise):
    """The v-prediction target v = sqrt(ab_t) eps - sqrt(1 - ab_t) x_0 (Salimans & Ho 2022, section 4): with
    x_t = sqrt(ab_t) x_0 + sqrt(1 - ab_t) eps, the rotation of (x_0, eps) by the angle of t."""
    t = _timesteps(sched, t, x0)
    return _at(sched, "sqrt_alphas_cumprod", t, x0) * noise - _at(sched, "sqrt_one_minus_alphas_cumprod", t, x0) * x0


def eps_from_velocity(sched, x_t, t, v):
    """eps = sqrt(1 - ab_t) x_t + sqrt(ab_t) v: the noise a v-prediction means (and x_0 = sqrt(ab_t) x_t -
    sqrt(1 - ab_t) v), so every sampler and the bound run on it unchanged."""
    t = _timesteps(sched, t, x_t)
    return _at(sched, "sqrt_one_minus_alphas_cumprod", t, x_t) * x_t + _at(sched, "sqrt_alphas_cumprod", t, x_t) * v


def model_eps(model, sched, x_t, t, y=None):
    """eps_theta(x_t, t[, y]) from the network, whatever it predicts (its config's prediction_type)."""
    out = model.forward(x_t, t, y)
    return out if model.config.prediction_type == "epsilon" else eps_from_velocity(sched, x_t, t, out)


def q_posterior(sched, x0, x_t, t):
    """q(x_{t-1} | x_t, x_0) = N(mu-tilde, beta-tilde I), DDPM eq. 6-7:
    mu-tilde = sqrt(ab_{t-1}) beta_t / (1 - ab_t) x_0 + sqrt(alpha_t) (1 - ab_{t-1}) / (1 - ab_t) x_t,
    beta-tilde = (1 - ab_{t-1}) / (1 - ab_t) beta_t.  Returns (mean, variance, log_variance_clipped)."""
    t = _timesteps(sched, t, x_t)
    mean = extract(sched.posterior_mean_coef1, t, x_t) * x0 + extract(sched.posterior_mean_coef2, t, x_t) * x_t
    variance = extract(sched.posterior_variance, t, x_t)
    log_variance = extract(sched.posterior_log_variance_clipped, t, x_t)
    return mean, variance, log_variance


def predict_start_from_noise(sched, x_t, t, eps):
    """x_0 from x_t and the predicted noise, inverting q_sample (DDPM eq. 15):
    x_0 = x_t / sqrt(ab_t) - sqrt(1/ab_t - 1) eps.  Undefined where ab_t = 0 (raises ValueError)."""
    t = _timesteps(sched, t, x_t)
    return extract(sched.sqrt_recip_alphas_cumprod, t, x_t) * x_t - extract(sched.sqrt_recipm1_alphas_cumprod, t, x_t) * eps


def p_mean_variance(sched, eps, x_t, t, variance_type="fixed_small", clip_denoised=True):
    """The reverse step p_theta(x_{t-1} | x_t) = N(mu_theta, sigma_t^2 I) of an epsilon-prediction model
    (article 3.2; DDPM eq. 11): mu_theta = (x_t - beta_t / sqrt(1 - ab_t) eps) / sqrt(alpha_t), computed as
    the posterior mean (eq. 7) of the predicted x_0 (eq. 15), which is the same thing when x_0 is not clipped.
    sigma_t^2 is beta_t ("fixed_large") or beta-tilde_t ("fixed_small"), DDPM section 3.2.
    Returns (mean, variance, log_variance, pred_x0)."""
    xp = array_module(x_t)
    t = _timesteps(sched, t, x_t)
    pred_x0 = predict_start_from_noise(sched, x_t, t, eps)
    if clip_denoised:
        pred_x0 = xp.clip(pred_x0, -1.0, 1.0)
    mean, variance, log_variance = q_posterior(sched, pred_x0, x_t, t)
    if variance_type == "fixed_large":
        # beta_t, with beta-tilde_2 in place of beta_1 as in the DDPM code (no noise is added at t = 1 anyway).
        large = np.append(sched.posterior_variance[1] if sched.num_train_timesteps > 1 else sched.betas[0], sched.betas[1:])
        variance, log_variance = extract(large, t, x_t), extract(np.log(large), t, x_t)
    elif variance_type != "fixed_small":
        raise ValueError(f"unknown variance_type {variance_type!r}; choose 'fixed_small' or 'fixed_large'")
    return mean, variance, log_variance, pred_x0
