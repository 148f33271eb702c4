"""The training loop: batches, the training step, logs, checkpoints, previews, exact resume.
Step 10 of the reading order, the last: it runs train_step.TrainStep over the data set, as nanoGPT's train.py does.

Everything needed for an exact resume is stateless or in the checkpoint: batch order comes from
data.batch_indices(seed, step), the timesteps from a generator seeded by (seed, step), the noise eps from the
counter-based Philox generator keyed by the seed and counted by step. So the "RNG state" a checkpoint needs is the
seed and the step, and a resumed run is bit-identical to an uninterrupted one.
"""
import dataclasses
import json
import math
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import numpy as np
from tqdm.auto import tqdm

from .optim import EMA, LR_SCHEDULES, Adam, learning_rate
from .sample import sample
from .schedule import NoiseSchedule
from .train_step import TrainStep, loss_weights, training_noise
from .utils.backend import get_xp, to_numpy
from .utils.checkpoint import CheckpointError, load_checkpoint, load_params_into, model_config_defaults, save_checkpoint
from .utils.data import DATASETS, batch_indices, load_dataset, to_model_range
from .utils.distributed import Single
from .utils.image import save_grid
from .utils.signals import StopRequest


@dataclass
class TrainConfig:
    dataset: str = "mnist"               # "mnist", "fashion-mnist", "cifar10" or a folder of images (utils/data.py)
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
    hflip: bool = False                  # flip each training image left-right with probability 1/2 (augmentation)

    # How a run is run, not what it computes: a resumed run may change these. Every other field must match the
    # checkpoint's; so must `steps` under a cosine learning rate, whose curve it sets (a constant-rate run may be
    # extended).
    RUN_CONTROL = ("data_dir", "out_dir", "device", "cuda_graphs", "log_every", "sample_every", "ckpt_every",
                   "max_minutes", "num_sample_images")

    def check(self):
        """A ValueError naming every setting out of its range: on construction, and again in train() (the examples
        change fields after it)."""
        bad = [f"{k} = {getattr(self, k)!r} (must be {rule})" for k, ok, rule in (
            ("steps", self.steps >= 1, ">= 1"), ("batch_size", self.batch_size >= 1, ">= 1"),
            ("lr", self.lr > 0, "> 0"), ("warmup_steps", self.warmup_steps >= 0, ">= 0"),
            ("lr_schedule", self.lr_schedule in LR_SCHEDULES, f"one of {LR_SCHEDULES}"),
            ("grad_clip", self.grad_clip > 0, "> 0"), ("weight_decay", self.weight_decay >= 0, ">= 0"),
            ("ema_decay", 0 <= self.ema_decay < 1, "in [0, 1)"), ("p_uncond", 0 <= self.p_uncond <= 1, "in [0, 1]"),
            ("guide_step", self.guide_step is None or self.guide_step >= 1, "None or >= 1"),
            ("snr_gamma", self.snr_gamma > 0, "> 0"), ("log_every", self.log_every >= 1, ">= 1"),
            ("sample_every", self.sample_every >= 0, ">= 0 (0: never)"), ("ckpt_every", self.ckpt_every >= 1, ">= 1"),
            ("num_sample_images", self.num_sample_images >= 1, ">= 1"),
            ("max_minutes", not self.max_minutes or self.max_minutes > 0, "None, 0 (no limit) or > 0")) if not ok]
        if bad:
            raise ValueError("training settings out of range: " + "; ".join(bad))

    __post_init__ = check

    def schedule(self):
        return NoiseSchedule(self.num_train_timesteps, self.beta_schedule, self.beta_start, self.beta_end)


class TrainingError(RuntimeError):
    """Training cannot go on (for example the loss became NaN); the last good checkpoint is kept. Every process
    raises it at the same step (it is found in values summed over the processes)."""
    every_rank = True


def _check_same(kind, saved, wanted, path, ignore=()):
    diff = {k: (saved.get(k), v) for k, v in wanted.items()
            if k not in ignore and json.loads(json.dumps(saved.get(k))) != json.loads(json.dumps(v))}
    if diff:
        lines = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items())
        raise CheckpointError(f"cannot resume from {path!r}: its {kind} differs ({lines})")


def _resume(ckpt_path, tcfg, model, opt, ema, xp):
    """Load a checkpoint into model, opt and ema after checking that it is the same run; returns (step, guide)."""
    ckpt = load_checkpoint(ckpt_path)
    config = ckpt["meta"]["config"]
    # (options a checkpoint predates count as their defaults)
    defaults = model_config_defaults()
    _check_same("model configuration", dict(defaults, **config["model"]), dict(defaults, **model.config_dict()),
                ckpt_path)
    ignore = TrainConfig.RUN_CONTROL + (("steps",) if tcfg.lr_schedule == "constant" else ())
    _check_same("training configuration", dict(dataclasses.asdict(TrainConfig()), **config["train"]),
                dataclasses.asdict(tcfg), ckpt_path, ignore)
    load_params_into(model.params, ckpt["params"], "weights", ckpt_path)
    load_params_into(ema.params, ckpt["ema"], "EMA weights", ckpt_path)
    opt.load_state_dict(ckpt["opt"])
    ema.num_updates = int(ckpt["meta"]["ema_num_updates"])
    return int(ckpt["meta"]["step"]), {k: xp.asarray(v) for k, v in ckpt["guide"].items()}


def train(tcfg, model, resume=False, progress=True, callback=None, group=None):
    """Train ``model`` (a UNet, or a conditional one from minidiff/conditioning/) as ``tcfg`` says; returns
    (model, ema, step). ``resume`` continues from ``out_dir/checkpoint.npz`` exactly. ``callback(step, loss)`` is
    called after every step (tests, logging). ``group``: the processes of a data-parallel run (utils/distributed.py:
    each trains on its share of every global batch; rank 0 alone writes files); None: this process alone."""
    group = group or Single()
    tcfg.check()
    xp = get_xp(tcfg.device)
    if tcfg.device == "cuda":
        group.use_gpu()                                        # this process's GPU (and NCCL between them)
    schedule = tcfg.schedule()
    T, B, cfg = schedule.num_train_timesteps, tcfg.batch_size, model.config
    folder = {} if tcfg.dataset in DATASETS else dict(resolution=cfg.resolution, channels=cfg.in_channels)
    with group.main_first():                                   # rank 0 downloads or decodes, the others read its cache
        data = load_dataset(tcfg.dataset, "train", data_dir=tcfg.data_dir, progress=progress and group.main, **folder)
    x_all = xp.asarray(to_model_range(data[0]))                # (N, C, H, W) in [-1, 1], moved to the device once
    y_all = data[1].astype(np.int64)
    if tuple(x_all.shape[1:]) != (cfg.in_channels, cfg.resolution, cfg.resolution):
        raise ValueError(f"data images are {tuple(x_all.shape[1:])} but the model expects "
                         f"({cfg.in_channels}, {cfg.resolution}, {cfg.resolution})")
    lo, hi = group.share(B)                                    # this process's rows of every global batch
    if hi <= lo:
        raise ValueError(f"{group.size} processes for a batch of {B}: each needs at least one example")
    draw_condition = getattr(model, "draw_condition", None)   # conditional models: y from the labels

    model.to(xp)
    opt = Adam(model.params, model.grads, lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    ema = EMA(model.params, max_decay=tcfg.ema_decay)
    guide = {}                  # autoguidance: the EMA weights at step guide_step, a weaker version of the model
    os.makedirs(tcfg.out_dir, exist_ok=True)
    ckpt_path = os.path.join(tcfg.out_dir, "checkpoint.npz")
    step = 0
    if resume:
        step, guide = _resume(ckpt_path, tcfg, model, opt, ema, xp)
        if group.main:
            print(f"resumed from {ckpt_path} at step {step}")

    def save():
        # The EMA weights go in the checkpoint's "ema/" section; its update count (for the decay warm-up) in meta.
        tokenizer = getattr(model, "tokenizer", None)
        save_checkpoint(ckpt_path, model.params, ema.params, opt.state_dict(), guide_params=guide,
                        meta=dict(step=step, ema_num_updates=ema.num_updates, class_names=data.class_names,
                                  config=dict(train=dataclasses.asdict(tcfg), model=model.config_dict()),
                                  tokenizer=tokenizer.to_dict() if tokenizer else None,
                                  rng=dict(kind="stateless: batch_indices(seed, step), default_rng([seed, step]), "
                                                 "Philox(seed | 0xFFFFFFFF << 32, step)", seed=tcfg.seed)))

    graph = tcfg.device == "cuda" and tcfg.cuda_graphs and not cfg.dropout
    if tcfg.device == "cuda" and tcfg.cuda_graphs and cfg.dropout and group.main:
        print("dropout > 0: the training step runs without a CUDA graph (its dropout masks come from the host)")
    weights = (None if tcfg.loss_weighting == "uniform" else
               loss_weights(schedule, cfg.prediction_type, tcfg.loss_weighting, tcfg.snr_gamma))
    train_step = TrainStep(model, opt, ema, schedule, tcfg.grad_clip, weights, graph, group, (hi - lo) / B)
    pending = []                                # (step, loss, grad norm, lr) of the steps not yet read back

    def read_back():
        """Read the losses of the steps since the last read (one host synchronisation; the global batch's mean over
        the processes), log them and stop if one is not finite: nothing after a non-finite loss reaches a
        checkpoint, on any process."""
        nonlocal smooth
        values = to_numpy(xp.stack([xp.stack([loss, norm]) for _, loss, norm, _ in pending])).astype(np.float64)
        values = group.sum_host(values * np.array([(hi - lo) / B, 1.0 / group.size]))
        for (s, _, _, lr), (loss, norm) in zip(pending, values):
            if not math.isfinite(loss):
                raise TrainingError(
                    f"loss became {loss} at step {s}; stopped without saving, so {ckpt_path} keeps the last good "
                    f"state. Try a lower learning rate (now {tcfg.lr}) or a stronger gradient clip.")
            smooth = loss if smooth is None else 0.98 * smooth + 0.02 * loss
            last = dict(step=s + 1, loss=float(loss), loss_smooth=smooth, lr=lr, grad_norm=float(norm))
        pending.clear()
        return last

    log = open(os.path.join(tcfg.out_dir, "log.jsonl"), "a") if group.main else None
    bar = tqdm(total=tcfg.steps, initial=step, unit="step", disable=not (progress and group.main), dynamic_ncols=True)
    model.train(True)
    smooth, t_last, s_last = None, time.perf_counter(), step
    t_start = t_last
    try:
        with StopRequest() as stop, train_step.stream_context():   # one stream: inputs, step, previews
            while step < tcfg.steps:
                # the global batch, every example keyed by (seed, step, its place in the batch); this process's rows
                rng = np.random.default_rng([tcfg.seed, step])
                idx = batch_indices(len(y_all), B, tcfg.seed, step)
                t = rng.integers(0, T, size=B)
                y = None if draw_condition is None else draw_condition(y_all[idx], tcfg.p_uncond, rng)
                flip = tcfg.hflip and rng.random(B) < 0.5      # horizontal flips (data augmentation)
                x0 = x_all[xp.asarray(idx[lo:hi])]
                if tcfg.hflip:
                    x0 = xp.where(xp.asarray(flip[lo:hi])[:, None, None, None], x0[..., ::-1], x0)
                noise = training_noise(tcfg.seed, step, (B,) + tuple(x_all.shape[1:]), xp)[lo:hi]
                lr = learning_rate(step, tcfg.lr, tcfg.warmup_steps, tcfg.steps, tcfg.lr_schedule)
                train_step(x0, t[lo:hi], noise, None if y is None else y[lo:hi], lr, group.share_rng(rng, B))
                pending.append((step, train_step.loss.copy(), train_step.grad_norm.copy(), lr))
                step += 1
                if step == tcfg.guide_step:
                    guide = {k: v.copy() for k, v in ema.params.items()}
                if callback is not None:
                    callback(step, train_step.loss)

                # Ctrl-C on any process, or the time budget spent (1, 2): every process stops after this same step
                out_of_time = tcfg.max_minutes and time.perf_counter() - t_start > 60 * tcfg.max_minutes
                stop.requested = ("", "ctrl-c", "time")[group.any(2 if out_of_time else 1 if stop.requested else 0)]
                stop.requested = stop.requested if step < tcfg.steps else ""
                due_ckpt = step % tcfg.ckpt_every == 0 or step == tcfg.steps or stop.requested
                due_sample = tcfg.sample_every and step % tcfg.sample_every == 0
                if step % tcfg.log_every == 0 or due_ckpt or due_sample:
                    train_step.synchronize()
                    last = read_back()
                    now = time.perf_counter()
                    ips = (step - s_last) * B / max(now - t_last, 1e-9)
                    t_last, s_last = now, step
                    bar.set_postfix(loss=f"{smooth:.4f}", img_s=f"{ips:.1f}", lr=f"{lr:.2e}")
                    if log:
                        log.write(json.dumps(dict(last, images_per_s=ips, processes=group.size)) + "\n")
                        log.flush()
                bar.update(1)
                if due_ckpt and group.main:
                    save()
                if due_sample and group.main:
                    write_samples(model, ema, schedule, tcfg, step, xp)
                if stop.requested:
                    why = "on the time budget (max_minutes) " if stop.requested == "time" else ""
                    if group.main:
                        print(f"stopped {why}at step {step}; checkpoint saved to {ckpt_path}; continue with --resume")
                    break
        group.barrier()                          # rank 0's last checkpoint is written before any process goes on
    finally:
        bar.close()
        if log:
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
