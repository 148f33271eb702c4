"""The sampling loop: from pure noise x_T ~ N(0, I) to images, one reverse step at a time.
Step 9 of the reading order (step.py computes one step; the network is unet.py).

    for t, coefficients in sampler_steps(schedule, sampler):       # the one place the samplers differ
        eps, eps_ref = predict_eps(model, x, t)                      # the network (and the guidance's second opinion)
        x, x0 = step(x, eps, StepParams(coefficients, ...))         # DDPM, DDIM or DPM-Solver++: one formula

Guidance: classifier-free guidance (Ho & Salimans 2022) asks the same network with the condition and with the "no
condition" input, in one doubled batch [x, x]; autoguidance (Karras et al. 2024) asks a weaker network, the guide, in
place of the unconditional model. Either way the step combines eps_ref + w (eps - eps_ref).

Noise is counter-based (Philox4x32-10): the z of reverse step t in batch b comes from key (seed, b) and counter
(element, t), and x_T from counter T. So a run is reproducible from its seed, the fused kernels and the NumPy
reference give the same images (MINIDIFF_REFERENCE=1), and the CPU and the GPU draw the same noise.
On a GPU the loop body (network and step) is captured once per batch as a CUDA graph and replayed for every step.
"""
import numpy as np
from tqdm.auto import tqdm

from . import fast
from .diffusion import model_eps, prepare_tables
from .fast.gpu import device_records
from .fast.graphs import CudaGraph, stream_context
from .step import StepParams, sampler_steps, step
from .utils.backend import array_module, to_numpy
from .utils.philox import philox_normal


def batch_seed(seed, batch):
    """64-bit Philox key of batch b: the user's 32-bit seed in the low word, the batch index in the high word."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2 ** 32:
        raise ValueError(f"seed must be an integer in [0, 2**32), got {seed!r}")
    return int(seed) | (batch << 32)


def predict_eps(model, schedule, x, t, y=None, y_null=None, guide=None):
    """(eps, eps_ref) at x_t for timesteps t (B,): eps_theta(x_t, t[, y]) (diffusion.model_eps: a v-prediction is
    turned into eps), and the prediction guidance pulls away from: with ``y_null`` (classifier-free guidance) the
    same network on the "no condition" input, both from ONE forward pass on the doubled batch [x, x]; with a
    ``guide`` network (autoguidance) the guide's eps; else None."""
    xp = array_module(x)
    if guide is not None:
        return model_eps(model, schedule, x, t, y), model_eps(guide, schedule, x, t, y)
    if y_null is None:
        return model_eps(model, schedule, x, t, y), None
    n = x.shape[0]
    eps2 = model_eps(model, schedule, xp.concatenate([x, x]), xp.concatenate([t, t]), xp.concatenate([y, y_null]))
    return eps2[:n], eps2[n:]


def sample(model, schedule, num_images, *, sampler="ddpm", num_steps=None, eta=0.0, variance_type="fixed_small",
           clip_sample=True, seed=0, batch_size=256, y=None, guidance=1.0, guide=None, timestep_spacing="linspace",
           progress=True, xp=np, cuda_graph=None, callback=None, group=None):
    """Generate ``num_images`` images (N, C, H, W) in model range [-1, 1], returned as a NumPy array.

    sampler: "ddpm" (all T steps, variance "fixed_small" = beta-tilde_t or "fixed_large" = beta_t), "ddim"
    (``num_steps`` evenly spaced steps, default 50, stochasticity ``eta`` in [0, 1]) or "dpmsolver++"
    (DPM-Solver++(2M), deterministic, on DDIM's ``num_steps`` timesteps); ``timestep_spacing``: "linspace" or
    "logsnr" (step.timesteps). ``y``: class labels (N,), prompt token ids (N, L) or None; ``guidance`` w combines
    eps_ref + w (eps - eps_ref), with eps_ref the unconditional prediction, or with a ``guide`` network (e.g. the
    early EMA weights a checkpoint keeps: utils.checkpoint.load_model(path, "guide")) the guide's, which works for
    unconditional models too. ``cuda_graph``: on a GPU, capture each batch's step once and replay it (None: yes,
    when the fused CUDA step is there). ``callback(t, x)``: called before each step with the network's input x_t
    (a device array; it turns the capture off). ``group`` (utils/distributed.py): the processes of a parallel run,
    each drawing the batches b with b mod size = rank; each batch's seed makes them the images one process draws,
    and every process returns them all."""
    cfg = model.config
    shape = (cfg.in_channels, cfg.resolution, cfg.resolution)
    if isinstance(num_images, bool) or not isinstance(num_images, (int, np.integer)) or num_images < 1:
        raise ValueError(f"num_images must be a positive integer, got {num_images!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    plan = sampler_steps(schedule, sampler, num_steps, eta, variance_type, timestep_spacing)
    if guidance == 1.0:
        guide = None                            # w = 1 is the model alone: no pass through the guide
    if guide is not None and (guide.config.in_channels, guide.config.resolution) != (cfg.in_channels, cfg.resolution):
        raise ValueError(f"the guide network draws {guide.config.in_channels} x {guide.config.resolution}^2 images, "
                         f"the model {cfg.in_channels} x {cfg.resolution}^2")
    if y is not None:
        y = np.asarray(y, dtype=np.int64)
        if y.ndim not in (1, 2) or y.shape[0] != num_images:
            raise ValueError(f"y must have {num_images} rows (labels (N,) or token ids (N, L)), got {y.shape}")
    graphed = xp is not np and callback is None and cuda_graph is not False and fast.has_fast_path("step.step", xp)
    if cuda_graph and not graphed:
        raise ValueError("cuda_graph needs CuPy arrays (xp=cupy), the fused CUDA step (not MINIDIFF_REFERENCE) and "
                         "no callback")
    was_training = getattr(model, "training", False)
    for net in (model, guide):
        if net is not None:
            net.train(False)
    rank, size = (0, 1) if group is None else (group.rank, group.size)
    images = np.zeros((num_images,) + shape, np.float32)
    mine = [b for b in range(-(-num_images // batch_size)) if b % size == rank]
    mine_images = sum(min(batch_size, num_images - b * batch_size) for b in mine)
    bar = tqdm(total=mine_images * len(plan), unit="img-step", desc=f"{sampler} x{len(plan)}", disable=not progress)
    try:
        for b in mine:
            start = b * batch_size
            n = min(batch_size, num_images - start)
            key = batch_seed(seed, b)
            yb = None if y is None else y[start:start + n]
            x = philox_normal(key, schedule.num_train_timesteps, n * int(np.prod(shape)), xp=xp).reshape((n,) + shape)
            params = [StepParams(coefs, guidance, clip_sample, key, t) for t, coefs in plan]
            images[start:start + n] = _reverse_process(model, schedule, plan, params, x, yb, guidance, guide, graphed,
                                                       callback, bar)
    finally:
        bar.close()
        model.train(was_training)
    return images if group is None else group.sum_host(images)      # each image from one process, zeros elsewhere


def _reverse_process(model, schedule, plan, params, x, y, guidance, guide, graphed, callback, bar):
    """One batch from x_T to x_0: x is updated in place, step by step."""
    xp = array_module(x)
    n = x.shape[0]
    x0 = xp.zeros_like(x)                      # DPM-Solver++(2M): the previous step's x_0 prediction
    y_null = None
    if y is not None and guidance != 1.0 and guide is None:     # classifier-free guidance
        y_null = xp.asarray(model.null_condition(n))
    y = None if y is None else xp.asarray(y)
    ts = xp.asarray(np.repeat(np.array([t for t, _ in plan], dtype=np.int64)[:, None], n, axis=1))   # (S, n)

    def body(t, p):                             # one reverse step: the network, then the step in place
        eps, eps_ref = predict_eps(model, schedule, x, t, y, y_null, guide)
        step(x, eps, p, eps_uncond=eps_ref, x0_prev=x0, out=x, x0_out=x0)

    run = body
    if graphed:                                 # the step's scalars are read from device memory, row i at step i
        prepare_tables(schedule, xp, x.dtype)
        run, params = CudaGraph(body), device_records(params, xp)
    with stream_context(run):
        for i, (t, _) in enumerate(plan):
            if callback is not None:
                callback(t, x)
            run(ts[i], params[i])
            bar.update(n)
        return to_numpy(x)
