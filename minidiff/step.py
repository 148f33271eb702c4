"""One reverse-process step x_t -> x_{t-1}, for every sampler, as one formula.
Step 3 of the reading order: the arithmetic of sampling (sample.py runs it in a loop).

DDPM (Ho et al. 2020) ancestral sampling, DDIM (Song et al. 2021) and DPM-Solver++(2M) (Lu et al. 2022), all from
a noise prediction eps_theta(x_t, t), optionally with classifier-free guidance (Ho & Salimans 2022). Article
section 4 (the reverse process p_theta(x_{t-1} | x_t) = N(mu_theta, Sigma_theta)).

Notation (index t = 0 .. T-1 stands for the paper's t + 1, see minidiff/schedule.py):
    ab_t       alpha-bar_t              schedule.alphas_cumprod[t]
    ab_prev    alpha-bar_{t-1}          schedule.alphas_cumprod_prev[t] (DDPM), alphas_cumprod[t_prev] (DDIM)
    x0         "predicted x_0"          DDPM eq. 15, DDIM eq. 12 (pred_original_sample in diffusers)
    sigma      noise std of the step    sqrt(beta-tilde_t) or sqrt(beta_t) (DDPM); DDIM eq. 16 with eta
DPM-Solver++ (its paper's notation; t_prev is the step's target, t_last the timestep of the step before this one):
    alpha_t    sqrt(ab_t)                         sigma_t    sqrt(1 - ab_t)
    lambda_t   log(alpha_t / sigma_t)             (half the log-SNR; +inf at t = -1, where ab = 1, sigma = 0)
    h          lambda_{t_prev} - lambda_t > 0     h_last = lambda_t - lambda_{t_last},  r = h_last / h
    x0_prev    the x_0 predicted by the previous step (from x_{t_last}); Algorithm 2's buffer Q

The file reads in three parts:
  1. ``ddpm_step`` / ``ddim_step`` / ``dpmpp_2m_step``: each sampler's step in its paper's form, equation by equation;
  2. ``ddpm_coefficients`` / ``ddim_coefficients`` / ``dpmpp_2m_coefficients`` and ``sampler_steps``: the scalars
     that turn every one of them into the same formula
        x_{t-1} = c_x0 * x0 + c_x0prev * x0_prev + c_xt * x_t + c_eps * eps + sigma * z,   x0 = a * x_t - b * eps,
     where, with clipping and guidance w > 1, eps is re-derived from the clipped x0: eps = (a * x_t - x0) / b
     (only DDIM uses eps; c_eps = 0 for DDPM and DPM-Solver++, which works on x0 alone; only DPM-Solver++ uses
     x0_prev). tests/test_step.py checks that each sampler's coefficients give its paper-form step;
  3. ``step``: that formula, the one step the sampling loop calls. It is a reference with fast paths (minidiff/
     fast/: one fused C++ or CUDA pass that also draws the noise); tests/test_native.py checks them against it.
"""
import math
from collections import namedtuple

import numpy as np

from . import fast
from .utils.backend import array_module
from .utils.philox import philox_normal

VARIANCE_TYPES = ("fixed_small", "fixed_large")

StepCoefficients = namedtuple("StepCoefficients", "a b c_x0 c_xt c_eps sigma c_x0prev", defaults=(0.0,))
StepCoefficients.__doc__ = """Scalars of one step (python floats): x0 = a x_t - b eps,
x_{t-1} = c_x0 x0 + c_x0prev x0_prev + c_xt x_t + c_eps eps + sigma z (c_x0prev: DPM-Solver++(2M) only, default 0)."""


# --------------------------------------------------------------------------- argument checks
def _check_t(schedule, t, name="t", allow_minus_one=False):
    T = schedule.num_train_timesteps
    lo = -1 if allow_minus_one else 0
    if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or not lo <= int(t) < T:
        raise ValueError(f"{name} must be an integer timestep index in [{lo}, {T - 1}], got {t!r}")
    return int(t)


def _check_variance_type(variance_type):
    if variance_type not in VARIANCE_TYPES:
        raise ValueError(f"unknown variance_type {variance_type!r}; choose one of {', '.join(VARIANCE_TYPES)}")


def _check_eta(eta):
    if isinstance(eta, bool) or not isinstance(eta, (int, float, np.floating, np.integer)) or not 0.0 <= eta < math.inf:
        raise ValueError(f"eta must be a finite number >= 0 (0: deterministic DDIM, 1: DDPM-like), got {eta!r}")
    return float(eta)


def _ddim_sigma(ab_t, ab_prev, eta):
    # DDIM eq. 16: sigma_t(eta) = eta sqrt((1 - ab_prev) / (1 - ab_t)) sqrt(1 - ab_t / ab_prev)
    sigma = eta * math.sqrt((1.0 - ab_prev) / (1.0 - ab_t)) * math.sqrt(1.0 - ab_t / ab_prev)
    dir_var = 1.0 - ab_prev - sigma ** 2  # the variance left for the direction pointing to x_t (DDIM eq. 12)
    if dir_var < -1e-12:
        raise ValueError(f"eta = {eta} is too large for this step: 1 - alpha-bar_prev - sigma^2 = {dir_var:.3g} < 0")
    return sigma, max(dir_var, 0.0)


def _guided_eps(eps, eps_uncond, guidance):
    # Classifier-free guidance (Ho & Salimans): eps = eps_u + w (eps_c - eps_u); w = 1 is the conditional model.
    # Autoguidance (Karras et al. 2024; D_w = D_0 + w (D_1 - D_0)): eps_u is a weaker guide network's eps.
    if eps_uncond is None:
        return eps
    return eps_uncond + guidance * (eps - eps_uncond)


def _noise(z, sigma, x_t):
    if sigma == 0.0:
        return 0.0  # the last DDPM step and eta = 0 DDIM add no noise; z may be None
    if z is None:
        raise ValueError(f"z (the noise of this step) is required: sigma = {sigma:g} > 0")
    if z.shape != x_t.shape:
        raise ValueError(f"z has shape {z.shape}, x_t has shape {x_t.shape}")
    return sigma * z


# --------------------------------------------------------------------------- 1. each sampler's step
def ddpm_step(schedule, x_t, eps, t, z, variance_type="fixed_small", clip_sample=True, eps_uncond=None,
              guidance=1.0, return_x0=False):
    """DDPM ancestral step: sample x_{t-1} ~ p_theta(x_{t-1} | x_t) = N(mu_theta, sigma_t^2 I).

    eps is eps_theta(x_t, t) (the conditional one when eps_uncond is given), z ~ N(0, I) of x_t's shape
    (may be None at t = 0, where no noise is added). Returns x_{t-1}, or (x_{t-1}, x0) with return_x0.
    """
    t = _check_t(schedule, t)
    _check_variance_type(variance_type)
    eps = _guided_eps(eps, eps_uncond, guidance)

    # 1. predicted x_0 (DDPM eq. 15, inverted): x0 = (x_t - sqrt(1 - ab_t) eps) / sqrt(ab_t)
    #                                             = sqrt(1/ab_t) x_t - sqrt(1/ab_t - 1) eps
    x0 = float(schedule.sqrt_recip_alphas_cumprod[t]) * x_t - float(schedule.sqrt_recipm1_alphas_cumprod[t]) * eps
    if clip_sample:
        x0 = x0.clip(-1.0, 1.0)  # images live in [-1, 1]; clipping x0 is why eq. 7 is used instead of eq. 11

    # 2. posterior mean (DDPM eq. 7): mu-tilde_t(x_t, x0) = coef1 x0 + coef2 x_t, with
    #    coef1 = sqrt(ab_{t-1}) beta_t / (1 - ab_t), coef2 = sqrt(alpha_t) (1 - ab_{t-1}) / (1 - ab_t).
    #    Without clipping, eq. 7 with eq. 15's x0 is exactly eq. 11:
    #    mu_theta = (x_t - beta_t / sqrt(1 - ab_t) eps) / sqrt(alpha_t)  (tests/test_step.py checks it).
    mean = float(schedule.posterior_mean_coef1[t]) * x0 + float(schedule.posterior_mean_coef2[t]) * x_t

    # 3. variance (DDPM section 3.2): sigma_t^2 = beta-tilde_t ("fixed_small", eq. 7) or beta_t ("fixed_large");
    #    the last step (paper's t = 1) adds no noise and returns the mean.
    sigma = _ddpm_sigma(schedule, t, variance_type)

    # 4. x_{t-1} = mu + sigma z  (Algorithm 2, line 4)
    x_prev = mean + _noise(z, sigma, x_t)
    return (x_prev, x0) if return_x0 else x_prev


def _ddpm_sigma(schedule, t, variance_type):
    """sigma_t = sqrt(beta-tilde_t) ("fixed_small") or sqrt(beta_t) ("fixed_large"); 0 at the last step."""
    if t == 0:
        return 0.0
    return math.sqrt(schedule.posterior_variance[t] if variance_type == "fixed_small" else schedule.betas[t])


def ddim_step(schedule, x_t, eps, t, t_prev, eta, z, clip_sample=True, eps_uncond=None, guidance=1.0,
              return_x0=False):
    """DDIM step t -> t_prev (any t_prev < t; -1 means alpha-bar_prev = 1, the clean image), DDIM eq. 12.

    eta = 0 is deterministic DDIM, eta = 1 matches DDPM's posterior variance. z may be None when sigma = 0.
    Returns x_{t_prev}, or (x_{t_prev}, x0) with return_x0.
    """
    t = _check_t(schedule, t)
    t_prev = _check_t(schedule, t_prev, "t_prev", allow_minus_one=True)
    if t_prev >= t:
        raise ValueError(f"t_prev ({t_prev}) must be smaller than t ({t})")
    eta = _check_eta(eta)
    eps = _guided_eps(eps, eps_uncond, guidance)

    ab_t = float(schedule.alphas_cumprod[t])
    ab_prev = float(schedule.alphas_cumprod[t_prev]) if t_prev >= 0 else 1.0

    # 1. "predicted x_0" (DDIM eq. 12, first term): (x_t - sqrt(1 - ab_t) eps) / sqrt(ab_t) = a x_t - b eps
    a = float(schedule.sqrt_recip_alphas_cumprod[t])
    b = float(schedule.sqrt_recipm1_alphas_cumprod[t])
    x0 = a * x_t - b * eps
    if clip_sample:
        x0 = x0.clip(-1.0, 1.0)
        if eps_uncond is not None and np.float32(guidance) > 1.0:  # w > 1 in float32, as the kernel compares
            # Guidance w > 1 extrapolates past the conditional eps; its size grows with w and, kept as is, drives
            # x_t off the data (docs/text_to_image.md). So re-derive eps from the clipped x_0 (as GLIDE
            # does): eps = (a x_t - x0) / b, the direction from the clipped x_0 to x_t. Otherwise (w <= 1, an
            # interpolation, or no guidance) keep the model's eps as diffusers does (docs/sampling.md: re-deriving
            # it is worse for an unconditional model).
            eps = (a * x_t - x0) / b

    # 2. sigma_t(eta) (DDIM eq. 16)
    sigma, dir_var = _ddim_sigma(ab_t, ab_prev, eta)

    # 3. x_{t_prev} = sqrt(ab_prev) x0 + sqrt(1 - ab_prev - sigma^2) eps + sigma z  (DDIM eq. 12:
    #    "predicted x_0", "direction pointing to x_t", random noise)
    x_prev = math.sqrt(ab_prev) * x0 + math.sqrt(dir_var) * eps
    x_prev = x_prev + _noise(z, sigma, x_t)
    return (x_prev, x0) if return_x0 else x_prev


def _check_dpmpp_timesteps(schedule, t, t_prev, t_last):
    t = _check_t(schedule, t)
    t_prev = _check_t(schedule, t_prev, "t_prev", allow_minus_one=True)
    if t_prev >= t:
        raise ValueError(f"t_prev ({t_prev}) must be smaller than t ({t})")
    if t_last is not None:
        t_last = _check_t(schedule, t_last, "t_last")
        if t_last <= t:
            raise ValueError(f"t_last (the previous step's timestep, {t_last}) must be larger than t ({t})")
    return t, t_prev, t_last


def _alpha_sigma_lambda(schedule, t):
    """alpha_t = sqrt(ab_t), sigma_t = sqrt(1 - ab_t), lambda_t = log(alpha_t / sigma_t); at t = -1 (ab = 1)
    alpha = 1, sigma = 0 and lambda = +inf."""
    if t == -1:
        return 1.0, 0.0, math.inf
    ab = float(schedule.alphas_cumprod[t])
    alpha, sigma = math.sqrt(ab), math.sqrt(1.0 - ab)
    return alpha, sigma, math.log(alpha / sigma)


def _dpmpp_second_order(t_prev, t_last):
    """Whether the step into t_prev uses the previous x_0 (second order). It cannot on the first step (no previous
    x_0), and does not on the last two. The DPM-Solver code and diffusers make the final ODE step first order
    (lower_order_final); on our grids that is the step into t_prev = 0, the last noisy time (sigma_0 = 0.01), whose
    lambda interval is long (linear schedule: lambda_0 = 4.6 against lambda_111 = 0.97 at S = 10) and r small, so the
    line through the last two x_0 would be extrapolated far past them (README and tests/test_samplers.py measure it
    on Gaussian data). The step after it, into t_prev = -1 (the DPM-Solver code's denoise_to_zero), has lambda = +inf
    and r = 0, where only the first order is defined: it returns x_0."""
    return t_last is not None and t_prev > 0


def dpmpp_2m_step(schedule, x_t, eps, t, t_prev, x0_prev=None, t_last=None, clip_sample=True, eps_uncond=None,
                  guidance=1.0, return_x0=False):
    """DPM-Solver++(2M) step t -> t_prev (Lu et al. 2022, Algorithm 2; -1 means alpha-bar_prev = 1, the clean image).

    The diffusion ODE in its data-prediction form, solved with the exponential integrator: the linear part in x_t
    exactly, the integral of the predicted x_0 over lambda to second order from this step's x_0 and the previous
    step's (x0_prev, predicted at t_last > t). Without them (the first step), and on the last two steps, it is
    DPM-Solver++(1), which is DDIM with eta = 0. Deterministic: no noise.
    Returns x_{t_prev}, or (x_{t_prev}, x0) with return_x0; the next step takes x0 as x0_prev and t as t_last.
    """
    t, t_prev, t_last = _check_dpmpp_timesteps(schedule, t, t_prev, t_last)
    if (x0_prev is None) != (t_last is None):
        raise ValueError("x0_prev and t_last go together: both given (second order) or both None (first step)")
    if x0_prev is not None and x0_prev.shape != x_t.shape:
        raise ValueError(f"x0_prev has shape {x0_prev.shape}, x_t has shape {x_t.shape}")
    eps = _guided_eps(eps, eps_uncond, guidance)

    # 1. data prediction x_theta(x_t, t) = (x_t - sigma_t eps) / alpha_t = a x_t - b eps, clipped to [-1, 1] as DDIM
    #    clips (the simplest of the paper's thresholding methods). The update below uses x_0 alone, so a guided eps
    #    needs no re-deriving: x_{t_prev} is already a combination of the clipped x_0 and x_t.
    x0 = float(schedule.sqrt_recip_alphas_cumprod[t]) * x_t - float(schedule.sqrt_recipm1_alphas_cumprod[t]) * eps
    if clip_sample:
        x0 = x0.clip(-1.0, 1.0)

    # 2. alpha, sigma, lambda = log(alpha / sigma) at both ends; the step length in lambda, h > 0 (+inf into -1)
    alpha_t, sigma_t, lambda_t = _alpha_sigma_lambda(schedule, t)
    alpha_prev, sigma_prev, lambda_prev = _alpha_sigma_lambda(schedule, t_prev)
    h = lambda_prev - lambda_t

    # 3. D, the x_0 integrated over the step (Algorithm 2): first order D = x0; second order the line through the
    #    previous and this x_0 in lambda, D = (1 + 1/(2r)) x0 - 1/(2r) x0_prev, r = h_last / h
    if _dpmpp_second_order(t_prev, t_last):
        r = (lambda_t - _alpha_sigma_lambda(schedule, t_last)[2]) / h
        D = (1.0 + 0.5 / r) * x0 - (0.5 / r) * x0_prev
    else:
        D = x0

    # 4. x_{t_prev} = sigma_prev / sigma_t x_t - alpha_prev (e^{-h} - 1) D   (Algorithm 2; the exact solution's
    #    linear part, and alpha_prev (1 - e^{-h}) = sigma_prev int_{lambda_t}^{lambda_prev} e^lambda dlambda).
    #    Into t_prev = -1: sigma_prev = 0 and e^{-h} = 0, so x_{-1} = x0, finite.
    x_prev = (sigma_prev / sigma_t) * x_t - (alpha_prev * math.expm1(-h)) * D
    return (x_prev, x0) if return_x0 else x_prev


# --------------------------------------------------------------------------- 2. the coefficients of one formula
def ddpm_coefficients(schedule, t, variance_type="fixed_small"):
    """The scalars of ddpm_step at t as a StepCoefficients of python floats."""
    t = _check_t(schedule, t)
    _check_variance_type(variance_type)
    sigma = _ddpm_sigma(schedule, t, variance_type)
    return StepCoefficients(a=float(schedule.sqrt_recip_alphas_cumprod[t]),
                            b=float(schedule.sqrt_recipm1_alphas_cumprod[t]),
                            c_x0=float(schedule.posterior_mean_coef1[t]),
                            c_xt=float(schedule.posterior_mean_coef2[t]),
                            c_eps=0.0, sigma=float(sigma))


def ddim_coefficients(schedule, t, t_prev, eta):
    """The scalars of ddim_step from t to t_prev as a StepCoefficients of python floats."""
    t = _check_t(schedule, t)
    t_prev = _check_t(schedule, t_prev, "t_prev", allow_minus_one=True)
    if t_prev >= t:
        raise ValueError(f"t_prev ({t_prev}) must be smaller than t ({t})")
    eta = _check_eta(eta)
    ab_t = float(schedule.alphas_cumprod[t])
    ab_prev = float(schedule.alphas_cumprod[t_prev]) if t_prev >= 0 else 1.0
    sigma, dir_var = _ddim_sigma(ab_t, ab_prev, eta)
    return StepCoefficients(a=float(schedule.sqrt_recip_alphas_cumprod[t]),
                            b=float(schedule.sqrt_recipm1_alphas_cumprod[t]),
                            c_x0=math.sqrt(ab_prev), c_xt=0.0, c_eps=math.sqrt(dir_var), sigma=float(sigma))


def dpmpp_2m_coefficients(schedule, t, t_prev, t_last=None):
    """The scalars of dpmpp_2m_step from t to t_prev (t_last: the previous step's timestep, None on the first step)
    as a StepCoefficients of python floats. With phi = alpha_prev (1 - e^{-h}), Algorithm 2's update
    x_{t_prev} = sigma_prev / sigma_t x_t + phi D, D = (1 + 1/(2r)) x0 - 1/(2r) x0_prev, expands to
        c_xt = sigma_prev / sigma_t,   c_x0 = phi (1 + 1/(2r)),   c_x0prev = -phi / (2r),   c_eps = sigma = 0;
    first order (no t_last, or the last two steps): c_x0 = phi, c_x0prev = 0."""
    t, t_prev, t_last = _check_dpmpp_timesteps(schedule, t, t_prev, t_last)
    a, b = float(schedule.sqrt_recip_alphas_cumprod[t]), float(schedule.sqrt_recipm1_alphas_cumprod[t])
    _, sigma_t, lambda_t = _alpha_sigma_lambda(schedule, t)
    alpha_prev, sigma_prev, lambda_prev = _alpha_sigma_lambda(schedule, t_prev)
    h = lambda_prev - lambda_t
    phi = -alpha_prev * math.expm1(-h)  # alpha_prev (1 - e^{-h}); 1 into t_prev = -1
    c_x0, c_x0prev = phi, 0.0
    if _dpmpp_second_order(t_prev, t_last):
        r = (lambda_t - _alpha_sigma_lambda(schedule, t_last)[2]) / h
        c_x0, c_x0prev = phi * (1.0 + 0.5 / r), -phi * 0.5 / r
    return StepCoefficients(a=a, b=b, c_x0=c_x0, c_xt=sigma_prev / sigma_t, c_eps=0.0, sigma=0.0, c_x0prev=c_x0prev)


SAMPLERS = ("ddpm", "ddim", "dpmsolver++")
SPACINGS = ("linspace", "logsnr")


def timesteps(num_train_timesteps, num_steps, spacing="linspace", schedule=None):
    """S timestep indices over [0, T-1], descending, from T-1 (the pure-noise end) to 0. "linspace": evenly spaced
    in t (DDIM's choice). "logsnr": evenly spaced in lambda_t = log(sqrt(ab_t) / sqrt(1 - ab_t)) (needs
    ``schedule``), each rounded to the nearest timestep: the spacing DPM-Solver recommends for low-resolution
    images, where a high-order solver's steps are most even. (Rounding can merge neighbours: then fewer than S.)"""
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"num_steps must be in [1, {num_train_timesteps}], got {num_steps}")
    if spacing == "linspace":
        return np.unique(np.linspace(0, num_train_timesteps - 1, num_steps).round().astype(np.int64))[::-1]
    if spacing != "logsnr":
        raise ValueError(f"unknown timestep spacing {spacing!r}; choose one of {SPACINGS}")
    ab = schedule.alphas_cumprod
    lam = 0.5 * np.log(ab / (1.0 - ab))                                        # decreasing in t
    targets = np.linspace(lam[-1], lam[0], num_steps)
    t = np.abs(lam[None, :] - targets[:, None]).argmin(axis=1)                 # nearest timestep to each target
    return np.unique(t.astype(np.int64))[::-1]


def sampler_steps(schedule, sampler="ddpm", num_steps=None, eta=0.0, variance_type="fixed_small",
                  spacing="linspace"):
    """[(t, StepCoefficients)] of every step of a sampler, from the pure-noise end down: the one place where the
    samplers differ. "ddpm": all T timesteps; "ddim" (stochasticity eta) and "dpmsolver++" (deterministic, eta 0):
    ``num_steps`` (default 50) of ``timesteps``. Step i goes from t_i to t_{i+1} (the last one to -1, the image)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {SAMPLERS}")
    if sampler == "dpmsolver++" and eta != 0:
        raise ValueError(f"eta = {eta!r}: DPM-Solver++(2M) solves the deterministic ODE (eta = 0); "
                         f"for stochastic sampling use sampler='ddim' with eta > 0 or 'ddpm'")
    T = schedule.num_train_timesteps
    ts = (np.arange(T - 1, -1, -1) if sampler == "ddpm" else
          timesteps(T, 50 if num_steps is None else num_steps, spacing, schedule))
    plan, t_last = [], None
    for i, t in enumerate(ts):
        t, t_prev = int(t), int(ts[i + 1]) if i + 1 < len(ts) else -1
        if sampler == "ddpm":
            coefs = ddpm_coefficients(schedule, t, variance_type)
        elif sampler == "ddim":
            coefs = ddim_coefficients(schedule, t, t_prev, eta)
        else:
            coefs, t_last = dpmpp_2m_coefficients(schedule, t, t_prev, t_last), t
        plan.append((t, coefs))
    return plan


# --------------------------------------------------------------------------- 3. the step
StepParams = namedtuple("StepParams", "coefs guidance clip_sample seed t", defaults=(1.0, True, 0, 0))
StepParams.__doc__ = """Everything one step needs besides the arrays: its StepCoefficients, the guidance weight w, whether
x0 is clipped to [-1, 1], and the noise's Philox key (seed) and counter (t): z = philox_normal(seed, t, x_t.size)."""


@fast.reference
def step(x_t, eps, params, eps_uncond=None, x0_prev=None, out=None, x0_out=None):
    """x_{t-1} and this step's x0 prediction from x_t and eps_theta(x_t, t) (with guidance: eps_cond, and
    eps_uncond, the unconditional model's or the guide's), for any sampler (params: a StepParams; x0_prev: the
    previous step's x0, DPM-Solver++(2M)). Writes into ``out`` (may be x_t) and ``x0_out`` (may be x0_prev) when
    given. Returns (x_{t-1}, x0)."""
    c = StepCoefficients(*params.coefs)
    for name, a in dict(eps=eps, eps_uncond=eps_uncond, x0_prev=x0_prev).items():
        if a is not None and a.shape != x_t.shape:
            raise ValueError(f"{name} has shape {a.shape}, x_t has shape {x_t.shape}")
    if x0_prev is None and c.c_x0prev != 0.0:
        raise ValueError(f"x0_prev (the previous step's x_0 prediction) is required: c_x0prev = {c.c_x0prev:g}")
    eps = _guided_eps(eps, eps_uncond, params.guidance)

    # 1. predicted x_0 = a x_t - b eps (DDPM eq. 15, DDIM eq. 12), clipped; guided (w > 1): eps from the clipped x_0
    x0 = c.a * x_t - c.b * eps
    if params.clip_sample:
        x0 = x0.clip(-1.0, 1.0)
        if eps_uncond is not None and np.float32(params.guidance) > 1.0:
            eps = (c.a * x_t - x0) / c.b

    # 2. x_{t-1} = c_x0 x0 + c_x0prev x0_prev + c_xt x_t + c_eps eps + sigma z
    x_prev = c.c_x0 * x0 + c.c_xt * x_t + c.c_eps * eps
    if c.c_x0prev != 0.0:
        x_prev = x_prev + c.c_x0prev * x0_prev
    if c.sigma != 0.0:
        z = philox_normal(params.seed, params.t, x_t.size, xp=array_module(x_t)).reshape(x_t.shape)
        z = z.astype(x_t.dtype, copy=False)
        x_prev = x_prev + c.sigma * z
    if out is not None:
        out[...] = x_prev
        x_prev = out
    if x0_out is not None:
        x0_out[...] = x0
        x0 = x0_out
    return x_prev, x0
