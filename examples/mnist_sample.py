"""Sample images from a trained minidiff checkpoint: a PNG grid and a .npy of the samples.

    python examples/mnist_sample.py runs/mnist/checkpoint.npz                        # DDPM, all T steps, EMA weights
    python examples/mnist_sample.py runs/mnist/checkpoint.npz --sampler ddim --steps 50 --eta 0
    python examples/mnist_sample.py runs/mnist/checkpoint.npz --sampler dpmsolver++ --steps 20   # DPM-Solver++(2M)
    python examples/mnist_sample.py runs/mnist/checkpoint.npz --sampler dpmsolver++ --steps 20 --autoguidance 2
    python examples/mnist_sample.py runs/mnist/checkpoint.npz -n 100 --seed 3 --out samples.png
    python examples/mnist_sample.py CKPT --class-label 7 --guidance 3                  # class-conditional models
    python examples/mnist_sample.py CKPT --guidance 3                  # without --class-label: a class per column
    python examples/mnist_sample.py CKPT --class-label cat                             # a class by its name
    mpiexec -n 4 python examples/mnist_sample.py CKPT -n 10000      # four processes: the same 10,000 images
    python examples/mnist_sample.py CKPT --prompt "a handwritten seven" --prompt "手写数字三" --guidance 3   # text

Writes OUT (PNG grid) and OUT with .npy (float32 samples in [-1, 1], shape (N, 1, 28, 28)). With --prompt, each prompt
gets one row of -n images (default 8); a prompt without any known word is an error that lists the vocabulary.
"""
import argparse
import os
import sys
import time

import numpy as np

from minidiff.conditioning.text import encode_prompts
from minidiff.sample import sample
from minidiff.utils.backend import get_xp
from minidiff.utils.checkpoint import CheckpointError, load_model
from minidiff.utils.distributed import group as process_group
from minidiff.utils.image import save_grid


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("--weights", choices=["ema", "raw"], default="ema")
    p.add_argument("--sampler", choices=["ddpm", "ddim", "dpmsolver++"], default="ddpm")
    p.add_argument("--steps", type=int, help="DDIM / DPM-Solver++ steps S, default 50 (DDPM always uses all T)")
    p.add_argument("--eta", type=float, help="DDIM stochasticity: 0 deterministic (default), 1 DDPM-like")
    p.add_argument("--spacing", choices=["linspace", "logsnr"],
                   help="DDIM / DPM-Solver++ timesteps: even in t (default), or even in log-SNR")
    p.add_argument("--variance", choices=["fixed_small", "fixed_large"],
                   help="DDPM sigma_t^2: beta-tilde_t (fixed_small, default) or beta_t (fixed_large)")
    p.add_argument("--no-clip", action="store_true", help="do not clip the predicted x_0 to [-1, 1]")
    p.add_argument("-n", "--num-images", type=int, default=None, help="images (default 64), or per prompt (default 8)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--class-label", default=None, help="class-conditional models: the class to draw (its number, or "
                                                         "its name: a folder's class names are in the checkpoint)")
    p.add_argument("--prompt", action="append", default=None,
                   help="text-conditional models: what to draw (English or Chinese); repeat for more rows")
    p.add_argument("--guidance", type=float, help="conditional models: classifier-free guidance weight w (default 3)")
    p.add_argument("--autoguidance", type=float, default=None,
                   help="guide by the checkpoint's early EMA weights with this weight w (autoguidance; replaces "
                        "classifier-free guidance)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--out", default=None, help="PNG path (default: next to the checkpoint)")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    if a.num_images is not None and a.num_images < 1:
        p.error(f"-n/--num-images must be at least 1, got {a.num_images}")
    # an option that would do nothing is an error, not silently dropped (--steps 20 without --sampler: 1,000 steps)
    for flag, value, samplers, default in (("--steps", a.steps, ("ddim", "dpmsolver++"), 50),
                                           ("--eta", a.eta, ("ddim",), 0.0),
                                           ("--spacing", a.spacing, ("ddim", "dpmsolver++"), "linspace"),
                                           ("--variance", a.variance, ("ddpm",), "fixed_small")):
        if value is not None and a.sampler not in samplers:
            p.error(f"{flag} is for --sampler {' or '.join(samplers)}, not {a.sampler}")
        setattr(a, flag[2:], default if value is None else value)
    if a.guidance is not None and a.autoguidance is not None:
        p.error("--autoguidance replaces classifier-free guidance: give --guidance or --autoguidance, not both")
    group = process_group()                     # under mpiexec: each process draws its share of the batches
    try:
        if a.device == "cuda":
            group.use_gpu()
        model, schedule, meta = load_model(a.checkpoint, a.weights, a.device)
        guide = None if a.autoguidance is None else load_model(a.checkpoint, "guide", a.device)[0]
        y, nrow = None, None
        if a.prompt:
            if getattr(model, "tokenizer", None) is None:
                raise ValueError("--prompt needs a text-conditional checkpoint (trained with --text add|concat)")
            per = 8 if a.num_images is None else a.num_images
            ids = encode_prompts(model.tokenizer, a.prompt, model.cond.text_len)
            y, a.num_images, nrow = np.repeat(ids, per, axis=0), per * len(a.prompt), per
        a.num_images = 64 if a.num_images is None else a.num_images
        num_classes = getattr(getattr(model, "cond", None), "num_classes", None)
        if a.guidance is not None and getattr(model, "cond", None) is None:
            raise ValueError("--guidance is classifier-free guidance, for conditional models; this checkpoint is "
                             "unconditional (--autoguidance W guides it by its early EMA weights)")
        a.guidance = 3.0 if a.guidance is None else a.guidance
        if a.class_label is not None:
            y = np.full(a.num_images, class_index(model, meta, a.class_label))
        elif num_classes:                       # no class named: the first ten classes in turn, one per column
            nrow = min(10, num_classes)
            y = np.arange(a.num_images) % nrow
        out = a.out or os.path.join(os.path.dirname(os.path.abspath(a.checkpoint)),
                                    f"samples_{a.sampler}{'' if a.sampler == 'ddpm' else a.steps}"
                                    f"{'' if guide is None else f'_ag{a.autoguidance:g}'}_seed{a.seed}.png")
        t0 = time.perf_counter()
        imgs = sample(model, schedule, a.num_images, sampler=a.sampler, num_steps=a.steps, eta=a.eta,
                      variance_type=a.variance, clip_sample=not a.no_clip, seed=a.seed, batch_size=a.batch_size,
                      y=y, guidance=a.guidance if guide is None else a.autoguidance, timestep_spacing=a.spacing,
                      xp=get_xp(a.device), guide=guide, progress=not a.no_progress and group.main, group=group)
        dt = time.perf_counter() - t0
    except (CheckpointError, ValueError, RuntimeError) as e:
        group.fail(f"error: {e}")
    if not group.main:
        return
    save_grid(imgs, out, nrow=nrow)
    np.save(os.path.splitext(out)[0] + ".npy", imgs)
    print(f"step {meta['step']} checkpoint; {a.num_images} images in {dt:.1f} s ({dt / a.num_images:.3f} s/image); "
          f"wrote {out} and {os.path.splitext(out)[0]}.npy")


def class_index(model, meta, label):
    """The class index a --class-label names: a number, or one of the checkpoint's class names."""
    num_classes = getattr(getattr(model, "cond", None), "num_classes", None)
    if not num_classes:
        raise ValueError("--class-label needs a class-conditional checkpoint (trained with --class-conditional)")
    names = meta.get("class_names") or []
    if label in names:
        return names.index(label)
    if not label.isdigit() or not 0 <= int(label) < num_classes:
        known = f"; its classes: {', '.join(names)}" if names else ""
        raise ValueError(f"--class-label {label!r} is not a class of this model: give 0..{num_classes - 1}{known}")
    return int(label)


if __name__ == "__main__":
    main()
