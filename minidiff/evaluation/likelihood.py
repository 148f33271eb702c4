"""The article's objective, computed: the variational bound L = E[sum_t L_t] in bits per dimension.
Stage 7 of the pipeline, in evaluate.py: how well the model explains real images.

DDPM eq. 5 bounds the negative log-likelihood of x_0 by
    L = L_T + sum_{t=2}^{T} L_{t-1} + L_0,
    L_T     = KL(q(x_T | x_0) || N(0, I))                                   (prior term, no parameters)
    L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p_theta(x_{t-1} | x_t))           (two Gaussians: closed form)
    L_0     = -log p_theta(x_0 | x_1)                                        (discretised decoder, DDPM eq. 13)
The article's L_t = -log p_theta(x_{t-1} | x_t) (its sections 3.2 and 4.2) is what these terms become once
the intractable marginal is replaced by the posterior q(x_{t-1} | x_t, x_0). Divided by D ln 2 (D = pixels) the
bound is in bits per dimension. Timestep indices t = 0..T-1 stand for the paper's t = 1..T, so index 0 is the
decoder term L_0 and index t >= 1 is L_t (paper indexing L_{t}).
"""
import math

import numpy as np

from ..utils.backend import array_module, to_numpy as to_host
from ..diffusion import p_mean_variance, q_mean_variance, q_posterior, q_sample


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats:
    0.5 (-1 + logvar2 - logvar1 + exp(logvar1 - logvar2) + (mean1 - mean2)^2 exp(-logvar2))."""
    xp = array_module(mean1) if hasattr(mean1, "dtype") else np
    return 0.5 * (-1.0 + logvar2 - logvar1 + xp.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * xp.exp(-logvar2))


def approx_standard_normal_cdf(x):
    """Phi(x) ~= 0.5 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), the approximation of the DDPM code
    (absolute error < 3.5e-4; NumPy has no erf)."""
    xp = array_module(x)
    return 0.5 * (1.0 + xp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """log p(x) for images x in [-1, 1] on 256 levels under N(means, exp(log_scales)^2) integrated over each
    level's bin [x - 1/255, x + 1/255], the edge bins reaching -inf and +inf (DDPM eq. 13). Elementwise, nats."""
    xp = array_module(x)
    centred = x - means
    inv_stdv = xp.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centred + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centred - 1.0 / 255.0))
    tiny = 1e-12
    log_cdf_plus = xp.log(xp.maximum(cdf_plus, tiny))              # bin (-inf, x + 1/255] at x = -1
    log_one_minus_cdf_min = xp.log(xp.maximum(1.0 - cdf_min, tiny))  # bin [x - 1/255, inf) at x = +1
    log_delta = xp.log(xp.maximum(cdf_plus - cdf_min, tiny))
    return xp.where(x < -0.999, log_cdf_plus, xp.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def _per_image_bits(nats):
    """Mean over pixels, in bits: nats (B, C, H, W) -> bits per dimension (B,)."""
    return nats.reshape(nats.shape[0], -1).mean(axis=1) / math.log(2.0)


def prior_bpd(schedule, x0):
    """L_T = KL(q(x_T | x_0) || N(0, I)) in bits per dimension, (B,)."""
    xp = array_module(x0)
    T = schedule.num_train_timesteps
    mean, var = q_mean_variance(schedule, x0, T - 1)
    return _per_image_bits(normal_kl(mean, xp.log(var), 0.0, 0.0))


def vb_term_bpd(schedule, eps_fn, x0, t, noise, variance_type="fixed_small", clip_denoised=True):
    """One term of the bound per image, in bits per dimension: the decoder term L_0 where t == 0, else
    L_{t} = KL(q(x_{t-1} | x_t, x_0) || p_theta(x_{t-1} | x_t)) with x_t = q_sample(x_0, t, noise).
    ``eps_fn(x_t, t)`` is the network's noise prediction; t is an int array (B,)."""
    xp = array_module(x0)
    t = np.asarray(t)
    x_t = q_sample(schedule, x0, t, noise)
    true_mean, _, true_logvar = q_posterior(schedule, x0, x_t, t)
    mean, _, logvar, _ = p_mean_variance(schedule, eps_fn(x_t, t), x_t, t, variance_type, clip_denoised)
    kl = _per_image_bits(normal_kl(true_mean, true_logvar, mean, logvar))
    decoder_nll = _per_image_bits(-discretized_gaussian_log_likelihood(x0, mean, 0.5 * logvar))
    return xp.where(xp.asarray(t) == 0, decoder_nll, kl)


def bpd_exact(schedule, eps_fn, x0, seed=0, batch_t=1, group=None, **kw):
    """The whole bound, every one of the T terms (one fresh noise draw each), for a few images; ``batch_t``
    timesteps share one call of eps_fn (the B images repeated). Returns dict(total (B,), terms (B, T), prior (B,))
    in bits per dimension. ``group`` (utils/distributed.py): the processes share the chunks of timesteps (chunk i
    on rank i mod size; the noise is drawn for all of them everywhere), and all get every term."""
    xp = array_module(x0)
    rng = np.random.default_rng(seed)
    B, T = x0.shape[0], schedule.num_train_timesteps
    terms = xp.zeros((B, T), dtype=np.float64)
    for i, t0 in enumerate(range(0, T, batch_t)):  # a loop over chunks of timesteps (the sum of the bound)
        ts = np.arange(t0, min(T, t0 + batch_t))
        xk = xp.concatenate([x0] * len(ts))                        # (k B, ...): image i at timestep ts[j] in row j B + i
        noise = xp.asarray(rng.standard_normal(xk.shape), dtype=x0.dtype)
        if group is None or i % group.size == group.rank:
            terms[:, ts] = vb_term_bpd(schedule, eps_fn, xk, np.repeat(ts, B), noise, **kw).reshape(len(ts), B).T
    if group is not None:
        terms = xp.asarray(group.sum_host(to_host(terms)))
    prior = prior_bpd(schedule, x0)
    return dict(total=terms.sum(axis=1) + prior, terms=terms, prior=prior)


def bpd_monte_carlo(schedule, eps_fn, x0, num_samples=1, seed=0, group=None, **kw):
    """Unbiased estimate of the bound: L_T + T * L_t for t ~ U{0..T-1}, num_samples draws per image.
    Returns (mean over images and draws, its standard error), bits per dimension. ``group``: the processes share the
    images (the draws are made for all of them everywhere, so the estimate is one process's)."""
    rng = np.random.default_rng(seed)
    B, T = x0.shape[0], schedule.num_train_timesteps
    lo, hi = (0, B) if group is None else group.share(B)
    estimates = np.zeros((num_samples, B))
    for k in range(num_samples):
        t = rng.integers(0, T, size=B)
        noise = rng.standard_normal(x0.shape)
        xs = x0[lo:hi]
        eps = array_module(xs).asarray(noise[lo:hi], dtype=x0.dtype)
        estimates[k, lo:hi] = to_host(prior_bpd(schedule, xs) + T * vb_term_bpd(schedule, eps_fn, xs, t[lo:hi], eps,
                                                                                  **kw))
    est = (estimates if group is None else group.sum_host(estimates)).ravel()
    return float(est.mean()), float(est.std(ddof=1) / math.sqrt(est.size))
