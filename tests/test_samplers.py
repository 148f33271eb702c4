"""The samplers end to end on Gaussian data, where the exact noise prediction is known in closed form.

Data x_0 ~ N(mu, s^2) independently per pixel. Then x_t = sqrt(ab_t) x_0 + sqrt(1 - ab_t) eps (DDPM eq. 4) is
Gaussian with mean sqrt(ab_t) mu and variance v_t = ab_t s^2 + 1 - ab_t, jointly Gaussian with eps
(Cov(eps, x_t) = sqrt(1 - ab_t)), so the best noise prediction, the one training converges to, is
    eps*(x_t, t) = E[eps | x_t] = sqrt(1 - ab_t) (x_t - sqrt(ab_t) mu) / v_t.
A sampler driven by eps* should return N(mu, s^2); what it misses at S steps is its discretisation error.
"""
import math
from types import SimpleNamespace

import numpy as np
import pytest

from minidiff import fast
from minidiff.sample import sample
from minidiff.schedule import NoiseSchedule
from minidiff.step import timesteps
from minidiff.utils import native as _native

SCHEDULE = NoiseSchedule(1000)
T = SCHEDULE.num_train_timesteps
MU = np.array([-0.5, 0.0, 0.3, 0.5]).reshape(1, 2, 2)  # one (mu, s) per pixel of a 1x2x2 image
S = np.array([0.3, 0.5, 0.7, 0.9]).reshape(1, 2, 2)


class GaussianData:
    """A stand-in for the U-Net: eps*(x_t, t) of x_0 ~ N(mu, s^2). Conditional on a label y, the mean moves to
    mu + 0.2 y (the null condition, y = 0, is the unconditional model), for guided sampling."""

    def __init__(self, mu=MU, s=S, num_classes=None):
        self.mu, self.s = mu, s
        self.config = SimpleNamespace(in_channels=1, resolution=mu.shape[-1], prediction_type="epsilon")
        self.num_classes = num_classes
        self.training = False

    def train(self, mode):
        self.training = mode

    def null_condition(self, n):
        return np.zeros(n, dtype=np.int64)

    def forward(self, x, t, y=None):
        ab = float(SCHEDULE.alphas_cumprod[int(t[0])])
        mu = self.mu if y is None else self.mu + 0.2 * np.asarray(y, np.float64).reshape(-1, 1, 1, 1)
        return (math.sqrt(1 - ab) * (x - math.sqrt(ab) * mu) / (ab * self.s ** 2 + 1 - ab)).astype(np.float32)


def _sample(sampler, num_steps, n, model=None, **kw):
    return sample(model or GaussianData(), SCHEDULE, n, sampler=sampler, num_steps=num_steps, clip_sample=False,
                  batch_size=n, progress=False, **kw)


@pytest.mark.parametrize("num_steps, std_tol", [(10, 0.25), (20, 0.06)])
def test_dpmsolver_lands_on_gaussian_data_better_than_ddim(num_steps, std_tol):
    # N = 65,536 samples per pixel: the sampling error of a mean is s / 256 <= 0.0035 and of a standard deviation
    # 1 / sqrt(2N) = 0.3% (relative). Besides discretisation, two small biases are known in closed form: x_T is drawn
    # from N(0, I), not from N(sqrt(ab_T) mu, v_T) (ab_T = 4e-5), and the last step returns E[x_0 | x_{t=0}], which
    # shrinks the spread by sqrt(ab_0 s^2 / v_0) (sigma_0 = 0.01); at most 0.003 on a mean and 0.05% on a standard
    # deviation here. So means must be within 0.02 (biases + 5 standard errors).
    # Standard deviations carry the discretisation error. Measured (std / s - 1 for s = 0.3, 0.5, 0.7, 0.9):
    #   S = 10: DPM-Solver++(2M) -0.37 -0.21 -0.14 -0.08,   DDIM -0.39 -0.27 -0.23 -0.19
    #   S = 20: DPM-Solver++(2M) -0.13 -0.04 -0.02 -0.00,   DDIM -0.20 -0.14 -0.11 -0.10
    # For s >= 0.5 the tolerance is 25% at 10 steps and 6% at 20 (DDIM misses both); the sharpest pixel, s = 0.3, is
    # resolved by neither sampler at these steps on DDIM's evenly spaced grid (its last interval, into t = 0, spans
    # lambda 0.97 -> 4.6 at S = 10), so it is only compared. Both samplers start from the same x_T (same seed), so
    # the sampling error is common to the comparison.
    n, data = 65536, GaussianData()
    dpm = _sample("dpmsolver++", num_steps, n, data)
    ddim = _sample("ddim", num_steps, n, data)
    for got in (dpm, ddim):
        assert np.abs(got.mean(0) - MU).max() < 0.02
    err_dpm, err_ddim = np.abs(dpm.std(0) / S - 1), np.abs(ddim.std(0) / S - 1)
    assert np.all(err_dpm < err_ddim)                  # second order beats first order on every pixel
    assert err_dpm[S >= 0.5].max() < std_tol < err_ddim[S >= 0.5].max()


@pytest.mark.skipif(not _native.native_status()["cpu_kernel"], reason="native extension unavailable")
@pytest.mark.parametrize("guided", [False, True])
def test_dpmsolver_native_and_numpy_give_the_same_images(guided):
    # The fused kernel carries x_0 from step to step (x0_out -> x0_prev) as the reference does; with clipping on (the
    # data reach past [-1, 1]) and, guided, w = 3 on class-conditional means.
    kw = dict(sampler="dpmsolver++", num_steps=12, seed=3, batch_size=5, progress=False)  # two batches of x_0 history
    if guided:
        kw.update(y=np.arange(8) % 3, guidance=3.0)
    native = sample(GaussianData(), SCHEDULE, 8, **kw)
    with fast.use_reference("step.step"):
        ref = sample(GaussianData(), SCHEDULE, 8, **kw)
    assert native.dtype == np.float32 and native.shape == (8, 1, 2, 2) and np.abs(native).max() <= 1
    np.testing.assert_allclose(native, ref, rtol=0, atol=1e-5)
    assert np.array_equal(native, sample(GaussianData(), SCHEDULE, 8, **kw))  # deterministic
    other = sample(GaussianData(), SCHEDULE, 8, **dict(kw, sampler="ddim"))
    assert np.abs(other - native).max() > 1e-3  # not DDIM under another name


def test_sampler_options_are_checked():
    model = GaussianData()
    for bad, match in [(dict(sampler="dpmsolver"), "unknown sampler"),
                       (dict(sampler="dpmsolver++", eta=0.5), "eta"),
                       (dict(sampler="dpmsolver++", num_steps=0), "num_steps"),
                       (dict(sampler="dpmsolver++", num_steps=T + 1), "num_steps"),
                       (dict(sampler="ddim", num_steps=0), "num_steps"),
                       (dict(batch_size=0), "batch_size"),
                       (dict(seed=-1), "seed"),
                       (dict(y=np.zeros(3, np.int64)), "y must have 2 rows")]:
        with pytest.raises(ValueError, match=match):
            sample(model, SCHEDULE, 2, progress=False, **bad)
    for n in (0, -1, 2.5):
        with pytest.raises(ValueError, match="num_images"):
            sample(model, SCHEDULE, n, progress=False)


def test_eval_command_parses_dpmsolver_names():
    import importlib.util
    from pathlib import Path
    script = Path(__file__).resolve().parents[1] / "examples" / "mnist_eval.py"
    spec = importlib.util.spec_from_file_location("mnist_eval", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.parse_sampler("dpmsolver++20") == ("dpmsolver++", 20)
    assert mod.parse_sampler("ddim50") == ("ddim", 50) and mod.parse_sampler("ddpm") == ("ddpm", None)
    for bad in ("dpmsolver++", "dpmsolver++0", "dpmsolver20", "dpmsolver++-3", "ddim", "ddim++20"):
        with pytest.raises(ValueError, match="dpmsolver\\+\\+S"):
            mod.parse_sampler(bad)
    with pytest.raises(SystemExit, match="2"):                     # argparse's error: --guidance beside --autoguidance
        mod.main(["missing.npz", "--guidance", "2", "--autoguidance", "2"])


def test_bound_rejects_negative_image_counts():
    """bound(): a negative count is an error, not x0[:-1] (nearly all the test set, hours of the exact bound)."""
    from minidiff.evaluation.evaluate import bound
    for kw in (dict(exact_images=-1), dict(mc_images=-2), dict(exact_images=2.5)):
        with pytest.raises(ValueError, match="must be an integer >= 0"):
            bound(None, SCHEDULE, np.zeros((3, 1, 4, 4), np.float32), **kw)   # checked before the model is used


def test_logsnr_spacing_is_even_in_lambda_and_helps_the_second_order_solver():
    """timestep_spacing="logsnr": from T-1 to 0 in steps of nearly equal lambda = log(sqrt(ab) / sqrt(1 - ab)); on it
    DPM-Solver++(2M) resolves the Gaussian data's spread at 10 steps, which it cannot on DDIM's even grid."""
    steps = timesteps(T, 10, "logsnr", SCHEDULE)
    ab = SCHEDULE.alphas_cumprod[steps]
    gaps = np.diff(0.5 * np.log(ab / (1 - ab)))
    assert steps[0] == T - 1 and steps[-1] == 0 and len(steps) == 10 and np.all(np.diff(steps) < 0)
    assert gaps.min() > 0 and gaps.max() < 1.5 * gaps.min()
    n = 65536
    err = lambda x: np.abs(x.std(0) / S - 1)  # noqa: E731
    dpm = _sample("dpmsolver++", 10, n, timestep_spacing="logsnr")
    assert np.abs(dpm.mean(0) - MU).max() < 0.02
    assert err(dpm).max() < 0.06 < err(_sample("dpmsolver++", 10, n)).max()
    with pytest.raises(ValueError, match="spacing"):
        timesteps(T, 10, "karras", SCHEDULE)
