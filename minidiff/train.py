"""Training: epsilon prediction with the simplified loss (DDPM eq. 14), Adam, warm-up, clipping, EMA.
Stage 5 of the pipeline: fits the network (unet.py) to the forward process (diffusion.py); writes checkpoints
that sample.py and evaluate.py read.

The article writes the objective as the negative log-likelihood L = E[sum_t L_t] with L_t = -log p_theta(x_{t-1}|x_t)
(its sections 3.2 and 4.2). Bounding it variationally (DDPM eq. 5) turns each L_{t-1} into a KL divergence between
two Gaussians, q(x_{t-1} | x_t, x_0) and p_theta(x_{t-1} | x_t). With the reverse mean written through a noise
prediction (DDPM eq. 11) that KL is, up to constants,
    L_{t-1} = beta_t^2 / (2 sigma_t^2 alpha_t (1 - ab_t)) * ||eps - eps_theta(sqrt(ab_t) x_0 + sqrt(1 - ab_t) eps, t)||^2
(DDPM eq. 12). DDPM drops the t-dependent weight and samples t uniformly: L_simple = E_{t, x_0, eps} ||eps -
eps_theta(x_t, t)||^2 (eq. 14), which is T times the mean of re-weighted L_t terms. That is what ``loss_simple``
computes; the exact weighted bound is computed for evaluation, not for training.

Everything needed for an exact resume is stateless or in the checkpoint: batch order comes from
data.batch_indices(seed, step), the timesteps from a generator seeded by (seed, step), the noise eps from the
counter-based Philox generator keyed by the seed and counted by step. So the "RNG state" a checkpoint needs is the
seed and the step, and a resumed run is bit-identical to an uninterrupted one.
"""
import dataclasses
import json
import math
import os
import signal
import time
import contextlib
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import numpy as np
from tqdm.auto import tqdm

from .utils import native as _native
from .utils.backend import array_module, get_xp, to_numpy
from .utils.checkpoint import CheckpointError, load_checkpoint, load_params_into, save_checkpoint
from .utils.data import batch_indices, load_dataset, to_model_range
from .diffusion import q_sample, velocity
from .utils.image import save_grid
from .optim import EMA, Adam, clip_grad_norm, learning_rate
from .utils.philox import philox_normal
from .conditioning.prompts import build_tokenizer, draw_prompts, prompt_table
from .sample import sample
from .schedule import NoiseSchedule
from .step import native_normal
from .conditioning.text import Tokenizer
from .unet import UNet, UNetConfig

TRAIN_NOISE_KEY = 0xFFFFFFFF << 32  # high word of the Philox key for training noise (sampling uses batch indices)


@dataclass
class TrainConfig:
    dataset: str = "mnist"               # "mnist" or "fashion-mnist"
    data_dir: Optional[str] = None       # where the IDX files are (else: $MINIDIFF_DATA_DIR, cache, /usr/share/datasets)
    out_dir: str = "runs/mnist"          # checkpoint.npz, samples_*.png, log.jsonl
    steps: int = 1500                    # optimizer steps in total (a resumed run continues up to this)
    batch_size: int = 64
    lr: float = 1e-3                     # Adam learning rate after warm-up
    warmup_steps: int = 100              # linear learning-rate warm-up from 0
    lr_schedule: str = "constant"        # after warm-up: "constant" or "cosine" (decay to 0 at `steps`)
    grad_clip: float = 1.0               # clip the global gradient norm to this
    weight_decay: float = 0.0            # decoupled (AdamW) when > 0
    ema_decay: float = 0.995             # max EMA decay; the decay warms up as min(ema_decay, (1+n)/(10+n))
    guide_step: Optional[int] = None     # keep the EMA weights of this step as the guide of autoguidance (sample.py)
    num_train_timesteps: int = 1000      # T (article 5.2)
    beta_schedule: str = "linear"        # "linear", "cosine" or "t_over_T" (article 4.1's teaching example)
    beta_start: float = 1e-4
    beta_end: float = 0.02
    p_uncond: float = 0.1                # conditional models: probability of the "no condition" label / empty prompt
    loss_weighting: str = "uniform"      # "uniform" (DDPM's L_simple) or "min_snr" (Min-SNR-gamma, loss_weights)
    snr_gamma: float = 5.0               # gamma of "min_snr"
    seed: int = 0
    device: str = "cpu"                  # "cpu" (NumPy) or "cuda" (CuPy)
    cuda_graphs: bool = True             # with "cuda": capture the training step once, replay it (TrainStep)
    log_every: int = 25
    sample_every: int = 500              # write a sample grid every this many steps (0: never)
    ckpt_every: int = 250                # write the checkpoint every this many steps (and at the end)
    max_minutes: Optional[float] = None  # stop (saving a checkpoint) once training has run this long
    num_sample_images: int = 36

    def schedule(self):
        return NoiseSchedule(self.num_train_timesteps, self.beta_schedule, self.beta_start, self.beta_end)


class TrainingError(RuntimeError):
    """Training cannot go on (for example the loss became NaN); the last good checkpoint is kept."""


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
    target = noise if model.cfg.prediction_type == "epsilon" else velocity(schedule, x0, t, noise)
    out = model.forward(x_t, t, y, rng=rng)
    w = 1.0 if weights is None else weights[t].reshape((-1,) + (1,) * (out.ndim - 1))   # w_t per image
    err = out - target
    return (w * err * err).mean(), (2.0 / out.size) * w * err          # the loss and its gradient d loss / d out


def training_noise(seed, step, shape, xp):
    """The eps of training step ``step``: Philox normals keyed by the seed and counted by the step (so a resumed run
    draws the same noise). NumPy computes them in NumPy (philox.philox_normal); on a GPU the CUDA kernel draws the
    same numbers (to 1e-6) on the device, with nothing to copy."""
    n = int(np.prod(shape))
    if xp is not np and _native.native_status()["cuda_kernel"]:
        return native_normal(TRAIN_NOISE_KEY | seed, step, n, xp=xp).reshape(shape)
    return philox_normal(TRAIN_NOISE_KEY | seed, step, n, xp=xp).reshape(shape)


class TrainStep:
    """One optimizer step on fixed input buffers: x_t = q_sample(x_0, t, eps), the network, L_simple and its
    gradient, backward, gradient clipping, Adam and EMA, with every value left where it is computed (no host
    synchronisation). ``set_inputs`` copies a batch and the step's scalars (learning rate, bias corrections, EMA
    decay, computed on the host from counters) into the buffers; ``run`` computes the step.

    On a GPU with ``cuda_graph=True`` the first ``run`` executes eagerly (so CuPy's memory pool and kernel caches
    serve every later call) and then captures the same work once as a CUDA graph on its own stream and memory
    pool; every later ``run`` replays the graph: a few microseconds of launch instead of thousands of kernel
    launches from Python. ``loss`` and ``grad_norm`` are 0-d arrays on the device, overwritten by every run."""

    def __init__(self, model, opt, ema, schedule, grad_clip, x_shape, y_shape=None, cuda_graph=False, weights=None):
        xp = array_module(model.params[next(iter(model.params))])
        self.xp, self.model, self.opt, self.ema, self.schedule = xp, model, opt, ema, schedule
        self.grad_clip = float(grad_clip)
        dtype = model.dtype
        self.weights = None if weights is None else xp.asarray(weights, dtype=dtype)   # (T,): loss_weights
        self.x0, self.noise = xp.zeros(x_shape, dtype), xp.zeros(x_shape, dtype)
        self.t = xp.zeros(x_shape[0], np.int64)
        self.y = None if y_shape is None else xp.zeros(y_shape, np.int64)
        self.hyper = xp.zeros(4, dtype)          # Adam step size, eps_hat, decay; EMA decay
        self.loss, self.grad_norm = xp.zeros((), dtype), xp.zeros((), dtype)
        self.rng = None
        if cuda_graph and xp is np:
            raise ValueError("cuda_graph needs a GPU (device 'cuda')")
        if cuda_graph and model.cfg.dropout:
            raise ValueError("cuda_graph needs dropout = 0: the dropout masks come from the host, new every step")
        self.cuda_graph, self.graph = cuda_graph, None
        if cuda_graph:
            import cupy
            self.stream, self.pool = cupy.cuda.Stream(non_blocking=True), cupy.cuda.MemoryPool()

    def set_inputs(self, x0, t, noise, y, lr, rng=None):
        """x0, noise (B, C, H, W) and y (B,) / (B, L) on the device or the host; t (B,) ints on the host, checked
        here (not on the device)."""
        t = np.asarray(t)
        T = self.schedule.num_train_timesteps
        if t.shape != self.t.shape or t.dtype.kind not in "iu" or t.min() < 0 or t.max() >= T:
            raise ValueError(f"t must be {self.t.shape[0]} ints in [0, {T}), got {t.dtype} {t.shape}")
        cfg = self.model.cfg
        if cfg.num_classes and not 0 <= np.min(y) <= np.max(y) <= cfg.num_classes:
            raise ValueError(f"class labels must be in [0, {cfg.num_classes}] ({cfg.num_classes} = no condition)")
        if cfg.text_cond and not 0 <= np.min(y) <= np.max(y) < cfg.vocab_size:
            raise ValueError(f"token ids must be in [0, {cfg.vocab_size})")
        hyper = np.array(self.opt.hyper(lr) + (self.ema.next_decay(),), dtype=self.hyper.dtype)
        for buf, value in ((self.x0, x0), (self.t, t), (self.noise, noise), (self.y, y), (self.hyper, hyper)):
            if buf is not None:
                self._copy(buf, value)
        self.rng = rng

    def _copy(self, buf, value):
        buf[...] = self.xp.asarray(value)       # on the current stream (stream_context): before the step

    def _body(self):
        model, h = self.model, self.hyper
        loss, dout = loss_simple(model, self.schedule, self.x0, self.t, self.noise, self.y, self.rng, self.weights)
        model.zero_grad()
        model.backward(dout)
        self.grad_norm[...] = clip_grad_norm(model.grads, self.grad_clip)
        self.opt.apply(h[0], h[1], h[2])
        self.ema.apply(model.params, h[3])
        self.loss[...] = loss

    def stream_context(self):
        """The stream the step runs on, as a context (a no-op without a graph): work around the step (its inputs,
        reading its results, sample previews) goes on the same stream, in order with it."""
        return self.stream if self.cuda_graph else contextlib.nullcontext()

    def run(self):
        if not self.cuda_graph:
            return self._body()
        import cupy
        if self.graph is not None:
            return self.graph.launch(self.stream)
        with self.stream, cupy.cuda.using_allocator(self.pool.malloc):
            self._body()                         # the real first step; fills the pool and the kernel caches
            self.stream.synchronize()
            self.stream.begin_capture()
            try:
                self._body()                     # recorded, not run
            finally:
                self.graph = self.stream.end_capture()

    def synchronize(self):
        """Wait for the step to finish (before the host reads the model, e.g. to save or sample)."""
        if self.cuda_graph:
            self.stream.synchronize()


def _config_json(tcfg, mcfg):
    return dict(train=dataclasses.asdict(tcfg), model=mcfg.asdict())


def _check_same(kind, saved, wanted, path):
    diff = {k: (saved.get(k), v) for k, v in wanted.items() if json.loads(json.dumps(saved.get(k))) != json.loads(json.dumps(v))}
    if diff:
        lines = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items())
        raise CheckpointError(f"cannot resume from {path!r}: its {kind} differs ({lines})")


class _StopRequest:
    """Ctrl-C (SIGINT) asks the loop to stop after the current step; a second Ctrl-C interrupts at once."""

    def __init__(self):
        self.requested = False

    def __enter__(self):
        self._previous = signal.getsignal(signal.SIGINT)
        try:
            signal.signal(signal.SIGINT, self._handler)
        except ValueError:  # not in the main thread: leave Ctrl-C alone
            self._previous = None
        return self

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nCtrl-C: finishing this step, saving a checkpoint and stopping (Ctrl-C again to abort)", flush=True)

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def train(tcfg, mcfg, resume=False, progress=True, callback=None):
    """Train a UNet (config ``mcfg``) as ``tcfg`` says; returns (model, ema, step). ``resume`` continues from
    ``out_dir/checkpoint.npz`` exactly. ``callback(step, loss)`` is called after every step (tests, logging)."""
    xp = get_xp(tcfg.device)
    schedule = tcfg.schedule()
    T = schedule.num_train_timesteps
    images, labels = load_dataset(tcfg.dataset, "train", data_dir=tcfg.data_dir)
    x_all = xp.asarray(to_model_range(images))                 # (N, 1, 28, 28) in [-1, 1], moved to the device once
    y_all = labels.astype(np.int64)
    if tuple(x_all.shape[1:]) != (mcfg.in_channels, mcfg.resolution, mcfg.resolution):
        raise ValueError(f"data images are {tuple(x_all.shape[1:])} but the model expects "
                         f"({mcfg.in_channels}, {mcfg.resolution}, {mcfg.resolution})")
    n = x_all.shape[0]
    tokenizer = table = None
    if mcfg.text_cond:                                         # prompts from templates (prompts.py)
        tokenizer = build_tokenizer(tcfg.dataset)
        if mcfg.vocab_size != len(tokenizer):
            raise ValueError(f"UNetConfig.vocab_size is {mcfg.vocab_size} but the {tcfg.dataset} prompt vocabulary "
                             f"has {len(tokenizer)} tokens (set vocab_size=len(build_tokenizer(dataset)))")
        table = prompt_table(tokenizer, tcfg.dataset, "train", mcfg.text_len)

    model = UNet(mcfg, seed=tcfg.seed).to(xp)
    opt = Adam(model.params, model.grads, lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    ema = EMA(model.params, max_decay=tcfg.ema_decay)
    guide = {}                  # autoguidance: the EMA weights at step guide_step, a weaker version of the model
    os.makedirs(tcfg.out_dir, exist_ok=True)
    ckpt_path = os.path.join(tcfg.out_dir, "checkpoint.npz")
    step = 0
    if resume:
        ckpt = load_checkpoint(ckpt_path)
        _check_same("model configuration", dict(UNetConfig().asdict(), **ckpt["meta"]["config"]["model"]),
                    mcfg.asdict(), ckpt_path)
        # (options a checkpoint predates count as their defaults)
        saved_train = dict(dataclasses.asdict(TrainConfig()), **ckpt["meta"]["config"]["train"])
        exact = {k: getattr(tcfg, k) for k in ("dataset", "batch_size", "lr", "warmup_steps", "lr_schedule",
                                               "grad_clip", "weight_decay", "ema_decay", "num_train_timesteps",
                                               "beta_schedule", "beta_start", "beta_end", "p_uncond",
                                               "loss_weighting", "snr_gamma", "seed", "guide_step")}
        _check_same("training configuration", saved_train, exact, ckpt_path)
        load_params_into(model.params, ckpt["params"], "weights", ckpt_path)
        load_params_into(ema.params, ckpt["ema"], "EMA weights", ckpt_path)
        opt.load_state_dict(ckpt["opt"])
        ema.num_updates = int(ckpt["meta"]["ema_num_updates"])
        guide = {k: xp.asarray(v) for k, v in ckpt["guide"].items()}
        step = int(ckpt["meta"]["step"])
        print(f"resumed from {ckpt_path} at step {step}")

    def save():
        # The EMA weights go in the checkpoint's "ema/" section; its update count (for the decay warm-up) in meta.
        save_checkpoint(ckpt_path, model.params, ema.params, opt.state_dict(), guide_params=guide,
                        meta=dict(step=step, ema_num_updates=ema.num_updates, config=_config_json(tcfg, mcfg),
                                  tokenizer=tokenizer.to_dict() if tokenizer else None,
                                  rng=dict(kind="stateless: batch_indices(seed, step), default_rng([seed, step]), "
                                                 "Philox(seed | 0xFFFFFFFF << 32, step)", seed=tcfg.seed)))

    B = tcfg.batch_size
    y_shape = (B,) if mcfg.num_classes else (B, mcfg.text_len) if table is not None else None
    graph = tcfg.device == "cuda" and tcfg.cuda_graphs and not mcfg.dropout
    if tcfg.device == "cuda" and tcfg.cuda_graphs and mcfg.dropout:
        print("dropout > 0: the training step runs without a CUDA graph (its dropout masks come from the host)")
    weights = (None if tcfg.loss_weighting == "uniform" else
               loss_weights(schedule, mcfg.prediction_type, tcfg.loss_weighting, tcfg.snr_gamma))
    ts = TrainStep(model, opt, ema, schedule, tcfg.grad_clip, (B,) + tuple(x_all.shape[1:]), y_shape, graph, weights)
    pending = []                                # (step, loss, grad norm, lr) of the steps not yet read back

    def read_back():
        """Read the losses of the steps since the last read (one host synchronisation), log them and stop if one is
        not finite: nothing after a non-finite loss reaches a checkpoint."""
        nonlocal smooth
        if not pending:
            return
        values = to_numpy(xp.stack([xp.stack([loss, norm]) for _, loss, norm, _ in pending]))
        for (s, _, _, lr), (loss, norm) in zip(pending, values.astype(np.float64)):
            if not math.isfinite(loss):
                raise TrainingError(
                    f"loss became {loss} at step {s}; stopped without saving, so {ckpt_path} keeps the last good "
                    f"state. Try a lower learning rate (now {tcfg.lr}) or a stronger gradient clip.")
            smooth = loss if smooth is None else 0.98 * smooth + 0.02 * loss
            last = dict(step=s + 1, loss=float(loss), loss_smooth=smooth, lr=lr, grad_norm=float(norm))
        pending.clear()
        return last

    log = open(os.path.join(tcfg.out_dir, "log.jsonl"), "a")
    bar = tqdm(total=tcfg.steps, initial=step, unit="step", disable=not progress, dynamic_ncols=True)
    model.train(True)
    smooth, t_last, s_last = None, time.perf_counter(), step
    t_start = t_last
    try:
        with _StopRequest() as stop, ts.stream_context():   # one stream for everything: inputs, step, previews
            while step < tcfg.steps:
                rng = np.random.default_rng([tcfg.seed, step])
                idx = batch_indices(n, B, tcfg.seed, step)
                t = rng.integers(0, T, size=B)
                y = None
                if mcfg.num_classes:
                    # classifier-free guidance: with probability p_uncond train on the "no condition" label
                    y = np.where(rng.random(B) < tcfg.p_uncond, mcfg.num_classes, y_all[idx])
                elif table is not None:                        # a random prompt per image, or "" with p_uncond
                    y = draw_prompts(table, y_all[idx], tcfg.p_uncond, rng)
                lr = learning_rate(step, tcfg.lr, tcfg.warmup_steps, tcfg.steps, tcfg.lr_schedule)
                ts.set_inputs(x_all[xp.asarray(idx)], t, training_noise(tcfg.seed, step, ts.x0.shape, xp), y, lr, rng)
                ts.run()
                pending.append((step, ts.loss.copy(), ts.grad_norm.copy(), lr))
                step += 1
                if step == tcfg.guide_step:
                    guide = {k: v.copy() for k, v in ema.params.items()}
                if callback is not None:
                    callback(step, ts.loss)

                if tcfg.max_minutes and time.perf_counter() - t_start > 60 * tcfg.max_minutes and step < tcfg.steps:
                    stop.requested = "time"            # the time budget is spent: save and stop like Ctrl-C
                due_ckpt = step % tcfg.ckpt_every == 0 or step == tcfg.steps or stop.requested
                due_sample = tcfg.sample_every and step % tcfg.sample_every == 0
                if step % tcfg.log_every == 0 or due_ckpt or due_sample:
                    ts.synchronize()
                    last = read_back()
                    now = time.perf_counter()
                    ips = (step - s_last) * B / max(now - t_last, 1e-9)
                    t_last, s_last = now, step
                    bar.set_postfix(loss=f"{smooth:.4f}", img_s=f"{ips:.1f}", lr=f"{lr:.2e}")
                    log.write(json.dumps(dict(last, images_per_s=ips)) + "\n")
                    log.flush()
                bar.update(1)
                if due_ckpt:
                    save()
                if due_sample:
                    write_samples(model, ema, schedule, tcfg, step, xp)
                if stop.requested:
                    why = f"after {tcfg.max_minutes:g} minutes (max_minutes) " if stop.requested == "time" else ""
                    print(f"stopped {why}at step {step}; checkpoint saved to {ckpt_path}; continue with --resume")
                    break
    finally:
        bar.close()
        log.close()
    return model, ema, step


def write_samples(model, ema, schedule, tcfg, step, xp, sampler="ddim", num_steps=50):
    """A PNG grid of samples from the EMA weights (quick DDIM preview); the training weights are restored."""
    with swapped_params(model.params, ema.params):
        imgs = sample(model, schedule, tcfg.num_sample_images, sampler=sampler, num_steps=num_steps,
                      seed=tcfg.seed, progress=False, xp=xp)
    return save_grid(imgs, os.path.join(tcfg.out_dir, f"samples_{step:06d}.png"))


@contextmanager
def swapped_params(params, replacement):
    """Temporarily copy ``replacement`` (e.g. the EMA weights) into ``params`` in place, then restore them."""
    saved = {k: v.copy() for k, v in params.items()}
    for k, v in params.items():
        v[...] = replacement[k]
    try:
        yield
    finally:
        for k, v in params.items():
            v[...] = saved[k]


def load_model(path, weights="ema", device="cpu"):
    """A UNet and its training config from a checkpoint; ``weights`` is "ema" (default), "raw" or "guide" (the
    early EMA weights kept by ``guide_step``, for autoguidance)."""
    if weights not in ("ema", "raw", "guide"):
        raise ValueError(f"unknown weights {weights!r}; choose 'ema', 'raw' or 'guide'")
    ckpt = load_checkpoint(path)
    cfg = ckpt["meta"]["config"]
    if weights == "guide" and not ckpt["guide"]:
        raise CheckpointError(f"{path} has no guide weights for autoguidance (it was trained without "
                              f"TrainConfig.guide_step)")
    model = UNet(UNetConfig.from_dict(cfg["model"]), seed=0).to(get_xp(device))
    load_params_into(model.params, ckpt[{"ema": "ema", "raw": "params", "guide": "guide"}[weights]],
                     f"{weights} weights", path)
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    tcfg = TrainConfig(**{k: v for k, v in cfg["train"].items() if k in known})
    return model, tcfg, ckpt["meta"]


def load_tokenizer(meta, path="checkpoint"):
    """The tokenizer saved in a text-conditional checkpoint's meta."""
    if not meta.get("tokenizer"):
        raise CheckpointError(f"{path} is not text-conditional (it has no tokenizer); train one with --text")
    return Tokenizer.from_dict(meta["tokenizer"])
