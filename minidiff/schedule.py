"""Noise schedules: the betas and every quantity derived from them.
Step 1 of the reading order: the schedule that the forward process, the loss and every sampler take their
coefficients from.

Article sections 3.1, 4.1 and 5.2; DDPM (Ho et al. 2020) eq. 4, 6, 7; improved DDPM
(Nichol & Dhariwal 2021) eq. 17 for the cosine schedule.

Index convention (the one of the DDPM code, diffusers and improved-diffusion): arrays have
T entries and the timestep index ``t = 0 .. T-1`` stands for the paper's step ``t + 1``.
So ``betas[0]`` is beta_1, ``alphas_cumprod[t]`` is alpha-bar_{t+1}, and the model is fed
``t`` in ``0 .. T-1``. Everything is computed in float64 and cast where it is used
(``extract``).

Where the article differs:
  * its section 5.2 code computes ``bar_alphas = alphas_prod / alphas``; that is
    alpha-bar_{t-1} (our ``alphas_cumprod_prev``), not alpha-bar_t. Feeding it to q_sample
    under-noises every x_t by one step. We use alpha-bar_t = prod_{i<=t} alpha_i
    (``alphas_cumprod``); ``tests/test_schedule.py::test_article_bar_alphas_is_alpha_bar_prev``
    shows the difference.
  * its section 4.1 example (T = 10, beta_t = t/T, schedule "t_over_T" here) reaches
    beta_T = 1, so alpha-bar_T = 0 exactly: x_T is pure noise, which is what the figure wants,
    but x_0 can no longer be predicted from x_T and a noise prediction, so that schedule is for
    showing the forward process, not for sampling. The quantities that would divide by zero
    are not stored as arrays; ``sqrt_recip_alphas_cumprod`` and friends raise a clear error.
"""
import math

import numpy as np

from .utils.backend import array_module

BETA_SCHEDULES = ("linear", "cosine", "t_over_T")


def make_beta_schedule(beta_schedule="linear", num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                       cosine_s=0.008, max_beta=0.999):
    """beta_1 .. beta_T as a float64 array of length T (article 3.1: beta_t is the noise added at step t)."""
    T = num_train_timesteps
    if not isinstance(T, (int, np.integer)) or isinstance(T, bool) or T < 1:
        raise ValueError(f"num_train_timesteps must be an integer >= 1, got {T!r}")
    if beta_schedule == "linear":
        # Article 5.2 / DDPM: beta_t linear from beta_start to beta_end (1e-4 .. 0.02 for T = 1000).
        if not (0.0 < beta_start <= 1.0 and 0.0 < beta_end <= 1.0):
            raise ValueError(f"beta_start and beta_end must lie in (0, 1], got {beta_start} and {beta_end}")
        if beta_start > beta_end:
            raise ValueError(f"beta_start ({beta_start}) must not exceed beta_end ({beta_end})")
        return np.linspace(beta_start, beta_end, T, dtype=np.float64)
    if beta_schedule == "t_over_T":
        # Article 4.1 teaching example: beta_t = t / T, t = 1..T, so beta_T = 1 (pure noise at T).
        return np.arange(1, T + 1, dtype=np.float64) / T
    if beta_schedule == "cosine":
        # Nichol & Dhariwal eq. 17: alpha-bar(t) = f(t)/f(0), f(t) = cos^2(((t/T + s)/(1 + s)) pi/2),
        # beta_t = 1 - alpha-bar(t)/alpha-bar(t-1), clipped at max_beta to avoid the singularity at t = T.
        steps = np.arange(T + 1, dtype=np.float64) / T
        f = np.cos((steps + cosine_s) / (1 + cosine_s) * math.pi / 2) ** 2
        return np.minimum(1.0 - f[1:] / f[:-1], max_beta)
    raise ValueError(f"unknown beta_schedule {beta_schedule!r}; choose one of {', '.join(BETA_SCHEDULES)}")


class NoiseSchedule:
    """The betas of a diffusion process and every coefficient the forward and reverse processes use.

    Names follow the papers (and diffusers): ``betas``, ``alphas``, ``alphas_cumprod`` (alpha-bar_t),
    ``alphas_cumprod_prev`` (alpha-bar_{t-1}), ``posterior_variance`` (beta-tilde_t),
    ``posterior_log_variance_clipped``, ``posterior_mean_coef1`` and ``posterior_mean_coef2``.
    """

    def __init__(self, num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02, betas=None):
        if betas is None:
            betas = make_beta_schedule(beta_schedule, num_train_timesteps, beta_start, beta_end)
        else:
            beta_schedule = "custom"
            betas = np.asarray(betas, dtype=np.float64)
            if betas.ndim != 1 or betas.size < 1:
                raise ValueError(f"betas must be a non-empty 1-D array, got shape {betas.shape}")
        if not np.all((betas > 0) & (betas <= 1)):
            bad = betas[~((betas > 0) & (betas <= 1))]
            raise ValueError(f"every beta must lie in (0, 1]; found {bad[:3].tolist()}")
        self.config = dict(num_train_timesteps=int(betas.size), beta_schedule=beta_schedule,
                           beta_start=float(beta_start), beta_end=float(beta_end))
        self.num_train_timesteps = T = int(betas.size)

        # --- forward process q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I)   (article 3.1) ---
        self.betas = betas
        self.alphas = 1.0 - betas                                            # alpha_t = 1 - beta_t
        self.sqrt_alphas = np.sqrt(self.alphas)

        # --- closed form q(x_t | x_0) = N(sqrt(ab_t) x_0, (1 - ab_t) I)   (article 4.1, DDPM eq. 4) ---
        self.alphas_cumprod = np.cumprod(self.alphas)                        # alpha-bar_t = prod_{i<=t} alpha_i
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])  # alpha-bar_{t-1}, alpha-bar_0 = 1
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)

        # --- posterior q(x_{t-1} | x_t, x_0) = N(mu-tilde_t, beta-tilde_t I)   (DDPM eq. 6, 7) ---
        # beta-tilde_t = beta_t (1 - ab_{t-1}) / (1 - ab_t); 1 - ab_t > 0 because every beta_t > 0.
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # beta-tilde_1 = 0, so its log is clipped to beta-tilde_2 (as in the DDPM code).
        clip_from = self.posterior_variance[1] if T > 1 else betas[0]
        self.posterior_log_variance_clipped = np.log(np.append(clip_from, self.posterior_variance[1:]))
        # mu-tilde_t = coef1 x_0 + coef2 x_t
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * self.sqrt_alphas / (1.0 - self.alphas_cumprod)

    # Quantities that divide by alpha-bar_t or alpha_t: undefined where beta_t = 1 (article 4.1's example).
    def _require_positive(self, values, what):
        if np.any(values <= 0):
            t = int(np.argmax(values <= 0))
            raise ValueError(
                f"{what} is undefined at timestep index {t}: beta = {self.betas[t]:g} makes it zero, so x_0 "
                f"cannot be recovered from x_t (the article's 4.1 schedule ends in pure noise; use it to "
                f"illustrate the forward process, not to sample)")
        return values

    @property
    def sqrt_recip_alphas_cumprod(self):
        """1 / sqrt(alpha-bar_t), used in x_0 = (x_t - sqrt(1 - ab_t) eps) / sqrt(ab_t)  (DDPM eq. 15)."""
        return 1.0 / np.sqrt(self._require_positive(self.alphas_cumprod, "1/sqrt(alpha-bar_t)"))

    @property
    def sqrt_recipm1_alphas_cumprod(self):
        """sqrt(1 / alpha-bar_t - 1), the noise coefficient of the same x_0 prediction."""
        return np.sqrt(1.0 / self._require_positive(self.alphas_cumprod, "sqrt(1/alpha-bar_t - 1)") - 1.0)

    @property
    def sqrt_recip_alphas(self):
        """1 / sqrt(alpha_t), the leading factor of mu_theta in DDPM eq. 11."""
        return 1.0 / np.sqrt(self._require_positive(self.alphas, "1/sqrt(alpha_t)"))

    def table(self, name, xp=np, dtype=np.float64):
        """The coefficient table ``name`` (e.g. "sqrt_alphas_cumprod") as an array of ``dtype`` for the array module
        ``xp``, made once and cached: on a GPU the table lives on the device, so indexing it by timesteps there
        copies nothing from the host (train.TrainStep, diffusion.q_sample)."""
        key = (name, xp.__name__, np.dtype(dtype).str)
        cache = self.__dict__.setdefault("_tables", {})
        if key not in cache:
            cache[key] = xp.asarray(getattr(self, name), dtype=dtype)
        return cache[key]

    def __repr__(self):
        c = self.config
        return (f"NoiseSchedule(num_train_timesteps={c['num_train_timesteps']}, beta_schedule={c['beta_schedule']!r}, "
                f"beta_start={c['beta_start']}, beta_end={c['beta_end']})")


def extract(values, t, x):
    """values[t] (float64 host array, int timesteps of shape (B,) or a scalar) cast to x's dtype and array
    module, shaped (B, 1, 1, ...) to broadcast against x of shape (B, ...)."""
    xp = array_module(x)
    t_host = t.get() if hasattr(t, "get") else np.asarray(t)
    out = xp.asarray(np.asarray(values)[t_host], dtype=x.dtype)
    return out.reshape(out.shape + (1,) * (x.ndim - out.ndim))

