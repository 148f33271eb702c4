"""Training: epsilon prediction with the simplified loss (DDPM eq. 14), Adam, warm-up, clipping, EMA.

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
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import numpy as np
from tqdm.auto import tqdm

from .backend import get_xp, to_numpy
from .checkpoint import CheckpointError, load_checkpoint, load_params_into, save_checkpoint
from .data import batch_indices, load_dataset, to_model_range
from .diffusion import q_sample
from .image import save_grid
from .optim import EMA, Adam, clip_grad_norm, warmup_lr
from .philox import philox_normal
from .prompts import build_tokenizer, draw_prompts, prompt_table
from .sample import sample
from .schedule import NoiseSchedule
from .text import Tokenizer
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
    grad_clip: float = 1.0               # clip the global gradient norm to this
    weight_decay: float = 0.0            # decoupled (AdamW) when > 0
    ema_decay: float = 0.995             # max EMA decay; the decay warms up as min(ema_decay, (1+n)/(10+n))
    num_train_timesteps: int = 1000      # T (article 5.2)
    beta_schedule: str = "linear"        # "linear", "cosine" or "t_over_T" (article 4.1's teaching example)
    beta_start: float = 1e-4
    beta_end: float = 0.02
    p_uncond: float = 0.1                # conditional models: probability of the "no condition" label / empty prompt
    seed: int = 0
    device: str = "cpu"                  # "cpu" (NumPy) or "cuda" (CuPy)
    log_every: int = 25
    sample_every: int = 500              # write a sample grid every this many steps (0: never)
    ckpt_every: int = 250                # write the checkpoint every this many steps (and at the end)
    num_sample_images: int = 36

    def schedule(self):
        return NoiseSchedule(self.num_train_timesteps, self.beta_schedule, self.beta_start, self.beta_end)


class TrainingError(RuntimeError):
    """Training cannot go on (for example the loss became NaN); the last good checkpoint is kept."""


def loss_simple(model, schedule, x0, t, noise, y=None, rng=None):
    """L_simple = mean ||eps - eps_theta(x_t, t)||^2 over the batch and pixels (DDPM eq. 14), with
    x_t = q_sample(x_0, t, eps). Runs the forward pass and returns (loss, dL/d eps_theta) for the backward pass."""
    x_t = q_sample(schedule, x0, t, noise)
    eps_pred = model.forward(x_t, t, y, rng=rng)
    diff = eps_pred - noise
    loss = float((diff * diff).mean())
    return loss, diff * (2.0 / diff.size)


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
    os.makedirs(tcfg.out_dir, exist_ok=True)
    ckpt_path = os.path.join(tcfg.out_dir, "checkpoint.npz")
    step = 0
    if resume:
        ckpt = load_checkpoint(ckpt_path)
        _check_same("model configuration", ckpt["meta"]["config"]["model"], mcfg.asdict(), ckpt_path)
        saved_train = ckpt["meta"]["config"]["train"]
        exact = {k: getattr(tcfg, k) for k in ("dataset", "batch_size", "lr", "warmup_steps", "grad_clip",
                                               "weight_decay", "ema_decay", "num_train_timesteps", "beta_schedule",
                                               "beta_start", "beta_end", "p_uncond", "seed")}
        _check_same("training configuration", saved_train, exact, ckpt_path)
        load_params_into(model.params, ckpt["params"], "weights", ckpt_path)
        load_params_into(ema.params, ckpt["ema"], "EMA weights", ckpt_path)
        opt.load_state_dict(ckpt["opt"])
        ema.num_updates = int(ckpt["meta"]["ema_num_updates"])
        step = int(ckpt["meta"]["step"])
        print(f"resumed from {ckpt_path} at step {step}")

    def save():
        # The EMA weights go in the checkpoint's "ema/" section; its update count (for the decay warm-up) in meta.
        save_checkpoint(ckpt_path, model.params, ema.params, opt.state_dict(),
                        meta=dict(step=step, ema_num_updates=ema.num_updates, config=_config_json(tcfg, mcfg),
                                  tokenizer=tokenizer.to_dict() if tokenizer else None,
                                  rng=dict(kind="stateless: batch_indices(seed, step), default_rng([seed, step]), "
                                                 "Philox(seed | 0xFFFFFFFF << 32, step)", seed=tcfg.seed)))

    log = open(os.path.join(tcfg.out_dir, "log.jsonl"), "a")
    bar = tqdm(total=tcfg.steps, initial=step, unit="step", disable=not progress, dynamic_ncols=True)
    model.train(True)
    smooth, t_last, s_last = None, time.perf_counter(), step
    try:
        with _StopRequest() as stop:
            while step < tcfg.steps:
                rng = np.random.default_rng([tcfg.seed, step])
                idx = batch_indices(n, tcfg.batch_size, tcfg.seed, step)
                x0 = x_all[xp.asarray(idx)]
                t = rng.integers(0, T, size=tcfg.batch_size)
                y = None
                if mcfg.num_classes:
                    # classifier-free guidance: with probability p_uncond train on the "no condition" label
                    y = np.where(rng.random(tcfg.batch_size) < tcfg.p_uncond, mcfg.num_classes, y_all[idx])
                elif table is not None:                        # a random prompt per image, or "" with p_uncond
                    y = draw_prompts(table, y_all[idx], tcfg.p_uncond, rng)
                noise = philox_normal(TRAIN_NOISE_KEY | tcfg.seed, step, x0.size, xp=xp).reshape(x0.shape)
                loss, dout = loss_simple(model, schedule, x0, t, noise, y, rng=rng)
                if not math.isfinite(loss):
                    raise TrainingError(
                        f"loss became {loss} at step {step}; stopped without saving, so {ckpt_path} keeps the last "
                        f"good state. Try a lower learning rate (now {tcfg.lr}) or a stronger gradient clip.")
                model.zero_grad()
                model.backward(dout)
                grad_norm = clip_grad_norm(model.grads, tcfg.grad_clip)
                lr = warmup_lr(step, tcfg.lr, tcfg.warmup_steps)
                opt.step(lr=lr)
                ema.update(model.params)
                step += 1

                smooth = loss if smooth is None else 0.98 * smooth + 0.02 * loss
                if step % tcfg.log_every == 0 or step == tcfg.steps:
                    now = time.perf_counter()
                    ips = (step - s_last) * tcfg.batch_size / max(now - t_last, 1e-9)
                    t_last, s_last = now, step
                    bar.set_postfix(loss=f"{smooth:.4f}", img_s=f"{ips:.1f}", lr=f"{lr:.2e}")
                    log.write(json.dumps(dict(step=step, loss=loss, loss_smooth=smooth, lr=lr,
                                              grad_norm=float(grad_norm), images_per_s=ips)) + "\n")
                    log.flush()
                bar.update(1)
                if callback is not None:
                    callback(step, loss)
                if step % tcfg.ckpt_every == 0 or step == tcfg.steps or stop.requested:
                    save()
                if tcfg.sample_every and step % tcfg.sample_every == 0:
                    write_samples(model, ema, schedule, tcfg, step, xp)
                if stop.requested:
                    print(f"stopped at step {step}; checkpoint saved to {ckpt_path}; continue with --resume")
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
    """A UNet and its training config from a checkpoint; ``weights`` is "ema" (default) or "raw"."""
    if weights not in ("ema", "raw"):
        raise ValueError(f"unknown weights {weights!r}; choose 'ema' or 'raw'")
    ckpt = load_checkpoint(path)
    cfg = ckpt["meta"]["config"]
    model = UNet(UNetConfig.from_dict(cfg["model"]), seed=0).to(get_xp(device))
    load_params_into(model.params, ckpt["ema" if weights == "ema" else "params"], f"{weights} weights", path)
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    tcfg = TrainConfig(**{k: v for k, v in cfg["train"].items() if k in known})
    return model, tcfg, ckpt["meta"]


def load_tokenizer(meta, path="checkpoint"):
    """The tokenizer saved in a text-conditional checkpoint's meta."""
    if not meta.get("tokenizer"):
        raise CheckpointError(f"{path} is not text-conditional (it has no tokenizer); train one with --text")
    return Tokenizer.from_dict(meta["tokenizer"])
