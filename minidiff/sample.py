"""Samplers: DDPM ancestral sampling over all T steps, DDIM and DPM-Solver++(2M) over S steps, driving the fused
step kernel.
Stage 6 of the pipeline: from a trained network to images (step.py does one step, philox.py draws its noise).

Each reverse step asks the network for eps_theta(x_t, t) (with classifier-free guidance: the conditional and
unconditional predictions from one batched forward pass), then one fused pass computes x_{t-1}
(step.py holds the readable NumPy reference of that pass; ``backend="numpy"`` uses it instead of the kernel).

Noise is counter-based (Philox4x32-10): the z of reverse step t in batch b comes from key (seed, b) and
counter (element, t), and x_T from counter step T. So a run is reproducible from its seed, the NumPy and the
native paths give the same images, and the CPU and GPU draw the same noise.
"""
import warnings

import numpy as np
from tqdm.auto import tqdm

from .utils.backend import array_module, to_numpy
from .diffusion import model_eps
from .utils.philox import philox_normal
from .step import (STEP_PARAMS, ddim_coefficients, ddim_step, ddpm_coefficients, ddpm_step, dpmpp_2m_coefficients,
                   dpmpp_2m_step, fused_step, fused_step_params, step_params)

SAMPLERS = ("ddpm", "ddim", "dpmsolver++")
BACKENDS = ("auto", "native", "numpy")


SPACINGS = ("linspace", "logsnr")


def ddim_timesteps(num_train_timesteps, num_steps, spacing="linspace", schedule=None):
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


def batch_seed(seed, batch):
    """64-bit Philox key of batch b: the user's 32-bit seed in the low word, the batch index in the high word."""
    if not 0 <= seed < 2 ** 32:
        raise ValueError(f"seed must be in [0, 2**32), got {seed}")
    return seed | (batch << 32)


def predict_eps(model, schedule, x, t, y=None, guidance=1.0, guide=None):
    """eps_theta(x_t, t[, y]) (diffusion.model_eps: a v-predicting network's output is turned into eps). With
    guidance and a condition y (class labels or prompt token ids), returns (eps_cond, eps_uncond) from ONE forward
    pass on the doubled batch [x, x] with conditions [y, model.null_condition()]; otherwise (eps, None).
    With a ``guide`` network (autoguidance), returns (eps_model, eps_guide): the step then takes
    eps_guide + w (eps_model - eps_guide), the same combination with the guide in place of the unconditional model."""
    xp = array_module(x)
    b = x.shape[0]
    tt = np.full((b,), t, dtype=np.int64)
    if guide is not None:
        return model_eps(model, schedule, x, tt, y), model_eps(guide, schedule, x, tt, y)
    if y is None or guidance == 1.0:
        return model_eps(model, schedule, x, tt, y), None
    eps2 = model_eps(model, schedule, xp.concatenate([x, x]), np.concatenate([tt, tt]),
                     np.concatenate([np.asarray(y), model.null_condition(b)]))
    return eps2[:b], eps2[b:]


def _native_available(xp):
    """Whether the fused kernel for this array module is built; warns once (readably) when it is not."""
    from .utils.native import native_status
    status = native_status()
    ok = status["cpu_kernel"] if xp is np else status["cuda_kernel"]
    if not ok and not _warned:
        warnings.warn(f"minidiff: using the NumPy reference step, the fused kernel is unavailable: {status['reason']}")
        _warned.append(True)
    return ok


_warned = []


class _GraphedStep:
    """One sampling step of a batch on a GPU (the network on x, or on [x, x] with the conditions and the null
    conditions under guidance, then the fused step writing x in place), captured once as a CUDA graph and replayed
    for every timestep: before each replay the timesteps and the step's scalars (a STEP_PARAMS record) are copied,
    device to device, into the buffers the graph reads. The first step runs eagerly, filling the graph's own memory
    pool and kernel caches, then the same work is captured."""

    def __init__(self, model, schedule, x, y, guidance, guide=None):
        import cupy
        n = x.shape[0]
        self.model, self.schedule, self.x, self.guide = model, schedule, x, guide
        self.guided = y is not None and guidance != 1.0 and guide is None       # classifier-free: [x, x] in one pass
        if self.guided:
            y = np.concatenate([y, model.null_condition(n)])
        self.y = None if y is None else cupy.asarray(y)
        self.t = cupy.zeros(2 * n if self.guided else n, np.int64)
        self.params = cupy.zeros(STEP_PARAMS.itemsize, np.uint8)
        self.x0_prev, self.x0_out = cupy.zeros_like(x), cupy.zeros_like(x)
        self.stream, self.pool, self.graph = cupy.cuda.Stream(non_blocking=True), cupy.cuda.MemoryPool(), None
        cupy.cuda.get_current_stream().synchronize()      # x, y and the buffers exist before the graph's stream runs

    def _body(self):
        n = self.x.shape[0]
        x_in = array_module(self.x).concatenate([self.x, self.x]) if self.guided else self.x
        eps = model_eps(self.model, self.schedule, x_in, self.t, self.y)
        eps_c, eps_u = (eps[:n], eps[n:]) if self.guided else (eps, None)
        if self.guide is not None:                        # autoguidance: the guide network's eps
            eps_u = model_eps(self.guide, self.schedule, x_in, self.t, self.y)
        fused_step_params(self.x, eps_c, self.params, eps_uncond=eps_u, x0_prev=self.x0_prev, out=self.x,
                          x0_out=self.x0_out)
        self.x0_prev[...] = self.x0_out                   # DPM-Solver++(2M): this step's x_0 for the next one

    def step(self, t, params):
        """t: a 0-d int64 device array, params: a (56,) uint8 device array (one STEP_PARAMS record)."""
        import cupy
        with self.stream:
            self.t[...] = t
            self.params[...] = params
            if self.graph is not None:
                self.graph.launch(self.stream)
                return
            with cupy.cuda.using_allocator(self.pool.malloc):
                self._body()
                self.stream.synchronize()
                self.stream.begin_capture()
                try:
                    self._body()
                finally:
                    self.graph = self.stream.end_capture()


def _step_records(schedule, sampler, steps, key, variance_type, eta, clip_sample, guidance):
    """The STEP_PARAMS record of every step of one batch (what the eager loop passes to fused_step)."""
    recs, t_last = [], None
    for i, t in enumerate(steps):
        t, t_prev = int(t), int(steps[i + 1]) if i + 1 < len(steps) else -1
        if sampler == "ddpm":
            coefs = ddpm_coefficients(schedule, t, variance_type)
        elif sampler == "ddim":
            coefs = ddim_coefficients(schedule, t, t_prev, eta)
        else:
            coefs, t_last = dpmpp_2m_coefficients(schedule, t, t_prev, t_last), t
        recs.append(step_params(coefs, seed=key, step=t, clip_sample=clip_sample, guidance=guidance))
    return np.stack(recs)


def sample(model, schedule, num_images, *, sampler="ddpm", num_steps=None, eta=0.0, variance_type="fixed_small",
           clip_sample=True, seed=0, batch_size=256, y=None, guidance=1.0, backend="auto",
           record_steps=(), progress=True, xp=np, cuda_graph=None, timestep_spacing="linspace", guide=None):
    """Generate ``num_images`` images (N, C, H, W) in model range [-1, 1], returned as a NumPy array.

    sampler: "ddpm" (all T steps, variance "fixed_small" = beta-tilde_t or "fixed_large" = beta_t),
    "ddim" (``num_steps`` evenly spaced steps, default 50, stochasticity ``eta`` in [0, 1]) or "dpmsolver++"
    (DPM-Solver++(2M), deterministic, on DDIM's ``num_steps`` timesteps; eta must be 0). ``y``: class labels (N,),
    prompt token ids (N, L) (text.encode_prompts) or None; ``guidance`` w combines eps_u + w (eps_c - eps_u).
    ``backend``: "native" (fused C++/CUDA kernel), "numpy" (readable reference, same images) or "auto" (native
    when built). ``record_steps``: timestep indices at which to keep the network's input x_t (returned as a dict
    {t: images} in a second return value when non-empty; key -1 holds the final x_0). ``cuda_graph``: on a GPU
    with the native kernel, capture each batch's step once and replay it (_GraphedStep); None = yes there, unless
    recording steps. ``timestep_spacing``: "linspace" or "logsnr" for DDIM and DPM-Solver++ (ddim_timesteps).
    ``guide``: autoguidance (Karras et al. 2024): a weaker network of the same data (e.g. the early EMA weights a
    checkpoint keeps, train.load_model(path, "guide")) takes the unconditional model's place, so ``guidance`` w
    combines eps_guide + w (eps_model - eps_guide); it works for unconditional models too."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {SAMPLERS}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    if sampler == "dpmsolver++" and eta != 0:
        raise ValueError(f"eta = {eta!r}: DPM-Solver++(2M) solves the deterministic ODE (eta = 0); "
                         f"for stochastic sampling use sampler='ddim' with eta > 0 or 'ddpm'")
    if backend == "auto":
        backend = "native" if _native_available(xp) else "numpy"
    graphed = (xp is not np and backend == "native" and not record_steps) if cuda_graph is None else bool(cuda_graph)
    if graphed and (xp is np or backend != "native" or record_steps):
        raise ValueError("cuda_graph needs CuPy arrays (xp=cupy), the native backend and no record_steps")
    T = schedule.num_train_timesteps
    steps = (np.arange(T - 1, -1, -1) if sampler == "ddpm" else
             ddim_timesteps(T, 50 if num_steps is None else num_steps, timestep_spacing, schedule))
    cfg = model.config
    shape = (cfg.in_channels, cfg.resolution, cfg.resolution)
    if guidance == 1.0:
        guide = None                        # w = 1 is the model alone: no pass through the guide
    if guide is not None and (guide.config.in_channels, guide.config.resolution) != (cfg.in_channels, cfg.resolution):
        raise ValueError(f"the guide network draws {guide.config.in_channels} x {guide.config.resolution}^2 images, "
                         f"the model {cfg.in_channels} x {cfg.resolution}^2")
    if y is not None:
        y = np.asarray(y, dtype=np.int64)
        if y.ndim not in (1, 2) or y.shape[0] != num_images:
            raise ValueError(f"y must have {num_images} rows (labels (N,) or token ids (N, L)), got {y.shape}")
    was_training = getattr(model, "training", False)
    model.train(False)
    if guide is not None:
        guide.train(False)
    out, recorded = [], {}
    bar = tqdm(total=num_images * len(steps), unit="img-step", desc=f"{sampler} x{len(steps)}", disable=not progress)
    try:
        for b, start in enumerate(range(0, num_images, batch_size)):
            n = min(batch_size, num_images - start)
            key = batch_seed(seed, b)
            yb = None if y is None else y[start:start + n]
            x = philox_normal(key, T, n * int(np.prod(shape)), xp=xp).reshape((n,) + shape)  # x_T ~ N(0, I)
            if graphed:
                out.append(_sample_graphed(model, schedule, sampler, steps, key, x, yb, variance_type, eta,
                                           clip_sample, guidance, bar, guide))
                continue
            x0_prev, t_last = None, None  # DPM-Solver++(2M): the previous step's x_0 prediction and its timestep
            for i, t in enumerate(steps):
                t = int(t)
                t_prev = int(steps[i + 1]) if i + 1 < len(steps) else -1
                if t in record_steps:  # the noisy input the network sees at timestep index t
                    recorded.setdefault(t, []).append(to_numpy(x))
                eps, eps_u = predict_eps(model, schedule, x, t, yb, guidance, guide)
                if sampler == "dpmsolver++":
                    if backend == "numpy":
                        x, x0 = dpmpp_2m_step(schedule, x, eps, t, t_prev, x0_prev, t_last, clip_sample, eps_u,
                                              guidance, return_x0=True)
                    else:
                        x, x0 = fused_step(x, eps, dpmpp_2m_coefficients(schedule, t, t_prev, t_last),
                                           clip_sample=clip_sample, eps_uncond=eps_u, guidance=guidance,
                                           x0_prev=x0_prev, x0_out=xp.empty_like(x))
                    x0_prev, t_last = x0, t
                elif backend == "numpy":
                    z = philox_normal(key, t, x.size, xp=xp).reshape(x.shape)
                    if sampler == "ddpm":
                        x = ddpm_step(schedule, x, eps, t, z, variance_type, clip_sample, eps_u, guidance)
                    else:
                        x = ddim_step(schedule, x, eps, t, t_prev, eta, z, clip_sample, eps_u, guidance)
                else:
                    coefs = (ddpm_coefficients(schedule, t, variance_type) if sampler == "ddpm"
                             else ddim_coefficients(schedule, t, t_prev, eta))
                    x = fused_step(x, eps, coefs, seed=key, step=t, clip_sample=clip_sample, eps_uncond=eps_u,
                                   guidance=guidance)
                bar.update(n)
            out.append(to_numpy(x))
            if -1 in record_steps:
                recorded.setdefault(-1, []).append(out[-1])
    finally:
        bar.close()
        model.train(was_training)
    images = np.concatenate(out)
    if record_steps:
        return images, {t: np.concatenate(v) for t, v in recorded.items()}
    return images


def _sample_graphed(model, schedule, sampler, steps, key, x, y, variance_type, eta, clip_sample, guidance, bar,
                    guide=None):
    """One batch's reverse process with a captured step (see _GraphedStep); returns the images on the host."""
    g = _GraphedStep(model, schedule, x, y, guidance, guide)
    with g.stream:                                        # the step records and timesteps, copied to the device once
        params = array_module(x).asarray(_step_records(schedule, sampler, steps, key, variance_type, eta, clip_sample,
                                                guidance).view(np.uint8).reshape(len(steps), -1))
        ts = array_module(x).asarray(np.asarray(steps, dtype=np.int64))
    for i in range(len(steps)):
        g.step(ts[i], params[i])
        bar.update(x.shape[0])
    g.stream.synchronize()
    return to_numpy(g.x)

