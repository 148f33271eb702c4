"""One training step: the loss L_simple (DDPM eq. 14) and its gradient, backward, clipping, Adam and EMA.
Step 8 of the reading order: fits the network (unet.py) to the forward process (diffusion.py); train.py loops it.

The article writes the objective as the negative log-likelihood L = E[sum_t L_t] with L_t = -log p_theta(x_{t-1}|x_t)
(its sections 3.2 and 4.2). Bounding it variationally (DDPM eq. 5) turns each L_{t-1} into a KL divergence between
two Gaussians, q(x_{t-1} | x_t, x_0) and p_theta(x_{t-1} | x_t). With the reverse mean written through a noise
prediction (DDPM eq. 11) that KL is, up to constants,
    L_{t-1} = beta_t^2 / (2 sigma_t^2 alpha_t (1 - ab_t)) * ||eps - eps_theta(sqrt(ab_t) x_0 + sqrt(1 - ab_t) eps, t)||^2
(DDPM eq. 12). DDPM drops the t-dependent weight and samples t uniformly: L_simple = E_{t, x_0, eps} ||eps -
eps_theta(x_t, t)||^2 (eq. 14), which is T times the mean of re-weighted L_t terms. That is what ``loss_simple``
computes; the exact weighted bound is computed for evaluation (minidiff/evaluation/likelihood.py).
"""
import numpy as np

from .diffusion import prepare_tables, q_sample, velocity
from .fast.graphs import CudaGraph, stream_context
from .optim import clip_grad_norm
from .utils.backend import array_module
from .utils.philox import philox_normal

TRAIN_NOISE_KEY = 0xFFFFFFFF << 32  # high word of the Philox key for training noise (sampling uses batch indices)


def loss_weights(schedule, prediction_type="epsilon", weighting="uniform", snr_gamma=5.0):
    """The weight w_t of each timestep's squared error, (T,) float64. "uniform": 1 (DDPM's L_simple, eq. 14).
    "min_snr": Min-SNR-gamma (Hang et al. 2023, section 3.4), the x_0-space weight min(SNR_t, gamma) written for
    the network's target: min(SNR_t, gamma) / SNR_t for eps, min(SNR_t, gamma) / (SNR_t + 1) for v, with
    SNR_t = ab_t / (1 - ab_t). It caps the weight of the nearly clean timesteps, whose conflicting gradients slow
    training down."""
    ab = schedule.alphas_cumprod
    if weighting == "uniform":
        return np.ones_like(ab)
    if weighting != "min_snr":
        raise ValueError(f"unknown loss weighting {weighting!r}; choose 'uniform' or 'min_snr'")
    snr = ab / (1.0 - ab)
    return np.minimum(snr, snr_gamma) / (snr if prediction_type == "epsilon" else snr + 1.0)


def loss_simple(model, schedule, x0, t, noise, y=None, rng=None, weights=None):
    """L_simple = mean ||eps - eps_theta(x_t, t)||^2 over the batch and pixels (DDPM eq. 14), with
    x_t = q_sample(x_0, t, eps); for a v-predicting network (UNetConfig.prediction_type) the target is
    v = sqrt(ab_t) eps - sqrt(1 - ab_t) x_0 instead, and ``weights`` (loss_weights, on the batch's device) weight each
    image by its timestep. Runs the forward pass and returns (loss, dL/d output) for the backward pass; the loss is
    a 0-d array on the batch's device (reading it would stall a GPU: the caller decides when)."""
    x_t = q_sample(schedule, x0, t, noise)
    target = noise if model.config.prediction_type == "epsilon" else velocity(schedule, x0, t, noise)
    out = model.forward(x_t, t, y, rng=rng)
    w = 1.0 if weights is None else weights[t].reshape((-1,) + (1,) * (out.ndim - 1))   # w_t per image
    err = out - target
    return (w * err * err).mean(), (2.0 / out.size) * w * err          # the loss and its gradient d loss / d out


def training_noise(seed, step, shape, xp=np):
    """The eps of training step ``step``: Philox normals keyed by the seed and counted by the step (so a resumed run
    draws the same noise), on the device of ``xp`` (the CUDA kernel there, with nothing to copy)."""
    return philox_normal(TRAIN_NOISE_KEY | seed, step, int(np.prod(shape)), xp=xp).reshape(shape)


class TrainStep:
    """One optimizer step: x_t = q_sample(x_0, t, eps), the network, L_simple and its gradient, backward, gradient
    clipping, Adam and EMA, with every value left where it is computed (no host synchronisation). Call it with a
    batch (x0, t, noise, y) and the learning rate; the step's scalars (learning rate, bias corrections, EMA decay)
    are computed on the host from counters. ``loss`` and ``grad_norm`` are 0-d arrays on the device, overwritten by
    every step.

    On a GPU with ``cuda_graph=True`` the step is captured once as a CUDA graph and replayed (fast/graphs.py): a few
    microseconds of launch instead of thousands of kernel launches from Python."""

    def __init__(self, model, opt, ema, schedule, grad_clip, weights=None, cuda_graph=False, group=None, share=1.0):
        """group, share: data-parallel training (utils/distributed.py): this process's share of the global batch,
        whose gradients the group sums over the processes; one process (group None): nothing to sum."""
        xp = array_module(next(iter(model.params.values())))
        self.group, self.share = group, float(share)
        self.xp, self.model, self.opt, self.ema, self.schedule = xp, model, opt, ema, schedule
        self.grad_clip = float(grad_clip)
        self.weights = None if weights is None else xp.asarray(weights, dtype=model.dtype)   # (T,): loss_weights
        self.loss, self.grad_norm = xp.zeros((), model.dtype), xp.zeros((), model.dtype)
        self.rng = None
        if cuda_graph and xp is np:
            raise ValueError("cuda_graph needs a GPU (device 'cuda')")
        if cuda_graph and model.config.dropout:
            raise ValueError("cuda_graph needs dropout = 0: the dropout masks come from the host, new every step")
        prepare_tables(schedule, xp, model.dtype)      # outside any capture
        self.run = CudaGraph(self._step) if cuda_graph else self._step

    def __call__(self, x0, t, noise, y, lr, rng=None):
        """x0, noise (B, C, H, W) and y (B,) / (B, L) on the device or the host; t (B,) ints on the host, checked
        here (not on the device)."""
        t = np.asarray(t)
        T = self.schedule.num_train_timesteps
        if t.shape != (x0.shape[0],) or t.dtype.kind not in "iu" or t.min() < 0 or t.max() >= T:
            raise ValueError(f"t must be {x0.shape[0]} ints in [0, {T}), got {t.dtype} {t.shape}")
        if y is not None:
            self.model.check_condition(y, x0.shape[0])
        hyper = np.array(self.opt.hyper(lr) + (self.ema.next_decay(),), dtype=self.model.dtype)
        self.rng = rng
        self.run(x0, t, noise, y, hyper)

    def _step(self, x0, t, noise, y, hyper):
        """hyper: (learning rate, Adam's bias corrections 1 - b1^n and 1 - b2^n, EMA decay)."""
        model = self.model
        loss, dout = loss_simple(model, self.schedule, x0, t, noise, y, self.rng, self.weights)
        model.zero_grad()
        model.backward(dout)
        if self.group is not None:              # data parallel: the gradient of the global batch's mean loss
            self.group.average(model.grads.flat, self.share)
        self.grad_norm[...] = clip_grad_norm(model.grads, self.grad_clip)
        self.opt.apply(hyper[0], hyper[1], hyper[2])
        self.ema.apply(model.params, hyper[3])
        self.loss[...] = loss

    def stream_context(self):
        """The stream the step runs on, as a context (a no-op without a graph): work around the step (its inputs,
        reading its results, sample previews) goes on the same stream, in order with it."""
        return stream_context(self.run)

    def synchronize(self):
        """Wait for the step to finish (before the host reads the model, e.g. to save or sample)."""
        if isinstance(self.run, CudaGraph):
            self.run.synchronize()
